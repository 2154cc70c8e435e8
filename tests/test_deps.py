"""dvc.yaml lists, for every stage, exactly the project code its script imports (directly or through
other project modules, lazy imports included): so an edit reruns every stage it can affect, and no other.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rsd"


def _module_file(name: str) -> Path | None:
    """rsd.a.b -> rsd/a/b.py or rsd/a/b/__init__.py (relative to ROOT); None if it is no project module."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(ROOT)
    return None


def _imported_modules(path: Path) -> set[str]:
    """Project modules one file imports, anywhere in it (a lazy import inside a function counts), with
    the packages above each (importing rsd.a.b runs rsd/__init__.py and rsd/a/__init__.py)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from rsd.x import module`
    modules = set()
    for name in names:
        if name.split(".")[0] == PACKAGE:
            parts = name.split(".")
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return modules


def import_closure(script: Path) -> set[Path]:
    """The script and every project file it reaches through imports."""
    seen, todo = {script}, [script]
    while todo:
        for module in _imported_modules(todo.pop()):
            path = _module_file(module)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def _code_deps(deps: list[str]) -> set[Path]:
    """The .py files a stage's deps name under stages/ and rsd/ (a folder stands for the files in it)."""
    files = set()
    for dep in deps:
        path = Path(dep)
        if path.parts[0] not in ("stages", PACKAGE):
            continue
        if (ROOT / path).is_dir():
            files.update(p.relative_to(ROOT) for p in (ROOT / path).rglob("*.py"))
        else:
            files.add(path)
    return files


def dep_problems(dvc_yaml: dict) -> list[str]:
    """Each stage whose code deps differ from its script's import closure, naming the files."""
    problems = []
    for name, stage in dvc_yaml["stages"].items():
        match = re.match(r"python (stages/\w+\.py)", stage["cmd"])
        if match is None:
            problems.append(f"stage {name}: its cmd does not run a stages/ script: {stage['cmd']!r}")
            continue
        expected, listed = import_closure(Path(match.group(1))), _code_deps(stage.get("deps", []))
        for path in sorted(expected - listed):
            problems.append(f"stage {name}: dvc.yaml lacks {path}, which {match.group(1)} imports")
        for path in sorted(listed - expected):
            problems.append(f"stage {name}: dvc.yaml lists {path}, which {match.group(1)} does not import")
    return problems


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_exactly_the_code_it_imports(dvc_yaml: dict) -> None:
    assert dep_problems(dvc_yaml) == []


def test_a_missing_or_extra_dep_is_named(dvc_yaml: dict) -> None:
    broken = copy.deepcopy(dvc_yaml)
    collect = broken["stages"]["collect"]
    collect["deps"].remove("rsd/draft/samples.py")
    collect["deps"].append("rsd/report.py")
    assert dep_problems(broken) == [
        "stage collect: dvc.yaml lacks rsd/draft/samples.py, which stages/collect.py imports",
        "stage collect: dvc.yaml lists rsd/report.py, which stages/collect.py does not import",
    ]


def test_the_report_code_is_a_dependency_of_the_report_alone(dvc_yaml: dict) -> None:
    users = [name for name, stage in dvc_yaml["stages"].items() if Path("rsd/report.py") in _code_deps(stage["deps"])]
    assert users == ["report"]


def test_stage_paths_come_from_the_command_line() -> None:
    """No stage script names a data, model or metrics path of its own: dvc.yaml's cmd is their one source."""
    for script in sorted((ROOT / "stages").glob("*.py")):
        text = script.read_text()
        code = text.split('"""', 2)[-1]  # after the docstring, which shows the command line
        for folder in ("data/", "models/", "metrics/", "dvclive/", "reports/"):
            assert f'"{folder}' not in code, f"{script.name} hard-codes a {folder} path"


def test_each_evaluation_depends_on_the_eval_params_its_variant_reads(dvc_yaml: dict) -> None:
    """Every evaluation on every evaluator key; a draft variant also on the keys of its acceptance rule, and
    on nothing else of `eval`, so moving the relaxed acceptance ratio reruns eval_draft_relaxed alone."""
    from rsd.evaluation import EvalConfig

    strict = {"eval.draft_precision", "eval.min_kept_layers"}
    engine_keys = {"none": set(), "strict": strict, "relaxed": strict | {"eval.min_ratio"}}
    evaluator = {f"eval.{field.name}" for field in dataclasses.fields(EvalConfig)} - engine_keys["relaxed"]
    for variant, mode in {"no_draft": "none", "draft": "strict", "draft_relaxed": "relaxed"}.items():
        params = {p for p in dvc_yaml["stages"][f"eval_{variant}"]["params"] if p.startswith("eval.")}
        assert params == evaluator | engine_keys[mode], variant
