"""One function per pipeline stage: read its params, call the package, write its outputs.

`stages/<name>.py` (what dvc.yaml runs) and `rsd <name>` (the CLI) both call these, so the two
can never drift apart. Output paths are fixed here and mirrored in dvc.yaml.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rsd.io import write_json
from rsd.params import BaseConfig, load_params, section

if TYPE_CHECKING:
    from rsd.engine import EngineConfig

log = logging.getLogger("rsd")

DEMOS_DIR = Path("data/demos")
TOKENIZER_CKPT = Path("models/tokenizer.pt")
METRICS = Path("metrics")


def run_demos(params_file: str | Path = "params.yaml") -> dict:
    from rsd.demos import DemosConfig, make_demos
    from rsd.sim.env import SimConfig

    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    metrics = make_demos(section(params, "demos", DemosConfig), section(params, "sim", SimConfig), base.seed, DEMOS_DIR)
    write_json(METRICS / "demos.json", metrics)
    log.info("demos: kept %s of %s episodes (success %s) in %s s", metrics["kept"], metrics["episodes"], metrics["success_rate"], metrics["wall_seconds"])
    return metrics


def run_tokenizer(params_file: str | Path = "params.yaml") -> dict:
    from rsd.data import read_demos
    from rsd.tokenizer.config import TokenizerConfig
    from rsd.tokenizer.train import train_tokenizer

    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    config = section(params, "tokenizer", TokenizerConfig, seed=base.seed)
    episodes = [demo.actions for task in read_demos(DEMOS_DIR, images=False) for demo in task.demos]
    log.info("RFSQ tokenizer: %d demos from %s", len(episodes), DEMOS_DIR)
    tokenizer, metrics = train_tokenizer(episodes, config, progress=True)
    tokenizer.save(TOKENIZER_CKPT)
    write_json(METRICS / "tokenizer.json", metrics)
    log.info("tokenizer: MAE by layers %s", metrics["mae_by_layers"])
    return metrics

POLICY_CKPT = Path("models/policy.pt")
DRAFT_SAMPLES = Path("data/draft_samples.pt")
DRAFT_CKPT = Path("models/draft.pt")
LIVE_DIR = Path("dvclive")
EVAL_VARIANTS = {"no_draft": "none", "draft": "strict", "draft_relaxed": "relaxed"}
"""Evaluation variants and the engine mode each runs (both acceptance rules of the draft, side by side)."""


def _split_model(params: dict, name: str) -> tuple[dict, dict]:
    """A stage section's `model` subsection (the architecture) apart from the rest (how to train)."""
    values = dict(params.get(name) or {})
    return values.pop("model", None) or {}, {name: values}


def _live(name: str):
    from dvclive import Live

    # curves only: plots are declared in dvc.yaml, and DVC itself records the experiment
    return Live(str(LIVE_DIR / name), save_dvc_exp=False, dvcyaml=False)


def run_policy(params_file: str | Path = "params.yaml") -> dict:
    from rsd.data import read_demos
    from rsd.policy.train import PolicyTrainConfig, train_policy
    from rsd.tokenizer.model import RFSQTokenizer

    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    model_params, rest = _split_model(params, "policy")
    config = section(rest, "policy", PolicyTrainConfig, seed=base.seed)
    tokenizer = RFSQTokenizer.load(TOKENIZER_CKPT)
    log.info("RFSQ tokenizer loaded: %d layers", tokenizer.config.num_layers)
    tasks = read_demos(DEMOS_DIR)
    with _live("policy") as live:
        policy, metrics = train_policy(tasks, tokenizer, model_params, config, live)
    policy.save(POLICY_CKPT)
    write_json(METRICS / "policy.json", metrics)
    return metrics


ENGINE_PARAMS = ("tolerance", "draft_precision")
"""params.yaml `eval` keys that configure the draft engines (EngineConfig fields), not the evaluator."""


def draft_engine_config(params: dict, mode: str = "strict") -> EngineConfig:
    """A draft engine in `mode` (strict or relaxed), configured by params `eval.tolerance` and `eval.draft_precision`."""
    from rsd.engine import EngineConfig

    values = params.get("eval") or {}
    try:
        return EngineConfig(mode=mode, **{key: values[key] for key in ENGINE_PARAMS if key in values})
    except ValueError as error:
        raise ValueError(f"params: eval ({', '.join(ENGINE_PARAMS)}): {error}") from None


def _engine_factory(mode: str, params: dict):
    """A picklable factory that builds the engine (`none`: the main policy alone) in each worker process."""
    from functools import partial

    from rsd.engine import load_engine

    base = section(params, "base", BaseConfig)
    draft = None if mode == "none" else str(DRAFT_CKPT)
    return partial(load_engine, str(POLICY_CKPT), str(TOKENIZER_CKPT), draft, draft_engine_config(params, mode), base.torch_device())


