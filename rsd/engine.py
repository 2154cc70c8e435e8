"""The RSD inference engine: main policy + optional draft + tokenizer -> an action chunk per call.

Decoding one chunk of L residual layers:

- no draft: prefill (gives layer 0 and the hidden state), then L-1 single-position passes.
- draft: the draft proposes layers 0..2 from the hidden state. Main's own layer 0 (from the prefill)
  checks the draft's layer 0 for free. One verify pass feeds [main's layer 0, draft layer 1, draft
  layer 2] and returns main's view of layers 1, 2 and 3. The longest accepted prefix of draft layers
  is kept, the KV cache is cut back to the positions fed with codes that were kept, and decoding
  continues one layer per pass from there. The verify pass is never wasted: its first output (main's
  layer 1 given main's layer 0) is exact whatever the draft proposed.

Acceptance: `strict` keeps a draft layer only if all its codes equal main's (actions identical to no
draft, up to floating-point near-ties); `relaxed` keeps one whose codes are all within `tolerance`
levels of main's (faster, lossy: the kept codes are the draft's).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsd.draft.model import RFSQDraftModelWithProjection, load_draft
from rsd.policy.model import MainPolicy, PolicyCache
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.engine")

MODES = ("none", "strict", "relaxed")


@dataclass
class EngineConfig:
    """How the engine decodes."""

    mode: str = "none"
    """`none` (no draft), `strict` (lossless speculation) or `relaxed` (per-code tolerance)."""
    tolerance: int = 1
    """relaxed only: a draft code is accepted when it is within this many levels of main's."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"engine mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not isinstance(self.tolerance, int) or self.tolerance < 0:
            raise ValueError(f"engine tolerance must be a non-negative int, got {self.tolerance!r}")


@dataclass
class Prediction:
    """One policy call's result."""

    chunk: np.ndarray  # [8, 7] actions
    tokens: Tensor  # [8, 16, L] the RFSQ codes decoded
    hidden_state: Tensor  # [H] main's hidden state at the act position (what the draft reads)
    stats: dict[str, float]  # draft_ms, main_ms, total_ms, main_passes, acceptance...


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
        self.policy, self.tokenizer, self.draft = policy.eval(), tokenizer.eval(), draft
        self.device = next(policy.parameters()).device
        self._instructions: dict[str, dict[str, Tensor]] = {}

    # ---- one policy call ----------------------------------------------------------------------------

    @torch.no_grad()
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
        log.debug("Draft time: %.2f ms, Main time: %.2f ms, total %.2f ms, passes %d, Actions shape: %s",
                  stats.get("draft_ms", 0.0), stats["main_ms"], stats["total_ms"], stats["main_passes"], chunk.shape)
        return Prediction(chunk, tokens[0], hidden[0], stats)

    def _decode_plain(self, codes: list[Tensor], cache: PolicyCache) -> dict[str, float]:
        """Layers 1..L-1, one pass each (what MainPolicy.generate does, keeping the hidden state)."""
        for layer in range(1, self.policy.config.num_layers):
            codes.append(self.policy.step(codes[-1], layer, cache).argmax(-1))
        return {"main_passes": self.policy.config.num_layers}

    def _decode_speculative(self, hidden: Tensor, codes: list[Tensor], cache: PolicyCache) -> dict[str, float]:
        policy, num_layers = self.policy, self.policy.config.num_layers
        t1 = self._now()
        proposal = self.draft.propose(hidden)  # [1, K, 128], K coarse layers
        t2 = self._now()
        K = proposal.shape[1]
        # verify: feed main's layer 0 and draft layers 1..K-1 -> main's view of layers 1..K
        fed = torch.cat([codes[0][:, None], proposal[:, 1:]], dim=1)  # [1, K, 128]
        views = policy.step_many(fed, 0, cache).argmax(-1)  # [1, K, 128]: main's layers 1..K
        passes = 2
        accepted = int(self._accept(proposal[:, 0], codes[0]))  # draft layers kept, a prefix of 0..K-1
        for layer in range(1, K):
            if accepted == layer and self._accept(proposal[:, layer], views[:, layer - 1]):
                accepted += 1
                codes.append(proposal[:, layer])
            else:
                break
        # main's view of layer len(codes) was conditioned only on kept codes: it is exact
        codes.append(views[:, len(codes) - 1])
        cache.crop(cache.prompt_length + len(codes) - 1)  # positions fed with kept codes
        while len(codes) < num_layers:
            codes.append(policy.step(codes[-1], len(codes), cache).argmax(-1))
            passes += 1
        main_view = torch.cat([codes[0][:, None], views[:, : K - 1]], dim=1)  # [1, K, 128]: main's codes where the draft proposed
        stats = {
            "draft_ms": (t2 - t1) * 1e3,
            "main_passes": passes,
            "accepted_layers": accepted,
            "token_acceptance": (proposal == main_view).float().mean().item(),
        }
        for layer in range(K):
            stats[f"token_acceptance_L{layer}"] = (proposal[:, layer] == main_view[:, layer]).float().mean().item()
        return stats

    def _accept(self, draft_codes: Tensor, main_codes: Tensor) -> bool:
        if self.config.mode == "strict":
            return bool(torch.equal(draft_codes, main_codes))
        return bool(((draft_codes - main_codes).abs() <= self.config.tolerance).all())

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
