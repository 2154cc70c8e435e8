"""`rsd doctor`: on an empty folder it names what is missing and how to make it, and exits non-zero; on a
folder with tiny real checkpoints (made here, as tests/test_policy.py, test_tokenizer.py and test_draft.py
build theirs), a DVC repository and a reachable S3 remote (moto's server), every check passes."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import S3_BUCKET
from rsd.cli import app
from rsd.doctor import CheckResult, DoctorConfig, run_doctor, summary
from rsd.draft.config import DraftConfig
from rsd.draft.model import RFSQDraftModelWithProjection
from rsd.draft.train import build_checkpoint, evaluate
from rsd.io import save_torch
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

ROOT = Path(__file__).resolve().parents[1]
H = 64  # the tiny policy's hidden size


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def tiny_policy(num_layers: int = 4, tokenizer_fingerprint: str = "0" * 64) -> MainPolicy:
    backbone = BackboneConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)
    config = PolicyConfig(vocab=build_vocab(["pick up the bowl"]), max_instruction_words=20, image_size=32,
                          vision_channels=(8, 16), vision_grid=2, num_layers=num_layers, backbone=backbone)
    return MainPolicy(config, tokenizer_fingerprint)


def save_tiny_draft(path: Path, input_dim: int = H) -> None:
    """A real draft checkpoint (train.build_checkpoint), its validation numbers measured on random samples."""
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(DraftConfig(input_dim=input_dim, hidden_dim=32, num_heads=2, ff_dim=32))
    optimizer = torch.optim.AdamW(model.parameters())
    val = evaluate(model, torch.randn(8, input_dim), torch.randint(0, 7, (8, 3, 128)), torch.device("cpu"))
    save_torch(path, build_checkpoint(model.state_dict(), optimizer.state_dict(), model.config, 1, val))


def git_dvc_repo(path: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid"}
    subprocess.run(["git", "init", "-q"], cwd=path, env=env, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, env=env, check=True)
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"hello": {"cmd": "echo hello"}}}))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with the repo's params (bar lowered for the random draft), tiny checkpoints and DVC."""
    root = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["verify"] = {"min_val_accuracy": 0.0}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "models").mkdir()
    torch.manual_seed(0)
    tokenizer = RFSQTokenizer(TokenizerConfig(hidden_dim=32, num_layers=4))
    tokenizer.save(root / "models" / "tokenizer.pt")
    tiny_policy(tokenizer_fingerprint=tokenizer.fingerprint()).save(root / "models" / "policy.pt")
    save_tiny_draft(root / "models" / "draft.pt")
    git_dvc_repo(root)
    (root / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())  # where the doctor finds the checkpoints
    return root


@pytest.fixture()
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials from the environment only; no AWS files of the machine."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def set_remote(root: Path, url: str, endpoint: str) -> None:
    dvc = [sys.executable, "-m", "dvc", "remote"]
    subprocess.run([*dvc, "add", "-f", "-d", "storage", url], cwd=root, check=True, capture_output=True)
    subprocess.run([*dvc, "modify", "--local", "storage", "endpointurl", endpoint], cwd=root, check=True,
                   capture_output=True)


