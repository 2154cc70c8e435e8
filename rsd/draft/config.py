"""Configuration of the draft model, of its training, and of the bar its checkpoint must clear.

Three dataclasses because they live in three places: `DraftConfig` travels inside the checkpoint (the
model rebuilds from it alone), `DraftTrainConfig` is params.yaml's `train` section (with the model's
fields under `train.model`), and `VerifyConfig` is its `verify` section, so that moving the accuracy
bar re-runs only the verify stage, never training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rsd.config import Config
from rsd.contract import CHUNK_LEN, LATENT_DIM, LEVELS, NUM_COARSE_LAYERS
from rsd.training import LR_SCHEDULES, PRECISIONS, PRECISIONS_EXPECTED


@dataclass
class DraftConfig(Config):
    """The draft model's shape: main policy hidden state [input_dim] -> coarse-code logits
    [num_coarse_layers, chunk_len * latent_dim, levels]. Saved inside every draft checkpoint."""

    prefix: ClassVar[str] = "train.model"

    input_dim: int
    """H, the main policy's hidden size (4096 for OpenVLA, 256 for this repo's CPU policy)."""
    hidden_dim: int = 512
    """Width of the projected hidden state, the queries and the decoder layer (d_model)."""
    num_coarse_layers: int = NUM_COARSE_LAYERS
    """Residual layers the draft proposes, from layer 0 up (collect records this many)."""
    num_heads: int = 8
    """Attention heads of the decoder layer; must divide hidden_dim."""
    ff_dim: int = 512
    """Width of the decoder layer's feed-forward block. 512 (not torch's 2048) keeps the model near
    4.7M parameters at input_dim=4096 and its CPU latency near a millisecond."""
    chunk_len: int = CHUNK_LEN
    """Timesteps per action chunk: one query token per (coarse layer, timestep). rsd.contract's; kept
    so that a checkpoint says what it was built for."""
    latent_dim: int = LATENT_DIM
    """RFSQ latent dims per timestep: each query token predicts this many codes. rsd.contract's, like chunk_len."""
    levels: int = LEVELS
    """Levels per code (codes 0..levels-1), the RFSQ tokenizer's."""
    dropout: float = 0.1
    """Dropout inside the decoder layer, during training only."""
    condition_on_layer0: bool = False
    """Read main's layer-0 codes besides the hidden state (they are exact after the prefill, before the
    draft runs, as an EAGLE draft reads the sampled token beside the target's feature): their summed
    (position, code) embedding is added to the projected hidden state. Main's later layers follow its
    layer 0 code for code, so the draft need not guess it first."""

    def validate(self) -> None:
        """Refuse a config that would build a broken model (checkpoints are checked through here too)."""
        for name in ("input_dim", "hidden_dim", "num_coarse_layers", "num_heads", "ff_dim"):
            self.check(getattr(self, name) >= 1, name, "a positive int")
        self.check(self.chunk_len == CHUNK_LEN, "chunk_len",
                   f"{CHUNK_LEN} (rsd.contract.CHUNK_LEN, which the main policy and the engine assume)")
        self.check(self.latent_dim == LATENT_DIM, "latent_dim",
                   f"{LATENT_DIM} (rsd.contract.LATENT_DIM, which the main policy and the engine assume)")
        self.check(self.hidden_dim % self.num_heads == 0, "num_heads", f"a divisor of hidden_dim={self.hidden_dim}")
        self.check(self.levels >= 2, "levels", "an int >= 2")
        self.check(0 <= self.dropout < 1, "dropout", "a number in [0, 1)")

    @property
    def codes_per_layer(self) -> int:
        """Codes of one residual layer: chunk_len x latent_dim, flattened timestep-major (t * latent_dim + d)."""
        return self.chunk_len * self.latent_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as stored in checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DraftConfig:
        """Inverse of `to_dict`; a non-dict, an unknown or a missing field is a ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a DraftConfig must come from a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown DraftConfig field(s): {unknown}")
        if "input_dim" not in data:
            raise ValueError("DraftConfig.input_dim is missing")
        return cls(**data)


@dataclass
class DraftTrainConfig(Config):
    """How the draft is trained, and its architecture (params.yaml `train`). The defaults are the
    reference recipe that profiles/full.yaml runs: 50 epochs at batch size 32 and a constant lr of 1e-4."""

    prefix: ClassVar[str] = "train"

    model: dict[str, Any] = field(default_factory=dict)
    """The draft's architecture: DraftConfig fields other than input_dim, which is the samples' hidden size."""
    epochs: int = 50
    """Passes over the training samples; the best epoch by validation accuracy is kept."""
    batch_size: int = 32
    """Samples per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate: the constant one, or the peak of the cosine schedule (`dvc exp run -S
    train.lr=...` sets it)."""
    lr_schedule: str = "constant"
    """`constant` (the reference recipe) or `cosine`: linear warmup over the first 5% of the steps, then a
    half cosine down to 0 at the last step (the same epochs reach a higher validation accuracy)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (torch's default)."""
    distill_weight: float = 0.0
    """Weight of distillation beside the hard-code cross entropy: the KL divergence from main's probabilities of
    each coarse code (recorded by collect) to the draft's, per code. 0 trains on main's codes alone."""
    val_fraction: float = 0.1
    """Share of EPISODES held out for validation: consecutive calls of one episode see near-identical
    hidden states, so a split by sample would leak validation into training."""
    precision: str = "auto"
    """`bf16`: forward passes under bfloat16 autocast, weights and optimizer in float32 (~1.7x faster
    training on a CPU with AVX512-BF16 or AMX, or a GPU; ~11x slower for the policy on a CPU without,
    where torch emulates it); `fp32`: all in float32; `auto`: bf16 where it runs natively, else fp32
    (rsd.hardware)."""
    seed: int = 0
    """Seeds the split, the initialisation, dropout and the batch order: same seed, same checkpoint."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            self.check(getattr(self, name) >= 1, name, "a positive int")
        self.check(self.lr > 0, "lr", "a number > 0")
        self.check(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        self.check(self.distill_weight >= 0, "distill_weight", "a number >= 0")
        self.check(0 < self.val_fraction < 1, "val_fraction", "a number in (0, 1)")
        self.check(self.precision in PRECISIONS, "precision", PRECISIONS_EXPECTED)
        self.check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", " or ".join(map(repr, LR_SCHEDULES)))
        self.draft_config(input_dim=1)  # the real input_dim comes with the samples

    def draft_config(self, input_dim: int) -> DraftConfig:
        """The DraftConfig of `model` for a main policy of hidden size `input_dim`; a bad `model` field is a
        ValueError that names it (`train.model.<field>`)."""
        known = {f.name for f in dataclasses.fields(DraftConfig)}
        for key in self.model:
            if key == "input_dim":
                raise ValueError(f"{self.prefix}.model.input_dim cannot be set: it is the main policy's hidden "
                                 "size, read from the draft samples")
            if key not in known:
                raise ValueError(f"{self.prefix}.model.{key} is not a DraftConfig field; known: "
                                 f"{', '.join(sorted(known - {'input_dim'}))}")
        return DraftConfig(input_dim=input_dim, **self.model)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup of the cosine schedule over `total_steps`: the first 5% of the steps, at least one."""
        return max(1, round(0.05 * total_steps))


@dataclass
class VerifyConfig(Config):
    """The bar a draft checkpoint must clear (params.yaml `verify`)."""

    prefix: ClassVar[str] = "verify"

    min_val_accuracy: float = 0.85
    """Least validation accuracy (share of coarse codes equal to the main policy's, averaged over the
    coarse layers) a checkpoint may have; 0.85 is the project's target for a trained draft."""

    def validate(self) -> None:
        self.check(0 <= self.min_val_accuracy <= 1, "min_val_accuracy", "a number in [0, 1]")
