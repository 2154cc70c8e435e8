"""The `report` stage: reports/report.md and its plots, every number read from a metrics file.

Inputs (all required; a missing one is an error naming it and the stage that writes it):
metrics/{demos,policy,recover,dagger,collect,train,verify,eval_no_draft,eval_draft,eval_draft_relaxed,bench}.json and
the DVCLive curves of the main policy (behaviour cloning, then DAgger) and the draft (dvclive/<name>/plots/metrics/**.tsv). Optional:
metrics/bench_7b.json (scripts/bench_7b.py, run on a GPU) adds the section at OpenVLA's scale, and
metrics/bench_gpu.json (`rsd bench --observations ... --device cuda`) the trained checkpoints on a GPU.

Outputs: report.md (comparison table, per-task success, training summary, conclusion checklist) and
three PNGs: training_curves.png, per_task_success.png, latency_breakdown.png.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rsd.config import Config
from rsd.io import atomic_path
from rsd.stats import paired_difference, success_interval

SOURCES = {
    "demos": "demos",
    "tokenizer": "tokenizer",
    "policy": "policy",
    "recover": "recover",
    "dagger": "dagger",
    "collect": "collect",
    "train": "train",
    "verify": "verify",
    "eval_no_draft": "eval_no_draft",
    "eval_draft": "eval_draft",
    "eval_draft_relaxed": "eval_draft_relaxed",
    "bench": "bench",
}
"""metrics/<name>.json the report reads -> the stage that writes it."""
OPTIONAL_SOURCES = ("bench_7b", "bench_gpu")
"""metrics/<name>.json read when present: results made outside the pipeline, on a GPU (scripts/bench_7b.py,
`rsd bench`)."""
CURVES = ("policy", "dagger", "draft")
"""DVCLive runs whose curves are plotted."""
PLOTS = ("training_curves.png", "per_task_success.png", "latency_breakdown.png", "acceptance_sweep.png")


@dataclass
class ReportConfig(Config):
    """params.yaml `report`: the targets the conclusion checks against."""

    prefix: ClassVar[str] = "report"
    min_speedup: float = 1.3
    """Benchmark speedup (median no-draft / median draft latency) the draft must reach."""
    min_token_acceptance: float = 0.6
    """Share of draft codes equal to main's the draft must reach."""
    max_relaxed_success_drop: float = 0.02
    """Relaxed mode: largest success-rate drop from no-draft that still passes (strict must be equal)."""
    max_gpu_memory_gb_7b: float = 16.0
    """Peak GPU memory the engine with the draft may use at OpenVLA's 7B shape (metrics/bench_7b.json)."""

    def validate(self) -> None:
        for name in ("min_speedup", "min_token_acceptance", "max_relaxed_success_drop", "max_gpu_memory_gb_7b"):
            self.check(getattr(self, name) >= 0, name, "a non-negative number")


class Metrics:
    """The metrics files, with errors that name the file and key when something is missing."""

    def __init__(self, metrics_dir: str | Path) -> None:
        self.dir = Path(metrics_dir)
        missing = [f"{self.dir / f'{name}.json'} (stage {stage})" for name, stage in SOURCES.items()
                   if not (self.dir / f"{name}.json").is_file()]
        if missing:
            raise FileNotFoundError("the report needs metrics files that are missing: " + ", ".join(missing))
        self.data: dict[str, dict[str, Any]] = {}
        for name in [*SOURCES, *(n for n in OPTIONAL_SOURCES if (self.dir / f"{n}.json").is_file())]:
            path = self.dir / f"{name}.json"
            try:
                self.data[name] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from exc

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str, *keys: str, default: Any = KeyError) -> Any:
        """metrics/<name>.json [key][key]...; a missing key is a KeyError naming the file (unless a default is given)."""
        value: Any = self.data[name]
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                if default is not KeyError:
                    return default
                raise KeyError(f"{self.path(name)} lacks {'.'.join(keys)}")
            value = value[key]
        return value

    def date(self, name: str) -> str:
        """The file's own `date` field if it has one, else the day the file was written."""
        if isinstance(self.data[name].get("date"), str):
            return self.data[name]["date"]
        return dt.datetime.fromtimestamp(self.path(name).stat().st_mtime).strftime("%Y-%m-%d")


