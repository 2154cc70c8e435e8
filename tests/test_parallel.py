"""Worker pools: results arrive, a failure in a worker (its job, its set-up, its death) fails the run with
the worker's own message and the job it ran, workers are terminated however the run ends, and they die
with their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from procs import alive, descendants
from rsd.parallel import RESTARTS, WorkerError, WorkerTraceback, run_unordered

ROOT = Path(__file__).resolve().parents[1]


def square(x: int) -> int:
    return x * x


def die(_: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def fail_on_task_2(job: tuple[int, int]) -> int:
    task, episode = job
    if task == 2:
        raise ValueError(f"no init state {episode} for task {task}")
    return task


def fail_setup(path: str) -> None:
    raise FileNotFoundError(f"policy checkpoint not found: {path}")


def mark_and_wait(job: tuple[str, int, float]) -> int:
    folder, index, seconds = job
    Path(folder, f"{index}-{os.getpid()}").touch()
    time.sleep(seconds)
    return index


def test_results_of_every_job() -> None:
    assert sorted(run_unordered(square, range(5), workers=2)) == [0, 1, 4, 9, 16]


def test_jobs_are_handed_out_in_order() -> None:
    assert list(run_unordered(square, range(6), workers=1)) == [0, 1, 4, 9, 16, 25]


def die_once(job: tuple[str, int]) -> int:
    """Kill this worker process the first time the job runs (a marker file says it ran), then succeed."""
    folder, index = job
    marker = Path(folder, f"ran-{index}")
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return index


def test_a_killed_worker_is_restarted_and_its_job_rerun(tmp_path: Path) -> None:
    jobs = [(str(tmp_path), i) for i in range(4)]
    assert sorted(run_unordered(die_once, jobs, workers=2)) == [0, 1, 2, 3]
    assert len(list(tmp_path.glob("ran-*"))) == 4  # every job's first run was killed


def test_a_worker_that_always_dies_fails_the_run_naming_its_job() -> None:
    with pytest.raises(WorkerError, match=rf"^a worker process died while running job 7, {RESTARTS + 1} times: "):
        list(run_unordered(die, [7], workers=1))


def test_a_job_error_reaches_the_parent_with_its_message_and_job() -> None:
    jobs = [(0, 0), (1, 0), (2, 5), (3, 0)]
    with pytest.raises(WorkerError) as caught:
        list(run_unordered(fail_on_task_2, jobs, workers=2))
    assert str(caught.value) == "job (2, 5) failed in a worker process: ValueError: no init state 5 for task 2"
    assert (caught.value.job, caught.value.error_type) == ((2, 5), "ValueError")
    assert isinstance(caught.value.__cause__, WorkerTraceback)  # where in the worker, printed above the error
    assert "fail_on_task_2" in str(caught.value.__cause__) and "raise ValueError" in str(caught.value.__cause__)


def test_a_job_is_said_as_the_caller_describes_it() -> None:
    with pytest.raises(WorkerError, match=r"^task 2, init state 5 failed in a worker process: ValueError"):
        list(run_unordered(fail_on_task_2, [(2, 5)], workers=1, describe=lambda j: f"task {j[0]}, init state {j[1]}"))


def test_a_set_up_error_reaches_the_parent_with_its_message() -> None:
    with pytest.raises(WorkerError) as caught:
        list(run_unordered(square, range(4), workers=2, initializer=fail_setup, initargs=("models/policy.pt",)))
    assert str(caught.value) == ("a worker process failed to set up (fail_setup): "
                                 "FileNotFoundError: policy checkpoint not found: models/policy.pt")
    assert "fail_setup" in str(caught.value.__cause__)


def test_leaving_early_terminates_a_running_worker(tmp_path: Path) -> None:
    """The pool does not wait for a running job (ProcessPoolExecutor's shutdown does): it is terminated."""
    results = run_unordered(mark_and_wait, [(str(tmp_path), 0, 0.0), (str(tmp_path), 1, 60.0)], workers=2)
    assert next(results) == 0
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("1-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (marker,) = tmp_path.glob("1-*")
    start = time.monotonic()
    results.close()
    assert time.monotonic() - start < 5 and not alive(int(marker.name.split("-")[1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL to the stage: its local Ray (and so every worker) goes with it."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from rsd.parallel import run_unordered

        def report_and_wait(index):
            Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}").touch()
            time.sleep(60)

        if __name__ == "__main__":
            for _ in run_unordered(report_and_wait, [0, 1], workers=2):
                pass
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2
    ray_processes = descendants(parent.pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while any(map(alive, workers + ray_processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)) and not any(map(alive, ray_processes))
