"""Build plots/offline.html: DVC's plot page with vega, vega-lite and vega-embed inlined.

`dvc plots show` writes a page that loads these three libraries from a CDN, so with no network it
renders blank. .dvc/config points `plots.html_template` at the page this script writes, which carries
the libraries inside it, at the versions the installed dvc-render would load (read from dvc-render
itself, so the offline page draws exactly what the online one would).

Run it after upgrading dvc-render (the tests check the versions still match):

    .venv/bin/python scripts/build-plots-template.py            # fetches the packages with `npm pack`
    .venv/bin/python scripts/build-plots-template.py --from DIR # or takes <name>-<version>.tgz files from DIR
"""
from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plots" / "offline.html"
LIBRARIES = ("vega", "vega-lite", "vega-embed")  # load order: vega-embed needs the other two as globals
# what DVC fills in: its CDN <script> tags go to {scripts}, which this page leaves out on purpose
PLACEHOLDERS = ("{refresh_tag}", "{plot_divs}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- DVC's plot page, with {names} inlined so that it renders with no network
         (built by scripts/build-plots-template.py; do not edit by hand). -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def dvc_vega_versions() -> dict[str, str]:
    """{library: version} that the installed dvc-render loads from its CDN."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r"npm/(vega(?:-lite|-embed)?)@([0-9][^\"'/]*)", VegaRenderer.SCRIPTS))
    missing = [name for name in LIBRARIES if name not in found]
    if missing:
        raise RuntimeError(f"dvc_render.vega.VegaRenderer.SCRIPTS names no version of {missing}: {VegaRenderer.SCRIPTS}")
    return {name: found[name] for name in LIBRARIES}


def npm_pack(name: str, version: str, into: Path) -> Path:
    """Download `name@version` from the npm registry as a tarball into `into`."""
    result = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(into)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"npm pack {name}@{version} failed:\n{result.stderr}")
    return into / f"{name}-{version}.tgz"


def read_package(tarball: Path, name: str) -> tuple[str, str]:
    """(minified browser build, license text) of an npm tarball."""
    if not tarball.is_file():
        raise FileNotFoundError(f"{tarball} not found (expected the npm tarball of {name})")
    with tarfile.open(tarball) as tar:
        def text(member: str) -> str:
            try:
                return io.TextIOWrapper(tar.extractfile(f"package/{member}"), encoding="utf-8").read()
            except KeyError:
                raise ValueError(f"{tarball} has no package/{member}") from None

        return text(f"build/{name}.min.js"), text("LICENSE")


def script_tag(name: str, version: str, code: str, license_text: str) -> str:
    """An inline <script> with the package's license in a comment before it."""
    for bad in ("</script", *PLACEHOLDERS):
        haystack = code.lower() if bad == "</script" else code  # HTML tags are case-insensitive
        if bad in haystack:
            raise ValueError(f"{name}@{version}'s build contains {bad!r}, which would break the page")
    code = re.sub(r"^//# sourceMappingURL=.*$", "", code, flags=re.M)  # no map file ships with the page
    notice = license_text.strip().replace("--", "- -")  # `--` may not appear inside an HTML comment
    return f"    <!-- {name}@{version}\n{notice}\n    -->\n    <script>\n{code.strip()}\n    </script>"


def build(out: Path, tarballs: Path | None) -> dict[str, str]:
    """Write the page to `out`; return the versions it carries."""
    versions = dvc_vega_versions()
    with tempfile.TemporaryDirectory() as tmp:
        scripts = []
        for name, version in versions.items():
            tarball = (tarballs / f"{name}-{version}.tgz") if tarballs else npm_pack(name, version, Path(tmp))
            scripts.append(script_tag(name, version, *read_package(tarball, name)))
    names = ", ".join(f"{n}@{v}" for n, v in versions.items())
    page = PAGE.format(names=names, scripts="\n".join(scripts))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="tarballs", type=Path, help="folder of <name>-<version>.tgz npm tarballs")
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"where to write (default {TEMPLATE.relative_to(ROOT)})")
    args = parser.parse_args()
    versions = build(args.out, args.tarballs)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): "
          + ", ".join(f"{n}@{v}" for n, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
