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
the draft in the precision `draft_precision` asks for, through its inference form
(`rsd.draft.model.proposer`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor

from rsd.config import Config
from rsd.contract import CHUNK_LEN, CODES_PER_LAYER, LATENT_DIM
from rsd.draft.model import RFSQDraftModelWithProjection, in_precision, load_draft, proposer
from rsd.hardware import resolve_precision
from rsd.policy.model import MainPolicy, PolicyCache
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.engine")

MODES = ("none", "strict", "relaxed")
"""Acceptance modes: no draft, then the two acceptance rules."""
DRAFT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class EngineConfig(Config):
    """How the engine decodes (set by params.yaml `eval`; the mode by the variant)."""

    prefix: ClassVar[str] = "eval"

    mode: str = "none"
    """`none` (no draft), `strict` (lossless speculation) or `relaxed` (per-code tolerance)."""
    tolerance: int = 1
    """relaxed only: a draft code is accepted when it is within this many levels of main's."""
    draft_precision: str = "fp32"
    """`fp32`, `bf16`, or `auto` (bf16 where it runs natively, rsd.hardware): the precision the draft model
    runs in. bf16 halves its time on a CPU with AVX512-BF16 (and on a GPU) and doubles it on one without;
    main checks every proposal, so strict decoding stays exact either way."""

    def validate(self) -> None:
        self.check(self.mode in MODES, "mode", f"one of {', '.join(MODES)}")
        self.check(self.tolerance >= 0, "tolerance", "a non-negative int")
        self.check(self.draft_precision in ("auto", *DRAFT_DTYPES), "draft_precision",
                   f"one of auto, {', '.join(DRAFT_DTYPES)}")

    def draft_dtype(self, device_type: str) -> torch.dtype:
        """The draft's dtype on a `device_type` device."""
        return DRAFT_DTYPES[resolve_precision(self.draft_precision, device_type)]


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
                 config: EngineConfig | None = None, names: tuple[str, str] = ("the main policy", "the tokenizer")) -> None:
        """`names`: how an error names the policy and the tokenizer (`load_engine` gives their files)."""
        self.config = config or EngineConfig()
        if self.config.mode != "none" and draft is None:
            raise ValueError(f"engine mode {self.config.mode!r} needs a draft model")
        policy.config.check_tokenizer(tokenizer.config.num_layers, tokenizer.config.levels)
        check_tokenizer_pair(policy, tokenizer, *names)
        if draft is not None:
            hidden = policy.config.backbone.hidden_size
            if draft.config.input_dim != hidden:
                raise ValueError(f"the draft reads hidden states of size {draft.config.input_dim}, the policy's are {hidden}")
            if draft.config.num_coarse_layers >= policy.config.num_layers:
                raise ValueError(f"the draft proposes {draft.config.num_coarse_layers} layers; the policy has only {policy.config.num_layers}")
            if draft.config.num_coarse_layers < 2:
                raise ValueError("the draft must propose at least 2 layers (layer 0 is main's own, from the prefill)")
        self.device = next(policy.parameters()).device
        if draft is not None:
            draft = in_precision(draft, self.config.draft_dtype(self.device.type))
        self.policy, self.tokenizer, self.draft = policy.eval(), tokenizer.eval(), draft
        self._propose: Callable[[Tensor], Tensor] | None = None
        self._proposal_shape: tuple[int, ...] | str = "-"  # for the debug line: [1, K, 128] per call
        if draft is not None and self.config.mode != "none":
            self._propose = proposer(draft)
            self._proposal_shape = (1, draft.config.num_coarse_layers, CODES_PER_LAYER)
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
        tokens = torch.stack(codes, dim=-1).unflatten(1, (CHUNK_LEN, LATENT_DIM))  # [1, 8, 16, L]
        chunk = self.tokenizer.decode(tokens.cpu())[0].numpy()  # [8, 7]
        stats["total_ms"] = (self._now() - start) * 1e3
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Draft time: %.2f ms, Draft tokens shape: %s, Main time: %.2f ms, total %.2f ms, passes %d, "
                      "acceptance %s, Actions shape: %s", stats.get("draft_ms", 0.0), self._proposal_shape,
                      stats["main_ms"], stats["total_ms"], stats["main_passes"], stats.get("token_acceptance", "-"),
                      chunk.shape)
        return Prediction(chunk, tokens[0], hidden[0], stats)

    def _decode_plain(self, codes: list[Tensor], cache: PolicyCache) -> dict[str, Any]:
        """Layers 1..L-1, one pass each, each fed the codes decoded for the layer before: greedy decoding."""
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


def check_tokenizer_pair(policy: MainPolicy, tokenizer: RFSQTokenizer, policy_name: str = "the main policy",
                         tokenizer_name: str = "the tokenizer") -> None:
    """Refuse a tokenizer other than the one `policy` was trained on (its recorded fingerprint): one of the same
    shapes from another run passes every shape check and decodes the policy's codes into other actions. A policy
    built in memory records none (tests, benchmarks on random weights) and is not checked."""
    expected = policy.tokenizer_fingerprint
    if expected is None:
        return
    found = tokenizer.fingerprint()
    if found != expected:
        raise ValueError(f"{policy_name} was trained with tokenizer {expected[:12]}, but {tokenizer_name} is "
                         f"tokenizer {found[:12]} (sha256 of its checkpoint): use the tokenizer the policy was "
                         f"trained on, or retrain the policy on this one, `dvc repro policy`")


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
    engine = RSDEngine(policy, tokenizer, draft, config, names=(f"main policy {policy_path}", tokenizer_path))
    log.info("RSD Inference Engine created - hidden size: %d, draft hidden size: %s, mode: %s",
             policy.config.backbone.hidden_size, draft.config.hidden_dim if draft else "-", config.mode)
    return engine