def read_curves(live_dir: str | Path, run: str) -> dict[str, tuple[list[float], list[float]]]:
    """DVCLive TSVs of one run -> {"train/loss": (steps, values), ...}; a missing folder names itself."""
    root = Path(live_dir) / run / "plots" / "metrics"
    if not root.is_dir():
        raise FileNotFoundError(f"the report needs the {run} training curves: {root} is missing")
    curves = {}
    for tsv in sorted(root.rglob("*.tsv")):
        lines = [line.split("\t") for line in tsv.read_text().splitlines() if line.strip()]
        if len(lines) < 2:
            continue
        rows = [r for r in lines[1:] if len(r) >= 2]
        curves[tsv.relative_to(root).with_suffix("").as_posix()] = ([float(r[0]) for r in rows], [float(r[1]) for r in rows])
    if not curves:
        raise FileNotFoundError(f"the report needs the {run} training curves: no .tsv under {root}")
    return curves


# ---- formatting ------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else ("✅" if ok else "❌")


def _check(ok: bool) -> str:
    return "[x]" if ok else "[ ]"


def _short(task: str) -> str:
    """A libero_spatial task name without the shared `pick_up_the_black_bowl_` / `_and_place_it_on_the_plate`."""
    return task.removeprefix("pick_up_the_black_bowl_").removesuffix("_and_place_it_on_the_plate").replace("_", " ")


# ---- the report ------------------------------------------------------------------------------------


def build_report(metrics_dir: str | Path, live_dir: str | Path, out_dir: str | Path,
                 config: ReportConfig | None = None) -> Path:
    """Write out_dir/report.md and the plots; return the report's path."""
    config = config or ReportConfig()
    m = Metrics(metrics_dir)
    curves = {run: read_curves(live_dir, run) for run in CURVES}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks = targets(m, config)
    _plot_curves(curves, out / PLOTS[0])
    _plot_per_task(m, out / PLOTS[1])
    _plot_latency(m, out / PLOTS[2])
    _plot_sweep(m, out / PLOTS[3])
    text = render(m, config, checks)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


DRAFT_MODES = {"strict": "eval_draft", "relaxed": "eval_draft_relaxed"}
"""Acceptance rule -> the evaluation variant that runs it (bench.json holds both under the rule's name)."""


def targets(m: Metrics, config: ReportConfig) -> dict[str, tuple[str, bool]]:
    """Each target of the conclusion checklist: key -> (statement with its numbers, met?)."""
    nd, b = m.data["eval_no_draft"], m.data["bench"]
    strict, relaxed = (m.data[name] for name in DRAFT_MODES.values())
    label = {"strict": "strict", "relaxed": _relaxed(b)}
    result = {}
    for mode in DRAFT_MODES:
        s = b[mode]
        result[f"speedup_{mode}"] = (
            f"Speedup ≥ {config.min_speedup:g}×, {label[mode]} ({s['speedup']:.2f}×, p10–p90 {s['speedup_p10']:.2f}–"
            f"{s['speedup_p90']:.2f}×)", s["speedup"] >= config.min_speedup)
    for mode in DRAFT_MODES:
        result[f"acceptance_{mode}"] = (
            f"Draft token acceptance ≥ {config.min_token_acceptance:.2f}, {label[mode]} "
            f"({b[mode]['token_acceptance']:.3f})", b[mode]["token_acceptance"] >= config.min_token_acceptance)
    result["success_strict"] = (
        f"Strict-mode success equals no draft ({strict['successes']}/{strict['trials']} vs {nd['successes']}/{nd['trials']})",
        strict["successes"] == nd["successes"])
    drop = nd["success_rate"] - relaxed["success_rate"]
    result["success_relaxed"] = (
        f"Relaxed-mode (ratio ≥ {b['relaxed']['min_ratio']:g}) success within {100 * config.max_relaxed_success_drop:g} points of "
        f"no draft ({relaxed['successes']}/{relaxed['trials']} vs {nd['successes']}/{nd['trials']})",
        drop <= config.max_relaxed_success_drop + 1e-9)
    mismatches, ties = m.get("bench", "action_mismatches"), m.get("bench", "near_ties")
    result["exact"] = (f"Strict decoding reproduces no-draft tokens ({mismatches} of {m.get('bench', 'observations')} "
                       f"observations differ, {ties} of them floating-point near-ties)", mismatches == ties)
    result["verified"] = (f"Draft checkpoint verified (val accuracy {m.get('train', 'best_val_accuracy'):.3f})",
                          bool(m.get("verify", "passed")))
    if "bench_7b" in m.data:
        peak, met = _peak_memory_7b(m, config)
        result["memory_7b"] = (f"Peak GPU memory with the draft at the 7B shape < {config.max_gpu_memory_gb_7b:g} GB "
                               f"({peak:.2f} GB)", met)
    return result


