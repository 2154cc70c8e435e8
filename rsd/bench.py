"""The speed benchmark: the same real observations through no-draft, strict and relaxed decoding, interleaved.

1. **Record** (rsd.recording, in LIBERO). The main policy (no draft) runs closed loop from fresh
   placements; the observation of every policy call is kept, then thinned evenly across the tasks.
   Everything below needs no simulator, only the observations: the stage writes them to a file
   (`save_observations`), so `rsd bench --observations FILE` times the checkpoints on another machine.
2. **Time.** In one process, after `warmup` untimed calls of each engine, every observation goes
   through every engine `repetitions` times. The engines take turns, and the order rotates from one
   observation (and repetition) to the next, so a slow spell of the machine hits them alike. Besides
   no-draft, strict and relaxed decoding, a fourth engine times the ceiling: strict decoding with a
   perfect draft, one that always proposes main's own codes (found per observation first, untimed)
   while still running the real draft model for its cost. Its speedup is the most any draft of this
   size can give this policy on this machine. The acceptance sweep times relaxed decoding at every
   ratio of `min_ratios` among them, from strict (1) to keeping every proposal (0).
3. **Report.** Latency is the wall time of a whole `predict` call (inputs to action chunk, on CUDA
   synchronised at both ends; the call's statistics are computed after it). `no_draft_ms` and
   `draft_ms` are medians over all timed calls; `speedup` is their ratio. Its spread,
   `speedup_p10`/`speedup_p90`, is the 10th/90th percentile of the per-observation ratios (each the ratio
   of that observation's median latencies), so it shows how the gain varies from one observation to
   another, acceptance included. `timing_noise` gives the same figures for no-draft decoding timed a
   second time beside the first: identical work, so their distance from 1 is the machine's (on a 2-core
   cloud CPU with 5 repetitions, p10-p90 spanned 0.89-1.08). `breakdown_ms` splits a mode's calls into their spans (`BREAKDOWN`).

Strict mode must decode the tokens of no-draft decoding. Every observation whose strict tokens differ
counts in `action_mismatches`; those whose first differing layer has, at every differing code, a top-2
logit margin below `near_tie_margin` in no-draft decoding are also counted in `near_ties` (a pass over
several positions may round differently from one over a single position). Relaxed mode trades
exactness for speed: its token mismatches and its mean action deviation from no-draft are reported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsd.config import Config
from rsd.contract import CHUNK_LEN
from rsd.draft.model import RFSQDraftModelWithProjection, in_precision, load_draft, proposer
from rsd.engine import DRAFT_DTYPES, MODES, EngineConfig, Prediction, RSDEngine
from rsd.io import atomic_path
from rsd.policy.model import MainPolicy
from rsd.progress import Progress
from rsd.sim.suite import TASKS_EXPECTED, are_task_indices, task_indices
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.bench")

@dataclass
class BenchConfig(Config):
    """params.yaml `bench`: which observations to record and how to time them."""

    prefix: ClassVar[str] = "bench"

    observations: int = 200
    """Observations timed, spread evenly over the tasks (each a real policy call's inputs)."""
    episodes_per_task: int = 2
    """Closed-loop main-policy episodes per task, from fresh placements, to record observations from."""
    tasks: list[int] | None = None
    """libero_spatial task indices; None means all ten."""
    execute_steps: int = CHUNK_LEN
    """Actions of each chunk executed before the next policy call while recording (as in evaluation)."""
    repetitions: int = 5
    """Timed calls of each engine per observation."""
    warmup: int = 10
    """Untimed calls of each engine before timing (allocator, caches, lazy initialisation)."""
    threads: int = 1
    """torch CPU threads while timing (1: what each evaluation worker uses; on a GPU, the host side's)."""
    workers: int = 2
    """Simulator processes while recording."""
    near_tie_margin: float = 1e-4
    """A strict-mode token difference counts as a near-tie when no-draft's top-2 logit margin is below this."""
    min_ratios: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 0.0])
    """The acceptance sweep: relaxed decoding at each `eval.min_ratio` here, ungated, timed beside the other
    engines (1: only main's own choices; 0: every proposal kept)."""

    def validate(self) -> None:
        for name in ("observations", "episodes_per_task", "execute_steps", "repetitions", "threads", "workers"):
            self.check(getattr(self, name) >= 1, name, "a positive int")
        self.check(self.warmup >= 0, "warmup", "a non-negative int")
        self.check(self.execute_steps <= CHUNK_LEN, "execute_steps", f"in 1..{CHUNK_LEN} (the chunk length)")
        self.check(are_task_indices(self.tasks), "tasks", TASKS_EXPECTED)
        self.check(self.near_tie_margin > 0, "near_tie_margin", "a positive number")
        self.check(all(0 <= r <= 1 for r in self.min_ratios), "min_ratios", "a list of numbers in [0, 1]")

    @property
    def task_indices(self) -> list[int]:
        return task_indices(self.tasks, f"{self.prefix}.tasks")


