"""Rollout work spread over Ray actors: one per worker, set up once (its simulator, its agent), then fed jobs.

Local by default: a stage starts its own one-machine Ray with `workers` CPUs and stops it when its jobs are
done. `base.ray_address` (or Ray's own `RAY_ADDRESS`) joins an existing cluster instead, whose nodes have
the project installed and the data and models at the same paths.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable, Iterable, Iterator, TypeVar

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read when Ray is imported: a stage reports nothing home
# Ray runs its workers at nice 15 (behind its own servers); here they are the stage's work, so at its priority
os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402

from rsd.progress import STOP_SIGNALS, deferred_stop, raise_if_stopped  # noqa: E402

log = logging.getLogger("rsd.parallel")

J = TypeVar("J")
R = TypeVar("R")

RESTARTS = 2
"""A worker process that dies (a simulator crash, a killed process, a lost node) is started again, set up
again, and its job rerun, this many times; then the run fails."""

OBJECT_STORE_BYTES = 256 * 2**20
"""The local Ray's shared-memory store: results are episodes (tens of MB at most), not datasets."""

_cluster_address: str | None = None


def use_cluster(address: str | None) -> None:
    """Run later jobs on the Ray cluster at `address` (`base.ray_address`); None: `RAY_ADDRESS`, else local."""
    global _cluster_address
    _cluster_address = address or None


class WorkerError(RuntimeError):
    """A job, or a worker's set-up, failed in a worker process, or a worker died more often than it is
    restarted: the message says which job (or the set-up) and why, with the worker's own exception type and
    text; its traceback is the cause."""

    def __init__(self, message: str, job: Any = None, error_type: str | None = None, error_text: str | None = None) -> None:
        super().__init__(message)
        self.job, self.error_type, self.error_text = job, error_type, error_text


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process, as it printed there."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0].rstrip()}\n"""'


def describe_job(job: Any) -> str:
    """A job as an error names it: its tuple, a long part of it (a config) shortened to its type."""
    parts = job if isinstance(job, tuple) else (job,)
    shown = [text if len(text := repr(part)) <= 40 else f"{type(part).__name__}(...)" for part in parts]
    return f"job ({', '.join(shown)}{',' if len(shown) == 1 else ''})" if isinstance(job, tuple) else f"job {shown[0]}"


def run_unordered(fn: Callable[[J], R], jobs: Iterable[J], workers: int,
                  initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = (),
                  describe: Callable[[J], str] = describe_job) -> Iterator[R]:
    """Yield `fn(job)` for every job as results arrive, from `workers` Ray actors.

    Jobs are handed out in order, each to the next free worker, so jobs of the same task sent together let a
    worker reuse its env. `initializer(*initargs)` sets each worker up (builds its agent) before its first job.

    A worker that dies is restarted (`RESTARTS` times) and its job rerun, so a stage's results do not depend
    on it. Any other failure fails the whole run with a `WorkerError` raised here, naming the job as
    `describe` says it and carrying the worker's exception type and text (its traceback as the cause): an
    exception in a job, one in the initializer (a checkpoint that does not load), a result that cannot be
    sent back. However the run ends (done, failed, left early, a stop signal in the stage), the workers are
    killed, not waited for; a local Ray dies with the process that started it (Linux), so killing a stage
    leaves no simulator running on.
    """
    jobs = list(jobs)
    if not jobs:
        return
    count = max(1, min(workers, len(jobs)))
    started = _connect(count)
    actors: list[Any] = []
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < count:  # more actors than CPUs would leave some never placed, holding their first job
            log.warning("%d workers asked for, the Ray cluster has %d CPUs: running %d", count, cpus, max(cpus, 1))
            count = max(cpus, 1)
        actors = [_Worker.remote(fn, initializer, initargs) for _ in range(count)]
        running: dict[Any, tuple[Any, int]] = {}  # result ref -> (actor, job index)
        queued = iter(range(len(jobs)))

        def hand_out(actor: Any) -> None:
            if (index := next(queued, None)) is not None:
                try:
                    running[actor.run.remote(jobs[index])] = (actor, index)
                except Exception as exc:  # pickling the job, here rather than in the worker
                    raise WorkerError(f"{describe(jobs[index])} cannot be sent to a worker process: "
                                      f"{type(exc).__name__}: {exc}", jobs[index], type(exc).__name__, str(exc)) from exc

        for actor in actors:
            hand_out(actor)
        while running:
            try:
                (ref,), _ = ray.wait(list(running), num_returns=1)
            except SystemExit as exc:  # a stop signal inside Ray's wait comes out as SystemExit(1)
                raise_if_stopped(exc)
                raise
            actor, index = running.pop(ref)
            job = jobs[index]
            try:
                kind, payload = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                raise WorkerError(f"a worker process died while running {describe(job)}, "
                                  f"{RESTARTS + 1} times: {_first_line(exc)}", job) from exc
            except ray.exceptions.RayError as exc:  # the result could not be sent back
                raise WorkerError(f"{describe(job)} failed in a worker process: {_first_line(exc)}", job,
                                  type(exc).__name__, str(exc)) from exc
            if kind == "failed":
                error_type, text, trace = payload
                raise WorkerError(f"{describe(job)} failed in a worker process: {error_type}: {text}",
                                  job, error_type, text) from WorkerTraceback(trace)
            if kind == "setup":
                error_type, text, trace = payload
                setup = getattr(initializer, "__qualname__", repr(initializer))
                raise WorkerError(f"a worker process failed to set up ({setup}): {error_type}: {text}",
                                  None, error_type, text) from WorkerTraceback(trace)
            yield payload
            hand_out(actor)
    finally:
        with deferred_stop():  # a stop signal now must not leave a worker running
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()
                _stop_reaper()


