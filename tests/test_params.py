"""params.yaml reaches every stage through one mapping (rsd.params.SECTIONS) and one validation
(rsd.config): each bad value is refused naming `section.key`, the value and what was expected."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rsd.params import SECTIONS, BaseConfig, check_sections, config_class, load_params, section
from rsd.policy.train import PolicyTrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_committed_params_are_valid_for_every_section(params: dict) -> None:
    assert set(params) == set(SECTIONS)
    assert check_sections(params) == []


def test_every_section_names_a_config_whose_prefix_is_the_section() -> None:
    for name in SECTIONS:
        assert config_class(name).prefix == name, name


@pytest.mark.parametrize(("edit", "message"), [
    (("policy", "epochs", True), "policy.epochs must be an int, got True"),
    (("train", "lr", "1e-4"), "train.lr must be a finite number, got '1e-4'"),
    (("eval", "init_states", 2.5), "eval.init_states must be an int, got 2.5"),
    (("eval", "tasks", [0, "1"]), "eval.tasks must be a list of ints or null, got [0, '1']"),
    (("eval", "first_init_state", 41), "eval.first_init_state must be in 0..40: the last of 10 states from it below 50, got 41"),
    (("collect", "execute_steps", 9), "collect.execute_steps must be in 1..8 (the chunk length), got 9"),
    (("recover", "workers", 0), "recover.workers must be at least 1, got 0"),
    (("sim", "fast_render", "yes"), "sim.fast_render must be true or false, got 'yes'"),
    (("bench", "warmup", -1), "bench.warmup must be a non-negative int, got -1"),
    (("demos", "atempts_per_task", 3), "params: unknown key(s) demos.atempts_per_task"),
    (("base", "ray_address", " "), "base.ray_address must be null or a Ray cluster address"),
])
def test_a_bad_value_is_refused_naming_section_and_key(params: dict, edit: tuple, message: str) -> None:
    name, key, value = edit
    params[name][key] = value
    problems = check_sections(params)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_a_bad_model_field_is_refused_by_its_full_name(params: dict) -> None:
    params["policy"]["model"]["backbone"]["hidden_size"] = "192"
    with pytest.raises(ValueError, match=r"policy.model.backbone.hidden_size must be an int, got '192'"):
        section(params, "policy", PolicyTrainConfig)


def test_a_missing_section_is_refused_not_defaulted(params: dict) -> None:
    del params["train"]
    assert check_sections(params) == ["params: section 'train' is missing (expected " + ", ".join(SECTIONS) + ")"]


def test_the_policy_architecture_is_required(params: dict) -> None:
    del params["policy"]["model"]
    assert check_sections(params) == ["params: policy.model missing: it has no default"]


def test_a_section_is_built_by_its_one_config_class(params: dict) -> None:
    with pytest.raises(TypeError, match="params section 'base' builds rsd.params:BaseConfig, not"):
        section(params, "base", PolicyTrainConfig)
    assert section(params, "base", BaseConfig) == BaseConfig(seed=0, device="cpu")


def test_a_yaml_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 0\n eval: [\n")
    with pytest.raises(ValueError, match=rf"{path}, line 3 is not valid YAML"):
        load_params(path)


def test_a_stage_script_run_without_its_paths_says_what_it_takes() -> None:
    result = subprocess.run([sys.executable, "stages/eval.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the following arguments are required: variant, policy, tokenizer, metrics" in result.stderr
    result = subprocess.run([sys.executable, "stages/eval.py", "draft", "p.pt", "t.pt", "m.json"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "variant draft takes --draft and --verdict" in result.stderr


def test_the_evaluated_init_states_start_at_first_init_state() -> None:
    from rsd.evaluation import EvalConfig

    assert EvalConfig().init_state_range == range(10)
    assert EvalConfig(first_init_state=10, init_states=40).init_state_range == range(10, 50)