def render(m: Metrics, config: ReportConfig, checks: dict[str, tuple[str, bool]]) -> str:
    """report.md's text."""
    nd, b = m.data["eval_no_draft"], m.data["bench"]
    d, r = (m.data[name] for name in DRAFT_MODES.values())
    relaxed = _relaxed(b)

    def marks(name: str) -> str:
        return " / ".join(_mark(checks[f"{name}_{mode}"][1]) for mode in DRAFT_MODES)

    def speedup(mode: str) -> str:
        s = b[mode]
        return f"{s['speedup']:.2f}× (p10–p90 {s['speedup_p10']:.2f}–{s['speedup_p90']:.2f})"

    memory = ("GPU memory" if "cuda" in str(nd.get("device"))
              else "the peak resident set of an evaluation worker, simulator included")
    lines = [
        "# RSD on LIBERO libero_spatial: report",
        "",
        f"Residual speculative decoding of the main policy's RFSQ tokens. The draft runs under two acceptance rules: "
        f"**strict** (lossless: a layer is kept when every code equals main's) and **relaxed** (kept when main's verify "
        f"pass gives every code at least {b['relaxed']['min_ratio']:g} of the probability of its own choice). Success rates "
        f"are closed-loop episodes on the benchmark's init states ({nd['trials']} per variant); latency is the "
        f"benchmark's median per policy call on {b['device']} ({b['observations']} recorded observations × "
        f"{b['repetitions']} repetitions, engines interleaved).",
        "",
        "## Comparison",
        "",
        f"| Metric | No draft | Draft (strict) | Draft ({relaxed}) | Target (strict / relaxed) | Met |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| Success Rate | {_pct(nd['success_rate'])} ({nd['successes']}/{nd['trials']}) | {_pct(d['success_rate'])} "
        f"({d['successes']}/{d['trials']}) | {_pct(r['success_rate'])} ({r['successes']}/{r['trials']}) | = no draft / "
        f"≥ no draft − {100 * config.max_relaxed_success_drop:g} pts | {marks('success')} |",
        f"| Avg Inference Time | {b['no_draft_ms']:.2f} ms | {b['strict']['draft_ms']:.2f} ms | "
        f"{b['relaxed']['draft_ms']:.2f} ms | — | — |",
        f"| Speedup | 1.00× | {speedup('strict')} | {speedup('relaxed')} | ≥ {config.min_speedup:g}× | {marks('speedup')} |",
        f"| Draft Acceptance | — | {b['strict']['token_acceptance']:.3f} | {b['relaxed']['token_acceptance']:.3f} | "
        f"≥ {config.min_token_acceptance:.2f} | {marks('acceptance')} |",
        f"| Memory (peak) | {nd['peak_memory_gb']:.2f} GB | {d['peak_memory_gb']:.2f} GB | {r['peak_memory_gb']:.2f} GB "
        f"| for reference | — |",
        "",
        f"Closed-loop evaluation, mean per call without the draft / strict / relaxed: {nd['avg_inference_ms']:.2f} / "
        f"{d['avg_inference_ms']:.2f} / {r['avg_inference_ms']:.2f} ms (p90 {nd['p90_inference_ms']:.2f} / "
        f"{d['p90_inference_ms']:.2f} / {r['p90_inference_ms']:.2f} ms); main passes per chunk "
        f"{nd['main_passes_per_chunk']:g} / {d['main_passes_per_chunk']:g} / {r['main_passes_per_chunk']:g}; accepted "
        f"draft layers per chunk {d['accepted_layers_per_chunk']:g} / {r['accepted_layers_per_chunk']:g} (strict / "
        f"relaxed); memory is {memory}.",
        "",
        "Both acceptance rules on the same observations (benchmark):",
        "",
        "| Mode | Median ms | Speedup (p10–p90) | Token acceptance | Per layer | Accepted layers / chunk | Main passes / chunk |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| no draft | {b['no_draft_ms']:.2f} | 1.00× | — | — | — | {b['no_draft']['main_passes_per_chunk']:g} |",
    ]
    labels = {"strict": "strict", "relaxed": relaxed, "perfect": "strict, perfect draft (ceiling)"}
    for name, label in labels.items():
        s = b[name]
        lines.append(f"| {label} | {s['draft_ms']:.2f} | {s['speedup']:.2f}× ({s['speedup_p10']:.2f}–{s['speedup_p90']:.2f}) "
                     f"| {s['token_acceptance']:.3f} | {' / '.join(f'{v:.2f}' for v in s['token_acceptance_per_layer'])} "
                     f"| {s['accepted_layers_per_chunk']:.2f} | {s['main_passes_per_chunk']:.2f} |")
    if "timing_noise" in b:  # identical work timed twice: how far from 1.00× the machine alone moves a speedup
        s = b["timing_noise"]
        lines.append(f"| no draft again (timing noise) | — | {s['speedup']:.2f}× ({s['speedup_p10']:.2f}–"
                     f"{s['speedup_p90']:.2f}) | — | — | — | {b['no_draft']['main_passes_per_chunk']:g} |")
    lines += ["", *_success_uncertainty(nd, d, r, relaxed)]
    lines += [
        "",
        f"Strict mode: {b['strict']['action_mismatches']} observation(s) decoded tokens unlike no-draft decoding, "
        f"{b['strict']['near_ties']} of them floating-point near-ties (top-2 logit margin below "
        f"{b.get('near_tie_margin', 1e-4):g}). Relaxed mode: "
        f"{b['relaxed']['token_mismatches']} observation(s) differ, mean action deviation "
        f"{b['relaxed']['mean_action_deviation']:.4f} (max {b['relaxed']['max_action_deviation']:.4f}). "
        f"The perfect draft proposes main's own codes (found beforehand) at the real draft's cost: its "
        f"{b['perfect']['speedup']:.2f}× is the most any draft can give this policy on this machine.",
        "",
        *_breakdown(b),
        "![latency breakdown](latency_breakdown.png)",
        "",
        *_sweep(b),
        "## Per-task success",
        "",
        f"| Task | No draft | Draft (strict) | Draft ({relaxed}) |",
        "| --- | --- | --- | --- |",
    ]
    for task, rate in nd["per_task"].items():
        others = [v["per_task"].get(task) for v in (d, r)]
        lines.append(f"| {_short(task)} | {_pct(rate)} | " + " | ".join("—" if v is None else _pct(v) for v in others) + " |")
    demos, tokenizer, policy, recover, dagger, collect, train = (
        m.data[k] for k in ("demos", "tokenizer", "policy", "recover", "dagger", "collect", "train"))
    tokenizer_mae = " / ".join(f"{v:.4f}" for v in tokenizer["mae_by_layers"])
    no_correction = " / ".join(f"{v:.2f}" for v in tokenizer["no_correction_share"])
    per_layer = " / ".join(f"{v:.3f}" for v in train["val_accuracies_per_layer"])
    policy_acc, dagger_acc = (" / ".join(f"{v:.3f}" for v in p["val_token_accuracy_per_layer"]) for p in (policy, dagger))
    lines += [
        "",
        "![per-task success](per_task_success.png)",
        "",
        "## Training summary",
        "",
        "| | |",
        "| --- | --- |",
        f"| Date (draft trained) | {m.date('train')} |",
        f"| Demonstrations | {demos['kept']} episodes kept of {demos['episodes']} ({demos.get('source', 'expert')}) |",
        f"| RFSQ tokenizer | {tokenizer['num_layers']} layers; round-trip error (normalized actions) with the first "
        f"1..{tokenizer['num_layers']} layers {tokenizer_mae}; share of \"no correction\" codes per layer {no_correction} |",
        f"| Main policy (behaviour cloning) | {policy['epochs']} epochs, {policy['train_seconds'] / 60:.1f} min, "
        f"{policy['parameters'] / 1e6:.2f}M parameters, val token accuracy per layer {policy_acc} |",
        f"| Recovery demos (DAgger) | {recover['kept']} kept of {recover['takeovers']} expert takeovers "
        f"({recover['takeovers_holding']} with the bowl in the gripper) in {recover['episodes']} policy rollouts from fresh "
        f"placements, {recover['policy_successes']} of which succeeded before the takeover; {recover['frames']:,} frames |",
        f"| Main policy (trained further) | {dagger['epochs']} epochs on the demos and {dagger['recovery_episodes']} "
        f"recoveries, {dagger['train_seconds'] / 60:.1f} min, val token accuracy per layer {dagger_acc} |",
        f"| Draft samples | {collect['samples']:,} from {collect['episodes']} main-policy episodes |",
        f"| Draft model | {train['epochs']} epochs, {train['train_seconds'] / 60:.1f} min, "
        f"{train['parameters'] / 1e6:.2f}M parameters |",
        f"| Best val accuracy | {train['best_val_accuracy']:.3f} (epoch {train['best_epoch']}; per layer {per_layer}) |",
        f"| Verification | {'passed' if m.get('verify', 'passed') else 'FAILED'} |",
        "",
        "![training curves](training_curves.png)",
        "",
        *_at_scale(m, config),
        "## Conclusion",
        "",
    ]
    lines += [f"- {_check(ok)} {text}" for text, ok in checks.values()]
    lines += ["", "Every number above is read from `metrics/*.json` (`dvc metrics show` lists those the pipeline writes).", ""]
    return "\n".join(lines)


