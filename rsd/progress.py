"""Progress reporting: a live bar in a terminal, plain timestamped lines in CI logs and files."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("rsd")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """`update(n, **status)` advances the count; in a terminal a tqdm bar, elsewhere a log line every `every_s`."""

    def __init__(self, total: int, description: str, every_s: float = 20.0, enabled: bool = True) -> None:
        self.total, self.description, self.every_s, self.enabled = total, description, every_s, enabled
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar = tqdm(total=total, desc=description, dynamic_ncols=True) if enabled and interactive() else None

    def update(self, n: int = 1, **status: object) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix(status, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            extra = " ".join(f"{k}={v}" for k, v in status.items())
            log.info("%s: %d/%d (%.0f s) %s", self.description, self.done, self.total, now - self._start, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_run(directory: str | os.PathLike) -> Any:
    """A DVCLive run logging training curves under `directory` (dvclive.Live, a context manager).

    Curves only: dvc.yaml declares the plots, and DVC itself records the experiment.
    """
    from dvclive import Live

    return Live(str(directory), save_dvc_exp=False, dvcyaml=False)
