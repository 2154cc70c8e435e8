"""Checkpoints load as data only, and garbage weights are refused at load.

Every checkpoint kind the pipeline writes (tokenizer, main policy, draft, draft samples) is made here, small but
real, by the project's own writers. A pickle payload planted in one (an object whose unpickling would create a
marker file) is refused by the project's loader with an error naming the file, and the marker never appears; a
NaN or inf planted in one's weights is refused with an error naming the file and the tensor.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from rsd.doctor import DoctorConfig, run_doctor
from rsd.draft.config import DraftConfig
from rsd.draft.model import RFSQDraftModelWithProjection, load_draft
from rsd.draft.samples import DraftSamples
from rsd.draft.train import build_checkpoint, evaluate
from rsd.draft.verify import malformed, verify_checkpoint
from rsd.io import first_non_finite, save_torch
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

ROOT = Path(__file__).resolve().parents[1]
H = 64  # the tiny policy's hidden size, which the draft reads
REFUSED = "holds objects other than tensors, numbers, strings, lists and dicts"


class Payload:
    """Unpickling it creates `marker`: what a hostile checkpoint would do, made visible and harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def save_tokenizer(path: Path) -> None:
    torch.manual_seed(0)
    RFSQTokenizer(TokenizerConfig(hidden_dim=32, num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).save(path)


def save_policy(path: Path) -> None:
    torch.manual_seed(0)
    backbone = BackboneConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)
    config = PolicyConfig(vocab=build_vocab(["pick up the bowl"]), max_instruction_words=20, image_size=32,
                          vision_channels=(8, 16), vision_grid=2, num_layers=4, backbone=backbone)
    MainPolicy(config, tokenizer_fingerprint="0" * 64).save(path)


def save_draft(path: Path) -> None:
    """As the train stage writes one (train.build_checkpoint, optimizer state included), on random samples."""
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(DraftConfig(input_dim=H, hidden_dim=32, num_heads=2, ff_dim=32))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, H)).sum().backward()
    optimizer.step()  # a real optimizer state: step counts and moments
    val = evaluate(model, torch.randn(8, H), torch.randint(0, 7, (8, 3, 128)), torch.device("cpu"))
    save_torch(path, build_checkpoint(model.state_dict(), optimizer.state_dict(), model.config, 1, val))


def save_samples(path: Path) -> None:
    n = 6
    DraftSamples(torch.randn(n, H), torch.randint(0, 7, (n, 8, 16, 3)), torch.full((n, 3, 128, 7), 1 / 7),
                 torch.zeros(n, dtype=torch.long), torch.arange(n), torch.arange(n) * 8,
                 task_names=["pick up the bowl"]).save(path)


