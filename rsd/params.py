"""params.yaml: one section per stage, each turned into that stage's config dataclass.

A stage script reads its sections with `section(load_params(), name, ConfigClass)`; `rsd doctor` checks
every section through the same call (`SECTIONS` names each section's class without importing it, so a
stage depends only on the configs it reads). `stage_args` reads the paths a stage script is given on
its command line, the one place (dvc.yaml's `cmd`) where a stage's inputs and outputs are named.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from rsd.config import Config
from rsd.progress import setup_logging

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")

SECTIONS: dict[str, str] = {
    "base": "rsd.params:BaseConfig",
    "sim": "rsd.sim.env:SimConfig",
    "demos": "rsd.demos:DemosConfig",
    "tokenizer": "rsd.tokenizer.config:TokenizerConfig",
    "policy": "rsd.policy.train:PolicyTrainConfig",
    "collect": "rsd.collect:CollectConfig",
    "train": "rsd.draft.config:DraftTrainConfig",
    "verify": "rsd.draft.config:VerifyConfig",
    "eval": "rsd.evaluation:EvalConfig",
    "bench": "rsd.bench:BenchConfig",
    "report": "rsd.report:ReportConfig",
}
"""Every params section and the config class (`module:Class`) that the stage reading it builds."""


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read the whole params file; an error naming the file (and the line, for a YAML error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must be a mapping of sections (base, sim, demos, ...)")
    return params


def section(params: dict[str, Any], name: str, cls: type[T], **overrides: Any) -> T:
    """Build config dataclass `cls` from params section `name`: a missing section and unknown keys are
    refused by name; the config checks the values (rsd.config)."""
    if SECTIONS.get(name) != f"{cls.__module__}:{cls.__qualname__}":  # one mapping, for the stages and the doctor
        raise TypeError(f"params section '{name}' builds {SECTIONS.get(name)}, not {cls.__module__}:{cls.__qualname__}")
    if name not in params:
        raise ValueError(f"params: section '{name}' is missing (expected {', '.join(SECTIONS)})")
    values = params[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"params: section '{name}' must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)} - set(overrides)  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"params: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**{**values, **overrides})


def config_class(name: str) -> type:
    """The config class of params section `name` (see SECTIONS)."""
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_sections(params: dict[str, Any]) -> list[str]:
    """Every section built as its stage builds it -> the problems found (empty when all are valid)."""
    problems = [f"params: unknown section(s) {sorted(set(params) - set(SECTIONS))}"] if set(params) - set(SECTIONS) else []
    for name in SECTIONS:
        try:
            section(params, name, config_class(name))
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    return problems


def stage_args(description: str | None, *paths: str) -> argparse.Namespace:
    """The paths a stage script is given on its command line, in order (dvc.yaml's `cmd` names them);
    also starts the log. A missing or extra argument is a usage error naming what is expected."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in paths:
        parser.add_argument(name, type=Path)
    args = parser.parse_args()
    setup_logging()
    return args


@dataclass
class BaseConfig(Config):
    """Settings every stage shares (params.yaml `base`)."""

    prefix: ClassVar[str] = "base"
    seed: int = 0
    """The one seed of the pipeline: placements, data splits, weight initialisation."""
    device: str = "cpu"
    """Where models run: `cpu`, `cuda`, or `auto` (cuda when present)."""

    def validate(self) -> None:
        self.check(self.seed >= 0, "seed", "a non-negative int")
        self.check(self.device in ("cpu", "cuda", "auto"), "device", "one of cpu, cuda, auto")

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("base.device is 'cuda' but torch sees no CUDA device")
        return self.device
