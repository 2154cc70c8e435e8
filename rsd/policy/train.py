"""Behaviour cloning of the main policy on demonstrations: teacher forcing over all residual layers."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsd.config import Config
from rsd.data import TaskDemos, action_chunks, split_episodes
from rsd.hardware import resolve_precision
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.tokenizer.model import RFSQTokenizer
from rsd.training import PRECISIONS, PRECISIONS_EXPECTED, Live, LoopConfig, torch_threads, train

log = logging.getLogger("rsd.policy")

FROM_DATA = ("vocab", "num_layers", "levels")
"""PolicyConfig fields that `policy.model` may not set: the vocabulary comes from the demos' instructions,
the residual layers and their levels from the tokenizer."""


@dataclass
class PolicyTrainConfig(Config):
    """How the main policy is trained, and its architecture: the `policy` section of params.yaml."""

    prefix: ClassVar[str] = "policy"

    model: dict[str, Any]
    """The main policy's architecture: PolicyConfig fields (a nested `backbone` for BackboneConfig's)
    other than vocab, num_layers and levels, which come from the demos and the tokenizer. Required: a
    params file without it would silently train the defaults' (another) architecture."""
    epochs: int = 10
    """Passes over the training samples (one sample per demo step)."""
    batch_size: int = 64
    """Samples per optimizer step."""
    lr: float = 1e-3
    """AdamW peak learning rate, after warmup, before cosine decay to 10%."""
    warmup_steps: int = 200
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    val_fraction: float = 0.1
    """Share of each task's episodes held out for validation."""
    shift_pixels: int = 4
    """Random-shift augmentation: images are padded by this many pixels and cropped back at random (0 = off)."""
    layer_weights: list[float] | None = None
    """Weight of each residual layer's cross entropy, coarse first (one per tokenizer layer); None = equal.
    The fine layers' codes are close to noise (their tokens barely move the action), so weighing them
    down keeps the backbone on the coarse layers that decide the action."""
    precision: str = "auto"
    """`bf16`: forward passes under bfloat16 autocast, weights and optimizer in float32 (~1.7x faster
    training on a CPU with AVX512-BF16 or AMX, or a GPU; ~11x slower for the policy on a CPU without,
    where torch emulates it); `fp32`: all in float32; `auto`: bf16 where it runs natively, else fp32
    (rsd.hardware)."""
    num_threads: int = 2
    """torch CPU threads."""
    seed: int = 0
    """Seeds the split, the initialisation and the batches (taken from base.seed by the stage)."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "num_threads"):
            self.check(getattr(self, name) >= 1, name, "a positive int")
        self.check(self.precision in PRECISIONS, "precision", PRECISIONS_EXPECTED)
        self.check(self.lr > 0, "lr", "> 0")
        self.check(self.warmup_steps >= 0, "warmup_steps", "a non-negative int")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)")
        self.check(self.shift_pixels >= 0, "shift_pixels", "a non-negative int")
        self.check(self.layer_weights is None or (len(self.layer_weights) > 0 and min(self.layer_weights) >= 0
                                                  and sum(self.layer_weights) > 0),
                   "layer_weights", "a list of non-negative numbers with a positive sum, or null")
        self.policy_config(vocab=(), num_layers=PolicyConfig.num_layers, levels=PolicyConfig.levels)

    def policy_config(self, vocab: tuple[str, ...], num_layers: int, levels: int) -> PolicyConfig:
        """The main policy's PolicyConfig: `model` with the vocabulary and the tokenizer's layers and levels.
        A bad `model` field is a ValueError that names it as `policy.model.<field>`."""
        name = f"{self.prefix}.model"
        known = {f.name for f in dataclasses.fields(PolicyConfig)} - set(FROM_DATA)
        for key in self.model:
            if key in FROM_DATA:
                raise ValueError(f"{name}.{key} cannot be set: it comes from the demos and the tokenizer")
            if key not in known:
                raise ValueError(f"{name}.{key} is not a PolicyConfig field; known: {', '.join(sorted(known))}")
        backbone = self.model.get("backbone", {})
        if not isinstance(backbone, dict):
            raise ValueError(f"{name}.backbone must be a mapping of BackboneConfig fields, got {backbone!r}")
        known = {f.name for f in dataclasses.fields(BackboneConfig)}
        for key in backbone:
            if key not in known:
                raise ValueError(f"{name}.backbone.{key} is not a BackboneConfig field; "
                                 f"known: {', '.join(sorted(known))}")
        try:
            return PolicyConfig.from_dict({**self.model, "vocab": vocab, "num_layers": num_layers, "levels": levels})
        except ValueError as error:  # PolicyConfig's messages start with the field: "image_size must be ..."
            message = str(error)
            raise ValueError(message if message.startswith(name) else f"{name}.{message}") from None
        except TypeError as error:  # a value of the wrong kind, e.g. vision_channels: 5
            raise ValueError(f"{name}: {error}") from None


@dataclass
class DaggerConfig(Config):
    """How the behaviour-cloned policy is trained further on the demos and the recovery demos (params.yaml
    `dagger`); everything else (batch size, augmentation, layer weights, precision) is the `policy` section's."""

    prefix: ClassVar[str] = "dagger"

    epochs: int = 2
    """Passes over the aggregated training samples."""
    lr: float = 3e-4
    """AdamW peak learning rate: below the first training's, since the policy is trained already."""
    warmup_steps: int = 50
    """Linear warmup steps (a fresh optimizer has no moment estimates yet)."""

    def validate(self) -> None:
        self.check(self.epochs >= 1, "epochs", "a positive int")
        self.check(self.lr > 0, "lr", "> 0")
        self.check(self.warmup_steps >= 0, "warmup_steps", "a non-negative int")