def test_an_empty_folder_names_what_is_missing_and_exits_non_zero(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", "--root", str(tmp_path), "--skip", "libero"])
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "params file not found" in lines["params"] and "params.yaml — fix: " in lines["params"]
    for name in ("tokenizer", "policy", "draft"):  # their paths come from the pipeline's definition
        assert f"{name:<9} failed: {tmp_path / 'dvc.yaml'} not found" in lines[name], lines[name]
        assert lines[name].endswith("fix: run from the project folder (a clone of the repository), or pass --root")
    assert lines["dvc"].startswith("dvc       failed:")
    assert lines["remote"].startswith("remote    failed (optional):")
    assert lines["torch"].startswith("torch     ok — torch ") and lines["disk"].startswith("disk      ok")
    assert "libero" not in lines
    assert lines["doctor:"].startswith("doctor: 2 ok, 5 failed (params, tokenizer, policy, draft, dvc), 1 optional failed")


def test_missing_checkpoints_name_the_stage_that_makes_them(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())
    checks = by_name(run_doctor(DoctorConfig(root=tmp_path, skip=("libero", "remote", "dvc", "params", "torch"))))
    assert checks["tokenizer"].line(9).startswith("tokenizer failed: models/tokenizer.pt not found — fix: run `dvc repro tokenizer`")
    assert checks["policy"].line(9).startswith("policy    failed: models/policy.pt not found — fix: run `dvc repro dagger`")
    assert checks["draft"].line(9).startswith("draft     ok — models/draft.pt not made yet")  # comes late in the pipeline


def test_tiny_real_checkpoints_a_dvc_repo_and_a_reachable_remote_pass(project: Path, s3_endpoint: str, aws: None) -> None:
    set_remote(project, f"s3://{S3_BUCKET}/doctor", s3_endpoint)
    lines: list[str] = []
    results = run_doctor(DoctorConfig(root=project, strict=True, min_free_gb=0.1), echo=lines.append)
    checks = by_name(results)
    assert list(checks) == ["params", "torch", "libero", "tokenizer", "policy", "draft", "dvc", "remote", "disk"]
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert "4 layers x 7 levels" in checks["tokenizer"].detail
    assert f"hidden size {H}" in checks["policy"].detail
    assert "every verify check passed" in checks["draft"].detail
    assert "nothing pushed yet" in checks["remote"].detail and s3_endpoint in checks["remote"].detail
    assert "rendered [" in checks["libero"].detail
    assert summary(results) == ("doctor: 9 ok, 0 failed", True)
    assert len(lines) == 9 and all(" ok — " in line for line in lines)


def test_checkpoints_that_do_not_fit_each_other_fail(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "mismatched"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_bytes((project / "dvc.yaml").read_bytes())
    (root / "params.yaml").write_bytes((project / "params.yaml").read_bytes())
    (root / "models" / "tokenizer.pt").write_bytes((project / "models" / "tokenizer.pt").read_bytes())
    tiny_policy(num_layers=5).save(root / "models" / "policy.pt")  # trained for a 5-layer tokenizer
    save_tiny_draft(root / "models" / "draft.pt", input_dim=H // 2)  # reads another policy's hidden state
    checks = by_name(run_doctor(DoctorConfig(root=root, skip=("libero", "remote", "dvc"))))
    assert not checks["policy"].ok and "does not fit models/tokenizer.pt" in checks["policy"].detail
    assert "dvc repro dagger" in checks["policy"].fix


def test_a_policy_trained_on_another_tokenizer_of_the_same_shapes_fails(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "other-tokenizer"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_bytes((project / "dvc.yaml").read_bytes())
    tokenizer = project / "models" / "tokenizer.pt"
    (root / "models" / "tokenizer.pt").write_bytes(tokenizer.read_bytes())
    tiny_policy(tokenizer_fingerprint="1" * 64).save(root / "models" / "policy.pt")  # trained on another tokenizer
    checks = by_name(run_doctor(DoctorConfig(root=root, skip=("libero", "remote", "dvc", "params", "draft"))))
    found = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12]
    assert checks["tokenizer"].ok and f"tokenizer {found}" in checks["tokenizer"].detail
    assert not checks["policy"].ok and checks["policy"].detail == (
        f"models/policy.pt was trained with tokenizer 111111111111, but models/tokenizer.pt is tokenizer {found} "
        "(sha256 of its checkpoint): same shapes, another tokenizer")
    assert checks["policy"].fix == "retrain the policy on this tokenizer: `dvc repro dagger`"


def test_a_malformed_draft_fails_with_the_failed_verify_checks(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad-draft"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_bytes((project / "dvc.yaml").read_bytes())
    (root / "params.yaml").write_bytes((project / "params.yaml").read_bytes())
    for name in ("tokenizer.pt", "policy.pt"):
        (root / "models" / name).write_bytes((project / "models" / name).read_bytes())
    save_tiny_draft(root / "models" / "draft.pt", input_dim=H // 2)
    checks = by_name(run_doctor(DoctorConfig(root=root, skip=("libero", "remote", "dvc"))))
    assert checks["policy"].ok and not checks["draft"].ok
    assert "projection_present" in checks["draft"].detail and f"hidden size is {H}" in checks["draft"].detail
    assert "dvc repro train" in checks["draft"].fix


def test_a_draft_below_the_bar_is_reported_but_does_not_fail(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "weak-draft"
    (root / "models").mkdir(parents=True)
    (root / "dvc.yaml").write_bytes((project / "dvc.yaml").read_bytes())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["verify"] = {"min_val_accuracy": 0.99}  # above a random draft's
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("tokenizer.pt", "policy.pt", "draft.pt"):
        (root / "models" / name).write_bytes((project / "models" / name).read_bytes())
    results = run_doctor(DoctorConfig(root=root, skip=("libero", "remote", "dvc")))
    draft = by_name(results)["draft"]
    assert not draft.ok and not draft.required and "is below the bar 0.990" in draft.detail
    assert "the evaluations still run" in draft.fix
    assert summary(results)[1] is True


def test_a_missing_bucket_and_bad_params_are_named(project: Path, tmp_path: Path, s3_endpoint: str, aws: None) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    git_dvc_repo(root)
    set_remote(root, "s3://no-such-bucket/rsd", s3_endpoint)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["eval"]["init_states"] = 51
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    results = run_doctor(DoctorConfig(root=root, skip=("libero", "torch", "tokenizer", "policy", "draft")))
    checks = by_name(results)
    assert not checks["remote"].ok and not checks["remote"].required
    assert "bucket 'no-such-bucket' not found" in checks["remote"].detail
    assert "dvc remote modify --local storage url" in checks["remote"].fix
    assert not checks["params"].ok and "eval.init_states must be in 1..50" in checks["params"].detail
    assert summary(results)[1] is False


def test_unknown_check_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown check.*'gpu'.*known: params, torch"):
        DoctorConfig(skip=("gpu",))


def test_torch_check_refuses_bf16_where_it_is_only_emulated(tmp_path, monkeypatch):
    """bf16 asked for explicitly on a CPU that emulates it: a clear failure naming the params; auto passes."""
    import rsd.doctor as doctor

    monkeypatch.setattr(doctor, "native_bf16", lambda device_type: False)
    config = doctor.DoctorConfig(root=tmp_path, params_file=tmp_path / "params.yaml")
    params = {"base": {"device": "cpu"}, "policy": {"precision": "bf16"}, "train": {"precision": "auto"}}
    result = doctor.check_torch(doctor._State(config, params=params))
    assert not result.ok and "policy.precision ask for bf16" in result.detail and "auto" in result.fix
    params["policy"]["precision"] = "auto"
    result = doctor.check_torch(doctor._State(config, params=params))
    assert result.ok and "no native bf16, so precision auto trains in fp32" in result.detail