# ---- 1. the recorded observations, as a file -----------------------------------------------------------

OBSERVATION_ARRAYS = {"agentview": np.uint8, "wrist": np.uint8, "proprio": np.float32}
"""The arrays of one policy input (`LiberoEnv.model_inputs`) besides its instruction, and their dtypes."""


def save_observations(path: str | os.PathLike, observations: list[dict[str, Any]]) -> None:
    """Policy inputs -> one compressed .npz (arrays stacked, instructions as strings), written atomically.
    Plain arrays only: it loads without unpickling anything."""
    if not observations:
        raise ValueError(f"no observations to write to {path}")
    arrays = {k: np.stack([np.asarray(o[k], dtype=dtype) for o in observations]) for k, dtype in OBSERVATION_ARRAYS.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez_compressed(file, instruction=np.array([o["instruction"] for o in observations]), **arrays)


def load_observations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """What `save_observations` wrote -> the policy inputs; anything else is a clear error naming the file."""
    expected = f"an observations file written by the bench stage (arrays {', '.join(['instruction', *OBSERVATION_ARRAYS])})"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("instruction", *OBSERVATION_ARRAYS)}
    except (OSError, ValueError, KeyError) as exc:  # not an npz, pickled objects, a missing array
        raise ValueError(f"{path} is not {expected}: {exc}") from exc
    instructions = arrays["instruction"]
    n = len(instructions)
    problems = [f"{k} is {arrays[k].dtype} of shape {arrays[k].shape}, expected {np.dtype(dtype)} of length {n}"
                for k, dtype in OBSERVATION_ARRAYS.items() if arrays[k].dtype != dtype or len(arrays[k]) != n]
    if instructions.dtype.kind != "U" or n == 0:
        problems.insert(0, f"instruction is {instructions.dtype} of shape {instructions.shape}, expected strings")
    if problems:
        raise ValueError(f"{path} is not {expected}: {'; '.join(problems)}")
    if not np.isfinite(arrays["proprio"]).all():
        raise ValueError(f"{path}: proprio holds non-finite values")
    return [{"agentview": arrays["agentview"][i], "wrist": arrays["wrist"][i], "proprio": arrays["proprio"][i],
             "instruction": str(arrays["instruction"][i])} for i in range(n)]


# ---- 2. time ---------------------------------------------------------------------------------------

# The ceiling: a draft whose proposal is set from outside, found per observation by `perfect_proposal`.


class PinnedDraft(nn.Module):
    """Runs the real draft model (for its cost), then proposes the codes set for this call, if any."""

    def __init__(self, draft: RFSQDraftModelWithProjection) -> None:
        super().__init__()
        self.inner, self.config = draft, draft.config
        self.compute = proposer(draft)  # the draft's inference form, as an engine would run it
        self.proposal: Tensor | None = None

    def logits(self, hidden: Tensor, layer0: Tensor) -> Tensor:
        computed = self.compute(hidden, layer0)  # [1, K, 128, levels], the real work
        if self.proposal is None:
            return computed
        return F.one_hot(self.proposal, computed.shape[-1]).to(computed.dtype)  # its argmax is the proposal


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