def _at_scale(m: Metrics, config: ReportConfig) -> list[str]:
    """The sections on metrics/bench_7b.json and metrics/bench_gpu.json; none without those files."""
    if "bench_7b" not in m.data:
        return _trained_on_gpu(m)
    s = m.data["bench_7b"]
    by_kept = " / ".join(f"{v:.2f}×" for v in s["speedup_by_accepted_layers"].values())
    share = " / ".join(f"{v:g}" for v in s["accepted_share"])
    source = s["accepted_share_source"]
    measured = m.get("bench", "strict")["accepted_layers_share"]
    if source == "metrics/bench.json" and list(s["accepted_share"]) != list(measured):  # bench ran again since
        source = f"an earlier metrics/bench.json; this run's is {' / '.join(f'{v:g}' for v in measured)}"
    peak, met = _peak_memory_7b(m, config)
    return [
        "## At OpenVLA's scale",
        "",
        f"`scripts/bench_7b.py` on {s['gpu']}: {s['backbone']}, {s['dtype']}, a draft of "
        f"{s['draft_parameters_m']:.1f}M parameters. Random weights say nothing about acceptance, so the share of "
        f"calls keeping 0 / 1 / 2 draft layers is pinned to {share} (from {source}).",
        "",
        "| Metric | No draft | Draft | Target | Met |",
        "| --- | --- | --- | --- | --- |",
        f"| ms per policy call | {s['no_draft_ms']:.1f} | {s['draft_ms']:.1f} | — | — |",
        f"| Speedup | 1.00× | {s['speedup']:.2f}× (p10–p90 {s['speedup_p10']:.2f}–{s['speedup_p90']:.2f}) | — | — |",
        f"| Peak GPU memory | {s['peak_memory_gb_no_draft']:.2f} GB | {peak:.2f} GB | "
        f"< {config.max_gpu_memory_gb_7b:g} GB | {_mark(met)} |",
        "",
        f"Speedup by draft layers kept (0 / 1 / 2): {by_kept}; the draft model takes {s['draft_model_ms']:.2f} ms.",
        "",
        *_passes_7b(s),
        *_trained_on_gpu(m),
    ]


