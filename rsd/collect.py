"""The `collect` stage: run the main policy in LIBERO and record, for every policy call, its hidden
state, the coarse RFSQ codes it decoded and its probabilities for them: the draft model's training data.

Placements are fresh and seeded from their own stream (never the demos' seeds, never the benchmark's
evaluation init states), so the draft learns from states the main policy itself visits.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from rsd.contract import NUM_COARSE_LAYERS
from rsd.draft.samples import DraftSamples
from rsd.engine import Prediction
from rsd.evaluation import Agent, RolloutConfig, init_worker, rollout, worker_agent, worker_env
from rsd.parallel import run_unordered
from rsd.progress import Progress
from rsd.sim.env import LiberoEnv, SimConfig, placement_seed
from rsd.sim.suite import NUM_TASKS

log = logging.getLogger("rsd.collect")

COLLECT_STREAM = 1  # placement-seed stream of this stage (demos use 0)


@dataclass
class CollectConfig(RolloutConfig):
    """How many main-policy rollouts to record, and how (tasks, execute_steps, workers: RolloutConfig)."""

    prefix: ClassVar[str] = "collect"

    episodes_per_task: int = 8
    """Rollouts per libero_spatial task, each from its own fresh placement."""
    query_every_step: bool = True
    """Ask the policy at every env step (one sample per step) while still executing chunks open loop."""

    def validate(self) -> None:
        super().validate()
        self.check(self.episodes_per_task >= 1, "episodes_per_task", "at least 1")


def _collect_episode(job: tuple[int, int, int, CollectConfig]) -> tuple[int, int, bool, dict[str, np.ndarray]]:
    task, episode, seed, config = job
    env = worker_env(task)
    obs = env.reset(seed=seed)
    hidden, coarse, probs, steps = [], [], [], []

    def record(step: int, prediction: Prediction) -> None:
        hidden.append(prediction.hidden_state.float().cpu().numpy())
        coarse.append(prediction.tokens[..., :NUM_COARSE_LAYERS].to(torch.uint8).cpu().numpy())
        logits = torch.cat(prediction.layer_logits[:NUM_COARSE_LAYERS]).float()  # [C, 128, levels], no-draft decoding's
        probs.append(logits.softmax(dim=-1).to(torch.float16).cpu().numpy())
        steps.append(step)

    success, _, _ = rollout(env, obs, worker_agent(), config.execute_steps, record, config.query_every_step)
    return task, episode, success, {"hidden_state": np.stack(hidden), "coarse_tokens": np.stack(coarse),
                                    "coarse_probs": np.stack(probs), "step": np.array(steps)}


def collect(make_agent: Callable[[], Agent], config: CollectConfig, sim: SimConfig, base_seed: int) -> tuple[DraftSamples, dict]:
    """Roll the main policy out over fresh placements; return the samples and the stage's metrics."""
    tasks = config.task_indices
    info = {t: LiberoEnv.task_info(t) for t in range(NUM_TASKS)}
    task_names = [info[t][0] for t in range(NUM_TASKS)]
    jobs = [(t, e, placement_seed(base_seed, COLLECT_STREAM, t, e), config) for t in tasks for e in range(config.episodes_per_task)]
    log.info("%d tasks in libero_spatial, %d episodes each", len(tasks), config.episodes_per_task)
    parts, successes = [], 0
    per_task: dict[str, int] = defaultdict(int)
    announced: set[int] = set()
    start = time.monotonic()
    with Progress(len(jobs), "collect") as bar:
        for task, episode, success, arrays in run_unordered(_collect_episode, jobs, config.workers, init_worker, (make_agent, sim)):
            if task not in announced:
                announced.add(task)
                log.info("Task %d/%d: %s", task + 1, NUM_TASKS, info[task][1])
            n = len(arrays["step"])
            log.info("Episode %d (task %d): %d samples, %s", episode, task + 1, n, "success" if success else "failure")
            parts.append(DraftSamples(
                hidden_state=torch.from_numpy(arrays["hidden_state"]),
                coarse_tokens=torch.from_numpy(arrays["coarse_tokens"]),
                coarse_probs=torch.from_numpy(arrays["coarse_probs"]),
                task=torch.full((n,), task),
                episode=torch.full((n,), episode),  # (task, episode) identifies an episode
                step=torch.from_numpy(arrays["step"]),
                task_names=task_names,
            ))
            successes += success
            per_task[info[task][0]] += n
            bar.update(1, samples=sum(per_task.values()))
    samples = DraftSamples.concat(sorted(parts, key=lambda p: (int(p.task[0]), int(p.episode[0]))))
    metrics = {
        "samples": len(samples),
        "episodes": len(jobs),
        "per_task_samples": dict(sorted(per_task.items())),
        "rollout_success_rate": round(successes / len(jobs), 4),
        "hidden_size": samples.hidden_size,
        "wall_seconds": round(time.monotonic() - start, 1),
    }
    log.info("Saved %s samples", f"{len(samples):,}")
    return samples, metrics
