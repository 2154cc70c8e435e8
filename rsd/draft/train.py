"""Train the draft model to reproduce the main policy's coarse codes from its hidden state.

The log follows the original checklist line for line (`Model created: 4.7M parameters`, one
`Epoch e/E | Train Loss ... | Val Acc: L0=... | Avg=...` line per epoch, `Best model saved: 0.892`,
`Training Complete! ...`), so runs compare with the user's expectations at a glance.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rsd.draft.config import DraftConfig, DraftTrainConfig, lr_factor
from rsd.draft.model import FORMAT_VERSION, RFSQDraftModelWithProjection, num_parameters
from rsd.draft.samples import DraftSamples
from rsd.io import save_torch
from rsd.progress import Progress

if TYPE_CHECKING:
    from dvclive import Live

log = logging.getLogger("rsd.draft")

EVAL_BATCH_SIZE = 512  # validation needs no gradients: big batches are cheaper per sample


def coarse_targets(coarse_tokens: Tensor, num_layers: int) -> Tensor:
    """Samples' tokens [N, 8, 16, C] -> codes of the first `num_layers` layers [N, num_layers, 128],
    each layer flattened timestep-major (t * 16 + d), as the main policy and the draft order them."""
    return coarse_tokens[..., :num_layers].permute(0, 3, 1, 2).flatten(2)


def check_compatible(samples: DraftSamples, config: DraftConfig) -> None:
    """Refuse samples the configured model cannot learn from, naming what differs."""
    _, chunk_len, latent_dim, layers = samples.coarse_tokens.shape
    problems = []
    if samples.hidden_size != config.input_dim:
        problems.append(f"hidden size {samples.hidden_size} vs input_dim={config.input_dim}")
    if (chunk_len, latent_dim) != (config.chunk_len, config.latent_dim):
        problems.append(f"tokens of {chunk_len}x{latent_dim} codes per layer vs chunk_len={config.chunk_len}, "
                        f"latent_dim={config.latent_dim}")
    if layers < config.num_coarse_layers:
        problems.append(f"{layers} coarse layers vs num_coarse_layers={config.num_coarse_layers}")
    top = int(samples.coarse_tokens.max())
    if top >= config.levels:
        problems.append(f"codes up to {top} vs levels={config.levels}")
    if problems:
        raise ValueError("the draft samples do not fit the draft config: " + "; ".join(problems))


class Tally:
    """Running sums of loss and of correct codes per layer, over samples, for one pass over a split."""

    def __init__(self, num_layers: int) -> None:
        self.loss_sum, self.samples = 0.0, 0
        self.correct = torch.zeros(num_layers)  # [C] codes equal to the target
        self.exact = torch.zeros(num_layers)  # [C] samples whose whole layer equals the target
        self.codes_per_layer = 0

    def add(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        """logits [B, C, 128, K], target [B, C, 128], loss the batch's mean cross entropy."""
        match = (logits.argmax(dim=-1) == target).cpu()  # [B, C, 128]
        self.loss_sum += loss.item() * len(target)
        self.samples += len(target)
        self.correct += match.sum(dim=(0, 2))
        self.exact += match.all(dim=2).sum(dim=0)
        self.codes_per_layer = target.shape[2]

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples

    @property
    def accuracy(self) -> list[float]:
        """Share of codes equal to the target, per layer."""
        return (self.correct / (self.samples * self.codes_per_layer)).tolist()

    @property
    def exact_match(self) -> list[float]:
        """Share of samples whose whole layer equals the target, per layer: what strict acceptance needs."""
        return (self.exact / self.samples).tolist()


@torch.no_grad()
def evaluate(model: RFSQDraftModelWithProjection, hidden: Tensor, targets: Tensor, device: torch.device) -> Tally:
    """Loss, accuracy and exact match of `model` (eval mode) on hidden [N, H] and targets [N, C, 128]."""
    model.eval()
    tally = Tally(targets.shape[1])
    for start in range(0, len(hidden), EVAL_BATCH_SIZE):
        x = hidden[start:start + EVAL_BATCH_SIZE].to(device, torch.float32)  # [B, H]
        y = targets[start:start + EVAL_BATCH_SIZE].to(device, torch.long)  # [B, C, 128]
        logits = model(x)  # [B, C, 128, K]
        tally.add(logits, y, F.cross_entropy(logits.flatten(0, 2), y.flatten()))
    return tally


