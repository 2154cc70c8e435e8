"""The libero_spatial suite's tasks as the configs name them, without loading the simulator.

A machine that only times recorded observations (no LIBERO installed) still validates `tasks` settings.
"""
from __future__ import annotations

from typing import Any

from rsd.config import is_int

SUITE = "libero_spatial"
NUM_TASKS = 10

TASKS_EXPECTED = f"null or a non-empty list of task indices in 0..{NUM_TASKS - 1}"
"""What a stage's `tasks` setting must be, in words (for its config's check)."""


def are_task_indices(tasks: Any) -> bool:
    """Whether `tasks` is a valid `tasks` setting: None (all tasks) or a non-empty list of the suite's task indices."""
    return tasks is None or (isinstance(tasks, (list, tuple)) and len(tasks) > 0
                             and all(is_int(t) and 0 <= t < NUM_TASKS for t in tasks))


def task_indices(tasks: list[int] | None, param: str) -> list[int]:
    """The suite's task indices a stage covers: all of them for None, else `tasks`, checked; `param` names
    the setting in the error (e.g. "eval.tasks")."""
    if not are_task_indices(tasks):
        raise ValueError(f"{param} must be {TASKS_EXPECTED}, got {tasks!r}")
    return list(range(NUM_TASKS)) if tasks is None else list(tasks)
