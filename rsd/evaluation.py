"""Closed-loop rollouts of an engine in LIBERO, over worker processes: evaluation and data collection.

An *agent* is anything with `predict(inputs) -> Prediction` (rsd.engine), where `inputs` is
`LiberoEnv.model_inputs(obs)`. Each worker builds its own agent once from a picklable factory, so
models never cross process boundaries.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np

from rsd.config import Config
from rsd.contract import CHUNK_LEN
from rsd.engine import EngineConfig, Prediction
from rsd.parallel import run_unordered
from rsd.progress import Progress
from rsd.sim.env import LiberoEnv, SimConfig, cached_env
from rsd.sim.suite import TASKS_EXPECTED, are_task_indices, task_indices
from rsd.stats import success_interval

log = logging.getLogger("rsd.eval")

INIT_STATES = 50
"""LIBERO's benchmark init states per libero_spatial task."""


class Agent(Protocol):
    def predict(self, inputs: dict[str, Any]) -> Prediction: ...

    def reset(self) -> None:
        """An episode starts: forget what earlier ones taught (the engine's gate)."""


@dataclass
class RolloutConfig(Config):
    """What every stage that rolls the policy out sets (eval, collect, recover): which tasks, how much of each
    chunk runs open loop, how many simulator processes."""

    tasks: list[int] | None = None
    """libero_spatial task indices; None means all ten."""
    execute_steps: int = CHUNK_LEN
    """Actions of each predicted chunk executed open loop before the policy is called again."""
    workers: int = 2
    """Parallel simulator processes, each with its own copy of the agent."""

    def validate(self) -> None:
        self.check(are_task_indices(self.tasks), "tasks", TASKS_EXPECTED)
        self.check(1 <= self.execute_steps <= CHUNK_LEN, "execute_steps", f"in 1..{CHUNK_LEN} (the chunk length)")
        self.check(self.workers >= 1, "workers", "at least 1")

    @property
    def task_indices(self) -> list[int]:
        return task_indices(self.tasks, f"{self.prefix}.tasks")


@dataclass
class EvalConfig(RolloutConfig):
    """params.yaml `eval`: which episodes to run and how, and how the draft variants' engines decode."""

    prefix: ClassVar[str] = "eval"

    init_states: int = 10
    """Benchmark init states first_init_state.. of every task, this many (LIBERO has 50 per task)."""
    first_init_state: int = 0
    """The first of them: the pipeline's are 0..init_states-1; later ones show how the policy does on states
    no choice was ever made on (scripts/eval_init_states.py)."""
    min_ratio: float = 0.1
    """Relaxed acceptance (the draft_relaxed variant): a draft code is kept when main gives it at least this
    share of the probability of its own choice (1: as strict; 0: every proposal). rsd.engine.EngineConfig."""
    min_kept_layers: float = 0.0
    """The gate of both draft variants: speculate while main keeps at least this many draft layers per
    speculating call, averaged over the episode so far; below it, only probing calls do, ever more rarely
    while they keep nothing (0: always speculate). rsd.engine.EngineConfig."""
    draft_precision: str = "fp32"
    """The draft model's precision in the draft variants (`fp32`, `bf16`, or `auto`: bf16 where it runs
    natively); main checks its proposals, so strict decoding stays exact either way."""

    def validate(self) -> None:
        super().validate()
        self.check(1 <= self.init_states <= INIT_STATES, "init_states", f"in 1..{INIT_STATES} (LIBERO's init states per task)")
        self.check(0 <= self.first_init_state <= INIT_STATES - self.init_states, "first_init_state",
                   f"in 0..{INIT_STATES - self.init_states}: the last of {self.init_states} states from it below {INIT_STATES}")
        self.engine_config("none")  # the engine's fields, checked as the engine checks them

    @property
    def init_state_range(self) -> range:
        return range(self.first_init_state, self.first_init_state + self.init_states)

    def engine_config(self, mode: str) -> EngineConfig:
        """The engine config of a variant whose acceptance mode is `mode` (`none`, `strict` or `relaxed`).
        The evaluation itself reads none of these: the engine each worker builds does."""
        return EngineConfig.for_mode(dataclasses.asdict(self), mode)


@dataclass
class Episode:
    task: int
    init_state: int
    success: bool
    steps: int
    calls: list[dict[str, float]]  # the agent's stats, one dict per policy call
    peak_memory_gb: float  # the worker's peak: GPU memory on CUDA, else the process's peak RSS (simulator included)


_worker: dict[str, Any] = {}


def init_worker(make_agent: Callable[[], Agent], sim: SimConfig) -> None:
    """Pool initializer: one agent per worker process, one torch thread (the workers fill the cores)."""
    import torch

    torch.set_num_threads(1)
    _worker.update(agent=make_agent(), sim=sim)


def worker_agent() -> Agent:
    """This worker process's agent (see init_worker)."""
    return _worker["agent"]


def worker_env(task: int) -> LiberoEnv:
    """This worker's rendering env for `task` (`rsd.sim.env.cached_env`: built once, other tasks' closed)."""
    return cached_env(task, _worker["sim"])


