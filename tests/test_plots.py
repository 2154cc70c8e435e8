"""Offline plots: `dvc plots show` uses the project's template, which inlines vega, so the page draws its
curves with no network. Checked the way a person would: headless Chromium renders the page, and the
screenshot must hold the curves' colours. A tiny DVCLive run made here gives the data.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plots" / "offline.html"
BUILDER = ROOT / "scripts" / "build-plots-template.py"
# DVC's default line colours (dvc_render.vega's palette): the first two series of a plot
CURVE_COLOURS = ((0x94, 0x5D, 0xD6), (0x13, 0xAD, 0xC7))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
CHROMIUM_FLAGS = (  # no sandbox as root; nothing that reaches for the network on its own
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-dev-shm-usage", "--window-size=1000,1400", "--virtual-time-budget=10000",
)


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: $RSD_CHROMIUM, one on PATH, or Playwright's downloaded build."""
    if os.environ.get("RSD_CHROMIUM"):
        return os.environ["RSD_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH", Path.home() / ".cache" / "ms-playwright"))
    builds = sorted(cache.glob("chromium*/chrome-linux*/chrome")) + sorted(cache.glob("chromium_headless_shell*/*/headless_shell"))
    return str(builds[-1]) if builds else None


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def screenshot(chromium: str, page: Path, out: Path, profile: Path) -> np.ndarray:
    """Render `page` in headless Chromium; the screenshot as uint8 RGB [H, W, 3]."""
    import matplotlib.image

    run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", page.as_uri()], page.parent)
    assert out.is_file(), f"Chromium wrote no screenshot of {page}"
    image = matplotlib.image.imread(out)  # float [H, W, 3 or 4] in [0, 1]
    return (image[..., :3] * 255).round().astype(np.uint8)


def curve_pixels(image: np.ndarray) -> int:
    """Pixels within a small distance of a curve colour (anti-aliasing blends the rest). A legend's dot
    has ~80 of them; a 2-pixel line across a plot several hundred."""
    rgb = image.astype(np.int32)
    return int(sum((np.abs(rgb - np.array(c)).sum(-1) <= 30).sum() for c in CURVE_COLOURS))


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository with the project's .dvc/config and template, and a tiny DVCLive run's curves."""
    repo = tmp_path_factory.mktemp("plots")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid"}
    run(["git", "init", "-q"], repo, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    shutil.copyfile(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "plots").mkdir()
    shutil.copyfile(TEMPLATE, repo / "plots" / TEMPLATE.name)

    from dvclive import Live

    with Live(str(repo / "dvclive" / "tiny"), save_dvc_exp=False, dvcyaml=False) as live:  # as the training stages do (rsd.progress.live_run)
        for step in range(20):
            live.log_metric("train/loss", float(np.exp(-step / 6) + 0.05 * np.sin(step)))
            live.log_metric("val/acc", float(1 - np.exp(-step / 5)))
            live.next_step()
    dvc_yaml = {"plots": [{"dvclive/tiny/plots/metrics": {"x": "step"}}]}  # as the project's dvc.yaml declares them
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    return repo


def test_project_config_uses_the_offline_template() -> None:
    from dvc.config import Config

    config = Config(dvc_dir=str(ROOT / ".dvc"), validate=False).load_one("repo")
    template = config["plots"].get("html_template")
    assert template, ".dvc/config sets no plots.html_template"
    assert (ROOT / ".dvc" / template).resolve() == TEMPLATE, f"plots.html_template {template} is not {TEMPLATE}"


def test_template_inlines_the_versions_dvc_render_loads() -> None:
    """The inlined libraries are those the installed dvc-render would fetch: rebuild the page if this fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_plots_template", BUILDER)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    page = TEMPLATE.read_text(encoding="utf-8")
    for name, version in builder.dvc_vega_versions().items():
        assert f"<!-- {name}@{version}\n" in page, (
            f"{TEMPLATE.name} lacks {name}@{version} (what dvc-render loads): run scripts/{BUILDER.name}")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags have nowhere to go
    assert not re.search(r"<script[^>]*\bsrc=", page), "the template must not load scripts from anywhere"


def test_dvc_plots_show_writes_a_self_contained_page(plots_repo: Path) -> None:
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], plots_repo)
    page = (plots_repo / "out" / "index.html").read_text(encoding="utf-8")
    assert "vegaEmbed(" in page and page.count("<script>") >= 3  # the three inlined libraries
    assert "cdn.jsdelivr.net" not in page and not re.search(r"<script[^>]*\bsrc=", page)
    assert "train/loss" in page and "val/acc" in page


def test_curves_are_drawn_in_headless_chromium(plots_repo: Path, tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no headless Chromium on this machine (looked for $RSD_CHROMIUM, "
                    f"{', '.join(CHROMIUM_NAMES)} on PATH and Playwright's cache): install Debian's `chromium` "
                    "package (apt-get install chromium) or set RSD_CHROMIUM to a Chrome/Chromium binary")
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", "offline"], plots_repo)
    image = screenshot(chromium, plots_repo / "offline" / "index.html", tmp_path / "offline.png", tmp_path / "profile")
    drawn = curve_pixels(image)
    assert drawn >= 600, f"only {drawn} curve-coloured pixels: the plots did not render (see {tmp_path / 'offline.png'})"

    # the control: the same page without the inlined libraries (what DVC's CDN page is with no network)
    # draws no curve, so the pixels counted above are vega's doing
    page = (plots_repo / "offline" / "index.html").read_text(encoding="utf-8")
    bare = plots_repo / "offline" / "bare.html"
    bare.write_text(re.sub(r"<script>.*?</script>", "", page, count=3, flags=re.S), encoding="utf-8")
    blank = curve_pixels(screenshot(chromium, bare, tmp_path / "bare.png", tmp_path / "profile-bare"))
    assert blank < 20, f"the page without vega still has {blank} curve-coloured pixels: the check proves nothing"
