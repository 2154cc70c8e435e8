"""Configuration of the RFSQ action tokenizer: its shapes, its width and how it is trained."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rsd.data import ACTION_DIM, CHUNK_LEN


@dataclass
class TokenizerConfig:
    """Everything needed to rebuild and retrain an RFSQ tokenizer; saved inside its checkpoint.

    A chunk `[chunk_len, action_dim]` is encoded to a latent `[latent_len, latent_dim]`; every latent
    scalar is quantized by a residual FSQ of `num_layers` layers of `levels` levels each, so a chunk
    becomes `[latent_len, latent_dim, num_layers]` codes in `0..levels-1`.
    """

    # Shapes (the pipeline's contract: [8, 7] chunks, [8, 16] latents, 7 levels).
    chunk_len: int = CHUNK_LEN  # actions per chunk, executed open loop
    action_dim: int = ACTION_DIM  # xyz delta, rotation delta, gripper; fixed by the demo format
    latent_len: int = 8  # latent rows; latent_len * latent_dim codes per residual layer
    latent_dim: int = 16  # latent columns
    levels: int = 7  # FSQ levels per scalar and layer; odd, so "no correction" (0) is a level
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

    def __post_init__(self) -> None:
        """Reject a config that would build a broken model or train on nothing, naming the field."""
        for name in ("chunk_len", "latent_len", "latent_dim", "num_layers", "hidden_dim", "num_hidden_layers",
                     "steps", "batch_size"):
            _check(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "a positive int")
        _check(self, "action_dim", self.action_dim == ACTION_DIM, f"{ACTION_DIM} (the demo format)")
        _check(self, "levels", _is_int(self.levels) and self.levels >= 3 and self.levels % 2 == 1, "an odd int >= 3")
        _check(self, "warmup_steps", _is_int(self.warmup_steps) and 0 <= self.warmup_steps < self.steps,
               f"an int in [0, steps={self.steps})")
        _check(self, "lr", _is_real(self.lr) and self.lr > 0, "> 0")
        _check(self, "weight_decay", _is_real(self.weight_decay) and self.weight_decay >= 0, ">= 0")
        _check(self, "first_layer_loss_weight", _is_real(self.first_layer_loss_weight)
               and self.first_layer_loss_weight > 0, "> 0")
        _check(self, "fine_residual_weight", _is_real(self.fine_residual_weight) and self.fine_residual_weight >= 0,
               ">= 0")
        _check(self, "val_fraction", _is_real(self.val_fraction) and 0 < self.val_fraction < 1, "in (0, 1)")
        _check(self, "seed", _is_int(self.seed), "an int")


def _is_int(value: object) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float (NaN fails every comparison, so it is caught by the range checks too)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check(config: TokenizerConfig, name: str, ok: bool, expected: str) -> None:
    """Raise the ValueError that names the offending field, what it must be and what it was."""
    if not ok:
        raise ValueError(f"TokenizerConfig.{name} must be {expected}, got {getattr(config, name)!r}")