def _relaxed(b: dict[str, Any]) -> str:
    """The relaxed rule's label: its acceptance ratio."""
    return f"relaxed, ratio ≥ {b['relaxed']['min_ratio']:g}"


SPANS = {"prefill": "prefill", "draft": "draft model", "verify": "verify pass", "passes": "further passes",
         "rest": "the rest"}
"""A call's spans as the report shows them (the bench's inputs and decode spans go to the rest)."""


def _spans(breakdown: dict[str, float]) -> dict[str, float | None]:
    """The bench's `breakdown_ms` of one mode -> SPANS' ms (None for a span the mode has not)."""
    out: dict[str, float | None] = {k: breakdown.get(k) for k in SPANS if k != "rest"}
    out["rest"] = breakdown["rest"] + breakdown.get("inputs", 0.0) + breakdown.get("decode", 0.0)
    return out


def _timed_modes(b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"no draft": b["no_draft"], "strict": b["strict"], "relaxed": b["relaxed"], "perfect draft": b["perfect"]}


def _breakdown(b: dict[str, Any]) -> list[str]:
    """Where a call's time goes, per mode (bench `breakdown_ms`), beside main's one-layer pass and the draft."""
    lines = ["Where a call's time goes (median ms per span; the rest is the inputs, the tokenizer's decode and the "
             "bookkeeping between passes):", "",
             "| Mode | " + " | ".join(SPANS.values()) + " |", "| --- |" + " --- |" * len(SPANS)]
    for label, s in _timed_modes(b).items():
        cells = ["—" if v is None else f"{v:.2f}" for v in _spans(s["breakdown_ms"]).values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"One one-layer pass of main takes {b['no_draft']['layer_pass_ms']:.2f} ms; one call of the draft "
              f"{b['strict']['draft_model_ms']:.2f} ms.", ""]
    if "break_even_layers" in b:
        lines += [f"Speculating costs {b['break_even_layers']:.2f} one-layer passes beyond a no-draft call (the draft "
                  "and the verify pass, less the pass the verify pass stands in for): it pays when main keeps more "
                  "draft layers than that.", ""]
    for mode, gate in (b.get("gate") or {}).items():
        if not gate.get("min_kept_layers"):
            continue
        lines += [f"The {mode} gate (speculate while main keeps ≥ {gate['min_kept_layers']:g} draft layers per "
                  f"speculating call on average) speculated in {_pct(gate['speculated_share'])} of calls and was right "
                  f"in {_pct(gate['right_share'])} (speculated for nothing {_pct(gate['wasted_share'])}, held back a "
                  f"call that would have kept a layer {_pct(gate['missed_share'])}).", ""]
    return lines


