"""The `demos` stage: scripted-expert demonstrations from fresh placements, in LIBERO's HDF5 layout."""
from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from rsd.config import Config
from rsd.data import Demo, TaskDemos, demo_files, demo_path, read_task_demos, write_task_demos
from rsd.parallel import run_unordered
from rsd.progress import Progress, deferred_stop, replace_dir
from rsd.sim.env import LiberoEnv, SimConfig, cached_env, placement_seed
from rsd.sim.suite import NUM_TASKS, TASKS_EXPECTED, are_task_indices, task_indices
from rsd.sim.expert import rollout_expert

log = logging.getLogger("rsd.demos")

DEMOS_STREAM = 0  # placement-seed stream of this stage (collect uses its own)


@dataclass
class DemosConfig(Config):
    """Where demonstrations come from, and how many."""

    prefix: ClassVar[str] = "demos"

    source: str = "expert"
    """`expert` runs the scripted expert; otherwise a folder of LIBERO `<task>_demo.hdf5` files to use instead."""
    tasks: list[int] | None = None
    """libero_spatial task indices to demonstrate (0..9); None means all ten."""
    attempts_per_task: int = 20
    """Expert episodes per task, each from its own fresh random placement; only successes are kept."""
    extra_attempts: dict[int, int] | None = None
    """More episodes for some tasks (task index -> attempts added to `attempts_per_task`): the tasks whose
    grasp needs the most precision get the most data."""
    max_steps: int = 300
    """Step cap of one expert attempt. Success within the suite's budget (sim.max_steps) is reported apart."""
    workers: int = 2
    """Parallel simulator processes."""

    def validate(self) -> None:
        # checked here, so that `rsd doctor` and the stage refuse a mistyped folder before any work
        self.check(self.source == "expert" or (self.source != "" and Path(self.source).is_dir()), "source",
                   "'expert' or an existing folder of LIBERO <task>_demo.hdf5 files")
        self.check(are_task_indices(self.tasks), "tasks", TASKS_EXPECTED)
        self.check(self.attempts_per_task >= 1, "attempts_per_task", "at least 1")
        self.check(all(0 <= t < NUM_TASKS and n >= 0 for t, n in (self.extra_attempts or {}).items()),
                   "extra_attempts", f"a mapping of task indices 0..{NUM_TASKS - 1} to non-negative ints")
        self.check(self.max_steps >= 1, "max_steps", "positive")
        self.check(self.workers >= 1, "workers", "at least 1")

    @property
    def task_indices(self) -> list[int]:
        return task_indices(self.tasks, f"{self.prefix}.tasks")

    def attempts(self, task: int) -> int:
        """Expert episodes of `task`."""
        return self.attempts_per_task + (self.extra_attempts or {}).get(task, 0)



def make_demos(config: DemosConfig, sim: SimConfig, seed: int, out_dir: str | Path) -> dict:
    """Fill `out_dir` with one demo file per task and return the stage's metrics."""
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        start = time.monotonic()
        if config.source == "expert":
            metrics = _expert_demos(config, sim, seed, tmp_dir)
        else:
            metrics = _copy_libero_demos(Path(config.source), tmp_dir)
        metrics["wall_seconds"] = round(time.monotonic() - start, 1)
        replace_dir(tmp_dir, out_dir)  # the folder appears only once every task file is complete
    finally:
        with deferred_stop():  # a failed or stopped run leaves no half-filled folder
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return metrics


# --- the scripted expert, over worker processes ----------------------------------------------

_worker_sim: SimConfig | None = None


def _init_worker(sim: SimConfig) -> None:
    global _worker_sim
    _worker_sim = sim


def _attempt(job: tuple[int, int, int, int]) -> tuple[int, int, bool, int, Demo | None]:
    """Run one expert attempt without rendering; render the frames of a success by replaying its states."""
    task, attempt, seed, max_steps = job
    episode = rollout_expert(cached_env(task, _worker_sim, render=False), seed=seed, max_steps=max_steps)
    if not episode.success:
        return task, attempt, False, episode.length, None
    renderer = cached_env(task, _worker_sim, render=True)
    renderer.reset(seed=seed)  # fixtures live in the model, not the state: same seed, same fixtures
    agentview, wrist = renderer.render_states(episode.states)
    demo = Demo(
        actions=episode.actions,
        states=episode.states,
        ee_pos=episode.ee_pos,
        ee_ori=episode.ee_ori,
        gripper_states=episode.gripper_states,
        joint_states=episode.joint_states,
        agentview=agentview,
        wrist=wrist,
        seed=seed,
    )
    return task, attempt, True, episode.length, demo


