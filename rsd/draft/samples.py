"""Draft training samples: for every main-policy call, its hidden state and the coarse codes it decoded.

The collect stage writes one file; the train stage reads it whole. All samples are stacked into a few
tensors (not a list of per-call dicts), so 60k samples load in seconds and index without Python loops:

    hidden_state   float16 [N, H]          (float32 only if a value exceeds float16's range, see below)
    coarse_tokens  uint8   [N, 8, 16, C]   codes 0..6 of the first C residual layers (C = 3)
    coarse_probs   float16 [N, C, 128, 7]  main's probability of each level of those codes, as it decoded them
                                           (layer-major, codes timestep-major: the draft's logits' layout)
    task           int16   [N]             index into task_names
    episode        int32   [N]             episode number (an episode is the pair (task, episode))
    step           int32   [N]             env step of the policy call within its episode

float16 for the hidden state halves the file (60k x 4096 x 2 B = 0.5 GB instead of 1 GB). Its relative
rounding error (< 5e-4) is far below anything that moves the draft's argmax, and the hidden state is
the output of the main policy's final RMSNorm, so it lies far inside float16's range (|x| <= 65504);
should a value not, the samples keep float32 rather than store inf. Main's probabilities are what draft
training distills from besides the hard codes (how sure main was of each code).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import Tensor

from rsd.data import split_episodes
from rsd.io import load_torch, save_torch

FORMAT = "rsd.draft_samples"
FORMAT_VERSION = 2  # 2: coarse_probs
FLOAT16_MAX = 65504.0
_TENSORS = ("hidden_state", "coarse_tokens", "coarse_probs", "task", "episode", "step")


def _compact_hidden(hidden: Tensor) -> Tensor:
    """float16 if every value fits, else float32; a NaN or inf is refused (a broken main policy)."""
    if not hidden.is_floating_point():
        raise ValueError(f"hidden_state must be floating point, got {hidden.dtype}")
    low, high = (float(v) for v in torch.aminmax(hidden))  # NaN propagates; no copy of a 1 GB tensor
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("hidden_state holds NaN or inf values")
    fits = max(-low, high) <= FLOAT16_MAX
    return hidden.to(torch.float16 if fits else torch.float32)


def _as_int(name: str, values: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """`values` [n] as `dtype`, refusing floats and values the narrower dtype would wrap around."""
    if values.shape != (n,) or values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [N={n}], got {values.dtype} {list(values.shape)}")
    info = torch.iinfo(dtype)
    if not (int(values.min()) >= info.min and int(values.max()) <= info.max):
        raise ValueError(f"{name} values {int(values.min())}..{int(values.max())} do not fit {dtype}")
    return values.to(dtype)


def _own_storage(t: Tensor) -> Tensor:
    """`t` itself if it owns its storage, else a copy: torch.save writes a view's whole parent storage."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