def _sweep(b: dict[str, Any]) -> list[str]:
    """The acceptance sweep's table (bench `acceptance_sweep`)."""
    if not b.get("acceptance_sweep"):
        return []
    lines = ["## Acceptance sweep", "",
             "Relaxed decoding at each acceptance ratio (a draft code is kept when main gives it at least that share of "
             "its own choice's probability: 1 keeps only main's choices, 0 every proposal), timed beside the other "
             "engines on the same observations:", "",
             "| Ratio | Speedup (p10–p90) | Layers kept / call | Kept 0 / 1 / 2 | Token mismatches | Mean / max action deviation |",
             "| --- | --- | --- | --- | --- | --- |"]
    for e in b["acceptance_sweep"]:
        shares = " / ".join(_pct(v) for v in e["accepted_layers_share"])
        lines.append(f"| {e['min_ratio']:g} | {e['speedup']:.2f}× ({e['speedup_p10']:.2f}–{e['speedup_p90']:.2f}) | "
                     f"{e['accepted_layers_per_chunk']:.2f} | {shares} | {e['token_mismatches']}/{b['observations']} | "
                     f"{e['mean_action_deviation']:.4f} / {e['max_action_deviation']:.4f} |")
    return [*lines, "", "![acceptance sweep](acceptance_sweep.png)", ""]


