"""Closed-loop success of the pipeline's policy (no draft) on a range of LIBERO's init states, outside the
pipeline: the evaluation stages use states 0..eval.init_states-1, so states beyond them show whether the
policy is as good on init states nothing was ever chosen on.

    python scripts/eval_init_states.py --first 10 --last 49 --out metrics/eval_init_states_10_49.json

Reads params.yaml's `base`, `sim` and `eval` sections (tasks, execute_steps, workers) as the stage does; the
range replaces `eval.first_init_state` and `eval.init_states`.
"""
from __future__ import annotations

import argparse
import dataclasses
from functools import partial

from rsd.engine import load_engine
from rsd.evaluation import INIT_STATES, EvalConfig, evaluate
from rsd.io import write_json
from rsd.params import BaseConfig, load_params, section, start_stage
from rsd.sim.env import SimConfig


def main() -> None:
    start_stage()  # progress lines, orderly stop, bad input as one line
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, required=True, help=f"first init state (0..{INIT_STATES - 1})")
    parser.add_argument("--last", type=int, required=True, help=f"last init state, included (first..{INIT_STATES - 1})")
    parser.add_argument("--policy", default="models/policy.pt")
    parser.add_argument("--tokenizer", default="models/tokenizer.pt")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    args = parser.parse_args()
    if not 0 <= args.first <= args.last < INIT_STATES:
        parser.error(f"--first {args.first} --last {args.last}: expected 0 <= first <= last < {INIT_STATES} (LIBERO's init states)")

    params = load_params()
    base = section(params, "base", BaseConfig)
    config = dataclasses.replace(section(params, "eval", EvalConfig), first_init_state=args.first,
                                 init_states=args.last - args.first + 1)
    make_agent = partial(load_engine, args.policy, args.tokenizer, None, config.engine_config("none"), base.torch_device())
    metrics, _ = evaluate(make_agent, config, section(params, "sim", SimConfig))
    write_json(args.out, {**metrics, "init_states": [args.first, args.last], "policy": args.policy})
    print(f"init states {args.first}..{args.last}: {metrics['successes']}/{metrics['trials']} "
          f"(95% CI {metrics['success_rate_ci95']}); per task {metrics['per_task']}")


if __name__ == "__main__":
    main()
