"""Configuration of the draft model, of its training, and of the bar its checkpoint must clear.

Three dataclasses because they live in three places: `DraftConfig` travels inside the checkpoint (the
model rebuilds from it alone), `DraftTrainConfig` is params.yaml's `train` section, and `VerifyConfig`
is its `verify` section, so that moving the accuracy bar re-runs only the verify stage, never training.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from rsd.data import CHUNK_LEN
from rsd.lr_schedule import warmup_cosine


def _check(condition: bool, name: str, expected: str, value: Any) -> None:
    """Raise a ValueError that names the field, what it must be and what it was."""
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DraftConfig:
    """The draft model's shape: main policy hidden state [input_dim] -> coarse-code logits
    [num_coarse_layers, chunk_len * latent_dim, levels]. Saved inside every draft checkpoint."""

    input_dim: int
    """H, the main policy's hidden size (4096 for OpenVLA, 256 for this repo's CPU policy)."""
    hidden_dim: int = 512
    """Width of the projected hidden state, the queries and the decoder layer (d_model)."""
    num_coarse_layers: int = 3
    """Residual layers the draft proposes, from layer 0 up; the pipeline's contract is 3."""
    num_heads: int = 8
    """Attention heads of the decoder layer; must divide hidden_dim."""
    ff_dim: int = 512
    """Width of the decoder layer's feed-forward block. 512 (not torch's 2048) keeps the model near
    4.7M parameters at input_dim=4096 and its CPU latency near a millisecond."""
    chunk_len: int = CHUNK_LEN
    """Timesteps per action chunk: one query token per (coarse layer, timestep)."""
    latent_dim: int = 16
    """RFSQ latent dims per timestep: each query token predicts this many codes."""
    levels: int = 7
    """Levels per code (codes 0..levels-1), the RFSQ tokenizer's."""
    dropout: float = 0.1
    """Dropout inside the decoder layer, during training only."""

    def __post_init__(self) -> None:
        """Reject a config that would build a broken model (checkpoints are checked through here too)."""
        for name in ("input_dim", "hidden_dim", "num_coarse_layers", "num_heads", "ff_dim", "chunk_len", "latent_dim"):
            _check(_positive_int(getattr(self, name)), f"DraftConfig.{name}", "a positive int", getattr(self, name))
        _check(self.hidden_dim % self.num_heads == 0, "DraftConfig.num_heads",
               f"a divisor of hidden_dim={self.hidden_dim}", self.num_heads)
        _check(_positive_int(self.levels) and self.levels >= 2, "DraftConfig.levels", "an int >= 2", self.levels)
        _check(_number(self.dropout) and 0 <= self.dropout < 1, "DraftConfig.dropout", "a number in [0, 1)",
               self.dropout)

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


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return 1.0
    return warmup_cosine(step, total_steps, warmup_steps=max(1, round(0.05 * total_steps)))


@dataclass
class DraftTrainConfig:
    """How the draft is trained (params.yaml `train`). The defaults are the original recipe:
    `--epochs 50 --batch-size 32 --learning-rate 1e-4`."""

    epochs: int = 50
    """Passes over the training samples; the best epoch by validation accuracy is kept."""
    batch_size: int = 32
    """Samples per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate: the constant one, or the peak of the cosine schedule (`dvc exp run -S
    train.lr=...` sets it)."""
    lr_schedule: str = "constant"
    """`constant` (the recipe) or `cosine`: linear warmup over the first 5% of the steps, then a half
    cosine down to 0 at the last step (the same epochs reach a higher validation accuracy)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (torch's default)."""
    val_fraction: float = 0.1
    """Share of EPISODES held out for validation: consecutive calls of one episode see near-identical
    hidden states, so a split by sample would leak validation into training."""
    precision: str = "bf16"
    """`bf16`: forward passes under bfloat16 autocast, weights and optimizer in float32 (~1.7x faster on
    a CPU with AVX512-BF16, or a recent GPU); `fp32`: all in float32."""
    seed: int = 0
    """Seeds the split, the initialisation, dropout and the batch order: same seed, same checkpoint."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            _check(_positive_int(value), f"DraftTrainConfig.{name}", "a positive int", value)
        _check(_number(self.lr) and self.lr > 0, "DraftTrainConfig.lr", "a number > 0", self.lr)
        _check(_number(self.weight_decay) and self.weight_decay >= 0, "DraftTrainConfig.weight_decay",
               "a number >= 0", self.weight_decay)
        _check(_number(self.val_fraction) and 0 < self.val_fraction < 1, "DraftTrainConfig.val_fraction",
               "a number in (0, 1)", self.val_fraction)
        _check(self.precision in ("bf16", "fp32"), "DraftTrainConfig.precision", "'bf16' or 'fp32'", self.precision)
        _check(self.lr_schedule in LR_SCHEDULES, "DraftTrainConfig.lr_schedule", " or ".join(map(repr, LR_SCHEDULES)),
               self.lr_schedule)
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "DraftTrainConfig.seed", "an int",
               self.seed)


@dataclass
class VerifyConfig:
    """The bar a draft checkpoint must clear (params.yaml `verify`)."""

    min_val_accuracy: float = 0.85
    """Least validation accuracy (share of coarse codes equal to the main policy's, averaged over the
    coarse layers) a checkpoint may have; the original checklist's target is "val > 85%"."""

    def __post_init__(self) -> None:
        _check(_number(self.min_val_accuracy) and 0 <= self.min_val_accuracy <= 1, "VerifyConfig.min_val_accuracy",
               "a number in [0, 1]", self.min_val_accuracy)
