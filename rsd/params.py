"""params.yaml: one section per stage, each turned into that stage's config dataclass."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read the whole params file; an error naming it if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ValueError(f"{path} must be a mapping of sections (base, sim, demos, ...)")
    return params


def section(params: dict[str, Any], name: str, cls: type[T], **overrides: Any) -> T:
    """Build config dataclass `cls` from params section `name`, refusing unknown keys by name."""
    values = params.get(name)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"params section '{name}' must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"params: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; known: {', '.join(sorted(known))}")
    return cls(**{**values, **overrides})


@dataclasses.dataclass
class BaseConfig:
    """Settings every stage shares."""

    seed: int = 0
    """The one seed of the pipeline: placements, data splits, weight initialisation."""
    device: str = "cpu"
    """Where models run: `cpu`, `cuda`, or `auto` (cuda when present)."""

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"base.seed must be a non-negative integer, got {self.seed!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"base.device must be one of cpu, cuda, auto; got {self.device!r}")

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("base.device is 'cuda' but torch sees no CUDA device")
        return self.device