@dataclass
class BCSamples:
    """One sample per demo step: what the policy saw there and the tokens of the chunk it should emit."""

    images: Tensor  # uint8 [N, 2, s, s, 3] (agentview, wrist), already at the policy's image size
    proprio: Tensor  # float32 [N, 8]
    instruction: Tensor  # long [N], index into `instructions`
    tokens: Tensor  # uint8 [N, 8, 16, L]
    instructions: list[str]

    def __len__(self) -> int:
        return len(self.proprio)

    def batch(self, index: Tensor, policy: MainPolicy, shift: int = 0) -> tuple[dict[str, Tensor], Tensor]:
        images = self.images[index]
        if shift:
            images = random_shift(images, shift)
        obs = {"agentview": images[:, 0], "wrist": images[:, 1], "proprio": self.proprio[index]}
        obs.update(policy.encode_instructions([self.instructions[i] for i in self.instruction[index].tolist()]))
        return obs, self.tokens[index].long()


def resize_images(images: np.ndarray, size: int) -> Tensor:
    """uint8 [..., h, w, 3] -> uint8 [..., size, size, 3], with the antialiased resize the policy uses itself."""
    x = torch.from_numpy(images)
    if x.shape[-3:-1] == (size, size):
        return x
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float()
    out = []
    for part in x.split(512):  # bounded memory
        out.append(F.interpolate(part, size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out).permute(0, 2, 3, 1).reshape(*lead, size, size, 3)


def random_shift(images: Tensor, pad: int) -> Tensor:
    """Shift each sample's images by up to `pad` pixels (edge-replicated), the same shift for both cameras."""
    B, C, h, w, _ = images.shape
    x = images.permute(0, 1, 4, 2, 3).reshape(B, C * 3, h, w).float()
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B)).tolist()
    x = torch.stack([x[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(B)])
    return x.reshape(B, C, 3, h, w).permute(0, 1, 3, 4, 2).to(torch.uint8)


def build_samples(tasks: list[TaskDemos], tokenizer: RFSQTokenizer, image_size: int, episodes: list[tuple[int, int]]) -> BCSamples:
    """Samples of the given (task, demo) episodes: images resized, chunks tokenized."""
    instructions = [t.instruction for t in tasks]
    images, proprio, instruction, tokens = [], [], [], []
    for task_index, demo_index in episodes:
        demo = tasks[task_index].demos[demo_index]
        images.append(resize_images(np.stack([demo.agentview, demo.wrist], axis=1), image_size))
        proprio.append(torch.from_numpy(demo.proprio))
        instruction.append(torch.full((len(demo),), task_index, dtype=torch.long))
        with torch.no_grad():
            tokens.append(tokenizer.encode(torch.from_numpy(action_chunks(demo.actions))).to(torch.uint8))
    return BCSamples(torch.cat(images), torch.cat(proprio), torch.cat(instruction), torch.cat(tokens), instructions)


def check_recoveries(tasks: list[TaskDemos], recoveries: list[TaskDemos]) -> None:
    """Refuse recovery demos of a task the demos do not hold (by name and instruction)."""
    known = {t.task_name: t.instruction for t in tasks}
    for task in recoveries:
        if known.get(task.task_name) != task.instruction:
            raise ValueError(f"recovery demos of task {task.task_name!r} match no task of the demos "
                             f"(known: {', '.join(sorted(known))})")


def split_by_task(tasks: list[TaskDemos], val_fraction: float, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(task, demo) pairs for training and validation: every task keeps some episodes of each."""
    train, val = [], []
    for t, task in enumerate(tasks):
        train_idx, val_idx = split_episodes(len(task.demos), val_fraction, seed + t)
        train += [(t, int(i)) for i in train_idx]
        val += [(t, int(i)) for i in val_idx]
    return train, val


@torch.no_grad()
def evaluate(policy: MainPolicy, samples: BCSamples, batch_size: int = 256) -> tuple[float, list[float]]:
    """Mean cross entropy and per-layer token accuracy (teacher forced) over all samples."""
    policy.eval()
    loss_sum, correct = 0.0, torch.zeros(policy.config.num_layers)
    for index in torch.arange(len(samples)).split(batch_size):
        obs, tokens = samples.batch(index, policy)
        logits = policy.forward_teacher(obs, tokens)  # [B, L, 128, levels]
        target = tokens.flatten(1, 2).transpose(1, 2)  # [B, L, 128]
        loss_sum += F.cross_entropy(logits.flatten(0, 2).float(), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).float().sum(dim=(0, 2))
    codes = len(samples) * policy.config.codes_per_layer
    return loss_sum / (codes * policy.config.num_layers), (correct / codes).tolist()


def train_policy(tasks: list[TaskDemos], tokenizer: RFSQTokenizer, config: PolicyTrainConfig,
                 live: Live | None = None, init: MainPolicy | None = None,
                 recoveries: list[TaskDemos] | None = None) -> tuple[MainPolicy, dict[str, Any]]:
    """Behaviour cloning; returns the trained policy (the last epoch's) and its metrics. `live` is an
    optional dvclive.Live. Everything runs with `config.num_threads` CPU threads, restored after.

    `init` trains an existing policy further (its architecture and input statistics kept) instead of a
    new one; `recoveries` (tasks of `tasks`, by name) are extra training episodes, never validation, so
    that a policy trained further is validated on the same held-out demos as before."""
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        if init is None:
            policy_config = config.policy_config(build_vocab([t.instruction for t in tasks]),
                                                 tokenizer.config.num_layers, tokenizer.config.levels)
            policy = MainPolicy(policy_config, tokenizer.fingerprint())  # the checkpoint records which tokenizer it learnt
        else:
            policy, policy_config = init, init.config
            if init.tokenizer_fingerprint != tokenizer.fingerprint():
                raise ValueError("the policy to train further learnt another tokenizer's codes")
        layer_weights = None
        if config.layer_weights is not None:
            if len(config.layer_weights) != policy_config.num_layers:
                raise ValueError(f"policy.layer_weights has {len(config.layer_weights)} entries; the tokenizer has "
                                 f"{policy_config.num_layers} residual layers")
            layer_weights = torch.tensor(config.layer_weights, dtype=torch.float32)
        train_eps, val_eps = split_by_task(tasks, config.val_fraction, config.seed)
        recoveries = recoveries or []
        check_recoveries(tasks, recoveries)
        pool = tasks + recoveries  # the (task, demo) pairs index into it
        extra = [(len(tasks) + r, i) for r, task in enumerate(recoveries) for i in range(len(task.demos))]
        train_samples = build_samples(pool, tokenizer, policy_config.image_size, train_eps + extra)
        val = build_samples(tasks, tokenizer, policy_config.image_size, val_eps)
        if init is None:
            policy.set_proprio_stats(train_samples.proprio)
        parameters = sum(p.numel() for p in policy.parameters())
        log.info("main policy: %.2fM parameters; %d train samples (%d episodes, %d of them recoveries), "
                 "%d val samples (%d episodes)", parameters / 1e6, len(train_samples), len(train_eps) + len(extra),
                 len(extra), len(val), len(val_eps))

        steps_per_epoch = len(train_samples) // config.batch_size  # whole batches only
        generator = torch.Generator().manual_seed(config.seed)
        history: list[dict[str, Any]] = []
        train_loss = 0.0  # the epoch's mean batch loss so far

        def batches(epoch: int) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
            nonlocal train_loss
            train_loss = 0.0
            order = torch.randperm(len(train_samples), generator=generator)[: steps_per_epoch * config.batch_size]
            for index in order.split(config.batch_size):
                yield train_samples.batch(index, policy, config.shift_pixels)  # the shift draws from torch's RNG

        def loss_fn(batch: tuple[dict[str, Tensor], Tensor]) -> Tensor:
            nonlocal train_loss
            obs, tokens = batch
            loss = policy.loss(obs, tokens, layer_weights)
            train_loss += loss.item() / steps_per_epoch
            return loss

        def evaluate_epoch(epoch: int) -> dict[str, float]:
            val_loss, val_acc = evaluate(policy, val)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
            log.info("Epoch %d/%d | Train Loss: %.4f | Val Loss: %.4f | Val Acc: %s", epoch, config.epochs, train_loss,
                     val_loss, " ".join(f"L{i}={a:.3f}" for i, a in enumerate(val_acc)))
            return {"train/loss": train_loss, "val/loss": val_loss,
                    **{f"val/token_accuracy_L{i}": a for i, a in enumerate(val_acc)}}

        start = time.monotonic()
        # warmup, then a cosine down to a floor of 10% of the peak; gradients clipped to norm 1
        train(policy, batches, loss_fn, LoopConfig(
            name="policy", epochs=config.epochs, steps_per_epoch=steps_per_epoch, lr=config.lr,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, lr_floor=0.1, clip_grad_norm=1.0,
            precision=config.precision), evaluate_epoch, live)
        metrics = {
            "val_loss": round(history[-1]["val_loss"], 5),
            "val_token_accuracy_per_layer": [round(a, 4) for a in history[-1]["val_acc"]],
            "train_loss": round(history[-1]["train_loss"], 5),
            "epochs": config.epochs,
            "precision": resolve_precision(config.precision, "cpu"),
            "train_seconds": round(time.monotonic() - start, 1),
            "parameters": parameters,
            "train_samples": len(train_samples),
            "val_samples": len(val),
            "train_episodes": len(train_eps) + len(extra),
            **({"recovery_episodes": len(extra)} if init is not None else {}),  # a policy trained further
        }
    return policy, metrics
