"""Checks of a draft checkpoint before the evaluation spends an hour on it.

`verify_checkpoint` never raises for a bad checkpoint: it reports every check, so metrics/verify.json
says everything that is wrong at once. Its verdict has two parts: `well_formed` (every check but the
accuracy bar: the file loads into a model the engine can run) and `passed` (the bar met too). A draft
below the bar is a result worth evaluating; a malformed one is not (`malformed` names its failures).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsd.draft.config import DraftConfig
from rsd.draft.model import (FORMAT_VERSION, REQUIRED_KEYS, RFSQDraftModelWithProjection, num_parameters,
                             state_dict_problems)
from rsd.contract import CODES_PER_LAYER, LEVELS, NUM_COARSE_LAYERS
from rsd.io import first_non_finite, load_torch

CHECKS = ("file_readable", "required_keys", "val_accuracy", "projection_present", "loads_into_fresh_model",
          "output_shape", "finite_logits")
"""The checks, in order; each is an entry {passed, detail} of `verify_checkpoint`'s result."""

CONTRACT_LOGITS = (NUM_COARSE_LAYERS, CODES_PER_LAYER, LEVELS)
"""Logits per input row that the engine relies on: 3 coarse layers x 128 codes x 7 levels."""

PROJECTION_KEYS = ("input_projection.weight", "input_projection.bias")


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1  # NaN fails too


def _accuracy_check(ckpt: dict[str, Any], min_val_accuracy: float) -> tuple[bool, str]:
    """The checkpoint's average validation accuracy against the bar (per-layer numbers shown when present)."""
    value, per_layer = ckpt["val_accuracy"], ckpt.get("val_accuracies_per_layer")
    if not _is_fraction(value):
        return False, f"val_accuracy must be a number in [0, 1], got {value!r}"
    shown = isinstance(per_layer, list) and all(map(_is_fraction, per_layer))
    layers = f" (per layer {', '.join(f'{v:.3f}' for v in per_layer)})" if shown else ""
    if value < min_val_accuracy:
        return False, f"{value:.3f} is below the bar {min_val_accuracy:.3f}{layers}"
    return True, f"{value:.3f} >= {min_val_accuracy:.3f}{layers}, epoch {ckpt.get('epoch')}"


def _projection_check(state: dict[str, Any], input_dim: int | None) -> tuple[bool, str]:
    """The trained H -> hidden_dim projection is in the state dict: a draft loaded without it would project
    the hidden state through random weights."""
    missing = [k for k in PROJECTION_KEYS if not isinstance(state.get(k), Tensor)]
    if missing:
        return False, f"model_state_dict lacks {missing}"
    weight, bias = (state[k] for k in PROJECTION_KEYS)
    detail = f"input_projection.weight {list(weight.shape)}, input_projection.bias {list(bias.shape)}"
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        return False, f"malformed projection: {detail}"
    if input_dim is not None and weight.shape[1] != input_dim:
        return False, f"{detail}: projects from {weight.shape[1]}, the main policy's hidden size is {input_dim}"
    return True, detail


def _load_check(ckpt: dict[str, Any]) -> tuple[RFSQDraftModelWithProjection | None, str]:
    """A fresh CPU model from the checkpoint's own config, weights loaded strictly -> (model or None, why)."""
    try:
        config = DraftConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as exc:
        return None, f"invalid config: {exc}"
    model = RFSQDraftModelWithProjection(config)
    problems = state_dict_problems(model, ckpt["model_state_dict"])
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        return None, "state dict does not fit its config: " + "; ".join(problems[:5]) + more
    bad = first_non_finite(ckpt["model_state_dict"])
    if bad:
        return None, f"state dict holds non-finite weights ({bad}), expected finite weights"
    try:
        model.load_state_dict(ckpt["model_state_dict"])
    except RuntimeError as exc:  # e.g. a tensor of the right shape but an impossible dtype
        return None, f"state dict does not load: {exc}"
    return model.eval(), f"{num_parameters(model):,} parameters, {config}"


