"""Small file helpers shared by every stage: atomic writes and JSON metrics."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import string
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from rsd.progress import deferred_stop, raise_if_stopped


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    An interrupted stage therefore never leaves a half-written file under the final name, nor a temporary
    beside it: a stop signal (`rsd.progress.exit_on_signals`) unwinds through here and removes it, and the
    temporaries of `path` that a SIGKILL left are removed when `path` is written again. A write that fails for
    want of space is an OSError naming `path` and the free space, not the writer's own message (torch's is an
    `inline_container.cc` enforce failure).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    try:  # created in here, so that it is removed whenever a signal comes
        while True:
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # as mkstemp made it
                break
            except FileExistsError:
                tmp = _temporary_name(path)
        try:
            yield tmp
        except Exception as exc:
            raise_if_stopped(exc)
            _raise_if_no_space(path, exc)
            raise
        os.replace(tmp, path)
    finally:
        with deferred_stop():
            tmp.unlink(missing_ok=True)


_TEMPORARY_CHARS = string.ascii_lowercase + string.digits + "_"


def _temporary_name(path: Path) -> Path:
    """`.<name>.<8 random chars>.tmp` beside `path`, the names tempfile.mkstemp gave them before."""
    return path.with_name(f".{path.name}.{''.join(secrets.choice(_TEMPORARY_CHARS) for _ in range(8))}.tmp")


def _remove_stale_temporaries(path: Path) -> None:
    """The temporaries of `path` that an earlier, killed, writer left (each target has one writer: its stage)."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for entry in path.parent.iterdir():
        if stale.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def _raise_if_no_space(path: Path, exc: Exception) -> None:
    """A write that failed for want of space, as an OSError naming `path` and the space left."""
    if not _no_space(exc):
        return
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    raise OSError(errno.ENOSPC, f"could not write {path}: the disk may be full ({free} in {path.parent})") from exc


def _no_space(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain, or a writer that only says that it could not write:
    torch's zip writer (an `inline_container.cc` enforce failure), HDF5 (`file write failed ... errno = 28`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(exc) for sign in ("No space left on device", "Disk quota exceeded", "errno = 28",
                                             "inline_container.cc", "file write failed")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save, atomically. Through a file object, so the archive's inner folder is always named
    "archive" rather than after the temporary file: equal contents give equal bytes (and DVC hashes)."""
    # A stop signal inside torch's C++ writer aborts the process (its destructor writes to the closed file):
    # it takes effect once the write is done, then unwinds through atomic_path as anywhere else.
    with atomic_path(path) as tmp, open(tmp, "wb") as file, deferred_stop():
        torch.save(obj, file)


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
"""What torch's weights-only unpickler names when it meets a class or function reference: `GLOBAL posix.system`."""


def load_torch(path: str | os.PathLike, what: str) -> dict:
    """Load a checkpoint dict as data only, turning a missing, unreadable or code-carrying file into a clear error.

    torch's weights-only unpickler builds tensors, numbers, strings, lists, tuples and dicts and nothing else: a
    pickle payload in a checkpoint (an object whose unpickling calls a function) is refused before it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps the unpickler's own error (what it met) in advice to load unsafely; keep only the former
        inner = str(exc.__context__ or exc).strip().splitlines()[0]
        found = _GLOBAL.search(str(exc))
        if found:
            raise ValueError(f"{what} checkpoint {path} holds objects other than tensors, numbers, strings, lists and "
                             f"dicts ({found.group(1)}); it was refused unread: a checkpoint is data, remake it with "
                             f"the stage that writes it") from None
        raise ValueError(f"{what} checkpoint {path} is unreadable as checkpoint data (UnpicklingError: {inner})") from None
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"{what} checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{what} checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def first_non_finite(state_dict: Mapping[str, Any]) -> str:
    """The first floating-point tensor of `state_dict` holding NaN or inf, named with how many of its values do
    ("heads.0.weight: 3 NaN of 4,096 values"); "" if every one is finite. A model that trained into NaN still
    loads and runs, and its evaluation writes plausible metrics: a load refuses it instead."""
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
        if nan or inf:
            counts = " and ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
            return f"{name}: {counts} of {value.numel():,} values"
    return ""


def state_dict_problems(model: torch.nn.Module, state_dict: dict[str, Any]) -> list[str]:
    """Why `state_dict` would not load into `model` (missing, unexpected or misshapen tensors), sorted; [] if it
    would. Checked before `load_state_dict`, so that a checkpoint that does not fit its config is refused with
    every problem named, not torch's first one."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state_dict.items()}
    problems = [f"missing {k}" for k in expected.keys() - found.keys()]
    problems += [f"unexpected {k}" for k in found.keys() - expected.keys()]
    problems += [f"{k}: {found[k]} vs {expected[k]} expected" for k in expected.keys() & found.keys()
                 if found[k] != expected[k]]
    return sorted(problems)


def misfit_message(problems: list[str], limit: int = 10) -> str:
    """The first `limit` of `state_dict_problems`, joined, and how many more there are."""
    return "; ".join(problems[:limit]) + (f" (+{len(problems) - limit} more)" if len(problems) > limit else "")
