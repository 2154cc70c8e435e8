"""The RSD inference engine: main policy + optional draft + tokenizer -> an action chunk per call.

Decoding one chunk of L residual layers:

- no draft: prefill (gives layer 0 and the hidden state), then L-1 single-position passes.
- draft: the draft proposes layers 0..K-1 (K = 3) from the hidden state; main's own layer 0 comes
  from the prefill and is checked against the draft's for free. One verify pass feeds [main's layer
  0, draft layers 1..K-1] and returns main's view of layers 1..K. The longest prefix of draft layers
  1..K-1 that main agrees with is kept, the KV cache is cut back to the positions fed with kept codes,
  and decoding continues one layer per pass from there. The verify pass is never wasted: its first
  output (main's layer 1 given main's layer 0) is exact whatever the draft proposed.

  Main's layer 0 is always the one fed, so a draft layer l >= 1 is checked against exactly what main
  would decode there, whether or not the draft also got layer 0 right: `accepted_layers` counts the
  kept draft layers 1..K-1, which is the number of main passes saved (main passes = L - accepted).

Acceptance: `strict` keeps a draft layer only if all its codes equal main's (actions identical to no
draft, up to floating-point near-ties); `relaxed` keeps one whose codes are all within `tolerance`
levels of main's (faster, lossy). Either way the codes decoded are main's own views from the verify
pass; in relaxed mode those of later layers were conditioned on the draft's nearby codes.

Speed: a call runs under `torch.inference_mode`, reads back to the host once per decision (one
boolean per draft layer, one list of acceptance rates), caches each instruction's word ids, and runs
the draft through `LeanDraft`: the same function as `RFSQDraftModelWithProjection.forward`, with the
query-only products precomputed and the single-token cross-attention folded into one matrix, in the
precision `draft_precision` asks for.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsd.draft.model import RFSQDraftModelWithProjection, load_draft
from rsd.policy.model import MainPolicy, PolicyCache
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.engine")

MODES = ("none", "strict", "relaxed")
DRAFT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class EngineConfig:
    """How the engine decodes."""

    mode: str = "none"
    """`none` (no draft), `strict` (lossless speculation) or `relaxed` (per-code tolerance)."""
    tolerance: int = 1
    """relaxed only: a draft code is accepted when it is within this many levels of main's."""
    draft_precision: str = "fp32"
    """`fp32` or `bf16`: the precision the draft model runs in. bf16 halves its time on a CPU with
    AVX512-BF16 (and on a GPU); main checks every proposal, so strict decoding stays exact either way."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"engine mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not isinstance(self.tolerance, int) or self.tolerance < 0:
            raise ValueError(f"engine tolerance must be a non-negative int, got {self.tolerance!r}")
        if self.draft_precision not in DRAFT_DTYPES:
            raise ValueError(f"engine draft_precision must be one of {', '.join(DRAFT_DTYPES)}; got {self.draft_precision!r}")


@dataclass
class Prediction:
    """One policy call's result."""

    chunk: np.ndarray  # [8, 7] actions
    tokens: Tensor  # [8, 16, L] the RFSQ codes decoded
    hidden_state: Tensor  # [H] main's hidden state at the act position (what the draft reads)
    stats: dict[str, float]  # draft_ms, main_ms, total_ms, main_passes, acceptance...


