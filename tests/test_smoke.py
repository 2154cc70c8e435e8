"""The whole DVC pipeline, end to end, on the smoke profile: every stage of dvc.yaml runs for real (LIBERO,
training, evaluation) in a copy of the repository and writes sane metrics. A few minutes on 2 cores.

The copy holds the working tree's files as git sees them (tracked and untracked, not ignored), with every
stage output removed first, so each stage must make its own. Stages added to dvc.yaml are picked up
as they come; give their params smoke values in profiles/smoke.yaml (and full values in full.yaml).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DAG_TIMEOUT_S = 1800  # a hard stop; the smoke DAG takes a few minutes

pytestmark = pytest.mark.smoke


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a command; on failure, fail the test with the end of its output."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-5000:]}\n{result.stderr[-15000:]}")
    return result.stdout + result.stderr


def working_tree_files() -> list[str]:
    """The repository's files as git sees them: tracked and untracked-but-not-ignored, present on disk."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


def stage_outputs(repo: Path) -> dict[str, list[Any]]:
    """{stage name: its outputs (DVC Output objects: outs, metrics, plots)} as DVC resolves dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {stage.name: list(stage.outs) for stage in dvc_repo.index.stages}


def numbers(value: Any) -> Iterator[float]:
    """Every number in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def check_stage_metrics(name: str, metrics: dict[str, Any], smoke: dict[str, Any]) -> None:
    """What each known stage's numbers must look like even at smoke scale (counts from the profile)."""
    def episodes(section: str, per_task: str) -> int:
        return len(smoke[section]["tasks"]) * smoke[section][per_task]

    if name == "demos":
        assert metrics["episodes"] == episodes("demos", "attempts_per_task") and metrics["kept"] >= 2, metrics
    elif name == "tokenizer":
        assert all(0 <= m < 1 for m in metrics["mae_by_layers"]), metrics
    elif name == "policy":
        assert metrics["train_samples"] > 0 and metrics["val_loss"] > 0, metrics
    elif name == "recover":
        assert metrics["episodes"] == episodes("recover", "episodes_per_task"), metrics
        assert metrics["kept"] <= metrics["takeovers"] <= metrics["episodes"], metrics
    elif name == "dagger":
        assert metrics["recovery_episodes"] >= 0 and metrics["train_samples"] > 0 and metrics["val_loss"] > 0, metrics
    elif name == "collect":
        assert metrics["episodes"] == episodes("collect", "episodes_per_task") and metrics["samples"] > 0, metrics
    elif name == "train":
        assert metrics["epochs"] == smoke["train"]["epochs"] and 0 <= metrics["best_val_accuracy"] <= 1, metrics
    elif name == "verify":  # a 2-epoch draft is well formed and below the smoke bar: a result, recorded
        assert metrics["well_formed"] is True and metrics["passed"] is False, metrics
        assert metrics["val_accuracy"]["below_bar"] is True, metrics
    elif name.startswith("eval_"):
        assert metrics["trials"] == episodes("eval", "init_states") and 0 <= metrics["success_rate"] <= 1, metrics
        assert metrics["policy_calls"] > 0 and metrics["avg_inference_ms"] > 0, metrics
        if name != "eval_no_draft":
            assert metrics["draft_verified"] is False, metrics


def test_the_whole_dag_runs_on_the_smoke_profile(tmp_path: Path, record_property: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    for name in working_tree_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # stages run `python`
        "PYTHONPATH": str(repo),  # the copy's code, not the installed package's folder
        "CI": "1",  # plain progress lines
        "GIT_AUTHOR_NAME": "rsd smoke", "GIT_AUTHOR_EMAIL": "smoke@example.invalid",
        "GIT_COMMITTER_NAME": "rsd smoke", "GIT_COMMITTER_EMAIL": "smoke@example.invalid",
    }
    assert run([sys.executable, "-c", "import rsd; print(rsd.__file__)"], repo, env).strip() == str(repo / "rsd" / "__init__.py")

    run(["git", "init", "-q"], repo, env)
    outputs = stage_outputs(repo)
    for outs in outputs.values():  # nothing made by an earlier run may stand in for this one's
        for out in outs:
            path = repo / out.def_path
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    run([sys.executable, "-m", "rsd.cli", "profile", "smoke"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "smoke"], repo, env)

    smoke = yaml.safe_load((repo / "profiles" / "smoke.yaml").read_text())
    start = time.monotonic()
    log = run([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=DAG_TIMEOUT_S)
    seconds = time.monotonic() - start
    record_property("smoke_dag_seconds", round(seconds, 1))
    with capsys.disabled():
        print(f"\nsmoke DAG: {len(outputs)} stages ({', '.join(outputs)}) in {seconds:.0f} s")

    for stage in outputs:
        assert f"Running stage '{stage}'" in log, f"stage {stage} did not run:\n{log[-3000:]}"
    check_outputs(repo, outputs, smoke)
    status = run([sys.executable, "-m", "dvc", "status"], repo, env)
    assert "up to date" in status, status


def check_outputs(repo: Path, outputs: dict[str, list[Any]], smoke: dict[str, Any]) -> None:
    """Every output of every stage exists; every metrics file is a JSON object of finite numbers that
    looks right for its stage."""
    for stage, outs in outputs.items():
        for out in outs:
            path = repo / out.def_path
            assert path.exists(), f"stage {stage} did not make {out.def_path}"
            if out.metric:
                metrics = json.loads(path.read_text())
                assert isinstance(metrics, dict) and metrics, f"{out.def_path}: empty or not a JSON object"
                bad = [v for v in numbers(metrics) if not math.isfinite(v)]
                assert not bad, f"{out.def_path} holds non-finite numbers: {bad}"
                check_stage_metrics(stage, metrics, smoke)