def save_checkpoint(path: str | os.PathLike, model: RFSQDraftModelWithProjection, optimizer: torch.optim.Optimizer,
                    epoch: int, val: Tally) -> None:
    """The draft checkpoint (`model.REQUIRED_KEYS`, nothing else), atomically: weights, optimizer state for
    resuming, the epoch and its validation numbers, and the config that rebuilds the model."""
    accuracies = val.accuracy
    save_torch(path, {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": epoch,
        "val_accuracy": sum(accuracies) / len(accuracies),
        "val_accuracies_per_layer": accuracies,
        "config": model.config.to_dict(),
        "layer_exact_match": val.exact_match,
        "format_version": FORMAT_VERSION,
    })


def _layers(values: list[float]) -> str:
    return " ".join(f"L{i}={v:.3f}" for i, v in enumerate(values))


def train_draft(samples: DraftSamples, model_config: DraftConfig, train_config: DraftTrainConfig,
                checkpoint_path: str | os.PathLike, live: Live | None = None,
                device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train a draft on `samples`, keeping at `checkpoint_path` the epoch with the best average validation
    accuracy; return the run's metrics (for metrics/train.json).

    Cross entropy over all coarse codes, AdamW at a constant or cosine learning rate, validation on held-out
    episodes after every epoch. `live` (a `dvclive.Live`) gets the same numbers as the log, one step
    per epoch. Same seed, same device and thread count -> same checkpoint.
    """
    start_time = time.perf_counter()
    check_compatible(samples, model_config)
    device = torch.device(device)
    C = model_config.num_coarse_layers
    train_idx, val_idx = samples.split_by_episode(train_config.val_fraction, train_config.seed)
    targets = coarse_targets(samples.coarse_tokens, C)  # uint8 [N, C, 128]
    val_hidden, val_targets = samples.hidden_state[val_idx], targets[val_idx]  # [M, H], [M, C, 128]

    torch.manual_seed(train_config.seed)  # initialisation and dropout
    model = RFSQDraftModelWithProjection(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    generator = torch.Generator().manual_seed(train_config.seed)  # batch order
    parameters = num_parameters(model)
    log.info("Model created: %.1fM parameters", parameters / 1e6)
    log.info("Train samples: %s", f"{len(train_idx):,}")
    log.info("Val samples: %s", f"{len(val_idx):,}")

    E, B = train_config.epochs, train_config.batch_size
    steps_per_epoch = -(-len(train_idx) // B)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(train_config.lr_schedule, step, E * steps_per_epoch))
    best: dict[str, Any] = {"val_accuracy": -1.0}
    for epoch in range(1, E + 1):
        model.train()
        train = Tally(C)
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        with Progress(steps_per_epoch, f"draft epoch {epoch}/{E}") as bar:
            for start in range(0, len(order), B):
                idx = order[start:start + B]
                x = samples.hidden_state[idx].to(device, torch.float32)  # [B, H]
                y = targets[idx].to(device, torch.long)  # [B, C, 128]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_config.precision == "bf16"):
                    logits = model(x).float()  # [B, C, 128, K]
                loss = F.cross_entropy(logits.flatten(0, 2), y.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                train.add(logits.detach(), y, loss)
                bar.update(1, loss=f"{loss.item():.3f}")

        val = evaluate(model, val_hidden, val_targets, device)
        val_avg = sum(val.accuracy) / C
        log.info("Epoch %d/%d | Train Loss: %.3f | Train Acc: %s | Val Loss: %.3f | Val Acc: %s | Avg=%.3f",
                 epoch, E, train.loss, _layers(train.accuracy), val.loss, _layers(val.accuracy), val_avg)
        if live is not None:
            live.log_metric("train/loss", train.loss)
            live.log_metric("val/loss", val.loss)
            for layer in range(C):
                live.log_metric(f"train/acc_L{layer}", train.accuracy[layer])
                live.log_metric(f"val/acc_L{layer}", val.accuracy[layer])
                live.log_metric(f"val/exact_match_L{layer}", val.exact_match[layer])
            live.log_metric("val/acc_avg", val_avg)
            live.next_step()
        if val_avg > best["val_accuracy"]:
            save_checkpoint(checkpoint_path, model, optimizer, epoch, val)
            best = {"val_accuracy": val_avg, "per_layer": val.accuracy, "exact": val.exact_match, "epoch": epoch}
            log.info("Best model saved: %.3f", val_avg)

    log.info("Training Complete! Best Val Accuracy: %.3f", best["val_accuracy"])
    return {
        "best_val_accuracy": best["val_accuracy"],
        "val_accuracies_per_layer": best["per_layer"],
        "layer_exact_match": best["exact"],
        "best_epoch": best["epoch"],
        "epochs": E,
        "parameters": parameters,
        "train_samples": len(train_idx),
        "val_samples": len(val_idx),
        "train_seconds": time.perf_counter() - start_time,
    }