class LeanDraft:
    """`RFSQDraftModelWithProjection.propose` with less work per call, for inference.

    The draft's decoder layer (post-norm, as torch's `TransformerDecoderLayer` defaults to) sees
    `tgt = queries + context` and a memory of ONE token, the context. Two facts make it cheap:

    - the self-attention input projection is linear, so `tgt @ W_in.T = queries @ W_in.T + context @
      W_in.T`: the first term is fixed and precomputed, leaving a one-row product per call;
    - attention over a single memory token gives every query that token's value (softmax over one key
      is 1), so the cross-attention output is `out_proj(v_proj(context))`, the same row for every
      query: one row through the product `W_out @ W_v`, precomputed.

    The result equals the module's forward up to float rounding (checked on random inputs when built;
    `from_draft` returns None, and the engine uses the module itself, when the check fails or the model
    is not an `RFSQDraftModelWithProjection`). Weights are read once: rebuild it after loading others.
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
        self.proj, self.sa_out = draft.input_projection, sa.out_proj
        self.norm1, self.norm2, self.norm3 = layer.norm1, layer.norm2, layer.norm3
        self.linear1, self.linear2, self.head = layer.linear1, layer.linear2, draft.head
        self.heads, self.hidden_dim = sa.num_heads, D
        self.shape = (c.num_coarse_layers, c.codes_per_layer, c.levels)
        self.dtype = draft.input_projection.weight.dtype

    @classmethod
    def from_draft(cls, draft: nn.Module) -> LeanDraft | None:
        """A LeanDraft for `draft` if it is a standard draft model whose logits it reproduces (to 1e-3 of
        their range in float32, 3e-2 in half precision), else None."""
        if not isinstance(draft, RFSQDraftModelWithProjection):
            return None
        layer = draft.decoder.decoder_layer
        if layer.norm_first or layer.activation is not F.gelu or not layer.self_attn._qkv_same_embed_dim:
            return None
        lean = cls(draft)
        weight = draft.input_projection.weight
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(4, draft.config.input_dim, generator=generator).to(weight.device, weight.dtype)
        with torch.inference_mode():
            expected, got = draft.eval()(probe).float(), lean.logits(probe).float()
        atol = 1e-3 if weight.dtype == torch.float32 else 3e-2
        scale = float(expected.abs().max()) + 1e-6
        if not torch.allclose(got, expected, atol=atol * scale, rtol=0):
            log.warning("lean draft path disagrees with the draft model (max diff %.3g); using the model",
                        float((got - expected).abs().max()))
            return None
        return lean

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, input_dim] -> logits [B, K, 128, levels], as the draft model's forward (eval mode)."""
        D = self.hidden_dim
        context = self.proj(hidden.to(self.dtype))  # [B, D]
        shared = F.linear(context, self.context_w, self.context_b)  # [B, 4D]: q, k, v shares + cross row
        qkv = self.query_qkv + shared[:, None, : 3 * D]  # [B, Q, 3D]
        B, Q = qkv.shape[:2]
        q, k, v = qkv.view(B, Q, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, heads, Q, d] each
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Q, D)
        x = self.norm1(self.queries + context[:, None] + self.sa_out(attn))
        x = self.norm2(x + shared[:, None, 3 * D:])
        x = self.norm3(x + self.linear2(F.gelu(self.linear1(x))))
        return self.head(x).view(B, *self.shape)

    def propose(self, hidden: Tensor) -> Tensor:
        """Greedy draft: hidden [B, input_dim] -> codes long [B, K, 128]."""
        return self.logits(hidden).argmax(dim=-1)