def verify_checkpoint(path: str | os.PathLike, min_val_accuracy: float,
                      input_dim: int | None = None) -> dict[str, Any]:
    """Run every check on the draft checkpoint at `path` -> {check: {passed, detail}, ..., passed}.

    `input_dim`, when given, is the main policy's hidden size, which the projection must read. A check
    whose inputs an earlier failure took away is reported failed, its detail starting "skipped:".
    """
    result: dict[str, Any] = {}

    def report(name: str, passed: bool, detail: str) -> None:
        result[name] = {"passed": passed, "detail": detail}

    def skip(names: tuple[str, ...], reason: str) -> None:
        for name in names:
            if name not in result:
                report(name, False, f"skipped: {reason}")

    try:
        ckpt = load_torch(path, "draft model")
        report("file_readable", True, f"{Path(path).stat().st_size:,} bytes")
    except (FileNotFoundError, ValueError) as exc:
        report("file_readable", False, str(exc))
        ckpt = None
        skip(CHECKS, "the file is unreadable")

    if ckpt is not None:
        missing = [k for k in REQUIRED_KEYS if k not in ckpt]
        if missing:
            report("required_keys", False, f"missing {missing}")
        elif ckpt["format_version"] != FORMAT_VERSION:
            report("required_keys", False,
                   f"format_version {ckpt['format_version']!r}, this code reads {FORMAT_VERSION}")
        else:
            extra = sorted(set(ckpt) - set(REQUIRED_KEYS))
            report("required_keys", True, f"all {len(REQUIRED_KEYS)} keys" + (f", plus {extra}" if extra else ""))

        if "val_accuracy" in ckpt:
            report("val_accuracy", *_accuracy_check(ckpt, min_val_accuracy))
            # a number in [0, 1] under the bar is a weak draft, not a broken file
            result["val_accuracy"]["below_bar"] = not result["val_accuracy"]["passed"] and _is_fraction(ckpt["val_accuracy"])
        skip(("val_accuracy",), "no val_accuracy key")

        model = None
        state = ckpt.get("model_state_dict")
        if isinstance(state, dict):
            report("projection_present", *_projection_check(state, input_dim))
            if "config" in ckpt:
                model, detail = _load_check(ckpt)
                report("loads_into_fresh_model", model is not None, detail)
        skip(("projection_present", "loads_into_fresh_model"), "no model_state_dict or no config")

        if model is not None:
            generator = torch.Generator().manual_seed(0)
            hidden = torch.randn(4, model.config.input_dim, generator=generator)  # [4, H]
            layer0 = torch.randint(0, LEVELS, (4, CODES_PER_LAYER), generator=generator)  # [4, 128] main's layer 0
            with torch.no_grad():
                shape, expected = tuple(model(hidden[:1], layer0[:1]).shape), (1, *CONTRACT_LOGITS)  # [1, C, 128, K]
                report("output_shape", shape == expected, f"[1, {model.config.input_dim}] -> {list(shape)}"
                       + ("" if shape == expected else f", the engine needs {list(expected)}"))
                logits = model(hidden, layer0)  # [4, C, 128, K]
            bad = int((~torch.isfinite(logits)).sum())
            report("finite_logits", bad == 0,
                   f"{bad} of {logits.numel()} logits are NaN or inf for a random [4, H] input")
        skip(("output_shape", "finite_logits"), "the model did not load")

    result["well_formed"] = not malformed(result)
    result["passed"] = all(result[name]["passed"] for name in CHECKS)
    return result


def malformed(result: dict[str, Any]) -> str:
    """The failed checks of `verify_checkpoint`'s result other than the accuracy bar, each with why
    (empty when the checkpoint is well formed)."""
    return "; ".join(f"{name} ({result[name]['detail']})" for name in CHECKS  # a skipped check says nothing new
                     if not result[name]["passed"] and not result[name].get("below_bar")
                     and not result[name]["detail"].startswith("skipped:"))
