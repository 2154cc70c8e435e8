"""Simulator work spread over worker processes."""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterable, Iterator, TypeVar

from rsd.progress import deferred_stop, die_with_parent

J = TypeVar("J")
R = TypeVar("R")


class WorkerError(RuntimeError):
    """A job, or a worker's set-up, failed in a worker process, or a worker died: the message says which job (or
    the set-up) and why, with the worker's own exception type and text; its traceback is the cause."""

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
    """Yield `fn(job)` for every job as results arrive, from `workers` fresh (spawned) processes.

    Jobs are handed out in order, so jobs of the same task sent together let a worker reuse its env.
    `initializer(*initargs)` sets each worker up (builds its agent) before its first job.

    Any failure fails the whole run with a `WorkerError` raised here, naming the job as `describe` says it
    and carrying the worker's exception type and text (its traceback as the cause): an exception in a job,
    one in the initializer (a checkpoint that does not load), a result that cannot be sent back, a worker
    that dies (a simulator crash, a kill). However the run ends (done, failed, left early, a stop signal in
    the stage), the workers are terminated, not waited for. They also die with the process that started
    them (Linux), so killing a stage leaves no simulator running on.
    """
    jobs = list(jobs)
    if not jobs:
        return
    ctx = mp.get_context("spawn")
    count = max(1, min(workers, len(jobs)))
    setup = getattr(initializer, "__qualname__", repr(initializer))
    queue = ctx.Queue()
    pool: list[_Worker] = []
    try:
        for index, job in enumerate(jobs):
            try:  # here, not in the queue's feeder thread, where a failure would be printed and the job lost
                payload = bytes(ForkingPickler.dumps(job))
            except Exception as exc:
                raise WorkerError(f"{describe(job)} cannot be sent to a worker process: {type(exc).__name__}: {exc}",
                                  job, type(exc).__name__, str(exc)) from exc
            queue.put((index, payload))
        for _ in range(count):
            queue.put(None)  # one stop per worker, after every job
        with deferred_stop():  # every worker started is in `pool`, for the clean-up below
            for _ in range(count):
                receiver, sender = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_work, args=(fn, queue, sender, initializer, initargs, os.getpid()),
                                      name="rsd-worker")
                process.start()
                _started.add(process)
                sender.close()
                pool.append(_Worker(process, receiver))
        left = len(jobs)
        while left:
            open_workers = [w for w in pool if w.receiver is not None]
            if not open_workers:
                raise WorkerError(f"every worker process exited with {left} job(s) not done")
            wait([w.receiver for w in open_workers] + [w.process.sentinel for w in open_workers])
            for worker in open_workers:
                for kind, index, payload in worker.messages():
                    if kind == "ready":
                        worker.set_up = True
                    elif kind == "start":
                        worker.running = index
                    elif kind == "done":
                        worker.running = None
                        left -= 1
                        yield payload
                    elif kind == "failed":
                        error_type, text, trace = payload
                        raise WorkerError(f"{describe(jobs[index])} failed in a worker process: {error_type}: {text}",
                                          jobs[index], error_type, text) from WorkerTraceback(trace)
                    else:  # "setup"
                        error_type, text, trace = payload
                        raise WorkerError(f"a worker process failed to set up ({setup}): {error_type}: {text}",
                                          None, error_type, text) from WorkerTraceback(trace)
                if worker.receiver is None and (worker.running is not None or worker.process.exitcode != 0):
                    job = None if worker.running is None else jobs[worker.running]
                    doing = (f"while running {describe(job)}" if job is not None
                             else "between jobs" if worker.set_up else f"while setting up ({setup})")
                    raise WorkerError(f"a worker process (pid {worker.process.pid}) died {doing}: "
                                      f"{_exit_status(worker.process.exitcode)}", job)
    finally:
        with deferred_stop():  # a stop signal now must not leave a worker running
            _terminate([w.process for w in pool])
            for worker in pool:
                worker.close()
            queue.close()
            queue.cancel_join_thread()  # jobs no worker took: nothing waits to deliver them


class _Worker:
    """One worker process as the parent sees it: its result pipe, the job it runs, whether it is set up."""

    def __init__(self, process: mp.process.BaseProcess, receiver: Connection) -> None:
        self.process, self.receiver = process, receiver
        self.running: int | None = None
        self.set_up = False

    def messages(self) -> Iterator[tuple[str, int | None, Any]]:
        """The messages waiting on the pipe; at its end (the worker exited) the pipe is closed and the
        process reaped, so that `exitcode` says how it ended."""
        while self.receiver is not None and self.receiver.poll():
            try:
                message = self.receiver.recv()
            except (EOFError, OSError):
                self.close()
                self.process.join(10)
                return
            yield message
        if self.receiver is not None and not self.process.is_alive():  # exited, its pipe held open elsewhere
            self.close()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running, its result pipe closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_started: set[mp.process.BaseProcess] = set()
"""Workers not yet terminated: the safety net below terminates them if their run was never closed."""


def _terminate(processes: list[mp.process.BaseProcess]) -> None:
    """SIGTERM (a worker dies at once: it has nothing to save), then SIGKILL whatever still runs."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        _started.discard(process)


atexit.register(lambda: _terminate(list(_started)))


def _work(fn: Callable[[Any], Any], queue: Any, results: Connection, initializer: Callable[..., None] | None,
          initargs: tuple[Any, ...], parent: int) -> None:
    """A worker process: set up, then run jobs from the queue until its stop, each result sent back."""
    # Ctrl-C reaches the whole process group: the parent answers it, and terminates its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent:
        return  # the parent died before this process asked to die with it
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        results.send(("setup", None, _error(exc)))
        return
    results.send(("ready", None, None))
    while (item := queue.get()) is not None:
        index, payload = item
        results.send(("start", index, None))
        try:
            message = ("done", index, fn(ForkingPickler.loads(payload)))
            data = ForkingPickler.dumps(message)
        except BaseException as exc:
            results.send(("failed", index, _error(exc)))
            return
        results.send_bytes(data)


def _error(exc: BaseException) -> tuple[str, str, str]:
    """An exception as the parent reports it: type, text, the traceback printed here."""
    return type(exc).__qualname__, str(exc), "".join(traceback.format_exception(exc))