def _success_uncertainty(nd: dict[str, Any], d: dict[str, Any], r: dict[str, Any], relaxed: str) -> list[str]:
    """Each variant's success rate with its 95% Wilson interval; each draft variant against no draft, episode by
    episode, where the evaluations recorded their episodes (the same tasks and init states)."""
    def rate(e: dict[str, Any]) -> str:
        low, high = success_interval(e["successes"], e["trials"])
        return f"{_pct(e['success_rate'])} ({e['successes']}/{e['trials']}; 95% CI {_pct(low)}–{_pct(high)})"

    lines = [f"Success with its 95% Wilson interval: no draft {rate(nd)}, strict {rate(d)}, {relaxed} {rate(r)}."]
    for label, e in (("strict", d), (relaxed, r)):
        if "episodes" not in nd or "episodes" not in e:
            continue
        same = all(nd["episodes"][k] == e["episodes"][k] for k in ("task", "init_state"))
        if not same:
            lines.append(f"The {label} evaluation ran other episodes than no draft's: no paired comparison.")
            continue
        p = paired_difference(nd["episodes"]["success"], e["episodes"]["success"])
        low, high = p["rate_difference_ci95"]
        lines.append(f"Paired, {label} against no draft on the same {p['episodes']} episodes: {p['difference']:+d} "
                     f"successes ({p['gained']} gained, {p['lost']} lost), {100 * p['rate_difference']:+.1f} points "
                     f"(95% bootstrap CI {100 * low:+.1f} to {100 * high:+.1f}; McNemar exact p = {p['mcnemar_p']:.3f}).")
    return lines


def _passes_7b(s: dict[str, Any]) -> list[str]:
    """The main policy's passes at the 7B shape against the floor of reading its weights once."""
    if "one_position_pass_ms" not in s:
        return []
    path = "compiled (static KV cache, CUDA graphs)" if s.get("compiled") else "eager"
    return [f"Main policy passes, {path}: prefill {s['prefill_ms']:.2f} ms, one position {s['one_position_pass_ms']:.2f} "
            f"ms, the {len(s['ms_by_accepted_layers'])}-position verify pass {s['verify_pass_ms']:.2f} ms; the floor, "
            f"{s['weights_gb']:.1f} GB of weights at the {s['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth measured "
            f"there, is {s['pass_floor_ms']:.2f} ms a pass.", ""]


def _trained_on_gpu(m: Metrics) -> list[str]:
    """The trained checkpoints on recorded observations on a GPU (metrics/bench_gpu.json), eager and compiled."""
    if "bench_gpu" not in m.data:
        return []
    g = m.data["bench_gpu"]
    rows = []
    for path in ("eager", "compiled"):
        if path in g:
            r = g[path]
            rows.append(f"| {path} | {r['no_draft_ms']:.2f} | {r['draft_ms']:.2f} ({r['speedup']:.2f}×) | "
                        f"{r['relaxed']['draft_ms']:.2f} ({r['relaxed']['speedup']:.2f}×) | "
                        f"{r['perfect']['draft_ms']:.2f} ({r['perfect']['speedup']:.2f}×) |")
    same = g.get("compiled_vs_eager")
    return [
        "## The trained checkpoints on a GPU",
        "",
        f"On {g['device']}, {g.get('checkpoints') or 'the checkpoints'}, on {g['observations']} observations the bench stage recorded "
        f"(`rsd bench --observations`), ms per call (speedup against no draft on the same path):",
        "",
        "| Path | No draft | Strict | Relaxed | Perfect draft |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        *([f"Compiled no-draft tokens differ from eager on {same['token_mismatches']} observations "
           f"({same['near_ties']} of them near-ties); compiled no-draft is {same['speedup_no_draft']:.2f}× eager.", ""]
          if same else []),
    ]