def _describe_attempt(job: tuple[int, int, int, int]) -> str:
    task, attempt, seed, _ = job
    return f"expert attempt {attempt} of task {task} (placement seed {seed})"


def _expert_demos(config: DemosConfig, sim: SimConfig, seed: int, out_dir: Path) -> dict:
    tasks = config.task_indices
    jobs = [(t, a, placement_seed(seed, DEMOS_STREAM, t, a), config.max_steps) for t in tasks for a in range(config.attempts(t))]
    info = {t: LiberoEnv.task_info(t) for t in tasks}
    log.info("%d tasks in libero_spatial, %d attempts each (%s more), %d workers", len(tasks), config.attempts_per_task,
             config.extra_attempts or "none", config.workers)

    kept: dict[int, list[tuple[int, Demo]]] = defaultdict(list)
    lengths: dict[int, list[int]] = defaultdict(list)  # of successes
    finished: dict[int, int] = defaultdict(int)
    with Progress(len(jobs), "demos") as bar:
        for task, attempt, success, length, demo in run_unordered(_attempt, jobs, config.workers, _init_worker, (sim,),
                                                                  describe=_describe_attempt):
            finished[task] += 1
            if success:
                kept[task].append((attempt, demo))
                lengths[task].append(length)
            ok = sum(len(v) for v in lengths.values())
            bar.update(1, task=task, ok=f"{ok}/{sum(finished.values())}")
            if finished[task] == config.attempts(task):
                name, instruction, bddl = info[task]
                n = len(kept[task])
                log.info("Task %d/%d %s: %d/%d succeeded", task + 1, len(tasks), instruction, n, config.attempts(task))
                if n:
                    demos = [d for _, d in sorted(kept.pop(task), key=lambda x: x[0])]
                    write_task_demos(demo_path(out_dir, name), TaskDemos(name, instruction, demos, bddl), env_args={"image_size": sim.image_size, "fast_render": sim.fast_render})

    all_lengths = [n for t in tasks for n in lengths[t]]
    kept_count = len(all_lengths)
    return {
        "source": "expert",
        "success_rate": round(kept_count / len(jobs), 4),
        "episodes": len(jobs),
        "kept": kept_count,
        "per_task": {info[t][0]: round(len(lengths[t]) / config.attempts(t), 4) for t in tasks},
        "per_task_kept": {info[t][0]: len(lengths[t]) for t in tasks},
        "mean_length": round(float(np.mean(all_lengths)), 1) if all_lengths else None,
        "within_budget": round(float(np.mean([n <= sim.max_steps for n in all_lengths])), 4) if all_lengths else None,
        "frames": int(sum(all_lengths)),
    }


# --- official LIBERO demos in place of the expert's --------------------------------------------

def _copy_libero_demos(source: Path, out_dir: Path) -> dict:
    """Check every `<task>_demo.hdf5` file of `source` reads as LIBERO demos, then copy it over."""
    kept_per_task, lengths = {}, []
    for path in demo_files(source):
        task = read_task_demos(path, images=False)
        kept_per_task[task.task_name] = len(task.demos)
        lengths += [len(d) for d in task.demos]
        shutil.copyfile(path, out_dir / path.name)
    log.info("copied %d demo files (%d demos) from %s", len(kept_per_task), len(lengths), source)
    return {
        "source": str(source),
        "success_rate": None,  # not measured: these demos come pre-filtered
        "episodes": len(lengths),
        "kept": len(lengths),
        "per_task": None,  # success rates are unknown for pre-filtered demos
        "per_task_kept": kept_per_task,
        "mean_length": round(float(np.mean(lengths)), 1),
        "within_budget": None,
        "frames": int(sum(lengths)),
    }