class RSDEngine:
    """`predict(inputs) -> Prediction` for one observation (LiberoEnv.model_inputs)."""

    def __init__(self, policy: MainPolicy, tokenizer: RFSQTokenizer, draft: RFSQDraftModelWithProjection | None = None,
                 config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        if self.config.mode != "none" and draft is None:
            raise ValueError(f"engine mode {self.config.mode!r} needs a draft model")
        policy.config.check_tokenizer(tokenizer.config.num_layers, tokenizer.config.levels)
        if draft is not None:
            hidden = policy.config.backbone.hidden_size
            if draft.config.input_dim != hidden:
                raise ValueError(f"the draft reads hidden states of size {draft.config.input_dim}, the policy's are {hidden}")
            if draft.config.num_coarse_layers >= policy.config.num_layers:
                raise ValueError(f"the draft proposes {draft.config.num_coarse_layers} layers; the policy has only {policy.config.num_layers}")
            if draft.config.num_coarse_layers < 2:
                raise ValueError("the draft must propose at least 2 layers (layer 0 is main's own, from the prefill)")
            if isinstance(draft, nn.Module):
                draft.eval()
            dtype = DRAFT_DTYPES[self.config.draft_precision]
            if isinstance(draft, RFSQDraftModelWithProjection) and draft.input_projection.weight.dtype != dtype:
                draft = copy.deepcopy(draft).to(dtype)  # a copy: the caller's model stays as it was
        self.policy, self.tokenizer, self.draft = policy.eval(), tokenizer.eval(), draft
        self.device = next(policy.parameters()).device
        self._propose = None
        if draft is not None and self.config.mode != "none":
            lean = LeanDraft.from_draft(draft)
            self._propose = lean.propose if lean is not None else draft.propose
        self._instructions: dict[str, dict[str, Tensor]] = {}

    # ---- one policy call ----------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, inputs: dict[str, Any]) -> Prediction:
        start = self._now()
        obs = self._batch(inputs)
        t0 = self._now()
        hidden, logits0, cache = self.policy.prefill(obs)
        codes = [logits0.argmax(-1)]  # per layer [1, 128]
        if self.config.mode == "none":
            stats = self._decode_plain(codes, cache)
        else:
            stats = self._decode_speculative(hidden, codes, cache)
        stats["main_ms"] = (self._now() - t0) * 1e3 - stats.get("draft_ms", 0.0)
        tokens = torch.stack(codes, dim=-1).unflatten(1, (8, 16))  # [1, 8, 16, L]
        chunk = self.tokenizer.decode(tokens.cpu())[0].numpy()  # [8, 7]
        stats["total_ms"] = (self._now() - start) * 1e3
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Draft time: %.2f ms, Draft tokens shape: %s, Main time: %.2f ms, total %.2f ms, passes %d, "
                      "acceptance %s, Actions shape: %s", stats.get("draft_ms", 0.0), stats.pop("_draft_shape", "-"),
                      stats["main_ms"], stats["total_ms"], stats["main_passes"], stats.get("token_acceptance", "-"),
                      chunk.shape)
        stats.pop("_draft_shape", None)
        return Prediction(chunk, tokens[0], hidden[0], stats)

    def _decode_plain(self, codes: list[Tensor], cache: PolicyCache) -> dict[str, Any]:
        """Layers 1..L-1, one pass each (what MainPolicy.generate does, keeping the hidden state)."""
        for layer in range(1, self.policy.config.num_layers):
            codes.append(self.policy.step(codes[-1], layer, cache).argmax(-1))
        return {"main_passes": self.policy.config.num_layers}

    def _decode_speculative(self, hidden: Tensor, codes: list[Tensor], cache: PolicyCache) -> dict[str, Any]:
        policy, num_layers = self.policy, self.policy.config.num_layers
        t1 = self._now()
        proposal = self._propose(hidden)  # [1, K, 128], K coarse layers
        t2 = self._now()
        K = proposal.shape[1]
        # verify: feed main's layer 0 and draft layers 1..K-1 -> main's view of layers 1..K
        fed = torch.cat([codes[0][:, None], proposal[:, 1:]], dim=1)  # [1, K, 128]
        views = policy.step_many(fed, 0, cache).argmax(-1)  # [1, K, 128]: views[:, i] = main's layer i+1
        agree = self._agree(proposal[:, 1:], views[:, : K - 1]).tolist()  # K-1 bools, one host read
        accepted = next((i for i, ok in enumerate(agree) if not ok), K - 1)  # kept draft layers 1..accepted
        # main's own codes for layers 1..accepted+1 (strict: equal to the draft's where accepted; relaxed:
        # conditioned on the draft's nearby codes, which is where the loss comes from)
        codes.extend(views[:, : accepted + 1].unbind(1))
        cache.crop(cache.prompt_length + accepted + 1)  # positions fed with kept codes
        while len(codes) < num_layers:
            codes.append(policy.step(codes[-1], len(codes), cache).argmax(-1))
        # main's own code for each proposed layer, in the context decoding took: layer 0 from the prefill,
        # layers up to accepted+1 from the verify pass, later ones from the passes after it
        reference = [codes[0], *views[:, : accepted + 1].unbind(1), *codes[accepted + 2: K]][:K]
        per_layer = (proposal == torch.stack(reference, dim=1)).float().mean(dim=-1)[0].tolist()  # K
        stats: dict[str, Any] = {
            "draft_ms": (t2 - t1) * 1e3,
            "main_passes": num_layers - accepted,
            "accepted_layers": accepted,
            "token_acceptance": sum(per_layer) / K,
            "_draft_shape": tuple(proposal.shape),
        }
        for layer, value in enumerate(per_layer):
            stats[f"token_acceptance_L{layer}"] = value
        return stats

    def _agree(self, draft_codes: Tensor, main_codes: Tensor) -> Tensor:
        """[B, n, 128] codes each -> [n] bools: does main accept each draft layer (batch of one)?"""
        if self.config.mode == "strict":
            return (draft_codes == main_codes).all(dim=-1)[0]
        return ((draft_codes - main_codes).abs() <= self.config.tolerance).all(dim=-1)[0]

    @torch.inference_mode()
    def plain_logits(self, inputs: dict[str, Any]) -> Tensor:
        """No-draft decoding's logits, layer by layer -> [L, 128, levels] (layer l's logits given the
        codes decoded for layers < l). Their argmax are the no-draft tokens; their top-2 margins tell
        whether a code was a floating-point near-tie (see `rsd.bench.explain_difference`)."""
        _, logits0, cache = self.policy.prefill(self._batch(inputs))
        logits = [logits0]
        for layer in range(1, self.policy.config.num_layers):
            logits.append(self.policy.step(logits[-1].argmax(-1), layer, cache))
        return torch.cat(logits).float()

    # ---- helpers --------------------------------------------------------------------------------------

    def _batch(self, inputs: dict[str, Any]) -> dict[str, Tensor]:
        """One observation -> a batch of one on the policy's device; instruction ids are cached per string."""
        text = inputs["instruction"]
        if text not in self._instructions:
            self._instructions[text] = self.policy.encode_instructions([text])
        obs = {
            "agentview": torch.as_tensor(np.ascontiguousarray(inputs["agentview"]), device=self.device)[None],
            "wrist": torch.as_tensor(np.ascontiguousarray(inputs["wrist"]), device=self.device)[None],
            "proprio": torch.as_tensor(inputs["proprio"], dtype=torch.float32, device=self.device)[None],
        }
        obs.update(self._instructions[text])
        return obs

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


