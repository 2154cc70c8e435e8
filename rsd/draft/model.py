"""The draft model: main policy hidden state [H] -> the main policy's coarse RFSQ codes, in one shot.

    hidden [B, H] --input_projection--> context [B, D]
    queries [Q, D] (Q = coarse layers x timesteps = 3 x 8 = 24) + context --> tgt [B, Q, D]
    decoder_layer(tgt, memory=context) --> [B, Q, D] --head--> [B, Q, 16 x 7] --> logits [B, 3, 128, 7]

One query token per (coarse layer, timestep), each predicting that timestep's 16 latent codes, keeps
the decoder at 24 positions instead of 384: its cost on a CPU grows with the positions, and the draft
must stay far cheaper than the main policy pass it saves. Adding the context to every query, not only
offering it as cross-attention memory, matters: with a single memory token cross-attention hands every
query the same vector, and self-attention over context-free queries would compute a constant. On a
synthetic teacher (H = 256, 4k samples, 8 epochs) it lifted layer-0 validation accuracy from 0.56 to
0.60 over cross-attention alone; per-query scales on the context (FiLM) added nothing beyond that.

Codes of one layer are tokens[..., l] of a chunk's tokens [8, 16, L] flattened timestep-major to [128]
(index t * 16 + d), the main policy's order.

With `condition_on_layer0` the context also holds main's layer-0 codes [B, 128] (exact after the
prefill): context = input_projection(hidden) + sum over positions of layer0_embed(position, code).

For inference the engine asks `proposer(draft)` for the draft's logits function: `LeanDraft`, the same
function with the query-only products precomputed and the single-token cross-attention folded into one
matrix, whenever it reproduces the model's logits; the model itself otherwise.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsd.draft.config import DraftConfig
from rsd.io import first_non_finite, load_torch, misfit_message, state_dict_problems

log = logging.getLogger("rsd.draft")

FORMAT_VERSION = 1
"""Version of the draft checkpoint layout (`train.save_checkpoint`); bumped when its keys change."""

REQUIRED_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "val_accuracy", "val_accuracies_per_layer",
                 "config", "layer_exact_match", "format_version")
"""Every key of a draft checkpoint, and no other."""


class DraftDecoder(nn.Module):
    """Learned queries, one per (coarse layer, timestep), read the context through one decoder layer."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        # registered before the queries: the state dict then runs input_projection.*, decoder.decoder_layer.*,
        # decoder.query_embed.*, the key order of every draft checkpoint written so far
        self.decoder_layer = nn.TransformerDecoderLayer(
            config.hidden_dim, config.num_heads, dim_feedforward=config.ff_dim, dropout=config.dropout,
            activation="gelu", batch_first=True)
        self.query_embed = nn.Embedding(config.num_coarse_layers * config.chunk_len, config.hidden_dim)

    def forward(self, context: Tensor) -> Tensor:
        """context [B, D] -> one output per query [B, Q, D]."""
        memory = context[:, None]  # [B, 1, D]
        tgt = self.query_embed.weight + memory  # [B, Q, D]
        return self.decoder_layer(tgt, memory)


