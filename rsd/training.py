"""The one training loop of the RFSQ tokenizer, the main policy and the draft model.

Each trainer brings its model, its batches, its loss and its per-epoch evaluation; `train` brings what
they share: AdamW, the learning-rate schedule, optional gradient clipping, bf16 autocast, the progress
bar, the DVCLive curves and the rule for which epoch to keep (the best by a validation metric, or the last).

It is a hand-written loop, not a framework's (🤗 Accelerate, Lightning), on purpose:
- same inputs and seed give bit-identical weights on a CPU, and every random draw, operation and
  setting that decides them is in this one screen, in the order it runs;
- the three models are small (a few million parameters) and each trains on one CPU or one GPU;
- nothing trains on several GPUs yet; when something does, this is the one place to change.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol, TypeVar

import torch
from torch import Tensor, nn

from rsd.config import Config
from rsd.hardware import resolve_precision
from rsd.progress import Progress

Batch = TypeVar("Batch")

LR_SCHEDULES = ("constant", "cosine")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then a half cosine from 1 down to `floor` at step `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at step `step`: 1 throughout (`constant`, no warmup either)
    or `warmup_cosine` (`cosine`)."""
    if schedule == "constant":
        return 1.0
    return warmup_cosine(step, total_steps, warmup_steps, floor)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `num_threads` intra-op CPU threads (None: as they are), then restore the
    caller's setting. Float reductions may split differently with another count, so a trainer runs
    everything its results depend on (data preparation, training, evaluation) inside one such block."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Live(Protocol):
    """What the loop uses of a `dvclive.Live`."""

    def log_metric(self, name: str, value: float) -> None: ...

    def next_step(self) -> None: ...


@dataclass
class LoopConfig(Config):
    """What the three trainers set differently in the loop (built by them, not read from params.yaml)."""

    prefix: ClassVar[str] = "training"

    name: str
    """What is trained (`tokenizer`, `policy`, `draft`): names the progress bar and the logger `rsd.<name>`."""
    epochs: int
    """Passes of `batches(epoch)`; a step-based trainer runs one."""
    steps_per_epoch: int
    """Optimizer steps per epoch: with `epochs`, the length the schedule decays over."""
    lr: float
    """AdamW peak learning rate."""
    weight_decay: float
    """AdamW decoupled weight decay."""
    lr_schedule: str = "cosine"
    """`cosine` (`warmup_cosine`) or `constant` (no warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps of the cosine schedule."""
    lr_floor: float = 0.0
    """Share of the peak learning rate the cosine ends at."""
    clip_grad_norm: float | None = None
    """Largest gradient norm before each step (None: no clipping)."""
    precision: str = "fp32"
    """`bf16`: the loss function runs under bfloat16 autocast, weights and optimizer stay float32; `fp32`;
    `auto`: bf16 where it runs natively (`rsd.hardware`), else fp32."""
    device_type: str = "cpu"
    """Device type of the autocast (`cpu`, `cuda`): where the model is."""
    best_metric: str | None = None
    """Evaluation metric whose highest value picks the epoch kept, its states copied to the CPU; None
    keeps the last epoch (the model as trained)."""
    progress: bool = True
    """Show the progress bar."""

    def validate(self) -> None:
        self.check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", " or ".join(map(repr, LR_SCHEDULES)))
        self.check(self.precision in PRECISIONS, "precision", PRECISIONS_EXPECTED)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


PRECISIONS = ("auto", "bf16", "fp32")
PRECISIONS_EXPECTED = "'auto', 'bf16' or 'fp32'"


@dataclass
class Kept:
    """The epoch `train` keeps, with its evaluation, and with `best_metric` set its states (CPU copies)."""

    epoch: int
    metrics: dict[str, float]
    model_state: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None


def cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a (model or optimizer) state dict, every tensor on the CPU: later steps update the
    originals in place. The copy keeps the dicts' types and metadata, so it saves to the same bytes."""

    def to_cpu(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.cpu()
        if isinstance(value, dict):
            for key in value:
                value[key] = to_cpu(value[key])
        elif isinstance(value, list):
            value[:] = [to_cpu(v) for v in value]
        return value

    return to_cpu(copy.deepcopy(state))


def train(model: nn.Module, batches: Callable[[int], Iterable[Batch]], loss_fn: Callable[[Batch], Tensor],
          config: LoopConfig, evaluate: Callable[[int], dict[str, float]] | None = None,
          live: Live | None = None) -> Kept:
    """Train `model` on `batches(epoch)` for epochs 1..config.epochs and return the epoch kept.

    `loss_fn(batch)` runs the forward pass and returns the loss (under autocast with `bf16`); it may
    tally what its trainer reports. `evaluate(epoch)`, after every epoch, logs its line and returns the
    numbers for DVCLive (`live`, one step per epoch) and for `config.best_metric`. The model is left in
    eval mode. Random draws happen in the order `batches`, `loss_fn` and `evaluate` make them.
    """
    log = logging.getLogger(f"rsd.{config.name}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        config.lr_schedule, step, config.total_steps, config.warmup_steps, config.lr_floor))
    kept, best = Kept(config.epochs, {}), -math.inf
    bf16 = resolve_precision(config.precision, config.device_type) == "bf16"
    log.info("training in %s (precision: %s)", "bf16 autocast" if bf16 else "fp32", config.precision)
    with Progress(config.total_steps, config.name, enabled=config.progress) as bar:
        for epoch in range(1, config.epochs + 1):
            model.train()
            for batch in batches(epoch):
                with torch.autocast(config.device_type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                bar.update(1, epoch=epoch, loss=f"{loss.item():.4f}")
            if evaluate is None:
                continue
            metrics = evaluate(epoch)
            if live is not None:
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.next_step()
            if config.best_metric is None:
                kept = Kept(epoch, metrics)
            elif metrics[config.best_metric] > best:
                best = metrics[config.best_metric]
                kept = Kept(epoch, metrics, cpu_copy(model.state_dict()), cpu_copy(optimizer.state_dict()))
                log.info("Best model saved: %.3f", best)
    model.eval()
    if config.best_metric is not None and kept.model_state is None:
        raise ValueError(f"no epoch of {config.name} training had a {config.best_metric} to keep (NaN every epoch?)")
    return kept