# ---- benchmarking aids: a draft whose proposal is set from outside ---------------------------------


class PinnedDraft(nn.Module):
    """Runs the real draft model (for its cost), then returns the proposal set for this call, if any."""

    def __init__(self, draft: RFSQDraftModelWithProjection) -> None:
        super().__init__()
        self.inner, self.config = draft, draft.config
        self.lean = LeanDraft.from_draft(draft)
        self.proposal: Tensor | None = None

    def propose(self, hidden: Tensor) -> Tensor:
        computed = (self.lean or self.inner).propose(hidden)  # [1, K, 128], the real work
        return computed if self.proposal is None else self.proposal


def perfect_proposal(engine: RSDEngine, draft: PinnedDraft, inputs: dict[str, Any], plain: Tensor) -> Tensor:
    """Main's codes [1, K, 128] as the verify pass sees them (a proposal strict mode keeps whole), starting
    from no-draft decoding's tokens `plain` [8, 16, L]; `engine` decodes strictly through `draft`."""
    K = draft.config.num_coarse_layers
    proposal = plain.flatten(0, 1).T[None, :K].clone()
    for _ in range(K + 1):  # each round fixes at least the first layer the verify pass saw differently
        draft.proposal = proposal
        prediction = engine.predict(inputs)
        if prediction.stats["accepted_layers"] == K - 1:
            return proposal
        proposal = prediction.tokens.flatten(0, 1).T[None, :K].clone()
    raise RuntimeError("could not find a proposal the verify pass accepts whole")


def load_engine(policy_path: str, tokenizer_path: str, draft_path: str | None, config: EngineConfig, device: str = "cpu") -> RSDEngine:
    """Build an engine from checkpoints (a picklable factory for the evaluator's worker processes)."""
    policy = MainPolicy.load(policy_path).to(device)
    tokenizer = RFSQTokenizer.load(tokenizer_path)
    draft = None
    if draft_path is not None and config.mode != "none":
        draft, record = load_draft(draft_path)
        draft = draft.to(device)
        log.info("Draft Model loaded (val_acc: %.3f), projection layer included: %s", record["val_accuracy"],
                 "input_projection.weight" in draft.state_dict())
    engine = RSDEngine(policy, tokenizer, draft, config)
    log.info("RSD Inference Engine created - hidden size: %d, draft hidden size: %s, mode: %s",
             policy.config.backbone.hidden_size, draft.config.hidden_dim if draft else "-", config.mode)
    return engine
