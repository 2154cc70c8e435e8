"""The `recover` stage: DAgger-style recovery demonstrations from the states the trained policy reaches.

The scripted expert never misses a grasp, so the demos show no way back from one. Here the main policy
acts from a fresh placement (its own seed stream: never the demos', collect's or the benchmark's init
states) for a drawn number of steps; then the expert takes over from wherever the policy left the scene
(a bowl the gripper holds is carried on, a gripper closed beside the bowl is reopened and the bowl
grasped again) and, where it succeeds, its part of the episode is a demonstration in the demos' own
HDF5 layout. A policy that succeeds before the takeover step leaves nothing to correct.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from rsd.data import Demo, TaskDemos, demo_path, write_task_demos
from rsd.evaluation import Agent, RolloutConfig, init_worker, rollout, worker_agent, worker_env
from rsd.parallel import run_unordered
from rsd.progress import Progress, deferred_stop, replace_dir
from rsd.sim.env import LiberoEnv, SimConfig, placement_seed
from rsd.sim.expert import take_over

log = logging.getLogger("rsd.recover")

RECOVER_STREAM = 2  # placement-seed stream of this stage (demos 0, collect 1)


@dataclass
class RecoverConfig(RolloutConfig):
    """How many policy rollouts the expert takes over, and when (tasks, execute_steps, workers: RolloutConfig)."""

    prefix: ClassVar[str] = "recover"

    episodes_per_task: int = 10
    """Rollouts per libero_spatial task, each from its own fresh placement."""
    takeover_steps: list[int] = field(default_factory=lambda: [24, 160])
    """[first, last]: the policy acts for a number of env steps drawn uniformly from this range (per
    episode, from its seed), then the expert takes over. Early takeovers correct the approach and the
    grasp, late ones a grasp that missed."""
    max_steps: int = 300
    """Step cap of the expert's part; success within it keeps the episode."""

    def validate(self) -> None:
        super().validate()
        self.check(self.episodes_per_task >= 1, "episodes_per_task", "at least 1")
        self.check(isinstance(self.takeover_steps, list) and len(self.takeover_steps) == 2
                   and all(isinstance(n, int) for n in self.takeover_steps)
                   and 1 <= self.takeover_steps[0] <= self.takeover_steps[1],
                   "takeover_steps", "[first, last]: two ints with 1 <= first <= last")
        self.check(self.max_steps >= 1, "max_steps", "positive")

    def takeover_step(self, seed: int) -> int:
        """The policy's steps before the expert takes over, in an episode of placement seed `seed`."""
        first, last = self.takeover_steps
        return int(np.random.default_rng(seed).integers(first, last + 1))


@dataclass
class Recovery:
    """One rollout's outcome: whether the policy succeeded before the takeover, whether the gripper held the
    bowl then, and the expert's demonstration from there (None unless the expert succeeded)."""

    task: int
    episode: int
    takeover_step: int
    policy_success: bool
    held: bool
    demo: Demo | None


def _recover_episode(job: tuple[int, int, int, int, RecoverConfig]) -> Recovery:
    task, episode, seed, takeover_step, config = job
    env = worker_env(task)
    obs = env.reset(seed=seed)
    success, _, obs = rollout(env, obs, worker_agent(), config.execute_steps, lambda *_: None,
                              max_steps=takeover_step)
    if success:
        return Recovery(task, episode, takeover_step, True, False, None)
    held = env.holds(env.target_object)
    expert = take_over(env, obs, config.max_steps)
    if not expert.success:
        return Recovery(task, episode, takeover_step, False, held, None)
    agentview, wrist = env.render_states(expert.states)  # the same env and reset: the same fixtures
    demo = Demo(actions=expert.actions, states=expert.states, ee_pos=expert.ee_pos, ee_ori=expert.ee_ori,
                gripper_states=expert.gripper_states, joint_states=expert.joint_states, agentview=agentview,
                wrist=wrist, seed=seed)
    return Recovery(task, episode, takeover_step, False, held, demo)


def _describe(job: tuple[int, int, int, int, RecoverConfig]) -> str:
    task, episode, seed, takeover_step, _ = job
    return f"recovery {episode} of task {task} (placement seed {seed}, takeover at step {takeover_step})"


def make_recoveries(make_agent: Callable[[], Agent], config: RecoverConfig, sim: SimConfig, base_seed: int,
                    out_dir: str | Path) -> dict:
    """Fill `out_dir` with one demo file per task that kept a recovery; return the stage's metrics."""
    out_dir = Path(out_dir)
    tasks = config.task_indices
    info = {t: LiberoEnv.task_info(t) for t in tasks}
    jobs = []
    for t in tasks:
        for e in range(config.episodes_per_task):
            seed = placement_seed(base_seed, RECOVER_STREAM, t, e)
            jobs.append((t, e, seed, config.takeover_step(seed), config))
    log.info("%d tasks in libero_spatial, %d rollouts each, the expert taking over after %d to %d steps",
             len(tasks), config.episodes_per_task, *config.takeover_steps)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    start = time.monotonic()
    results: dict[int, list[Recovery]] = defaultdict(list)
    try:
        with Progress(len(jobs), "recover") as bar:
            for r in run_unordered(_recover_episode, jobs, config.workers, init_worker, (make_agent, sim),
                                   describe=_describe):
                results[r.task].append(r)
                kept = sum(x.demo is not None for rs in results.values() for x in rs)
                bar.update(1, task=r.task, kept=kept)
                if len(results[r.task]) == config.episodes_per_task:
                    demos = [x.demo for x in sorted(results[r.task], key=lambda x: x.episode) if x.demo is not None]
                    name, instruction, bddl = info[r.task]
                    log.info("Task %d %s: %d recoveries kept of %d rollouts", r.task, instruction, len(demos),
                             config.episodes_per_task)
                    if demos:
                        write_task_demos(demo_path(tmp_dir, name), TaskDemos(name, instruction, demos, bddl),
                                         env_args={"image_size": sim.image_size, "fast_render": sim.fast_render})
        replace_dir(tmp_dir, out_dir)  # the folder appears only once every task's file is complete
    finally:
        with deferred_stop():  # a failed or stopped run leaves no half-filled folder
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return summarize(results, {t: info[t][0] for t in tasks}, time.monotonic() - start)


def summarize(results: dict[int, list[Recovery]], names: dict[int, str], wall_seconds: float) -> dict:
    """Counts overall and per task: rollouts, the policy's successes before the takeover, takeovers (and how
    many found the bowl held), recoveries kept."""
    every = [r for rs in results.values() for r in rs]
    taken = [r for r in every if not r.policy_success]
    kept = [r for r in taken if r.demo is not None]
    return {
        "episodes": len(every),
        "policy_successes": len(every) - len(taken),
        "takeovers": len(taken),
        "takeovers_holding": sum(r.held for r in taken),
        "kept": len(kept),
        "expert_success_rate": round(len(kept) / len(taken), 4) if taken else None,
        "per_task_kept": {names[t]: sum(r.demo is not None for r in results[t]) for t in sorted(results)},
        "per_task_takeovers": {names[t]: sum(not r.policy_success for r in results[t]) for t in sorted(results)},
        "mean_takeover_step": round(float(np.mean([r.takeover_step for r in taken])), 1) if taken else None,
        "frames": int(sum(len(r.demo) for r in kept)),
        "wall_seconds": round(wall_seconds, 1),
    }
