"""Closed-loop success of the pipeline's policy (no draft) on a range of LIBERO's init states, outside the
pipeline: the evaluation stages use states 0..eval.init_states-1, so states beyond them show whether the
policy is as good on init states nothing was ever chosen on.

    python scripts/eval_init_states.py --first 10 --last 49 --out metrics/eval_init_states_10_49.json

Reads params.yaml's `base`, `sim` and `eval` sections (tasks, execute_steps, workers) as the stage does.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

from rsd.engine import load_engine
from rsd.evaluation import EvalConfig, _run_episode, init_worker, summarize
from rsd.io import write_json
from rsd.parallel import run_unordered
from rsd.params import BaseConfig, load_params, section, start_stage
from rsd.progress import Progress
from rsd.sim.env import LiberoEnv, SimConfig


def main() -> None:
    start_stage()  # progress lines, orderly stop, bad input as one line
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, required=True, help="first init state (0..49)")
    parser.add_argument("--last", type=int, required=True, help="last init state, included (first..49)")
    parser.add_argument("--policy", default="models/policy.pt")
    parser.add_argument("--tokenizer", default="models/tokenizer.pt")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    args = parser.parse_args()
    if not 0 <= args.first <= args.last <= 49:
        parser.error(f"--first {args.first} --last {args.last}: expected 0 <= first <= last <= 49 (LIBERO's init states)")

    params = load_params()
    base = section(params, "base", BaseConfig)
    config = section(params, "eval", EvalConfig)
    sim = section(params, "sim", SimConfig)
    make_agent = partial(load_engine, args.policy, args.tokenizer, None, config.engine_config("none"), base.torch_device())
    tasks = config.task_indices
    jobs = [(t, i, config.execute_steps) for t in tasks for i in range(args.first, args.last + 1)]
    start, episodes = time.monotonic(), []
    with Progress(len(jobs), "eval") as bar:
        for episode in run_unordered(_run_episode, jobs, config.workers, init_worker, (make_agent, sim)):
            episodes.append(episode)
            bar.update(1, success=f"{sum(e.success for e in episodes)}/{len(episodes)}")
    episodes.sort(key=lambda e: (e.task, e.init_state))
    metrics = summarize(episodes, {t: LiberoEnv.task_info(t)[0] for t in tasks}, time.monotonic() - start)
    write_json(args.out, {**metrics, "init_states": [args.first, args.last], "policy": args.policy})
    print(f"init states {args.first}..{args.last}: {metrics['successes']}/{metrics['trials']} "
          f"(95% CI {metrics['success_rate_ci95']}); per task {metrics['per_task']}")


if __name__ == "__main__":
    main()
