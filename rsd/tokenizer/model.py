"""The RFSQ action tokenizer: action chunk <-> residual FSQ codes, coarse to fine.

A chunk `[8, 7]` is normalized to [-1, 1], encoded by an MLP (plus a linear shortcut) to a latent `[8, 16]`, and each latent
scalar is quantized by vector-quantize-pytorch's `ResidualFSQ` (7 levels, L layers): layer l codes what
layers < l left over, so the first k layers alone already give a usable, coarser action. The decoder
maps any such prefix back to a chunk; it is trained on every prefix so that it decodes each one well.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualFSQ

from rsd.io import first_non_finite, load_torch, save_torch
from rsd.tokenizer.config import TokenizerConfig

CHECKPOINT_KIND = "rsd.rfsq_tokenizer"  # tells a tokenizer checkpoint from the pipeline's other ones
FORMAT_VERSION = 1


class SkipMLP(nn.Module):
    """A GELU MLP plus a linear shortcut from input to output.

    The shortcut gives the network an exact linear path, which the fine residual layers need (a plain
    MLP plateaus well above the 0.01 error they can reach); the MLP bends that map to the data so the
    coarse layers alone still decode well.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_hidden_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * num_hidden_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.mlp = nn.Sequential(*layers)
        self.shortcut = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, in_dim] -> [B, out_dim]`."""
        return self.mlp(x) + self.shortcut(x)


class RFSQTokenizer(nn.Module):
    """Encodes raw action chunks `[..., 8, 7]` to tokens `[..., 8, 16, L]` and decodes any layer prefix back."""

    def __init__(self, config: TokenizerConfig, action_q01: np.ndarray | Tensor | None = None,
                 action_q99: np.ndarray | Tensor | None = None) -> None:
        """Build an untrained tokenizer; the bounds (1st/99th percentile per action dim) default to [-1, 1]."""
        super().__init__()
        self.config = config
        c = config
        chunk_numel, latent_numel = c.chunk_len * c.action_dim, c.latent_len * c.latent_dim
        # The encoder and decoder see the whole chunk at once: actions within a chunk are strongly correlated.
        self.encoder = SkipMLP(chunk_numel, c.hidden_dim, latent_numel, c.num_hidden_layers)
        self.quantizer = ResidualFSQ(levels=[c.levels], num_quantizers=c.num_layers, dim=1)
        self.decoder = SkipMLP(latent_numel, c.hidden_dim, chunk_numel, c.num_hidden_layers)
        # The bounds travel in the checkpoint under their own keys, not in the state dict.
        low = torch.full((c.action_dim,), -1.0) if action_q01 is None else torch.as_tensor(action_q01, dtype=torch.float32)
        high = torch.full((c.action_dim,), 1.0) if action_q99 is None else torch.as_tensor(action_q99, dtype=torch.float32)
        if low.shape != (c.action_dim,) or high.shape != (c.action_dim,) or not bool((high >= low).all()):
            raise ValueError(f"action bounds must be two [{c.action_dim}] vectors with q01 <= q99, "
                             f"got {tuple(low.shape)} and {tuple(high.shape)}")
        self.register_buffer("action_q01", low, persistent=False)
        self.register_buffer("action_q99", high, persistent=False)

    # --- normalization -------------------------------------------------------------------------------

    def _center_and_half_range(self) -> tuple[Tensor, Tensor]:
        """Per-dim affine map of the bounds onto [-1, 1]; a constant dim (q01 == q99, e.g. a gripper that
        never closes) gets half-range 1 so that it maps to 0 instead of dividing by zero."""
        center = (self.action_q99 + self.action_q01) / 2  # [7]
        half = (self.action_q99 - self.action_q01) / 2  # [7]
        return center, torch.where(half > 1e-6, half, torch.ones_like(half))

    def normalize(self, actions: Tensor) -> Tensor:
        """Raw actions `[..., 7]` -> [-1, 1], clipped (the outer 2% of the data saturates)."""
        center, half = self._center_and_half_range()
        return ((actions - center) / half).clamp(-1.0, 1.0)

    def unnormalize(self, actions: Tensor) -> Tensor:
        """Normalized actions `[..., 7]` -> raw units."""
        center, half = self._center_and_half_range()
        return actions * half + center

    # --- training path ---------------------------------------------------------------------------------

    def forward(self, actions_norm: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruct normalized chunks `[B, 8, 7]` from every layer prefix -> (`[L, B, 8, 7]`, prefix k at
        index k-1; the mean absolute residual entering each of layers 1..L-2, summed over them: a scalar).

        Every prefix carries ResidualFSQ's straight-through gradient to the encoder, so the encoder is
        shaped by the coarse reconstructions as well as by the fine one.
        """
        c = self.config
        batch = actions_norm.shape[0]
        z = self.encoder(actions_norm.reshape(batch, -1)).view(batch, -1, 1)  # [B, 128, 1]
        quantized, _, codes = self.quantizer(z, return_all_codes=True)  # [B, 128, 1], _, [L, B, 128, 1]
        prefixes = codes.cumsum(dim=0)  # [L, B, 128, 1]: values of layers 0..k-1, no gradient
        # what layers 0..l-1 leave for layer l, l = 1..L-2; its gradient pulls z toward those layers' grid
        fine_residual = (z - prefixes[: c.num_layers - 2]).abs().mean(dim=(1, 2, 3)).sum()  # 0 when L <= 2
        prefixes = quantized + (prefixes - quantized).detach()  # values of the prefixes, gradient of the full code
        recon = self.decoder(prefixes.reshape(c.num_layers * batch, -1))  # [L*B, 56]
        return recon.view(c.num_layers, batch, c.chunk_len, c.action_dim), fine_residual

    # --- inference ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, actions: Tensor) -> Tensor:
        """Raw (un-normalized) chunks `[..., 8, 7]` -> tokens `[..., 8, 16, L]`, int64 codes in 0..levels-1."""
        c = self.config
        if not torch.is_floating_point(actions) or actions.shape[-2:] != (c.chunk_len, c.action_dim):
            raise ValueError(f"encode expects float actions of shape [..., {c.chunk_len}, {c.action_dim}], "
                             f"got {actions.dtype} {tuple(actions.shape)}")
        lead = actions.shape[:-2]
        x = self.normalize(actions.reshape(-1, c.chunk_len, c.action_dim).to(self.action_q01.dtype))  # [B, 8, 7]
        z = self.encoder(x.flatten(1)).view(x.shape[0], -1, 1)  # [B, 128, 1]
        _, indices = self.quantizer(z)  # [B, 128, L]; with preserve_symmetry FSQ the indices are the levels 0..6
        return indices.long().view(*lead, c.latent_len, c.latent_dim, c.num_layers)

    @torch.no_grad()
    def decode_normalized(self, tokens: Tensor) -> Tensor:
        """Tokens `[..., 8, 16, k]` of the first k layers (1 <= k <= L) -> normalized chunks `[..., 8, 7]` in [-1, 1]."""
        c = self.config
        expected = f"integer tokens of shape [..., {c.latent_len}, {c.latent_dim}, k] with 1 <= k <= {c.num_layers}"
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"decode expects {expected}, got dtype {tokens.dtype}")
        if tokens.ndim < 3 or tokens.shape[-3:-1] != (c.latent_len, c.latent_dim):
            raise ValueError(f"decode expects {expected}, got shape {tuple(tokens.shape)}")
        k = tokens.shape[-1]
        if not 1 <= k <= c.num_layers:
            raise ValueError(f"decode expects {expected}, got k={k}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= c.levels):
            raise ValueError(f"decode expects codes in 0..{c.levels - 1}, got {tokens.min().item()}..{tokens.max().item()}")
        return self.decode_normalized_unchecked(tokens)

    def decode_normalized_unchecked(self, tokens: Tensor) -> Tensor:
        """`decode_normalized` without its checks, which read values back to the host: for a captured CUDA graph
        (rsd.compiled), whose tokens come from the policy's argmax and are in range by construction."""
        c = self.config
        k = tokens.shape[-1]
        lead = tokens.shape[:-3]
        indices = tokens.reshape(-1, c.latent_len * c.latent_dim, k).long()  # [B, 128, k]
        indices = F.pad(indices, (0, c.num_layers - k), value=-1)  # [B, 128, L]; -1 = layer left out
        z = self.quantizer.get_output_from_indices(indices)  # [B, 128, 1]
        x = self.decoder(z.flatten(1)).clamp(-1.0, 1.0)  # [B, 56]; the data never leaves [-1, 1]
        return x.view(*lead, c.chunk_len, c.action_dim)

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens `[..., 8, 16, k]` of the first k layers (1 <= k <= L) -> raw chunks `[..., 8, 7]`."""
        return self.unnormalize(self.decode_normalized(tokens))

    @property
    def device(self) -> torch.device:
        """Where the tokenizer's weights are (tokens to decode go there)."""
        return self.action_q01.device

    # --- checkpoints -------------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """What `save` writes: kind, format, config, weights and normalization bounds."""
        return {
            "kind": CHECKPOINT_KIND,
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "state_dict": self.state_dict(),
            "action_q01": self.action_q01.tolist(),
            "action_q99": self.action_q99.tolist(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a self-contained checkpoint (config, weights, normalization bounds), atomically."""
        save_torch(path, self.checkpoint())

    def fingerprint(self) -> str:
        """sha256 (hex) of everything that defines this tokenizer: the bytes `save` writes for it, which are
        byte-reproducible, so this is also the sha256 of its checkpoint file. A main policy records the one
        it was trained with: another tokenizer of the same shapes codes actions differently."""
        on_cpu = all(t.device.type == "cpu" for t in self.state_dict().values())
        tokenizer = self if on_cpu else copy.deepcopy(self).cpu()  # torch.save records each tensor's device
        buffer = io.BytesIO()
        torch.save(tokenizer.checkpoint(), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> RFSQTokenizer:
        """Rebuild a tokenizer from `save`'s checkpoint; any missing, corrupt, foreign or non-finite file is a clear error."""
        ckpt = load_torch(path, "RFSQ tokenizer")  # FileNotFoundError / ValueError naming the file
        if ckpt.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{path} is not an RFSQ tokenizer checkpoint (kind={ckpt.get('kind')!r}, "
                             f"expected {CHECKPOINT_KIND!r})")
        if ckpt.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"RFSQ tokenizer checkpoint {path} has format_version={ckpt.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")
        try:
            tokenizer = cls(TokenizerConfig(**ckpt["config"]), ckpt["action_q01"], ckpt["action_q99"])
            tokenizer.load_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"RFSQ tokenizer checkpoint {path} is malformed ({type(exc).__name__}: {exc})") from exc
        # a tokenizer that trained into NaN loads and decodes every code to NaN actions: refused here instead
        bad = first_non_finite({**ckpt["state_dict"], "action_q01": tokenizer.action_q01,
                                "action_q99": tokenizer.action_q99})
        if bad:
            raise ValueError(f"RFSQ tokenizer checkpoint {path} holds non-finite values ({bad}); expected finite "
                             f"weights and bounds: retrain it, `dvc repro tokenizer`")
        return tokenizer.eval()