def variant(engine: RSDEngine, draft: Any = None, **changes: Any) -> RSDEngine:
    """`engine` with some of its config changed (and another draft), sharing its policy and tokenizer."""
    return RSDEngine(engine.policy, engine.tokenizer, draft or engine.draft, dataclasses.replace(engine.config, **changes))


class PerfectDraftEngine:
    """Strict decoding, never gated, whose draft proposes, for each known observation, main's own codes:
    the ceiling."""

    def __init__(self, strict: RSDEngine, observations: list[dict[str, Any]], plain_tokens: list[Tensor]) -> None:
        self.draft = PinnedDraft(strict.draft)
        self.engine = variant(strict, self.draft, min_kept_layers=0.0)
        self.device = self.engine.device
        self.proposals = {id(inputs): perfect_proposal(self.engine, self.draft, inputs, tokens)
                          for inputs, tokens in zip(observations, plain_tokens)}

    def predict(self, inputs: dict[str, Any]) -> Prediction:
        self.draft.proposal = self.proposals[id(inputs)]
        return self.engine.predict(inputs)


@dataclass
class Timings:
    """One engine's results over the observations."""

    ms: list[list[float]] = field(default_factory=list)  # [observation][repetition] wall ms of predict
    first: list[Prediction] = field(default_factory=list)  # [observation] the first call's prediction


def _wall_ms(engine: RSDEngine, inputs: dict[str, Any]) -> tuple[float, Prediction]:
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    prediction = engine.predict(inputs)
    if cuda:
        torch.cuda.synchronize(engine.device)
    return (time.perf_counter() - start) * 1e3, prediction


def time_engines(engines: dict[str, RSDEngine | PerfectDraftEngine], observations: list[dict[str, Any]], repetitions: int,
                 warmup: int, progress: bool = True) -> dict[str, Timings]:
    """Each observation through every engine `repetitions` times, the engines' order rotating per call round."""
    names = list(engines)
    for i in range(warmup):
        for name in names:
            engines[name].predict(observations[i % len(observations)])
    results = {name: Timings(ms=[[] for _ in observations]) for name in names}
    rounds = 0
    with Progress(repetitions * len(observations), "bench: time", enabled=progress) as bar:
        for rep in range(repetitions):
            for i, inputs in enumerate(observations):
                shift = rounds % len(names)
                for name in names[shift:] + names[:shift]:
                    ms, prediction = _wall_ms(engines[name], inputs)
                    results[name].ms[i].append(ms)
                    if rep == 0:
                        results[name].first.append(prediction)
                rounds += 1
                bar.update(1)
    return results


# ---- 3. report -------------------------------------------------------------------------------------


def _layer_codes(tokens: Tensor) -> Tensor:
    """Tokens [8, 16, L] -> codes per layer [L, 128]."""
    return tokens.flatten(0, 1).T


def explain_difference(engine: RSDEngine, inputs: dict[str, Any], tokens: Tensor, margin: float) -> tuple[int, float] | None:
    """Where `tokens` [8, 16, L] first differ from no-draft decoding of `inputs`: (layer, largest top-2
    logit margin of no-draft decoding over that layer's differing codes), or None if they do not differ.
    A margin below `margin` makes the difference a floating-point near-tie."""
    logits = engine.plain_logits(inputs)  # [L, 128, levels]
    plain, other = logits.argmax(-1), _layer_codes(tokens).to(logits.device)
    differs = plain != other  # [L, 128]
    if not differs.any():
        return None
    layer = int(differs.any(dim=1).nonzero()[0])
    top2 = logits[layer].topk(2, dim=-1).values  # [128, 2]
    gaps = (top2[:, 0] - top2[:, 1])[differs[layer]]
    return layer, float(gaps.max())


