"""Simulator work spread over worker processes."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Iterator, TypeVar

J = TypeVar("J")
R = TypeVar("R")


def run_unordered(fn: Callable[[J], R], jobs: Iterable[J], workers: int,
                  initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()) -> Iterator[R]:
    """Yield `fn(job)` for every job as results arrive, from `workers` fresh (spawned) processes.

    Jobs are handed out in order, so jobs of the same task sent together let a worker reuse its env.
    A worker that dies (a simulator crash, a kill) fails the whole run with BrokenProcessPool instead
    of hanging it, and leaving early cancels the jobs not yet started. Workers die with the process
    that started them (Linux), so killing a stage leaves no simulator running on.
    """
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(initializer, initargs)) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _init_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if initializer is not None:
        initializer(*initargs)