KINDS: dict[str, tuple[Callable[[Path], None], Callable[[Path], Any], str]] = {
    # kind: (writer, the project's loader, the state dict's key)
    "tokenizer": (save_tokenizer, RFSQTokenizer.load, "state_dict"),
    "policy": (save_policy, MainPolicy.load, "state_dict"),
    "draft": (save_draft, load_draft, "model_state_dict"),
    "samples": (save_samples, DraftSamples.load, ""),
}


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the checkpoint at `path` after `change(ckpt)` (read as data: these are the test's own files)."""
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def plant_payload(path: Path, marker: Path, where: str) -> None:
    """A payload at the checkpoint's top level, or deep inside it (among the weights, or in a nested dict)."""
    def change(ckpt: dict[str, Any]) -> None:
        if where == "top":
            ckpt["note"] = Payload(marker)
        else:
            dicts = [v for v in ckpt.values() if isinstance(v, dict)]  # a config or a state dict
            (dicts[0] if dicts else ckpt)["x"] = [1, {"y": Payload(marker)}]
    edit(path, change)


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_pickle_payload_is_refused_unread(kind: str, where: str, tmp_path: Path) -> None:
    write, load, _ = KINDS[kind]
    path, marker = tmp_path / f"{kind}.pt", tmp_path / "marker"
    write(path)
    load(path)  # the real checkpoint loads as data
    plant_payload(path, marker, where)
    with pytest.raises(ValueError, match=re.escape(f"{path} {REFUSED} (exec); it was refused unread")):
        load(path)
    assert not marker.exists()


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The planted payload is not a dud: a full unpickling runs it (which is what load_torch refuses to do)."""
    path, marker = tmp_path / "tokenizer.pt", tmp_path / "marker"
    save_tokenizer(path)
    plant_payload(path, marker, "top")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_verify_and_the_doctor_refuse_a_draft_payload(tmp_path: Path) -> None:
    root, marker = tmp_path / "project", tmp_path / "marker"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())  # where the doctor finds the checkpoints
    path = root / "models" / "draft.pt"
    save_draft(path)
    plant_payload(path, marker, "top")

    result = verify_checkpoint(path, min_val_accuracy=0.0, input_dim=H)
    assert not result["passed"] and not result["well_formed"] and not result["file_readable"]["passed"]
    assert f"{path} {REFUSED}" in result["file_readable"]["detail"]
    assert all(result[name]["detail"].startswith("skipped:") for name in ("required_keys", "loads_into_fresh_model"))

    checks = {r.name: r for r in run_doctor(DoctorConfig(root=root, skip=("params", "torch", "libero", "tokenizer",
                                                                           "policy", "dvc", "remote", "disk")))}
    draft = checks["draft"]
    assert not draft.ok and draft.required and "models/draft.pt is malformed: file_readable" in draft.detail
    assert REFUSED in draft.detail and "dvc repro train" in draft.fix
    assert not marker.exists()


def test_garbage_is_unreadable_not_a_payload(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.pt is unreadable as checkpoint data \(UnpicklingError: "):
        RFSQTokenizer.load(path)


# ---- non-finite weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("value, counted", [(math.nan, "2 NaN"), (math.inf, "2 inf")])
@pytest.mark.parametrize("kind", ["tokenizer", "policy", "draft"])
def test_non_finite_weights_are_refused_naming_the_tensor(kind: str, value: float, counted: str, tmp_path: Path) -> None:
    write, load, key = KINDS[kind]
    path = tmp_path / f"{kind}.pt"
    write(path)
    names: list[str] = []

    def poison(ckpt: dict[str, Any]) -> None:
        name, tensor = [(k, v) for k, v in ckpt[key].items() if v.is_floating_point()][-1]  # the last weight
        tensor.view(-1)[:2] = value
        names.append(f"{name}: {counted} of {tensor.numel():,} values")
    edit(path, poison)
    with pytest.raises(ValueError, match=re.escape(f"{path} holds non-finite ") + ".*" + re.escape(f"({names[0]})")):
        load(path)


def test_non_finite_tokenizer_bounds_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.pt"
    save_tokenizer(path)
    edit(path, lambda ckpt: ckpt.update(action_q99=[1.0] * 6 + [math.inf]))
    with pytest.raises(ValueError, match=re.escape(f"{path} holds non-finite values (action_q99: 1 inf of 7 values)")):
        RFSQTokenizer.load(path)


def test_verify_reports_a_non_finite_draft_as_malformed(tmp_path: Path) -> None:
    path = tmp_path / "draft.pt"
    save_draft(path)
    edit(path, lambda ckpt: ckpt["model_state_dict"]["head.bias"].fill_(math.nan))
    result = verify_checkpoint(path, min_val_accuracy=0.0, input_dim=H)
    assert not result["well_formed"] and not result["loads_into_fresh_model"]["passed"]
    assert "non-finite weights (head.bias: 112 NaN of 112 values)" in result["loads_into_fresh_model"]["detail"]
    assert "loads_into_fresh_model" in malformed(result)


def test_the_doctor_refuses_a_non_finite_policy(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())
    save_policy(root / "models" / "policy.pt")
    edit(root / "models" / "policy.pt", lambda ckpt: ckpt["state_dict"]["proprio_std"].fill_(math.nan))
    checks = {r.name: r for r in run_doctor(DoctorConfig(root=root, skip=("params", "torch", "libero", "tokenizer",
                                                                           "draft", "dvc", "remote", "disk")))}
    assert not checks["policy"].ok and "non-finite weights (proprio_std: 8 NaN of 8 values)" in checks["policy"].detail
    assert "dvc repro dagger" in checks["policy"].fix


def test_non_finite_samples_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "samples.pt"
    save_samples(path)
    edit(path, lambda ckpt: ckpt["hidden_state"][0, 0].fill_(math.nan))
    with pytest.raises(ValueError, match=re.escape(f"{path} is malformed: hidden_state holds NaN or inf values")):
        DraftSamples.load(path)


def test_first_non_finite_skips_integers_and_names_the_first() -> None:
    state = {"codes": torch.arange(3), "a": torch.zeros(4), "b": torch.tensor([math.nan, math.inf, -math.inf, 1.0]),
             "c": torch.full((2,), math.nan)}
    assert first_non_finite(state) == "b: 1 NaN and 2 inf of 4 values"
    assert first_non_finite({"a": torch.zeros(2), "n": 3}) == ""
