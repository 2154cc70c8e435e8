"""Configuration of the RFSQ action tokenizer: its shapes, its width and how it is trained."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rsd.config import Config
from rsd.contract import ACTION_DIM, CHUNK_LEN, LATENT_DIM, LEVELS


@dataclass
class TokenizerConfig(Config):
    """Everything needed to rebuild and retrain an RFSQ tokenizer; saved inside its checkpoint.

    A chunk `[chunk_len, action_dim]` is encoded to a latent `[latent_len, latent_dim]`; every latent
    scalar is quantized by a residual FSQ of `num_layers` layers of `levels` levels each, so a chunk
    becomes `[latent_len, latent_dim, num_layers]` codes in `0..levels-1`.
    """

    prefix: ClassVar[str] = "tokenizer"

    # Shapes. The chunk and latent shapes are rsd.contract's: the main policy, the draft and the engine
    # assume them, so other values are refused; they stay fields so that a checkpoint says what it was built for.
    chunk_len: int = CHUNK_LEN  # actions per chunk, executed open loop
    action_dim: int = ACTION_DIM  # xyz delta, rotation delta, gripper; fixed by the demo format
    latent_len: int = CHUNK_LEN  # latent rows, one per chunk step; latent_len * latent_dim codes per residual layer
    latent_dim: int = LATENT_DIM  # latent columns
    levels: int = LEVELS  # FSQ levels per scalar and layer; odd, so "no correction" (0) is a level
    # Residual layers L; the first 3 are the coarse ones a draft proposes. 4 is the fewest that leaves a fine
    # layer to verify; on synthetic expert-like demos layers past the 3rd barely lower the error (~0.005).
    num_layers: int = 4

    # Model width.
    hidden_dim: int = 256  # width of the encoder's and decoder's hidden layers
    num_hidden_layers: int = 2  # hidden layers in each of encoder and decoder

    # Training.
    steps: int = 4000  # optimizer steps (a fixed count keeps training time independent of data size)
    batch_size: int = 256  # chunks per step
    lr: float = 6e-3  # AdamW peak learning rate, after warmup and before cosine decay to zero
    warmup_steps: int = 200  # linear warmup steps
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    first_layer_loss_weight: float = 0.5  # loss weight of the 1-layer prefix; every other prefix weighs 1
    # L1 weight on what the layers before each of layers 1..L-2 leave over (latent units). Without it a fine
    # layer's codes are the next "digits" of a continuous latent, uniform over the levels (perplexity 7.0):
    # noise that neither the main policy nor a draft can predict. With it most fine codes mean "no correction"
    # and the rest follow the action; the last layer stays free to take up what is left.
    fine_residual_weight: float = 0.0
    val_fraction: float = 0.1  # share of EPISODES held out for the metrics (chunks of one episode overlap)
    seed: int = 0  # seeds the split, the initialization and the batches

    def validate(self) -> None:
        """Refuse a config that would build a broken model, or one the rest of the pipeline cannot use."""
        for name, value, what in (("chunk_len", CHUNK_LEN, "CHUNK_LEN"), ("action_dim", ACTION_DIM, "ACTION_DIM"),
                                  ("latent_len", CHUNK_LEN, "CHUNK_LEN"), ("latent_dim", LATENT_DIM, "LATENT_DIM")):
            self.check(getattr(self, name) == value, name, f"{value} (rsd.contract.{what}, which the main policy, "
                       "the draft and the engine assume)")
        self.check(self.levels >= 3 and self.levels % 2 == 1, "levels", "an odd int >= 3")
        for name in ("num_layers", "hidden_dim", "num_hidden_layers", "steps", "batch_size"):
            self.check(getattr(self, name) >= 1, name, "a positive int")
        self.check(0 <= self.warmup_steps < self.steps, "warmup_steps", f"an int in [0, steps={self.steps})")
        self.check(self.lr > 0, "lr", "> 0")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(self.first_layer_loss_weight > 0, "first_layer_loss_weight", "> 0")
        self.check(self.fine_residual_weight >= 0, "fine_residual_weight", ">= 0")
        self.check(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)")