def run_collect(params_file: str | Path = "params.yaml") -> dict:
    from rsd.collect import CollectConfig, collect
    from rsd.sim.env import SimConfig

    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    samples, metrics = collect(_engine_factory("none", params), section(params, "collect", CollectConfig),
                               section(params, "sim", SimConfig), base.seed)
    samples.save(DRAFT_SAMPLES)
    write_json(METRICS / "collect.json", metrics)
    return metrics


def run_train(params_file: str | Path = "params.yaml") -> dict:
    from rsd.draft.config import DraftConfig, DraftTrainConfig
    from rsd.draft.samples import DraftSamples
    from rsd.draft.train import train_draft

    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    model_params, rest = _split_model(params, "train")
    config = section(rest, "train", DraftTrainConfig, seed=base.seed)
    samples = DraftSamples.load(DRAFT_SAMPLES)
    model_config = section({"model": model_params}, "model", DraftConfig, input_dim=samples.hidden_size)
    with _live("draft") as live:
        metrics = train_draft(samples, model_config, config, DRAFT_CKPT, live, device=base.torch_device())
    write_json(METRICS / "train.json", metrics)
    return metrics


def run_verify(params_file: str | Path = "params.yaml") -> dict:
    """Write metrics/verify.json, then fail (non-zero exit) naming every failed check."""
    from rsd.draft.config import VerifyConfig
    from rsd.draft.verify import require_verified, verify_checkpoint
    from rsd.policy.model import MainPolicy

    params = load_params(params_file)
    config = section(params, "verify", VerifyConfig)
    hidden = MainPolicy.load(POLICY_CKPT).config.backbone.hidden_size
    result = verify_checkpoint(DRAFT_CKPT, config.min_val_accuracy, input_dim=hidden)
    write_json(METRICS / "verify.json", result)
    require_verified(result)
    log.info("draft checkpoint %s passed every check", DRAFT_CKPT)
    return result


def run_eval(variant: str, params_file: str | Path = "params.yaml") -> dict:
    from rsd.evaluation import EvalConfig, evaluate
    from rsd.sim.env import SimConfig

    if variant not in EVAL_VARIANTS:
        raise ValueError(f"eval variant must be one of {', '.join(EVAL_VARIANTS)}; got {variant!r}")
    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    values = {k: v for k, v in (params.get("eval") or {}).items() if k not in ENGINE_PARAMS}
    config = section({"eval": values}, "eval", EvalConfig)
    mode = EVAL_VARIANTS[variant]
    metrics, _ = evaluate(_engine_factory(mode, params), config, section(params, "sim", SimConfig))
    metrics = {**metrics, "device": base.torch_device(), "acceptance_mode": mode}
    write_json(METRICS / f"eval_{variant}.json", metrics)
    log.info("eval@%s: success %.3f (%d/%d), %.1f ms per call", variant, metrics["success_rate"], metrics["successes"],
             metrics["trials"], metrics["avg_inference_ms"])
    return metrics


def run_bench(params_file: str | Path = "params.yaml") -> dict:
    """Record real observations with the main policy, then time no-draft, strict, relaxed and perfect-draft
    decoding on them."""
    from rsd.bench import MODES, BenchConfig, benchmark, record_observations
    from rsd.engine import load_engine
    from rsd.sim.env import SimConfig

    params = load_params(params_file)
    base = section(params, "base", BaseConfig)
    config = section(params, "bench", BenchConfig)
    device = base.torch_device()
    start = time.monotonic()
    observations, recorded = record_observations(_engine_factory("none", params), config,
                                                 section(params, "sim", SimConfig), base.seed)
    engines = {mode: load_engine(str(POLICY_CKPT), str(TOKENIZER_CKPT), None if mode == "none" else str(DRAFT_CKPT),
                                 draft_engine_config(params, mode), device) for mode in MODES}
    metrics = benchmark(engines, [o.inputs for o in observations], config)
    metrics = {**metrics, **recorded, "wall_seconds": round(time.monotonic() - start, 1)}
    write_json(METRICS / "bench.json", metrics)
    return metrics


REPORTS_DIR = Path("reports")


def run_report(params_file: str | Path = "params.yaml") -> Path:
    """reports/report.md and its plots, from the metrics files and the training curves."""
    from rsd.report import ReportConfig, build_report

    params = load_params(params_file)
    path = build_report(METRICS, LIVE_DIR, REPORTS_DIR, section(params, "report", ReportConfig))
    log.info("report written: %s", path)
    return path
