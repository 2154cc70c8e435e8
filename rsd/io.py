"""Small file helpers shared by every stage: atomic writes and JSON metrics."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    An interrupted stage therefore never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save, atomically. Through a file object, so the archive's inner folder is always named
    "archive" rather than after the temporary file: equal contents give equal bytes (and DVC hashes)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def load_torch(path: str | os.PathLike, what: str) -> dict:
    """Load a checkpoint dict, turning a missing or unreadable file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"{what} checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{what} checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


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
