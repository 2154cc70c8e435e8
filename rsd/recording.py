"""Real policy inputs for the benchmark: the main policy (no draft) runs closed loop in LIBERO from fresh
placements, their own seed stream (never the demos', the draft samples' or the evaluation's init
states), and the observation of every policy call is kept, then thinned evenly across the tasks.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rsd.bench import BenchConfig
from rsd.engine import Prediction
from rsd.evaluation import Agent, init_worker, rollout, worker_agent, worker_env
from rsd.parallel import run_unordered
from rsd.progress import Progress
from rsd.sim.env import LiberoEnv, SimConfig, placement_seed

log = logging.getLogger("rsd.bench")

BENCH_STREAM = 2
"""Placement-seed stream of the benchmark's recording (demos 0, collect 1)."""


@dataclass
class Observation:
    """One recorded policy input (`LiberoEnv.model_inputs`) and where it came from."""

    inputs: dict[str, Any]
    task: int
    episode: int
    step: int


class _Recorder:
    """An agent that keeps a copy of every input it is asked about, then answers with the wrapped agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.inputs = agent, []

    def predict(self, inputs: dict[str, Any]) -> Prediction:
        self.inputs.append({k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()})
        return self.agent.predict(inputs)

    def reset(self) -> None:
        self.agent.reset()


def _record_episode(job: tuple[int, int, int, int]) -> tuple[int, int, bool, list[tuple[int, dict[str, Any]]]]:
    task, episode, seed, execute_steps = job
    env = worker_env(task)
    obs = env.reset(seed=seed)
    recorder, steps = _Recorder(worker_agent()), []
    success, _, _ = rollout(env, obs, recorder, execute_steps, lambda step, _: steps.append(step))
    return task, episode, success, list(zip(steps, recorder.inputs))


def record_observations(make_agent: Callable[[], Agent], config: BenchConfig, sim: SimConfig,
                        base_seed: int) -> tuple[list[Observation], dict[str, Any]]:
    """Run the agent closed loop from fresh placements; keep `config.observations` policy inputs, evenly
    spread over tasks and over each task's calls. Returns them and a summary of the episodes."""
    tasks = config.task_indices
    jobs = [(t, e, placement_seed(base_seed, BENCH_STREAM, t, e), config.execute_steps)
            for t in tasks for e in range(config.episodes_per_task)]
    per_task: dict[int, list[Observation]] = defaultdict(list)
    successes = 0
    with Progress(len(jobs), "bench: record") as bar:
        for task, episode, success, calls in run_unordered(_record_episode, jobs, config.workers, init_worker,
                                                           (make_agent, sim)):
            per_task[task] += [Observation(inputs, task, episode, step) for step, inputs in calls]
            successes += success
            bar.update(1, calls=sum(map(len, per_task.values())))
    quota = _quotas(config.observations, tasks, {t: len(per_task[t]) for t in tasks})
    kept: list[Observation] = []
    for t in tasks:
        calls = sorted(per_task[t], key=lambda o: (o.episode, o.step))
        picks = np.linspace(0, len(calls) - 1, quota[t]).round().astype(int) if quota[t] else []
        kept += [calls[i] for i in picks]
    if len(kept) < config.observations:
        log.warning("recorded only %d policy calls, fewer than bench.observations=%d", len(kept), config.observations)
    summary = {"episodes": len(jobs), "record_success_rate": round(successes / len(jobs), 4),
               "observations_per_task": {LiberoEnv.task_info(t)[0]: quota[t] for t in tasks}}
    return kept, summary


def _quotas(total: int, tasks: list[int], available: dict[int, int]) -> dict[int, int]:
    """Split `total` over tasks as evenly as each task's available calls allow."""
    quota = dict.fromkeys(tasks, 0)
    left = total
    while left > 0:
        open_tasks = [t for t in tasks if quota[t] < available[t]]
        if not open_tasks:
            break
        share = max(1, left // len(open_tasks))
        for t in open_tasks:
            take = min(share, available[t] - quota[t], left)
            quota[t] += take
            left -= take
    return quota
