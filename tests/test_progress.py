"""Progress reporting: a tqdm bar in a terminal, plain timestamped log lines under CI or in a log file; DVCLive
curves that land only when the training succeeds."""
from __future__ import annotations

import io
import json
import logging
import signal
import sys
from pathlib import Path

import pytest

from rsd.progress import Interrupted, Progress, interactive, live_run


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_under_ci(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(sys, "stderr", Terminal())  # even in a terminal: CI logs are files
    assert not interactive()
    with caplog.at_level(logging.INFO, logger="rsd"), Progress(3, "collect", every_s=0) as bar:
        assert bar._bar is None
        for i in range(3):
            bar.update(1, samples=10 * (i + 1))
    lines = [r.getMessage() for r in caplog.records if r.name == "rsd"]
    assert [line.split(" (")[0] for line in lines] == ["collect: 1/3", "collect: 2/3", "collect: 3/3"]
    assert lines[-1].endswith("samples=30") and sys.stderr.getvalue() == ""  # no bar drawn


def test_plain_lines_are_rate_limited_but_the_last_always_shows(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: a log file
    with caplog.at_level(logging.INFO, logger="rsd"), Progress(100, "eval", every_s=3600) as bar:
        for _ in range(100):
            bar.update(1)
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "rsd"] == ["eval: 100/100"]


def test_a_bar_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress(4, "policy") as bar:
        assert bar._bar is not None
        bar.update(4, loss="0.5")
    assert "policy" in terminal.getvalue() and "4/4" in terminal.getvalue()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """dvclive/policy as the last successful run left it (and dvc.lock describes it); outside any DVC repo."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "dvclive" / "policy"
    (target / "plots" / "metrics" / "val").mkdir(parents=True)
    (target / "plots" / "metrics" / "val" / "loss.tsv").write_text("timestamp\tstep\tloss\n0\t0\t0.5\n")
    (target / "metrics.json").write_text('{"val": {"loss": 0.5}, "step": 11}\n')
    return target


@pytest.mark.parametrize("failure", [RuntimeError("NaN loss"), Interrupted(signal.SIGTERM)], ids=["error", "SIGTERM"])
def test_a_failed_training_leaves_the_old_curves(old_curves: Path, failure: BaseException) -> None:
    before = _tree(old_curves)
    with pytest.raises(type(failure)):
        with live_run(old_curves) as live:
            live.log_metric("train/loss", 2.0)
            live.next_step()  # DVCLive has written this run's curves and metrics.json, in its staging folder
            assert _tree(old_curves) == before
            raise failure
    assert _tree(old_curves) == before
    assert sorted(p.name for p in old_curves.parent.iterdir()) == ["policy"]  # no staging folder left


def test_curves_land_whole_when_training_succeeds(old_curves: Path) -> None:
    stale = old_curves.with_name(".policy.live-0123abcd")  # a run killed outright (SIGKILL) left its staging folder
    stale.mkdir()
    (stale / "metrics.json").write_text("{}")
    with live_run(old_curves) as live:
        for loss in (2.0, 1.0):
            live.log_metric("train/loss", loss)
            live.next_step()
    files = _tree(old_curves)
    assert sorted(files) == ["metrics.json", "plots/metrics/train/loss.tsv"]  # the old run's files replaced, not merged
    assert json.loads(files["metrics.json"]) == {"train": {"loss": 1.0}, "step": 1}
    assert sorted(p.name for p in old_curves.parent.iterdir()) == ["policy"]
