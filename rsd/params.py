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
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from rsd.config import Config
from rsd.progress import die_with_parent, exit_on_signals, setup_logging

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")

SECTIONS: dict[str, str] = {
    "base": "rsd.params:BaseConfig",
    "sim": "rsd.sim.env:SimConfig",
    "demos": "rsd.demos:DemosConfig",
    "tokenizer": "rsd.tokenizer.config:TokenizerConfig",
    "policy": "rsd.policy.train:PolicyTrainConfig",
    "recover": "rsd.recovery:RecoverConfig",
    "dagger": "rsd.policy.train:DaggerConfig",
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
    required = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values) - set(overrides))
    if missing:
        raise ValueError(f"params: {', '.join(f'{name}.{k}' for k in missing)} missing: it has no default")
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


def start_stage() -> None:
    """What a stage script does first (`stage_args` does it): it dies with the process that started it (a
    killed `dvc repro`), a stop signal (SIGTERM, SIGINT, SIGHUP) becomes an orderly exit (its workers
    terminated, its temporary files removed, nothing more written, exit status 128 + the signal), and the
    log starts. A bad input (a ValueError or OSError: every check of a file, a checkpoint or a param
    raises one naming it) ends the stage with its message alone, no traceback (RSD_TRACEBACK=1 shows it)."""
    die_with_parent()
    exit_on_signals()
    setup_logging()
    if not os.environ.get("RSD_TRACEBACK"):
        sys.excepthook = _one_line_errors(sys.excepthook)


_INPUT_ERRORS = {"ValueError", "FileNotFoundError", "OSError", "BadDemoData"}


def _one_line_errors(default: Any) -> Any:
    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        # a worker's error (rsd.parallel.WorkerError) of the same kinds says it all in its message, too
        if issubclass(kind, (ValueError, OSError)) or getattr(error, "error_type", None) in _INPUT_ERRORS:
            print(f"{Path(sys.argv[0]).name}: {type(error).__name__}: {error}", file=sys.stderr)
        else:
            default(kind, error, trace)
    return hook


def stage_args(description: str | None, *paths: str) -> argparse.Namespace:
    """The paths a stage script is given on its command line, in order (dvc.yaml's `cmd` names them);
    starts the stage first (`start_stage`). A missing or extra argument is a usage error naming what is
    expected."""
    start_stage()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in paths:
        parser.add_argument(name, type=Path)
    return parser.parse_args()


@dataclass
class BaseConfig(Config):
    """Settings every stage shares (params.yaml `base`)."""

    prefix: ClassVar[str] = "base"
    seed: int = 0
    """The one seed of the pipeline: placements, data splits, weight initialisation."""
    device: str = "cpu"
    """Where models run: `cpu`, `cuda`, or `auto` (cuda when present)."""
    ray_address: str | None = None
    """The Ray cluster that runs the rollout stages' episodes (its head's `host:port`, or `auto`); None: Ray's
    own `RAY_ADDRESS` if set, else a local Ray per stage with the stage's `workers` CPUs. Where an episode
    runs changes none of its numbers, so no stage depends on this param."""

    def validate(self) -> None:
        self.check(self.seed >= 0, "seed", "a non-negative int")
        self.check(self.device in ("cpu", "cuda", "auto"), "device", "one of cpu, cuda, auto")
        self.check(self.ray_address is None or (isinstance(self.ray_address, str) and self.ray_address.strip() != ""),
                   "ray_address", "null or a Ray cluster address (host:port of its head, or auto)")

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("base.device is 'cuda' but torch sees no CUDA device")
        return self.device
