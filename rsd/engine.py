"""The RSD inference engine: main policy + optional draft + tokenizer -> an action chunk per call.

Decoding one chunk of L residual layers:

- no draft: prefill (gives layer 0 and the hidden state), then L-1 single-position passes.
- draft: the draft proposes layers 0..K-1 (K = 3) from the hidden state (and from main's layer-0 codes,
  if it reads them); main's own layer 0 comes from the prefill and is checked against the draft's for
  free. One verify pass feeds [main's layer 0, draft layers 1..K-1] and returns main's view of layers
  1..K. The longest prefix of draft layers 1..K-1 that main agrees with is kept, the KV cache is cut
  back to the positions fed with kept codes, and decoding continues one layer per pass from there. The verify pass is never wasted: its first
  output (main's layer 1 given main's layer 0) is exact whatever the draft proposed.

  Main's layer 0 is always the one fed, so a draft layer l >= 1 is checked against exactly what main
  would decode there, whether or not the draft also got layer 0 right: `accepted_layers` counts the
  kept draft layers 1..K-1, which is the number of main passes saved (main passes = L - accepted).

Acceptance: `strict` keeps a draft layer only if all its codes equal main's (actions identical to no
draft, up to floating-point near-ties); `relaxed` keeps one whose every code main finds plausible: main's
verify pass gives it at least `min_ratio` times the probability of main's own choice there (Medusa's
typical acceptance, on whole RFSQ layers). One knob from strict (1: only main's choices) to keeping
every proposal (0). Either way the codes decoded are main's own views from the verify pass; in relaxed
mode those of later layers were conditioned on the draft's plausible codes.

The gate: speculating costs the draft, a verify pass wider than a one-layer pass and the bookkeeping,
which pays only if main keeps enough draft layers. With `min_kept_layers` > 0 the engine keeps a running
average of the layers kept per speculating call since `reset()` (an episode's start) and, while it is
below that, decodes without the draft (not even running it), speculating only every `PROBE_EVERY`-th call
to keep the average current; each probe that keeps nothing doubles the wait before the next (up to
`MAX_PROBE_EVERY`), so a draft main never agrees with costs ever less. The average is of
acceptance, not of time, so which calls speculate is a function of the episode's observations alone.

Speed: a call runs under `torch.inference_mode` and reads back to the host once (the kept layer count,
which the gate also reads); its statistics are computed when first read, after the
call has returned its actions (`Prediction.stats`). Time marks are `perf_counter` on the CPU and CUDA
events on a GPU (no synchronisation inside the call). Each instruction's word ids are cached, inputs
reach a GPU through pinned buffers, and the draft runs in the precision `draft_precision` asks for,
through its inference form (`rsd.draft.model.proposer`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor

from rsd.config import Config
from rsd.contract import CHUNK_LEN, CODES_PER_LAYER, LATENT_DIM
from rsd.draft.model import DraftLogits, RFSQDraftModelWithProjection, in_precision, load_draft, proposer
from rsd.hardware import resolve_precision
from rsd.policy.model import MainPolicy, PolicyCache
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.engine")

MODES = ("none", "strict", "relaxed")
"""Acceptance modes: no draft, then the two acceptance rules."""
DRAFT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROBE_EVERY = 7
"""While the gate holds speculation back, the this-many-th call still speculates (measuring acceptance)."""
MAX_PROBE_EVERY = 8 * PROBE_EVERY
"""The longest wait between probes: each probe that keeps no draft layer doubles the wait, up to this."""
KEPT_AVERAGE_WEIGHT = 0.25
"""Weight of the newest speculating call in the gate's running average of kept layers."""


