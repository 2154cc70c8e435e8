"""Phase 1: fit the RFSQ tokenizer to demonstration action chunks and measure it on held-out episodes."""
from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from rsd.data import action_chunks, split_episodes
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer
from rsd.training import LoopConfig, torch_threads, train


def chunks_of(episodes_actions: list[np.ndarray], chunk_len: int) -> torch.Tensor:
    """Every chunk of every episode, stacked: `[sum T_i, chunk_len, 7]` float32."""
    return torch.from_numpy(np.concatenate([action_chunks(a, chunk_len) for a in episodes_actions])).float()


def evaluate_tokenizer(tokenizer: RFSQTokenizer, chunks: torch.Tensor) -> dict[str, Any]:
    """Round-trip error per layer prefix, in normalized action units, and how much of each layer's codebook is used.

    `chunks` are raw `[N, 8, 7]`. The round trip goes through the real token path (encode -> ints -> decode).
    """
    levels, num_layers = tokenizer.config.levels, tokenizer.config.num_layers
    target = tokenizer.normalize(chunks)  # [N, 8, 7]
    tokens = tokenizer.encode(chunks)  # [N, 8, 16, L]
    mae, max_error = [], []
    for k in range(1, num_layers + 1):
        error = (tokenizer.decode_normalized(tokens[..., :k]) - target).abs()  # [N, 8, 7]
        mae.append(error.mean().item())
        max_error.append(error.max().item())
    counts = torch.stack([torch.bincount(tokens[..., l].flatten(), minlength=levels) for l in range(num_layers)])
    share = counts.float() / counts.sum(dim=1, keepdim=True)  # [L, levels]
    entropy = -(share * share.clamp_min(1e-12).log()).sum(dim=1)  # [L]
    return {
        "num_layers": num_layers,
        "mae_by_layers": mae,
        "max_error_by_layers": max_error,
        "codebook_usage": ((counts > 0).sum(dim=1) / levels).tolist(),
        # exp(entropy), in levels: 7 when all 7 are equally frequent; usage alone counts a level seen once
        "codebook_perplexity": entropy.exp().tolist(),
        # share of codes at the middle level, "no correction": what fine_residual_weight raises in layers >= 1
        "no_correction_share": share[:, levels // 2].tolist(),
    }


def fit(tokenizer: RFSQTokenizer, x_train: Tensor, progress: bool) -> float:
    """AdamW on random batches of normalized chunks `x_train [N, 8, 7]`; returns the smoothed final loss.

    The loss is the L1 error (the metric's own units) averaged over every layer prefix k = 1..L, so that
    each prefix decodes well; the 1-layer prefix is down-weighted (`first_layer_loss_weight`) because
    serving it well costs precision in all the others. `fine_residual_weight` adds the residuals left to
    the fine layers, which makes their codes predictable (see TokenizerConfig).
    """
    config = tokenizer.config
    generator = torch.Generator().manual_seed(config.seed)
    prefix_weights = torch.ones(config.num_layers)  # [L], one per prefix k = 1..L
    prefix_weights[0] = config.first_layer_loss_weight
    prefix_weights /= prefix_weights.sum()
    losses: list[float] = []

    def batches(epoch: int) -> Iterator[Tensor]:
        """`config.steps` batches drawn with replacement: the step count does not depend on the data size."""
        for _ in range(config.steps):
            yield x_train[torch.randint(len(x_train), (config.batch_size,), generator=generator)]  # [B, 8, 7]

    def loss_fn(batch: Tensor) -> Tensor:
        recon, fine_residual = tokenizer(batch)  # [L, B, 8, 7], scalar
        prefix_errors = (recon - batch).abs().mean(dim=(1, 2, 3))  # [L]
        loss = (prefix_weights * prefix_errors).sum() + config.fine_residual_weight * fine_residual
        losses.append(loss.item())
        return loss

    # one pass of config.steps steps; the cosine decays to zero: the last, small steps polish the fine layers
    train(tokenizer, batches, loss_fn, LoopConfig(
        name="tokenizer", epochs=1, steps_per_epoch=config.steps, lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, progress=progress))
    loss_avg = losses[0]
    for loss in losses[1:]:
        loss_avg = 0.98 * loss_avg + 0.02 * loss
    return loss_avg


def train_tokenizer(episodes_actions: list[np.ndarray], config: TokenizerConfig,
                    progress: bool = True) -> tuple[RFSQTokenizer, dict[str, Any]]:
    """Train a tokenizer on every chunk of the training episodes; return it (in eval mode) and its metrics.

    `episodes_actions` holds one raw `[T_i, 7]` action array per demonstration; `val_fraction` of the
    episodes are held out and the metrics are measured on their chunks. Training uses one CPU thread:
    the matmuls are too small for a second one to help, and on a busy machine two threads ran 4-7x slower.
    """
    start = time.perf_counter()
    train_idx, val_idx = split_episodes(len(episodes_actions), config.val_fraction, config.seed)
    train_chunks = chunks_of([episodes_actions[i] for i in train_idx], config.chunk_len)  # [N, 8, 7]
    val_chunks = chunks_of([episodes_actions[i] for i in val_idx], config.chunk_len)  # [M, 8, 7]
    train_actions = np.concatenate([episodes_actions[i] for i in train_idx])  # [sum T_i, 7]
    q01, q99 = np.quantile(train_actions, [0.01, 0.99], axis=0)  # [7] each

    with torch_threads(1):
        torch.manual_seed(config.seed)
        tokenizer = RFSQTokenizer(config, q01, q99)
        train_loss = fit(tokenizer, tokenizer.normalize(train_chunks), progress)
        metrics = evaluate_tokenizer(tokenizer, val_chunks)
    metrics.update({
        "train_loss": train_loss,
        "train_episodes": len(train_idx),
        "val_episodes": len(val_idx),
        "train_chunks": len(train_chunks),
        "val_chunks": len(val_chunks),
        "train_seconds": time.perf_counter() - start,
    })
    return tokenizer, metrics