def _connect(workers: int) -> bool:
    """Connect to the cluster asked for, or start a local Ray with `workers` CPUs; True when this call did
    (and its run must disconnect)."""
    if ray.is_initialized():
        return False
    address = _cluster_address or os.environ.get("RAY_ADDRESS")
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    # Ray's core installs its own SIGTERM handler (it prints a stack and exits): the stage's own handlers
    # (a stop signal as an orderly exit, rsd.progress) are put back
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    if address:
        ray.init(address=address, **quiet)  # the cluster kills this driver's actors when it dies
    else:
        ray.init(address="local", num_cpus=workers, object_store_memory=OBJECT_STORE_BYTES, **quiet)  # a new one, not a `ray start` cluster found on this machine
        _start_reaper()
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
    return True


_REAPER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
driver, me = int(sys.argv[1]), os.getpid()

def descendants():
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    found, frontier = {}, [driver]
    while frontier:
        for pid, start in children.get(frontier.pop(), []):
            if pid != me:
                found[pid] = start
                frontier.append(pid)
    return found

last = {}
while os.getppid() == driver:
    last = descendants()
    time.sleep(1.0)
for pid, start in last.items():
    try:
        with open(f"/proc/{pid}/stat") as f:
            same = f.read().rsplit(")", 1)[1].split()[19] == start
        if same:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass
"""
"""Watches the stage's local Ray: when the stage dies, every process it had started dies too. Ray's servers
die with it by themselves, its workers with them, but its dashboard and runtime-env agents outlive a killed
stage (they wait on the dead servers)."""

_reaper: subprocess.Popen | None = None


def _start_reaper() -> None:
    global _reaper
    if sys.platform.startswith("linux") and _reaper is None:
        _reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.DEVNULL)


def _stop_reaper() -> None:
    global _reaper
    if _reaper is not None:
        _reaper.kill()
        _reaper.wait()
        _reaper = None


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@ray.remote(num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)
class _Worker:
    """One worker process: set up before its first job (again after a restart), then one job a call."""

    def __init__(self, fn: Callable[[Any], Any], initializer: Callable[..., None] | None,
                 initargs: tuple[Any, ...]) -> None:
        self.fn, self.initializer, self.initargs = fn, initializer, initargs
        self.set_up = False

    def run(self, job: Any) -> tuple[str, Any]:
        if not self.set_up:
            try:
                if self.initializer is not None:
                    self.initializer(*self.initargs)
            except BaseException as exc:
                return "setup", _error(exc)
            self.set_up = True
        try:
            return "done", self.fn(job)
        except BaseException as exc:
            return "failed", _error(exc)


def _error(exc: BaseException) -> tuple[str, str, str]:
    """An exception as the parent reports it: type, text, the traceback printed here."""
    return type(exc).__qualname__, str(exc), "".join(traceback.format_exception(exc))