@dataclass
class EngineConfig(Config):
    """How the engine decodes (set by params.yaml `eval`; the mode by the variant)."""

    prefix: ClassVar[str] = "eval"

    mode: str = "none"
    """`none` (no draft), `strict` (lossless speculation) or `relaxed` (codes main finds plausible)."""
    min_ratio: float = 0.1
    """relaxed only: a draft code is plausible when main's verify pass gives it at least this share of the
    probability of main's own choice there; a layer is kept when all its codes are. 1 keeps only main's
    choices (as strict), 0 keeps every proposal."""
    min_kept_layers: float = 0.0
    """The gate: speculate while main keeps at least this many draft layers per speculating call, on a
    running average since the episode began; below it, only a probing call speculates, every `PROBE_EVERY`-th
    at first and half as often after each probe that keeps nothing (down to one in `MAX_PROBE_EVERY`). Set it
    to what speculating costs beyond a no-draft call, in one-layer passes (the bench measures it as
    `break_even_layers`). 0 always speculates."""
    draft_precision: str = "fp32"
    """`fp32`, `bf16`, or `auto` (bf16 where it runs natively, rsd.hardware): the precision the draft model
    runs in. Which is cheaper depends on the machine (the bench times both: `draft_call_ms`); emulated bf16
    is always the slower. Main checks every proposal, so strict decoding stays exact either way."""

    def validate(self) -> None:
        self.check(self.mode in MODES, "mode", f"one of {', '.join(MODES)}")
        self.check(0 <= self.min_ratio <= 1, "min_ratio", "a number in [0, 1]")
        self.check(0 <= self.min_kept_layers, "min_kept_layers", "a non-negative number")
        self.check(self.draft_precision in ("auto", *DRAFT_DTYPES), "draft_precision",
                   f"one of auto, {', '.join(DRAFT_DTYPES)}")

    @classmethod
    def for_mode(cls, values: dict[str, Any], mode: str) -> EngineConfig:
        """params.yaml `eval` (a dict, or its config's fields) -> the engine config of `mode`: the one mapping
        from eval params to the engine, by field name."""
        names = {f.name for f in dataclasses.fields(cls)} - {"mode"}
        return cls(mode=mode, **{name: values[name] for name in names if name in values})

    def draft_dtype(self, device_type: str) -> torch.dtype:
        """The draft's dtype on a `device_type` device."""
        return DRAFT_DTYPES[resolve_precision(self.draft_precision, device_type)]