def _peak_memory_7b(m: Metrics, config: ReportConfig) -> tuple[float, bool]:
    """Peak GPU memory with the draft at the 7B shape, and whether it is under the bar."""
    peak = m.get("bench_7b", "peak_memory_gb_draft")
    return peak, peak < config.max_gpu_memory_gb_7b


# ---- plots -----------------------------------------------------------------------------------------


def _figure(path: Path, fig: Any) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(curves: dict[str, dict[str, tuple[list[float], list[float]]]], path: Path) -> None:
    """Loss (train and val) and validation accuracy per epoch, for the main policy and the draft."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(curves), 2, figsize=(10, 3.2 * len(curves)), squeeze=False)
    for row, (run, series) in enumerate(curves.items()):
        loss_ax, acc_ax = axes[row]
        for name, (x, y) in series.items():
            if name.endswith("loss"):
                loss_ax.plot(x, y, marker=".", label=name)
            elif name.startswith("val/") and ("acc" in name) and "exact" not in name:
                acc_ax.plot(x, y, marker=".", label=name.removeprefix("val/"))
        loss_ax.set(title=f"{run}: loss", xlabel="epoch (DVCLive step)", ylabel="cross entropy")
        acc_ax.set(title=f"{run}: validation accuracy", xlabel="epoch (DVCLive step)", ylabel="token accuracy", ylim=(0, 1))
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    _figure(path, fig)


def _plot_per_task(m: Metrics, path: Path) -> None:
    """Success per task: no draft, strict and relaxed draft side by side."""
    plt = _pyplot()
    tasks = list(m.data["eval_no_draft"]["per_task"])
    variants = {"no draft": "eval_no_draft", **{f"draft ({mode})": name for mode, name in DRAFT_MODES.items()}}
    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(tasks))
    for k, (label, name) in enumerate(variants.items()):
        rates = [m.data[name]["per_task"].get(t, 0.0) for t in tasks]
        ax.bar([i + 0.27 * (k - 1) for i in x], rates, 0.27, label=label)
    ax.set_xticks(list(x), [_short(t) for t in tasks], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="success rate", ylim=(0, 1.05), title="libero_spatial success per task")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _figure(path, fig)


def _plot_latency(m: Metrics, path: Path) -> None:
    """Median ms per policy call, split into its spans (bench `breakdown_ms`)."""
    plt = _pyplot()
    b = m.data["bench"]
    rows = {label: _spans(s["breakdown_ms"]) for label, s in _timed_modes(b).items()}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    left = [0.0] * len(rows)
    for span, label in SPANS.items():
        widths = [spans[span] or 0.0 for spans in rows.values()]
        ax.barh(names, widths, left=left, label=label)
        left = [a + w for a, w in zip(left, widths)]
    for i, total in enumerate(left):
        ax.text(total * 1.01, i, f"{total:.1f} ms", va="center", fontsize=8)
    ax.set(xlabel=f"median ms per span of a policy call ({b['device']})", title="Latency breakdown")
    ax.set_xlim(0, max(left) * 1.2)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    _figure(path, fig)


def _plot_sweep(m: Metrics, path: Path) -> None:
    """Speedup against mean action deviation from no-draft decoding, one point per acceptance ratio."""
    plt = _pyplot()
    b = m.data["bench"]
    sweep = b.get("acceptance_sweep") or []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = [e["mean_action_deviation"] for e in sweep]
    y = [e["speedup"] for e in sweep]
    ax.plot(x, y, marker="o")
    for e in sweep:
        ax.annotate(f"{e['min_ratio']:g}", (e["mean_action_deviation"], e["speedup"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="mean |action − no-draft action| (normalized units)", ylabel="speedup vs no draft",
           title=f"Acceptance sweep (ratio labelled; {b['device']})")
    _figure(path, fig)
