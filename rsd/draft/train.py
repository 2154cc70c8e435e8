"""Train the draft model to reproduce the main policy's coarse codes from its hidden state.

The log lines are the ones users compare runs by: `Model created: 4.7M parameters`, `Train samples`,
`Val samples`, one `Epoch e/E | Train Loss ... | Val Acc: L0=... | Avg=...` line per epoch, `Best model
saved: 0.892` whenever an epoch beats the ones before, and `Training Complete! Best Val Accuracy: ...`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from rsd.draft.config import DraftConfig, DraftTrainConfig
from rsd.draft.model import FORMAT_VERSION, RFSQDraftModelWithProjection, num_parameters
from rsd.draft.samples import DraftSamples
from rsd.hardware import resolve_precision
from rsd.training import Live, LoopConfig, train

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
        logits = model(x, y[:, 0])  # [B, C, 128, K]; layer 0 is read only by a draft conditioned on it
        tally.add(logits, y, F.cross_entropy(logits.flatten(0, 2), y.flatten()))
    return tally


def build_checkpoint(model_state: dict[str, Any], optimizer_state: dict[str, Any], config: DraftConfig, epoch: int,
                     val: Tally) -> dict[str, Any]:
    """The draft checkpoint (`model.REQUIRED_KEYS`, nothing else, in that order): weights, optimizer state
    for resuming, the epoch and its validation numbers, and the config that rebuilds the model.
    `rsd.io.save_torch` writes it."""
    accuracies = val.accuracy
    return {
        "model_state_dict": model_state,
        "optimizer_state_dict": optimizer_state,
        "epoch": epoch,
        "val_accuracy": sum(accuracies) / len(accuracies),
        "val_accuracies_per_layer": accuracies,
        "config": config.to_dict(),
        "layer_exact_match": val.exact_match,
        "format_version": FORMAT_VERSION,
    }


def _layers(values: list[float]) -> str:
    return " ".join(f"L{i}={v:.3f}" for i, v in enumerate(values))


def train_draft(samples: DraftSamples, config: DraftTrainConfig, live: Live | None = None,
                device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a draft on `samples`; return the checkpoint of the epoch with the best average validation
    accuracy (`build_checkpoint`, on the CPU) and the run's metrics (for metrics/train.json). Nothing is
    written: the caller saves the checkpoint (`rsd.io.save_torch`).

    Cross entropy over all coarse codes (plus, with `distill_weight`, the KL divergence from main's recorded
    probabilities), AdamW at a constant or cosine learning rate, validation on held-out episodes after every
    epoch. `live` (a `dvclive.Live`) gets the same numbers as the log, one step
    per epoch. Same seed, same device and thread count -> same checkpoint.
    """
    start_time = time.perf_counter()
    model_config = config.draft_config(input_dim=samples.hidden_size)
    check_compatible(samples, model_config)
    device = torch.device(device)
    C = model_config.num_coarse_layers
    train_idx, val_idx = samples.split_by_episode(config.val_fraction, config.seed)
    targets = coarse_targets(samples.coarse_tokens, C)  # uint8 [N, C, 128]
    main_probs = samples.coarse_probs[:, :C]  # float16 [N, C, 128, K]
    val_hidden, val_targets = samples.hidden_state[val_idx], targets[val_idx]  # [M, H], [M, C, 128]

    torch.manual_seed(config.seed)  # initialisation and dropout
    model = RFSQDraftModelWithProjection(model_config).to(device)
    generator = torch.Generator().manual_seed(config.seed)  # batch order
    parameters = num_parameters(model)
    log.info("Model created: %.1fM parameters", parameters / 1e6)
    log.info("Train samples: %s", f"{len(train_idx):,}")
    log.info("Val samples: %s", f"{len(val_idx):,}")

    E, B = config.epochs, config.batch_size
    steps_per_epoch = -(-len(train_idx) // B)  # the last batch may be short
    train_tally = Tally(C)  # the current epoch's training batches
    val_tallies: dict[int, Tally] = {}

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        nonlocal train_tally
        train_tally = Tally(C)
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            x = samples.hidden_state[idx].to(device, torch.float32)  # [B, H]
            y = targets[idx].to(device, torch.long)  # [B, C, 128]
            p = main_probs[idx].to(device, torch.float32)  # [B, C, 128, K]
            yield x, y, p

    def loss_fn(batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, p = batch
        logits = model(x, y[:, 0]).float()  # [B, C, 128, K]
        with torch.autocast(device.type, enabled=False):  # the losses in float32, outside the bf16 forward pass
            hard = F.cross_entropy(logits.flatten(0, 2), y.flatten())
            loss = hard
            if config.distill_weight > 0:  # KL(main || draft), per code
                loss = loss + config.distill_weight * F.kl_div(logits.log_softmax(-1).flatten(0, 2), p.flatten(0, 2),
                                                               reduction="batchmean")
        train_tally.add(logits.detach(), y, hard)
        return loss

    def evaluate_epoch(epoch: int) -> dict[str, float]:
        fit, val = train_tally, evaluate(model, val_hidden, val_targets, device)
        val_tallies[epoch] = val
        val_avg = sum(val.accuracy) / C
        log.info("Epoch %d/%d | Train Loss: %.3f | Train Acc: %s | Val Loss: %.3f | Val Acc: %s | Avg=%.3f",
                 epoch, E, fit.loss, _layers(fit.accuracy), val.loss, _layers(val.accuracy), val_avg)
        metrics = {"train/loss": fit.loss, "val/loss": val.loss}
        for layer in range(C):
            metrics[f"train/acc_L{layer}"] = fit.accuracy[layer]
            metrics[f"val/acc_L{layer}"] = val.accuracy[layer]
            metrics[f"val/exact_match_L{layer}"] = val.exact_match[layer]
        metrics["val/acc_avg"] = val_avg
        return metrics

    total_steps = E * steps_per_epoch
    kept = train(model, batches, loss_fn, LoopConfig(
        name="draft", epochs=E, steps_per_epoch=steps_per_epoch, lr=config.lr, weight_decay=config.weight_decay,
        lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps(total_steps), precision=config.precision,
        device_type=device.type, best_metric="val/acc_avg"), evaluate_epoch, live)
    assert kept.model_state is not None and kept.optimizer_state is not None  # best_metric keeps both
    val = val_tallies[kept.epoch]
    checkpoint = build_checkpoint(kept.model_state, kept.optimizer_state, model_config, kept.epoch, val)

    log.info("Training Complete! Best Val Accuracy: %.3f", kept.metrics["val/acc_avg"])
    return checkpoint, {
        "best_val_accuracy": kept.metrics["val/acc_avg"],
        "val_accuracies_per_layer": val.accuracy,
        "layer_exact_match": val.exact_match,
        "best_epoch": kept.epoch,
        "epochs": E,
        "precision": resolve_precision(config.precision, device.type),
        "parameters": parameters,
        "train_samples": len(train_idx),
        "val_samples": len(val_idx),
        "train_seconds": time.perf_counter() - start_time,
    }
