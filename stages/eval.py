"""DVC stages `eval_no_draft`, `eval_draft`, `eval_draft_relaxed`: closed-loop evaluation on the
benchmark's init states, without the draft, with it under strict acceptance, and with it relaxed.

    python stages/eval.py {no_draft,draft,draft_relaxed} POLICY TOKENIZER METRICS [--draft DRAFT --verdict VERIFY_METRICS]

The draft variants record the verify stage's verdict beside their results: a draft below the
accuracy bar is still evaluated, and says so.
"""
import argparse
import json
import logging
from functools import partial
from pathlib import Path

from rsd.engine import load_engine
from rsd.evaluation import EvalConfig, evaluate
from rsd.io import write_json
from rsd.parallel import use_cluster
from rsd.params import BaseConfig, load_params, section, start_stage
from rsd.sim.env import SimConfig

log = logging.getLogger("rsd.eval")

VARIANTS = {"no_draft": "none", "draft": "strict", "draft_relaxed": "relaxed"}
"""Evaluation variant -> the engine mode it decodes with."""


def main() -> None:
    start_stage()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=VARIANTS)
    for name in ("policy", "tokenizer", "metrics"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--draft", type=Path, help="draft checkpoint (the draft variants)")
    parser.add_argument("--verdict", type=Path, help="the verify stage's metrics (the draft variants)")
    args = parser.parse_args()
    mode = VARIANTS[args.variant]
    if (mode == "none") != (args.draft is None) or (args.draft is None) != (args.verdict is None):
        parser.error(f"variant {args.variant} takes --draft and --verdict exactly when it decodes with the draft")

    params = load_params()
    base = section(params, "base", BaseConfig)
    use_cluster(base.ray_address)
    config = section(params, "eval", EvalConfig)
    make_agent = partial(load_engine, str(args.policy), str(args.tokenizer), None if args.draft is None else str(args.draft),
                         config.engine_config(mode), base.torch_device())
    metrics, _ = evaluate(make_agent, config, section(params, "sim", SimConfig))
    metrics = {**metrics, "device": base.torch_device(), "acceptance_mode": mode}
    if args.verdict is not None:
        metrics["draft_verified"] = bool(json.loads(args.verdict.read_text())["passed"])
    write_json(args.metrics, metrics)
    log.info("eval %s: success %.3f (%d/%d), %.1f ms per call", args.variant, metrics["success_rate"],
             metrics["successes"], metrics["trials"], metrics["avg_inference_ms"])


if __name__ == "__main__":
    main()