@dataclass
class Prediction:
    """One policy call's result. Its `stats` are computed when first read, after the call has returned its
    actions: they are diagnostics, and their small host reads stay off the path to the action chunk."""

    chunk: np.ndarray  # [8, 7] actions
    tokens: Tensor  # [8, 16, L] the RFSQ codes decoded
    hidden_state: Tensor  # [H] main's hidden state at the act position (what the draft reads)
    finish_stats: Callable[[], dict[str, float]] = field(repr=False)
    layer_logits: list[Tensor] = field(default_factory=list)  # no draft: main's logits [1, 128, levels] per layer
    _stats: dict[str, float] | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[str, float]:
        """draft_ms, main_ms, total_ms (inputs to action chunk), main_passes, acceptance, each span's ms..."""
        if self._stats is None:
            self._stats = self.finish_stats()
        return self._stats


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
        self._draft_logits: DraftLogits | None = None
        self._proposal_shape: tuple[int, ...] | str = "-"  # for the debug line: [1, K, 128] per call
        if draft is not None and self.config.mode != "none":
            self._draft_logits = proposer(draft)
            self._proposal_shape = (1, draft.config.num_coarse_layers, CODES_PER_LAYER)
        # relaxed: a code is plausible when its logit is at most -log(min_ratio) below main's top one
        self._log_ratio = math.log(self.config.min_ratio) if self.config.min_ratio > 0 else -math.inf
        self._instructions: dict[str, dict[str, Tensor]] = {}
        self._pinned: dict[str, Tensor] = {}  # host staging of each input on a GPU (`_to_device`)
        self.reset()

    def reset(self) -> None:
        """Forget the gate's running average: a new episode starts speculating."""
        self._kept_average: float | None = None
        self._calls_held_back = 0
        self._probe_every = PROBE_EVERY

    def _gate_open(self) -> bool:
        """Speculate on this call? Yes when ungated, before any speculating call, while kept layers average at
        least `min_kept_layers`, and on a probing call."""
        return self._paying() or self._calls_held_back >= self._probe_every - 1

    def _paying(self) -> bool:
        """Ungated, before any speculating call, or kept layers averaging at least `min_kept_layers`."""
        threshold = self.config.min_kept_layers
        return threshold == 0 or self._kept_average is None or self._kept_average >= threshold

    def _gate_record(self, accepted: int | None) -> None:
        """What this call did: kept `accepted` draft layers, or (None) held back."""
        if accepted is None:
            self._calls_held_back += 1
            return
        probing = not self._paying()
        previous = self._kept_average
        self._kept_average = accepted if previous is None else previous + KEPT_AVERAGE_WEIGHT * (accepted - previous)
        # a probe that kept nothing: wait longer for the next; any kept layer: look again soon
        self._probe_every = min(2 * self._probe_every, MAX_PROBE_EVERY) if probing and accepted == 0 else PROBE_EVERY
        self._calls_held_back = 0

    # ---- one policy call ----------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, inputs: dict[str, Any]) -> Prediction:
        marks = Marks(self.device)
        obs = self._batch(inputs)
        marks("inputs")
        hidden, logits0, cache = self.policy.prefill(obs)
        codes = [logits0.argmax(-1)]  # per layer [1, 128]
        marks("prefill")
        layer_logits = [logits0]
        if self.config.mode == "none":
            self._decode_rest(codes, cache, marks, layer_logits)
            stats, finish = {"main_passes": self.policy.config.num_layers}, None
        else:
            stats, finish = self._decode_speculative(hidden, codes, cache, marks)
        tokens = torch.stack(codes, dim=-1).unflatten(1, (CHUNK_LEN, LATENT_DIM))  # [1, 8, 16, L]
        chunk = self.tokenizer.decode(tokens.to(self.tokenizer.device))[0].cpu().numpy()  # [8, 7]; waits for the passes
        marks("decode")
        stats["total_ms"] = marks.total_ms()

        def finish_stats() -> dict[str, float]:
            if finish is not None:
                stats.update(finish())
            ms = marks.ms()
            if finish is not None:
                ms.setdefault("verify", 0.0)  # a call the gate held back
            stats.update({f"{name}_ms": value for name, value in ms.items()})
            stats["main_ms"] = ms["prefill"] + ms.get("verify", 0.0) + ms["passes"]
            return stats

        prediction = Prediction(chunk, tokens[0], hidden[0], finish_stats, layer_logits if self.config.mode == "none" else [])
        if log.isEnabledFor(logging.DEBUG):
            s = prediction.stats
            log.debug("Draft time: %.2f ms, Draft tokens shape: %s, Main time: %.2f ms, total %.2f ms, passes %d, "
                      "acceptance %s, Actions shape: %s", s.get("draft_ms", 0.0), self._proposal_shape, s["main_ms"],
                      s["total_ms"], s["main_passes"], s.get("token_acceptance", "-"), chunk.shape)
        return prediction

    def _decode_rest(self, codes: list[Tensor], cache: PolicyCache, marks: Marks, logits: list[Tensor] | None = None) -> None:
        """Layers len(codes)..L-1, one pass each, each fed the codes decoded for the layer before: greedy decoding.
        `logits` gets each layer's logits."""
        while len(codes) < self.policy.config.num_layers:
            layer_logits = self.policy.step(codes[-1], len(codes), cache)
            codes.append(layer_logits.argmax(-1))
            if logits is not None:
                logits.append(layer_logits)
        marks("passes")

    def _decode_speculative(self, hidden: Tensor, codes: list[Tensor], cache: PolicyCache, marks: Marks
                            ) -> tuple[dict[str, Any], Callable[[], dict[str, float]]]:
        """Layers 1..L-1 with the draft's proposal -> (stats, the acceptance statistics to compute once the
        codes are on the host)."""
        num_layers = self.policy.config.num_layers
        if not self._gate_open():  # decode as without a draft, not even running it
            self._gate_record(None)
            marks("draft")
            self._decode_rest(codes, cache, marks)
            return {"main_passes": num_layers, "accepted_layers": 0, "speculated": 0}, lambda: {}
        draft_logits = self._draft_logits(hidden, codes[0])  # [1, K, 128, levels], K coarse layers
        proposal = draft_logits.argmax(-1)  # [1, K, 128]
        K = proposal.shape[1]
        marks("draft")
        # main's own code for each proposed layer, in the context decoding took: layer 0 from the prefill,
        # then the verify pass's views up to the first rejected layer, then the passes after it
        finish = partial(self._acceptance, proposal, codes)
        # verify: feed main's layer 0 and draft layers 1..K-1 -> main's view of layers 1..K
        fed = torch.cat([codes[0][:, None], proposal[:, 1:]], dim=1)  # [1, K, 128]
        view_logits = self.policy.step_many(fed, 0, cache)  # [1, K, 128, levels]: [:, i] is main's layer i+1
        views = view_logits.argmax(-1)  # [1, K, 128]
        keep = self._keep(proposal[:, 1:], views[:, : K - 1], view_logits[:, : K - 1])  # [K-1] bools
        accepted = int(keep.cumprod(0).sum())  # kept draft layers 1..accepted: the one host read
        self._gate_record(accepted)
        marks("verify")
        # main's own codes for layers 1..accepted+1 (strict: equal to the draft's where accepted; relaxed:
        # conditioned on the draft's plausible codes, which is where the loss comes from)
        codes.extend(views[:, : accepted + 1].unbind(1))
        cache.crop(cache.prompt_length + accepted + 1)  # positions fed with kept codes
        self._decode_rest(codes, cache, marks)
        return {"main_passes": num_layers - accepted, "accepted_layers": accepted, "speculated": 1}, finish

    def _keep(self, draft_codes: Tensor, main_codes: Tensor, main_logits: Tensor) -> Tensor:
        """Draft codes [1, n, 128], main's codes [1, n, 128] and logits [1, n, 128, levels] of the same layers
        -> [n] bools: does main keep each draft layer?"""
        if self.config.mode == "strict":
            return (draft_codes == main_codes).all(dim=-1)[0]
        proposed = main_logits.gather(-1, draft_codes[..., None])[..., 0]  # [1, n, 128]
        return (proposed >= main_logits.amax(dim=-1) + self._log_ratio).all(dim=-1)[0]

    @staticmethod
    def _acceptance(proposal: Tensor, codes: list[Tensor]) -> dict[str, float]:
        """Share of the draft's codes [1, K, 128] equal to main's decoded ones (per layer [1, 128]), per layer
        and over all."""
        per_layer = (proposal[0] == torch.cat(codes[: proposal.shape[1]])).float().mean(dim=-1).tolist()  # [K]
        stats = {f"token_acceptance_L{layer}": value for layer, value in enumerate(per_layer)}
        stats["token_acceptance"] = sum(per_layer) / len(per_layer)
        return stats

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
        obs = {name: self._to_device(name, np.asarray(inputs[name], dtype=dtype))[None]
               for name, dtype in (("agentview", np.uint8), ("wrist", np.uint8), ("proprio", np.float32))}
        obs.update(self._instructions[text])
        return obs

    def _to_device(self, name: str, array: np.ndarray) -> Tensor:
        """`array` on the policy's device. On a GPU through a pinned buffer kept per input: a copy from pageable
        memory blocks the host for each input, one from pinned memory is queued. The buffer is rewritten only by
        the next call, after this one has read its results back, so its copy is done by then."""
        if self.device.type != "cuda":
            return torch.as_tensor(np.ascontiguousarray(array))
        buffer = self._pinned.get(name)
        if buffer is None or tuple(buffer.shape) != array.shape or buffer.numpy().dtype != array.dtype:
            buffer = self._pinned[name] = torch.from_numpy(np.empty_like(array)).pin_memory()
        buffer.numpy()[...] = array
        return buffer.to(self.device, non_blocking=True)


class Marks:
    """Time marks within one call: `marks("verify")` ends the span named so. `perf_counter` on the CPU; on a
    GPU, CUDA events read once the call's results are on the host, so timing adds no synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.names: list[str] = []
        self.points: list[Any] = []
        self.start = time.perf_counter()
        self("start")

    def __call__(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())
        self.names.append(name)

    def ms(self) -> dict[str, float]:
        """Each span's ms, by the name of the mark that ended it."""
        if self.cuda:
            self.points[-1].synchronize()
            spans = [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        else:
            spans = [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:])]
        return dict(zip(self.names[1:], spans))

    def total_ms(self) -> float:
        """Wall ms since the call began (host clock: the results are on the host by now)."""
        return (time.perf_counter() - self.start) * 1e3


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
                         f"trained on, or retrain the policy on this one, `dvc repro dagger`")


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