class RFSQDraftModelWithProjection(nn.Module):
    """Proposes the main policy's first `num_coarse_layers` residual layers from its hidden state."""

    def __init__(self, input_dim: int | DraftConfig, hidden_dim: int = 512, num_coarse_layers: int = 3,
                 **config: Any) -> None:
        """Either `RFSQDraftModelWithProjection(4096, hidden_dim=512, num_coarse_layers=3, ...)` (any other
        `DraftConfig` field as a keyword) or `RFSQDraftModelWithProjection(DraftConfig(...))`."""
        super().__init__()
        if isinstance(input_dim, DraftConfig):
            if config or (hidden_dim, num_coarse_layers) != (512, 3):
                raise TypeError("pass either a DraftConfig or the fields, not both")
            self.config = input_dim
        else:
            self.config = DraftConfig(input_dim=input_dim, hidden_dim=hidden_dim, num_coarse_layers=num_coarse_layers,
                                      **config)
        c = self.config
        self.input_projection = nn.Linear(c.input_dim, c.hidden_dim)
        self.decoder = DraftDecoder(c)
        self.head = nn.Linear(c.hidden_dim, c.latent_dim * c.levels)  # shared by all queries
        if c.condition_on_layer0:  # registered last: an unconditioned draft's state dict keeps its keys
            self.layer0_embed = nn.Embedding(c.codes_per_layer * c.levels, c.hidden_dim)  # row = position * levels + code
            nn.init.normal_(self.layer0_embed.weight, std=0.02 / c.codes_per_layer ** 0.5)  # the sum has std ~0.02
            self.register_buffer("code_offsets", torch.arange(c.codes_per_layer) * c.levels, persistent=False)

    def context(self, hidden: Tensor, layer0: Tensor | None) -> Tensor:
        """hidden [B, input_dim] (+ main's layer-0 codes [B, 128] if the draft reads them) -> context [B, D]."""
        hidden = hidden.to(self.input_projection.weight.dtype)  # the engine may run the draft in bf16
        context = self.input_projection(hidden)
        if not self.config.condition_on_layer0:
            return context
        if layer0 is None:
            raise ValueError("this draft reads main's layer-0 codes (condition_on_layer0): pass layer0 [B, 128]")
        return context + self.layer0_embed(layer0.long() + self.code_offsets).sum(dim=-2)

    def forward(self, hidden: Tensor, layer0: Tensor | None = None) -> Tensor:
        """hidden [B, input_dim], main's layer-0 codes [B, 128] (read only with `condition_on_layer0`) ->
        logits [B, num_coarse_layers, chunk_len * latent_dim, levels]."""
        c = self.config
        x = self.decoder(self.context(hidden, layer0))  # [B, Q, D], Q = layers x timesteps, layer-major
        logits = self.head(x)  # [B, Q, latent_dim * levels]
        return logits.view(-1, c.num_coarse_layers, c.codes_per_layer, c.levels)  # (t, d, k) -> (t*16+d, k)

    @torch.no_grad()
    def propose(self, hidden: Tensor, layer0: Tensor | None = None) -> Tensor:
        """Greedy draft: hidden [B, input_dim] (and layer0 [B, 128]) -> codes long [B, num_coarse_layers, 128]."""
        return self(hidden, layer0).argmax(dim=-1)


class LeanDraft:
    """`RFSQDraftModelWithProjection`'s forward with less work per call, for inference.

    The draft's decoder layer (post-norm, as torch's `TransformerDecoderLayer` defaults to) sees
    `tgt = queries + context` and a memory of ONE token, the context. Two facts make it cheap:

    - the self-attention input projection is linear, so `tgt @ W_in.T = queries @ W_in.T + context @
      W_in.T`: the first term is fixed and precomputed, leaving a one-row product per call;
    - attention over a single memory token gives every query that token's value (softmax over one key
      is 1), so the cross-attention output is `out_proj(v_proj(context))`, the same row for every
      query: one row through the product `W_out @ W_v`, precomputed.

    The result equals the module's forward up to float rounding (checked on random inputs when built;
    `from_draft` returns None, and `proposer` falls back to the module itself, when the check fails or
    the model is not an `RFSQDraftModelWithProjection`). Weights are read once: rebuild it after loading
    others.
    """

    def __init__(self, draft: RFSQDraftModelWithProjection) -> None:
        c = draft.config
        layer = draft.decoder.decoder_layer
        sa, ca = layer.self_attn, layer.multihead_attn
        D = c.hidden_dim
        with torch.no_grad():
            queries = draft.decoder.query_embed.weight  # [Q, D]
            self.query_qkv = queries @ sa.in_proj_weight.T  # [Q, 3D]
            w_v, b_v = ca.in_proj_weight[2 * D:], ca.in_proj_bias[2 * D:]
            cross_w = ca.out_proj.weight @ w_v  # [D, D]
            cross_b = ca.out_proj.weight @ b_v + ca.out_proj.bias  # [D]
            # one product of the context gives its share of q, k, v and the cross-attention row
            self.context_w = torch.cat([sa.in_proj_weight, cross_w]).contiguous()  # [4D, D]
            self.context_b = torch.cat([sa.in_proj_bias, cross_b]).contiguous()  # [4D]
        self.queries = queries.detach()
        self.context, self.sa_out = draft.context, sa.out_proj
        self.norm1, self.norm2, self.norm3 = layer.norm1, layer.norm2, layer.norm3
        self.linear1, self.linear2, self.head = layer.linear1, layer.linear2, draft.head
        self.heads, self.hidden_dim = sa.num_heads, D
        self.shape = (c.num_coarse_layers, c.codes_per_layer, c.levels)

    @classmethod
    def from_draft(cls, draft: Any) -> LeanDraft | None:
        """A LeanDraft for `draft` if it is a standard draft model whose logits it reproduces (to 1e-3 of
        their range in float32, 3e-2 in half precision), else None."""
        if not isinstance(draft, RFSQDraftModelWithProjection):
            return None
        layer = draft.decoder.decoder_layer
        if layer.norm_first or layer.activation is not F.gelu or not layer.self_attn._qkv_same_embed_dim:
            return None
        lean = cls(draft)
        c, weight = draft.config, draft.input_projection.weight
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(4, c.input_dim, generator=generator).to(weight.device, weight.dtype)
        layer0 = torch.randint(0, c.levels, (4, c.codes_per_layer), generator=generator).to(weight.device)
        with torch.inference_mode():
            expected, got = draft.eval()(probe, layer0).float(), lean.logits(probe, layer0).float()
        atol = 1e-3 if weight.dtype == torch.float32 else 3e-2
        scale = float(expected.abs().max()) + 1e-6
        if not torch.allclose(got, expected, atol=atol * scale, rtol=0):
            log.warning("lean draft path disagrees with the draft model (max diff %.3g); using the model",
                        float((got - expected).abs().max()))
            return None
        return lean

    def logits(self, hidden: Tensor, layer0: Tensor | None = None) -> Tensor:
        """hidden [B, input_dim] (and main's layer-0 codes [B, 128]) -> logits [B, K, 128, levels], as the
        draft model's forward (eval mode)."""
        D = self.hidden_dim
        context = self.context(hidden, layer0)  # [B, D]
        shared = F.linear(context, self.context_w, self.context_b)  # [B, 4D]: q, k, v shares + cross row
        qkv = self.query_qkv + shared[:, None, : 3 * D]  # [B, Q, 3D]
        B, Q = qkv.shape[:2]
        q, k, v = qkv.view(B, Q, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, heads, Q, d] each
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Q, D)
        x = self.norm1(self.queries + context[:, None] + self.sa_out(attn))
        x = self.norm2(x + shared[:, None, 3 * D:])
        x = self.norm3(x + self.linear2(F.gelu(self.linear1(x))))
        return self.head(x).view(B, *self.shape)