def rollout(
    env: LiberoEnv,
    obs: dict[str, Any],
    agent: Agent,
    execute_steps: int,
    on_call: Callable[[int, Prediction], None],
    query_every_step: bool = False,
    max_steps: int | None = None,
) -> tuple[bool, int, dict[str, Any]]:
    """Run one episode from `obs` (what the env's reset returned) until success or the step budget
    (`max_steps`, else the suite's).

    Each chunk's first `execute_steps` actions run open loop. With `query_every_step` the agent is also
    asked at the steps in between (for data: what it would say there), without changing what runs.
    `on_call(step, prediction)` sees every call. Returns (success, steps, the last observation). The agent
    is reset first, so an episode's calls depend on that episode alone, whichever worker runs it after
    whichever others.
    """
    agent.reset()
    budget = env.config.max_steps if max_steps is None else max_steps
    steps, success, chunk, start = 0, False, None, 0
    while steps < budget and not success:
        if chunk is None or steps - start >= execute_steps or query_every_step:
            prediction = agent.predict(env.model_inputs(obs))
            on_call(steps, prediction)
            if chunk is None or steps - start >= execute_steps:
                chunk, start = prediction.chunk, steps
        action = chunk[steps - start]
        steps += 1
        call_due = query_every_step or steps - start >= execute_steps
        obs, success = env.step(action, render=call_due)  # images only where a call will read them
    return success, steps, obs


def _run_episode(job: tuple[int, int, int]) -> Episode:
    task, init_state, execute_steps = job
    env = worker_env(task)
    obs = env.reset(init_state=init_state)
    calls: list[dict[str, float]] = []
    success, steps, _ = rollout(env, obs, worker_agent(), execute_steps, lambda _, p: calls.append(p.stats))
    return Episode(task, init_state, success, steps, calls, peak_memory_gb())


def peak_memory_gb() -> float:
    """Peak GPU memory of this process when it uses CUDA, else its peak resident set size."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def evaluate(make_agent: Callable[[], Agent], config: EvalConfig, sim: SimConfig) -> tuple[dict, list[Episode]]:
    """Run every (task, init state) episode; return the metrics and the episodes."""
    tasks = config.task_indices
    jobs = [(t, i, config.execute_steps) for t in tasks for i in config.init_state_range]
    names = {t: LiberoEnv.task_info(t)[0] for t in tasks}
    start = time.monotonic()
    episodes: list[Episode] = []
    with Progress(len(jobs), "eval") as bar:
        for episode in run_unordered(_run_episode, jobs, config.workers, init_worker, (make_agent, sim)):
            episodes.append(episode)
            wins = sum(e.success for e in episodes)
            bar.update(1, success=f"{wins}/{len(episodes)}")
    episodes.sort(key=lambda e: (e.task, e.init_state))
    return summarize(episodes, names, time.monotonic() - start), episodes


def summarize(episodes: list[Episode], names: dict[int, str], wall_seconds: float) -> dict:
    """Success per task and overall; latency percentiles and the engine's per-call stats, averaged over calls."""
    per_task: dict[int, list[bool]] = defaultdict(list)
    for e in episodes:
        per_task[e.task].append(e.success)
    calls = [c for e in episodes for c in e.calls]

    def mean(key: str) -> float | None:
        values = [c[key] for c in calls if key in c]
        return round(float(np.mean(values)), 4) if values else None

    total_ms = np.array([c["total_ms"] for c in calls])
    successes = sum(e.success for e in episodes)
    layers = sorted(int(k.rsplit("L", 1)[1]) for k in calls[0] if k.startswith("token_acceptance_L"))
    return {
        "success_rate": round(successes / len(episodes), 4),
        "success_rate_ci95": list(success_interval(successes, len(episodes))),
        "successes": successes,
        "trials": len(episodes),
        "per_task": {names[t]: round(float(np.mean(v)), 4) for t, v in sorted(per_task.items())},
        "avg_inference_ms": round(float(total_ms.mean()), 3),
        "p50_inference_ms": round(float(np.percentile(total_ms, 50)), 3),
        "p90_inference_ms": round(float(np.percentile(total_ms, 90)), 3),
        "draft_ms": mean("draft_ms") or 0.0,
        "main_ms": mean("main_ms"),
        "main_passes_per_chunk": mean("main_passes"),
        "token_acceptance": mean("token_acceptance"),
        "token_acceptance_per_layer": [mean(f"token_acceptance_L{i}") for i in layers] or None,
        "accepted_layers_per_chunk": mean("accepted_layers"),
        "peak_memory_gb": round(max(e.peak_memory_gb for e in episodes), 3),
        "policy_calls": len(calls),
        "mean_episode_steps": round(float(np.mean([e.steps for e in episodes])), 1),
        "wall_seconds": round(wall_seconds, 1),
        # each episode's outcome, in (task, init state) order: variants compare episode by episode (rsd.stats)
        "episodes": {"task": [e.task for e in episodes], "init_state": [e.init_state for e in episodes],
                     "success": [int(e.success) for e in episodes]},
    }
