"""Profiles: smoke and full set the same keys, write into params.yaml keeping its comments, give valid
configs for every stage, and the full profile is the draft recipe's scale (50 epochs at lr 1e-4, batch 32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rsd.cli import app
from rsd.doctor import DoctorConfig, run_doctor
from rsd.profiles import apply_profile, available, check_profiles, load_profile

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"


@pytest.fixture()
def params_copy(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def test_the_project_has_smoke_and_full_setting_the_same_keys() -> None:
    assert {"smoke", "full"} <= set(available(PROFILES))
    check_profiles(PROFILES)  # raises, naming the keys, if one profile sets a key another does not


def test_full_is_the_original_recipes_scale() -> None:
    full = load_profile("full", PROFILES)
    # the recipe's 60,000+ draft samples at one per step: episodes last ~100 steps (220 at most)
    assert full["collect"]["tasks"] is None and full["collect"]["episodes_per_task"] * 10 * 100 >= 60_000
    assert (full["train"]["epochs"], full["train"]["batch_size"], full["train"]["lr"]) == (50, 32, 1e-4)
    assert full["train"]["lr_schedule"] == "constant"
    assert full["eval"]["tasks"] is None and full["eval"]["init_states"] == 50
    assert full["sim"]["max_steps"] == 220 and full["verify"]["min_val_accuracy"] == 0.85


@pytest.mark.parametrize("name", ["smoke", "full"])
def test_each_profile_gives_valid_configs_for_every_stage(name: str, params_copy: Path) -> None:
    apply_profile(name, params_copy, PROFILES)
    others = ("torch", "libero", "tokenizer", "policy", "draft", "dvc", "remote", "disk")
    (result,) = run_doctor(DoctorConfig(root=params_copy.parent, skip=others))
    assert result.name == "params" and result.ok, result.line()


def test_switching_profiles_is_order_free_and_keeps_comments(params_copy: Path, tmp_path: Path) -> None:
    direct = tmp_path / "direct.yaml"
    direct.write_text(params_copy.read_text())
    apply_profile("full", direct, PROFILES)
    changes = apply_profile("smoke", params_copy, PROFILES)
    assert ("eval.init_states", yaml.safe_load((ROOT / "params.yaml").read_text())["eval"]["init_states"], 1) in changes
    apply_profile("full", params_copy, PROFILES)
    assert params_copy.read_text() == direct.read_text()
    assert apply_profile("full", params_copy, PROFILES) == []  # applying it again changes nothing
    text = params_copy.read_text()
    assert "# the one seed: placements, splits, initialisation" in text  # comments survive
    assert yaml.safe_load(text)["demos"]["tasks"] is None and "tasks: null" in text


def test_unknown_and_inconsistent_profiles_are_refused(params_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no profile 'huge'.*profiles: full, smoke"):
        apply_profile("huge", params_copy, PROFILES)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "a.yaml").write_text("train: {epochs: 1, lr: 0.1}\n")
    (profiles / "b.yaml").write_text("train: {epochs: 2}\n")
    with pytest.raises(ValueError, match="must all set the same keys: b lacks train.lr"):
        apply_profile("a", params_copy, profiles)
    (profiles / "b.yaml").write_text("train: 3\n")
    with pytest.raises(ValueError, match=r"b.yaml: section\(s\) \['train'\] must be mappings"):
        load_profile("b", profiles)


def test_cli_writes_the_profile_and_lists_the_changes(params_copy: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "smoke", "--params", str(params_copy), "--profiles-dir", str(PROFILES)])
    assert result.exit_code == 0, result.output
    assert "train.epochs: " in result.output and f"{params_copy}: profile smoke applied" in result.output
    assert yaml.safe_load(params_copy.read_text())["eval"]["tasks"] == [0]
    bad = CliRunner().invoke(app, ["profile", "nope", "--params", str(params_copy), "--profiles-dir", str(PROFILES)])
    assert bad.exit_code != 0 and "no profile 'nope'" in bad.output
