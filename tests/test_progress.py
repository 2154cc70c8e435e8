"""Progress reporting: a tqdm bar in a terminal, plain timestamped log lines under CI or in a log file."""
from __future__ import annotations

import io
import logging
import sys

import pytest

from rsd.progress import Progress, interactive


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
