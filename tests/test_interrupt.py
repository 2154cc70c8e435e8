"""A stopped stage leaves nothing behind: SIGTERM to `dvc repro` (a timeout, a CI runner, a scheduler) or to
the stage stops the stage and its workers, writes no output and leaves no temporary file; a SIGKILL's
temporaries go when the target is written again; a full disk is said as such, naming the file."""
from __future__ import annotations

import errno
import os
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from procs import alive, parent
import rsd.io
import rsd.progress
from rsd.io import atomic_path, save_torch, write_json
from rsd.progress import Interrupted, deferred_stop, exit_on_signals

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and the parent-death signal are Linux's")

STAGE = textwrap.dedent(f"""
    '''A stage as the pipeline's are: its paths from the command line, an output written atomically, slow jobs.'''
    import os
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, {str(ROOT)!r})
    from rsd.params import stage_args
    from rsd.parallel import run_unordered


    def slow(job):
        index, pids = job
        Path(pids, f"worker-{{os.getpid()}}").touch()
        time.sleep(60)
        return index


    if __name__ == "__main__":
        args = stage_args(__doc__, "out", "pids", "write")
        (args.pids / f"stage-{{os.getpid()}}").touch()
        jobs = [(i, str(args.pids)) for i in range(2)]
        if str(args.write) == "atomic":  # the output half written, in its temporary, while the jobs run
            from rsd.io import atomic_path  # torch, for the stage alone: the workers import this file too

            with atomic_path(args.out) as tmp:
                tmp.write_text("half")
                tmp.write_text(repr(list(run_unordered(slow, jobs, workers=2))))
        else:
            results = list(run_unordered(slow, jobs, workers=2))
            args.out.write_text(repr(results))
""")


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(pids: list[int]) -> None:
    """The processes a test started, by pid, if a failed test left any."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _running_stage(pids: Path, proc: subprocess.Popen, log: Path) -> tuple[int, list[int]]:
    """The stage's pid and its two workers', once both workers run their slow job."""
    ready = _wait_for(lambda: len(list(pids.glob("worker-*"))) == 2 or proc.poll() is not None, 90)
    assert ready and proc.poll() is None, log.read_text()
    (stage,) = [int(p.name.split("-")[1]) for p in pids.glob("stage-*")]
    return stage, [int(p.name.split("-")[1]) for p in pids.glob("worker-*")]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out.json"))


@linux_only
@pytest.mark.parametrize("shell", ["/bin/bash", None], ids=["bash", "sh"])
def test_sigterm_to_dvc_repro_stops_the_stage_and_its_workers(tmp_path: Path, shell: str | None) -> None:
    """bash replaces itself with the stage's command; /bin/sh (dash) stays between DVC and the stage."""
    project, pids = tmp_path / "project", tmp_path / "pids"
    project.mkdir()
    pids.mkdir()
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text("[core]\n    no_scm = True\n    analytics = false\n")
    (project / "stage.py").write_text(STAGE)
    cmd = f"{shlex.quote(sys.executable)} stage.py out.json {shlex.quote(str(pids))} atomic"
    (project / "dvc.yaml").write_text(f"stages:\n  slow:\n    cmd: {cmd}\n    deps: [stage.py]\n    outs: [out.json]\n")
    env = {k: v for k, v in os.environ.items() if k != "SHELL"}
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site"), **({"SHELL": shell} if shell else {}))
    log = tmp_path / "dvc.log"
    with open(log, "w") as out:
        dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, stdout=out, stderr=out)
    started = [dvc.pid]
    try:
        stage, workers = _running_stage(pids, dvc, log)
        started += [stage, *workers]
        if parent(stage) != dvc.pid:
            started.append(parent(stage))  # the shell
        assert (parent(stage) == dvc.pid) == (shell is not None)
        dvc.send_signal(signal.SIGTERM)
        dvc.wait(10)
        assert _wait_for(lambda: not any(map(alive, started)), 15), f"still running: {[p for p in started if alive(p)]}"
        assert not (project / "out.json").exists() and _leftovers(project) == []
        assert "SIGTERM received: stopping" in log.read_text()
    finally:
        _kill(started)
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()


@linux_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signalled_stage_exits_non_zero_and_writes_nothing(tmp_path: Path, signum: int) -> None:
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "pids").mkdir()
    log = tmp_path / "stage.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "stage.py", "out.json", "pids", "plain"], cwd=tmp_path, stdout=out,
                                stderr=out)
    started = [proc.pid]
    try:
        _, workers = _running_stage(tmp_path / "pids", proc, log)
        started += workers
        proc.send_signal(signum)
        assert proc.wait(15) == 128 + signum
        assert not any(map(alive, workers))  # terminated before the stage exited, not left to the parent-death signal
        assert not (tmp_path / "out.json").exists() and _leftovers(tmp_path) == []
        assert f"{signal.Signals(signum).name} received: stopping" in log.read_text()
    finally:
        _kill(started)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SAVER = textwrap.dedent(f"""
    import sys
    import time

    sys.path.insert(0, {str(ROOT)!r})
    from pathlib import Path

    import torch
    import rsd.progress
    from rsd.io import save_torch
    from rsd.params import start_stage
    from rsd.progress import Interrupted


    class Slow:
        '''Pickled in the middle of the checkpoint: the save is under way for 3 s, its temporary half written.'''

        def __reduce__(self):
            print("saving", flush=True)
            time.sleep(3)
            return int, (0,)


    if __name__ == "__main__":
        start_stage()
        path, mode = sys.argv[1:]
        if mode == "slow":
            save_torch(path, {{"weights": torch.zeros(100_000), "slow": Slow()}})
        while True:  # saves until a signal stops them, then what they left; a stage would exit there
            try:
                print("saving", flush=True)
                for i in range(100_000):
                    save_torch(path, {{"weights": torch.randn(50_000), "step": i}})
            except Interrupted:
                rsd.progress._stopping = None  # ready for the next signal
            left = sorted(p.name for p in Path(path).parent.iterdir() if p.name.endswith(".tmp"))
            keys = sorted(torch.load(path)) if Path(path).exists() else None
            print(f"stopped: temporaries {{left}}, checkpoint {{keys}}", flush=True)
""")