class DraftSamples:
    """Stacked draft samples: one tensor per field (see the module docstring), `len(data)` their count."""

    def __init__(self, hidden_state: Tensor, coarse_tokens: Tensor, coarse_probs: Tensor, task: Tensor, episode: Tensor,
                 step: Tensor, task_names: Sequence[str] = ()) -> None:
        """Check shapes and value ranges and store compactly (see the module docstring for the dtypes)."""
        if hidden_state.ndim != 2 or hidden_state.shape[0] < 1 or hidden_state.shape[1] < 1:
            raise ValueError(f"hidden_state must be [N, H] with N, H >= 1, got {list(hidden_state.shape)}")
        n = hidden_state.shape[0]
        if coarse_tokens.ndim != 4 or coarse_tokens.shape[0] != n:
            raise ValueError(f"coarse_tokens must be [N={n}, chunk_len, latent_dim, layers], "
                             f"got {list(coarse_tokens.shape)}")
        if coarse_tokens.is_floating_point() or not (int(coarse_tokens.min()) >= 0 and int(coarse_tokens.max()) <= 255):
            raise ValueError(f"coarse_tokens must be integer codes in 0..255, got {coarse_tokens.dtype} "
                             f"{int(coarse_tokens.min())}..{int(coarse_tokens.max())}")
        _, chunk_len, latent_dim, layers = coarse_tokens.shape
        expected = (n, layers, chunk_len * latent_dim)
        if coarse_probs.ndim != 4 or coarse_probs.shape[:3] != expected or not coarse_probs.is_floating_point():
            raise ValueError(f"coarse_probs must be float [N, C, 128, levels] with [N, C, 128] = {list(expected)}, "
                             f"got {coarse_probs.dtype} {list(coarse_probs.shape)}")
        low, high = (float(v) for v in torch.aminmax(coarse_probs))
        if not (0 <= low and high <= 1):  # NaN fails too
            raise ValueError(f"coarse_probs must be probabilities in [0, 1], got {low}..{high}")
        self.task_names = [str(name) for name in task_names]
        self.hidden_state = _compact_hidden(hidden_state)  # [N, H]
        self.coarse_tokens = coarse_tokens.to(torch.uint8)  # [N, 8, 16, C]
        self.coarse_probs = coarse_probs.to(torch.float16)  # [N, C, 128, levels]
        self.task = _as_int("task", task, n, torch.int16)  # [N]
        self.episode = _as_int("episode", episode, n, torch.int32)  # [N]
        self.step = _as_int("step", step, n, torch.int32)  # [N]
        if self.task_names and not (int(self.task.min()) >= 0 and int(self.task.max()) < len(self.task_names)):
            raise ValueError(f"task indices {int(self.task.min())}..{int(self.task.max())} do not fit "
                             f"{len(self.task_names)} task_names")

    @property
    def hidden_size(self) -> int:
        """H, the main policy's hidden size."""
        return self.hidden_state.shape[1]

    def __len__(self) -> int:
        return self.hidden_state.shape[0]

    @classmethod
    def concat(cls, parts: Sequence[DraftSamples]) -> DraftSamples:
        """Join the samples of several collectors (e.g. one per worker); their task_names must agree."""
        if not parts:
            raise ValueError("no draft samples to join")
        names = parts[0].task_names
        if any(p.task_names != names for p in parts):
            raise ValueError("draft sample parts disagree on task_names")
        hidden = [p.hidden_state for p in parts]
        if len({h.dtype for h in hidden}) > 1:  # join at float32; __init__ compacts again where it can
            hidden = [h.float() for h in hidden]
        return cls(torch.cat(hidden), *(torch.cat([getattr(p, key) for p in parts]) for key in _TENSORS[1:]),
                   task_names=names)

    def split_by_episode(self, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
        """Sample indices (train, val), long and sorted, holding out `val_fraction` of the episodes (at least
        one, never all). No episode has samples on both sides: consecutive calls of one episode are near
        duplicates, so a split by sample would measure memorization."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        pairs = torch.stack([self.task.long(), self.episode.long()], dim=1)  # [N, 2]
        episodes, episode_of = torch.unique(pairs, dim=0, return_inverse=True)  # [E, 2], [N]
        _, val_episodes = split_episodes(len(episodes), val_fraction, seed)
        is_val = torch.isin(episode_of, torch.from_numpy(val_episodes))  # [N]
        return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()

    def save(self, path: str | os.PathLike) -> None:
        """Write everything to one file, atomically."""
        save_torch(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "hidden_size": self.hidden_size,
                          "task_names": self.task_names,
                          **{key: _own_storage(getattr(self, key)) for key in _TENSORS}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> DraftSamples:
        """Read `save`'s file; a missing, corrupt or foreign file is an error naming it."""
        data = load_torch(path, "draft samples")  # FileNotFoundError / ValueError naming the file
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a draft samples file of format {FORMAT!r} v{FORMAT_VERSION} "
                             f"(found {data.get('format')!r} v{data.get('format_version')!r})")
        missing = [key for key in (*_TENSORS, "hidden_size", "task_names") if key not in data]
        if missing:
            raise ValueError(f"draft samples file {path} lacks {missing}")
        try:
            samples = cls(*(data[key] for key in _TENSORS), task_names=data["task_names"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"draft samples file {path} is malformed: {exc}") from exc
        if samples.hidden_size != data["hidden_size"]:
            raise ValueError(f"draft samples file {path} says hidden_size={data['hidden_size']!r} "
                             f"but holds hidden states of size {samples.hidden_size}")
        return samples
