"""Worker pools: results arrive, a dead worker fails the run, and workers die with their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from rsd.parallel import run_unordered

ROOT = Path(__file__).resolve().parents[1]


def square(x: int) -> int:
    return x * x


def die(_: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def test_results_of_every_job() -> None:
    assert sorted(run_unordered(square, range(5), workers=2)) == [0, 1, 4, 9, 16]


def test_a_dead_worker_fails_the_run() -> None:
    with pytest.raises(BrokenProcessPool):
        list(run_unordered(die, [1], workers=1))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from rsd.parallel import run_unordered

        def report_and_wait(_):
            print(os.getpid(), flush=True)
            time.sleep(60)

        if __name__ == "__main__":
            for _ in run_unordered(report_and_wait, [0, 1], workers=2):
                pass
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(parent.stdout.readline()) for _ in range(2)]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers))