def _saver(tmp_path: Path, mode: str) -> subprocess.Popen:
    (tmp_path / "saver.py").write_text(SAVER)
    return subprocess.Popen([sys.executable, "saver.py", "model.pt", mode], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "saver.log", "w"), text=True)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_sigterm_during_save_torch_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """The stop waits for torch's writer to finish (stopped inside it, the process aborts), then unwinds."""
    (tmp_path / "model.pt").write_bytes(b"the checkpoint dvc.lock describes")
    proc = _saver(tmp_path, "slow")
    try:
        assert proc.stdout.readline() == "saving\n"
        assert _temporaries(tmp_path)  # the save is under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "model.pt").read_bytes() == b"the checkpoint dvc.lock describes"
    assert _temporaries(tmp_path) == []


def test_sigterm_at_any_moment_of_repeated_saves_leaves_no_temporary(tmp_path: Path) -> None:
    """One process saving over and over, stopped at 25 random moments: after each, no temporary, and the
    checkpoint is whole (or not written yet)."""
    rng = random.Random(0)
    proc = _saver(tmp_path, "loop")
    try:
        for _ in range(25):
            assert proc.stdout.readline() == "saving\n"
            time.sleep(rng.uniform(0, 0.2))
            proc.send_signal(signal.SIGTERM)
            assert proc.stdout.readline() in ("stopped: temporaries [], checkpoint None\n",
                                              "stopped: temporaries [], checkpoint ['step', 'weights']\n")
    finally:
        proc.kill()
        proc.wait()


def test_temporaries_a_sigkill_left_go_when_the_target_is_written_again(tmp_path: Path) -> None:
    stale = [tmp_path / ".metrics.json.k3x_9q2a.tmp", tmp_path / ".metrics.json.00000000.tmp"]
    others = [tmp_path / ".metrics.json.old.abcdefgh.tmp", tmp_path / ".other.json.abcdefgh.tmp", tmp_path / "notes.tmp"]
    for path in stale + others:
        path.write_text("left by a killed run")
    write_json(tmp_path / "metrics.json", {"success_rate": 0.82})
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in others)
    assert (tmp_path / "metrics.json").read_text() == '{\n  "success_rate": 0.82\n}\n'


class Unsaveable:
    def __reduce__(self) -> tuple:
        raise TypeError("not a checkpoint value")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"old")
    with pytest.raises(TypeError, match="not a checkpoint value"):  # its own message: no disk is full here
        save_torch(tmp_path / "model.pt", {"weights": torch.zeros(3), "bad": Unsaveable()})
    assert (tmp_path / "model.pt").read_bytes() == b"old" and _temporaries(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_is_named_with_the_file_not_torchs_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: object, mode: str = "r") -> object:  # the checkpoint's bytes go to a full device
        return open("/dev/full", mode)

    monkeypatch.setattr(rsd.io, "open", full_disk, raising=False)
    target = tmp_path / "models" / "policy.pt"
    with pytest.raises(OSError) as caught:
        save_torch(target, {"weights": torch.zeros(100_000)})
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "inline_container" not in message
    assert message.startswith(f"[Errno 28] could not write {target}: the disk may be full (")
    assert " free in " in message and not target.exists() and _temporaries(target.parent) == []


def test_no_space_for_json_is_named_with_the_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"could not write .*metrics\.json: the disk may be full \(\d+\.\d [KMGT]iB free in "):
        with atomic_path(tmp_path / "metrics.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError, match="not the disk"):  # other failures keep their own message
        with atomic_path(tmp_path / "metrics.json"):
            raise PermissionError(errno.EACCES, "not the disk")
    assert _temporaries(tmp_path) == []


def test_a_stop_signal_waits_for_the_end_of_a_deferred_block(monkeypatch: pytest.MonkeyPatch) -> None:
    for signum in rsd.progress.STOP_SIGNALS:
        monkeypatch.setattr(rsd.progress, "_stopping", None)
        previous = {s: signal.getsignal(s) for s in rsd.progress.STOP_SIGNALS}
        steps = []
        try:
            exit_on_signals()
            with pytest.raises(Interrupted) as caught:
                with deferred_stop():
                    os.kill(os.getpid(), signum)
                    time.sleep(0.05)  # the handler has run by now: it waits for the block's end
                    steps.append("the block ran to its end")
            assert caught.value.code == 128 + signum and steps == ["the block ran to its end"]
            os.kill(os.getpid(), signum)  # while stopping, a second signal does not cut the clean-up short
            time.sleep(0.05)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
