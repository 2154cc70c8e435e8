"""Progress reporting: a live bar in a terminal, plain timestamped lines in CI logs and files.

Also a stage's life around its work: it dies with the process that started it, a stop signal becomes an
orderly exit, and its DVCLive curves land only when it succeeds.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

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


# --- stopping: dying with the parent, stop signals as an orderly exit --------------------------------

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
"""What a timeout, a CI runner, a scheduler, Ctrl-C or a closed terminal sends to stop a stage."""

_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}


class Interrupted(SystemExit):
    """A stop signal, raised in the main thread: it unwinds through every `finally` (workers terminated,
    temporary files removed) and ends the process with status 128 + the signal's number, as a shell reports
    a process the signal killed."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


_stopping: int | None = None  # the signal being acted on: later ones are ignored so the clean-up runs to its end
_deferring = 0
_deferred: int | None = None


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it dies, so a killed `dvc repro` (or a
    killed stage, for its workers) leaves nothing running on to overwrite a newer result later.

    DVC starts a stage as `$SHELL -c CMD` (/bin/sh without $SHELL). bash replaces itself with the command;
    dash does not, and stays between DVC and the stage: then the shell's own parent is watched too."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    shell = os.getppid()
    if _is_shell_running_a_command(shell):
        launcher = _parent_of(shell)
        threading.Thread(target=_watch_launcher, args=(shell, launcher), name="rsd-watch-launcher", daemon=True).start()


def _parent_of(pid: int) -> int | None:
    """`pid`'s parent (Linux /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # the command name, in parentheses, may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _is_shell_running_a_command(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]).lstrip("-") in _SHELLS and "-c" in argv[1:]


def _watch_launcher(shell: int, launcher: int | None) -> None:
    """When the process that started our shell is gone the shell is handed to another parent: stop then."""
    while _parent_of(shell) == launcher:
        time.sleep(0.5)
    log.warning("the process that started this stage (pid %s) is gone: stopping", launcher)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_on_signals() -> None:
    """Turn SIGTERM, SIGINT and SIGHUP into `Interrupted` in the main thread (see there). Only the first one
    counts; one that arrives inside `deferred_stop` takes effect at that block's end."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("exit_on_signals() must be called from the main thread")
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


def _on_stop_signal(signum: int, frame: object) -> None:
    global _deferred
    if _stopping is not None:
        return
    if _deferring:
        _deferred = signum
        return
    _stop(signum)


def _stop(signum: int) -> None:
    global _stopping
    _stopping = signum
    log.warning("%s received: stopping (workers terminated, temporary files removed, nothing more written)",
                signal.Signals(signum).name)
    raise Interrupted(signum)


def raise_if_stopped(exc: BaseException) -> None:
    """Re-raise the stop behind `exc`, if there is one. A signal that arrives while C++ code is calling back
    into Python (torch's checkpoint writer calling `file.write`) surfaces as that code's own error (an
    `inline_container.cc` enforce failure), the `Interrupted` only its context: the stop is what happened."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, (Interrupted, KeyboardInterrupt)):
            raise link
        link = link.__cause__ or link.__context__
    if _stopping is not None:
        raise Interrupted(_stopping) from exc


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """A block a stop signal must not cut in two (a folder swapped into place, a clean-up): a signal received
    inside it takes effect when it ends."""
    global _deferring, _deferred
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _deferred is not None:
            signum, _deferred = _deferred, None
            if _stopping is None:
                _stop(signum)


# --- folders that appear whole -----------------------------------------------------------------------

def staging_dir(target: str | os.PathLike, kind: str) -> Path:
    """A fresh hidden folder beside `target` (`.<name>.<kind>-<random>`), to fill and then move into place with
    `replace_dir`; the ones of `target` a killed run left behind are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_dirs(target, kind)
    staging = target.with_name(f".{target.name}.{kind}-{secrets.token_hex(4)}")
    staging.mkdir()
    return staging


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move folder `new` to `target`, replacing the folder there: a stop signal cannot leave neither."""
    new, target = Path(new), Path(target)
    _remove_stale_dirs(target, "old")
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    with deferred_stop():
        if target.exists():
            target.rename(old)
        new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_dirs(target: Path, kind: str) -> None:
    """`.<name>.<kind>-<hex>` folders beside `target`, from a run killed outright (SIGKILL)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
        if stale.is_dir() and len(stale.name.rsplit("-", 1)[1]) == 8:
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def live_run(directory: str | os.PathLike) -> Iterator[Any]:
    """A DVCLive run logging training curves for `directory` (yields a dvclive.Live).

    Curves only: dvc.yaml declares the plots, and DVC itself records the experiment. DVCLive writes into a
    staging folder beside `directory`, moved into place (replacing the old folder) when the block finishes: a
    failed or killed training leaves the curves dvc.lock describes, and no half-run metrics.json.
    """
    from dvclive import Live

    staging = staging_dir(directory, "live")
    try:
        live = Live(str(staging), save_dvc_exp=False, dvcyaml=False)
        yield live
        # Inside `dvc exp run` DVCLive git-adds its folder's untracked files when it ends: that is done for the
        # final folder below, so that no staging path is left in the index.
        exp_repo = live._dvc_repo if getattr(live, "_inside_dvc_exp", False) else None
        live._inside_dvc_exp = False
        live.end()
        replace_dir(staging, directory)
        if exp_repo is not None:
            from dvclive.dvc import ensure_dir_is_tracked

            ensure_dir_is_tracked(str(directory), exp_repo)
    finally:
        with deferred_stop():
            shutil.rmtree(staging, ignore_errors=True)