def token_differences(reference: RSDEngine, observations: list[dict[str, Any]], tokens: list[Tensor], margin: float,
                      expected: list[Tensor] | None = None) -> tuple[int, int, list[int]]:
    """How many of `tokens` (one [8, 16, L] per observation) differ from `reference`'s no-draft decoding (or from
    `expected`, its tokens already decoded), how many of those are near-ties (see `explain_difference`), and the
    first differing layer of each near-tie."""
    mismatches, near_ties, tie_layers = 0, 0, []
    for i, (inputs, found) in enumerate(zip(observations, tokens)):
        if expected is not None and torch.equal(expected[i], found):
            continue
        where = explain_difference(reference, inputs, found, margin)
        if where is None:
            continue
        mismatches += 1
        if where[1] < margin:
            near_ties += 1
            tie_layers.append(where[0])
        else:
            log.warning("tokens differ from no-draft decoding beyond a near-tie (layer, margin): %s", where)
    return mismatches, near_ties, tie_layers


def _percentile(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _r(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def _median_stat(predictions: list[Prediction], key: str) -> float:
    return _r(np.median([p.stats[key] for p in predictions]), 3)


BREAKDOWN = ("inputs", "prefill", "draft", "verify", "passes", "decode")
"""The spans of one call (rsd.engine.Marks), in order: inputs to tensors, the prefill, the draft (and the
gate), the verify pass and its decision, the further one-layer passes, the tokenizer's decode."""


def breakdown(stats: list[dict[str, float]]) -> dict[str, float]:
    """Calls' stats -> median ms of each span of a call, and of the rest (its wall time beyond its spans)."""
    spans = [name for name in BREAKDOWN if f"{name}_ms" in stats[0]]
    out = {name: _r(np.median([s[f"{name}_ms"] for s in stats]), 3) for name in spans}
    rest = [s["total_ms"] - sum(s[f"{name}_ms"] for name in spans) for s in stats]
    return {**out, "rest": _r(np.median(rest), 3)}


def _mode_summary(timed: Timings, plain: Timings, num_proposed_layers: int) -> dict[str, Any]:
    """Latency, speedup and acceptance of one draft mode against no-draft decoding: token acceptance over the
    calls that ran the draft, the share of calls keeping 0..K-1 draft layers over all."""
    all_ms = np.concatenate([np.asarray(m) for m in timed.ms])
    stats = [p.stats for p in timed.first]
    accepted = np.array([s["accepted_layers"] for s in stats])
    return {
        "draft_ms": _r(np.median(all_ms), 3),
        **speedup_spread(plain, timed),
        "p90_ms": _r(_percentile(all_ms, 90), 3),
        **_acceptance([s for s in stats if s["speculated"]]),
        "accepted_layers_per_chunk": _r(accepted.mean()),
        "accepted_layers_share": [_r((accepted == k).mean()) for k in range(num_proposed_layers)],
        "main_passes_per_chunk": _r(np.mean([s["main_passes"] for s in stats])),
        "speculated_share": _r(np.mean([s["speculated"] for s in stats])),
        "draft_model_ms": _median_stat(timed.first, "draft_ms"),
        "main_ms": _median_stat(timed.first, "main_ms"),
        "breakdown_ms": breakdown(stats),
    }


def speedup_spread(plain: Timings, timed: Timings) -> dict[str, float]:
    """The ratio of median latencies over all calls, and the 10th/90th percentile and mean of the
    per-observation ratios (each of that observation's medians)."""
    per_obs = np.array([np.median(p) / np.median(d) for p, d in zip(plain.ms, timed.ms)])
    median_ms = [float(np.median(np.concatenate([np.asarray(m) for m in t.ms]))) for t in (plain, timed)]
    return {"speedup": _r(median_ms[0] / median_ms[1]), "speedup_p10": _r(_percentile(per_obs, 10)),
            "speedup_p90": _r(_percentile(per_obs, 90)), "speedup_mean_per_observation": _r(per_obs.mean())}


def _acceptance(stats: list[dict[str, float]]) -> dict[str, Any]:
    """Share of the draft's codes equal to main's, over all and per layer, over calls that ran the draft."""
    if not stats:
        return {"token_acceptance": None, "token_acceptance_per_layer": []}
    layers = sorted(int(k.rsplit("L", 1)[1]) for k in stats[0] if k.startswith("token_acceptance_L"))
    return {"token_acceptance": _r(np.mean([s["token_acceptance"] for s in stats])),
            "token_acceptance_per_layer": [_r(np.mean([s[f"token_acceptance_L{i}"] for s in stats])) for i in layers]}


def _deviation(plain: Timings, timed: Timings) -> dict[str, Any]:
    """How far a lossy mode's first calls land from no-draft decoding's: tokens and actions."""
    deviation = [np.abs(r.chunk - p.chunk) for p, r in zip(plain.first, timed.first)]
    return {"token_mismatches": sum(not torch.equal(p.tokens, r.tokens) for p, r in zip(plain.first, timed.first)),
            "mean_action_deviation": _r(np.mean([d.mean() for d in deviation]), 6),
            "max_action_deviation": _r(np.max([d.max() for d in deviation]), 6)}


def gate_summary(gated: list[Prediction], ungated: list[Prediction], min_kept_layers: float) -> dict[str, float]:
    """How the gate chose, call by call, against what speculating would have kept (the same engine ungated):
    the share of calls it speculated on, it was right on (speculated exactly where a layer would be kept),
    it speculated on for nothing, and it held back although a layer would have been kept."""
    went = np.array([p.stats["speculated"] == 1 for p in gated])
    pays = np.array([p.stats["accepted_layers"] > 0 for p in ungated])
    return {"min_kept_layers": min_kept_layers, "speculated_share": _r(went.mean()),
            "right_share": _r((went == pays).mean()), "wasted_share": _r((went & ~pays).mean()),
            "missed_share": _r((~went & pays).mean())}


def draft_call_ms(draft: Any, predictions: list[Prediction], warmup: int) -> dict[str, float]:
    """The draft's inference call alone in each precision (`eval.draft_precision`), on the hidden states and
    layer-0 codes of `predictions` (no-draft calls), the precisions taking turns -> median ms of each. Which is
    cheaper depends on the CPU: bf16 kernels pay off on wide products, this draft's are narrow."""
    if not isinstance(draft, RFSQDraftModelWithProjection):
        return {}
    calls = {name: proposer(in_precision(draft, dtype)) for name, dtype in DRAFT_DTYPES.items()}
    device = next(draft.parameters()).device
    inputs = [(p.hidden_state[None].to(device), _layer_codes(p.tokens)[:1].to(device)) for p in predictions]
    ms: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for i in range(warmup + len(inputs)):
            hidden, layer0 = inputs[i % len(inputs)]
            for name, call in calls.items():
                start = time.perf_counter()
                call(hidden, layer0).argmax(-1).cpu()
                if i >= warmup:
                    ms[name].append((time.perf_counter() - start) * 1e3)
    return {name: _r(np.median(values), 3) for name, values in ms.items()}


def break_even_layers(speculating_ms: dict[str, float], layer_pass_ms: float) -> float:
    """What speculating costs beyond a no-draft call, in one-layer passes: the draft and the verify pass, less
    the one-layer pass the verify pass stands in for (`speculating_ms`: a speculating mode's breakdown). A
    gate (eval.min_kept_layers) set below it lets calls speculate that cost more than they save."""
    return _r((speculating_ms["draft"] + speculating_ms["verify"] - layer_pass_ms) / layer_pass_ms, 3)


def device_name(device: torch.device | str) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark(engines: dict[str, RSDEngine], observations: list[dict[str, Any]], config: BenchConfig,
              progress: bool = True) -> dict[str, Any]:
    """Time `engines` ({"none", "strict", "relaxed"} -> engine) on the observations; the metrics.

    The top-level `draft_ms`, `speedup`, `speedup_p10`, `speedup_p90`, `token_acceptance` are strict
    mode's (lossless: the project's claim); `strict` and `relaxed` hold each mode's in full."""
    missing = [m for m in MODES if m not in engines]
    if missing:
        raise ValueError(f"benchmark needs engines for modes {', '.join(MODES)}; missing {', '.join(missing)}")
    if not observations:
        raise ValueError("benchmark needs at least one observation")
    device = engines["none"].device
    relaxed = engines["relaxed"]
    sweep = {f"min_ratio={r:g}": variant(relaxed, min_ratio=r, min_kept_layers=0.0) for r in config.min_ratios}
    ungated = {mode: variant(engines[mode], min_kept_layers=0.0) for mode in ("strict", "relaxed")}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # on a GPU too: the host side (inputs, the tokenizer's decode) is tiny work
    start = time.monotonic()
    try:
        plain_tokens = [engines["none"].predict(inputs).tokens for inputs in observations]
        # "none, again": no-draft decoding a second time, whose "speedup" is the machine's timing noise
        timed = time_engines({**engines, "none, again": variant(engines["none"]),
                              "perfect": PerfectDraftEngine(engines["strict"], observations, plain_tokens),
                              **sweep}, observations, config.repetitions, config.warmup, progress)
        speculating = {mode: [engine.predict(inputs) for inputs in observations] for mode, engine in ungated.items()}
        draft_calls = draft_call_ms(relaxed.draft, timed["none"].first, config.warmup)
    finally:
        torch.set_num_threads(threads)
    plain = timed["none"]
    K = relaxed.draft.config.num_coarse_layers
    summaries = {mode: _mode_summary(timed[mode], plain, K) for mode in ("strict", "relaxed", "perfect")}
    gate = {mode: gate_summary(timed[mode].first, speculating[mode], engines[mode].config.min_kept_layers)
            for mode in ("strict", "relaxed")}
    for mode in gate:  # the draft's agreement with main on every observation, not only where the gate let it run
        summaries[mode].update(_acceptance([p.stats for p in speculating[mode]]))

    # strict exactness, on the gated engine's calls and on every call speculating (the ungated engine's)
    expected = [p.tokens for p in plain.first]
    mismatches, near_ties, tie_layers = 0, 0, []
    for predictions in (timed["strict"].first, speculating["strict"]):
        found = token_differences(engines["none"], observations, [p.tokens for p in predictions], config.near_tie_margin, expected)
        mismatches, near_ties, tie_layers = mismatches + found[0], near_ties + found[1], tie_layers + found[2]
    summaries["strict"].update(action_mismatches=mismatches, near_ties=near_ties)
    summaries["relaxed"].update(min_ratio=relaxed.config.min_ratio, **_deviation(plain, timed["relaxed"]))
    acceptance_sweep = []
    for name, engine in sweep.items():
        summary = _mode_summary(timed[name], plain, K)
        acceptance_sweep.append({"min_ratio": engine.config.min_ratio, **{k: summary[k] for k in (
            "speedup", "speedup_p10", "speedup_p90", "accepted_layers_per_chunk", "accepted_layers_share",
            "speculated_share", "token_acceptance")}, **_deviation(plain, timed[name])})
    plain_ms = np.concatenate([np.asarray(m) for m in plain.ms])
    # one one-layer pass of main, beside the draft's one call (strict's draft_model_ms)
    layer_pass_ms = _r(np.median([p.stats["passes_ms"] / (p.stats["main_passes"] - 1) for p in plain.first]), 3)
    head = summaries["strict"]
    result = {
        "no_draft_ms": _r(np.median(plain_ms), 3),
        "draft_ms": head["draft_ms"],
        "speedup": head["speedup"],
        "speedup_p10": head["speedup_p10"],
        "speedup_p90": head["speedup_p90"],
        "device": device_name(device),
        "acceptance_mode": "strict",
        "token_acceptance": head["token_acceptance"],
        "action_mismatches": summaries["strict"]["action_mismatches"],
        "near_ties": summaries["strict"]["near_ties"],
        "strict": summaries["strict"],
        "relaxed": summaries["relaxed"],
        "speedup_perfect_draft": summaries["perfect"]["speedup"],
        "perfect": summaries["perfect"],
        "no_draft": {
            "ms": _r(np.median(plain_ms), 3),
            "p90_ms": _r(_percentile(plain_ms, 90), 3),
            "main_ms": _median_stat(plain.first, "main_ms"),
            "main_passes_per_chunk": _r(np.mean([p.stats["main_passes"] for p in plain.first])),
            "layer_pass_ms": layer_pass_ms,
            "breakdown_ms": breakdown([p.stats for p in plain.first]),
        },
        "timing_noise": speedup_spread(plain, timed["none, again"]),
        "break_even_layers": break_even_layers(summaries["perfect"]["breakdown_ms"], layer_pass_ms),
        "draft_call_ms": draft_calls,
        "acceptance_sweep": acceptance_sweep,
        "gate": gate,
        "near_tie_margin": config.near_tie_margin,
        "speedup_spread": "p10/p90 of per-observation ratios of median no-draft to median draft latency; "
                          "timing_noise: the same for no-draft decoding timed twice",
        "observations": len(observations),
        "repetitions": config.repetitions,
        "warmup": config.warmup,
        "threads": config.threads,
        "torch_device": str(device),
        "timing_seconds": round(time.monotonic() - start, 1),
    }
    if tie_layers:
        result["near_tie_layers"] = sorted(set(tie_layers))
    log.info("bench on %s: no draft %.2f ms, strict %.2f ms (x%.3f, p10 %.3f, p90 %.3f), relaxed x%.3f; token "
             "acceptance strict %.3f relaxed %.3f; strict mismatches %d (near-ties %d); a perfect draft x%.3f",
             result["device"], result["no_draft_ms"], result["draft_ms"], result["speedup"],
             result["speedup_p10"], result["speedup_p90"], summaries["relaxed"]["speedup"],
             summaries["strict"]["token_acceptance"], summaries["relaxed"]["token_acceptance"], mismatches, near_ties,
             result["speedup_perfect_draft"])
    return result



def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes: which checkpoint a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def time_checkpoints(policy_path: str, tokenizer_path: str, draft_path: str, observations: list[dict[str, Any]],
                     config: BenchConfig, engine_configs: dict[str, EngineConfig], device: str,
                     compile: bool, label: str = "") -> dict[str, Any]:
    """`benchmark` of the checkpoints on recorded observations, eager and (with `compile`) on the compiled path
    (rsd.compiled), one after the other in one process; with both, how the compiled no-draft tokens compare.
    The result names the checkpoints (`label`, and each file's sha256)."""
    from rsd.compiled import compiled_engines

    policy = MainPolicy.load(policy_path).to(device)
    tokenizer = RFSQTokenizer.load(tokenizer_path)
    draft = load_draft(draft_path)[0].to(device)
    names = (f"main policy {policy_path}", tokenizer_path)
    eager = {mode: RSDEngine(policy, tokenizer, None if mode == "none" else draft, engine_configs[mode], names)
             for mode in MODES}
    files = {"policy": policy_path, "tokenizer": tokenizer_path, "draft": draft_path}
    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "observations": len(observations),
        "checkpoints": label, "checkpoint_sha256": {name: file_sha256(path) for name, path in files.items()},
        "eager": benchmark(eager, observations, config)}
    if compile:
        start = time.monotonic()
        words = max(len(policy.config.encode_instruction(o["instruction"])) for o in observations)
        compiled = compiled_engines(eager, max_words=words)
        result["compiled"] = benchmark(compiled, observations, config)  # its warm-up compiles and captures
        result["compiled"]["wall_seconds"] = round(time.monotonic() - start, 1)
        tokens = [compiled["none"].predict(o).tokens for o in observations]
        mismatches, near_ties, _ = token_differences(eager["none"], observations, tokens, config.near_tie_margin)
        result["compiled_vs_eager"] = {"token_mismatches": mismatches, "near_ties": near_ties,
                                       "speedup_no_draft": _r(result["eager"]["no_draft_ms"] / result["compiled"]["no_draft_ms"])}
    return result