def in_precision(draft: Any, dtype: torch.dtype) -> Any:
    """`draft` in eval mode and, if it is a draft model of another precision, a copy of it in `dtype` (the
    caller's model stays as it was). A stand-in draft (anything with `config` and `logits`) is kept as is."""
    if isinstance(draft, nn.Module):
        draft.eval()
    if isinstance(draft, RFSQDraftModelWithProjection) and draft.input_projection.weight.dtype != dtype:
        draft = copy.deepcopy(draft).to(dtype)
    return draft


DraftLogits = Callable[[Tensor, Tensor], Tensor]
"""A draft at inference: hidden [B, input_dim], main's layer-0 codes [B, 128] -> logits [B, K, 128, levels]."""


def proposer(draft: Any) -> DraftLogits:
    """What proposes for `draft` at inference: the lean path when it reproduces the model's logits, else the
    model itself; a stand-in draft (anything with `config` and `logits`) its own `logits`."""
    if not isinstance(draft, RFSQDraftModelWithProjection):
        return draft.logits
    lean = LeanDraft.from_draft(draft)
    return lean.logits if lean is not None else draft


def num_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_draft(path: str | os.PathLike) -> tuple[RFSQDraftModelWithProjection, dict[str, Any]]:
    """Rebuild a trained draft from its checkpoint alone -> (model in eval mode on the CPU, training record:
    epoch, val_accuracy, val_accuracies_per_layer, layer_exact_match). Any unusable file is a clear error;
    `rsd.draft.verify` reports the same problems check by check."""
    ckpt = load_torch(path, "draft model")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"draft checkpoint {path} lacks {missing}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise ValueError(f"draft checkpoint {path} has format_version={ckpt['format_version']!r}, "
                         f"this code reads {FORMAT_VERSION}")
    try:
        model = RFSQDraftModelWithProjection(DraftConfig.from_dict(ckpt["config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"draft checkpoint {path} has an invalid config: {exc}") from exc
    problems = state_dict_problems(model, ckpt["model_state_dict"])
    if problems:
        raise ValueError(f"draft checkpoint {path} does not fit its config: " + misfit_message(problems))
    bad = first_non_finite(ckpt["model_state_dict"])  # a NaN draft still runs: noise proposals, meaningless acceptance
    if bad:
        raise ValueError(f"draft checkpoint {path} holds non-finite weights ({bad}); expected finite weights: "
                         f"retrain it, `dvc repro train`")
    model.load_state_dict(ckpt["model_state_dict"])
    record = {k: ckpt[k] for k in ("epoch", "val_accuracy", "val_accuracies_per_layer", "layer_exact_match")}
    return model.eval(), record
