"""The `rsd` command: one subcommand per pipeline stage, plus tools."""
from __future__ import annotations

from pathlib import Path

import typer

from rsd import pipeline
from rsd.progress import setup_logging

app = typer.Typer(help="Residual speculative decoding for RFSQ-token VLA policies on LIBERO.", no_args_is_help=True)
ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params file to read")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    import logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)


@app.command()
def demos(params: Path = ParamsOption) -> None:
    """Record scripted-expert demonstrations (or take LIBERO's, see demos.source)."""
    pipeline.run_demos(params)


@app.command()
def tokenizer(params: Path = ParamsOption) -> None:
    """Train the RFSQ action tokenizer on the demos' action chunks."""
    pipeline.run_tokenizer(params)


@app.command()
def policy(params: Path = ParamsOption) -> None:
    """Train the main policy by behaviour cloning on the demos."""
    pipeline.run_policy(params)


@app.command()
def collect(params: Path = ParamsOption) -> None:
    """Roll the main policy out and record hidden states and coarse tokens for the draft."""
    pipeline.run_collect(params)


@app.command()
def train(params: Path = ParamsOption) -> None:
    """Train the draft model on the collected samples."""
    pipeline.run_train(params)


@app.command()
def verify(params: Path = ParamsOption) -> None:
    """Check the draft checkpoint; exits non-zero naming each failed check."""
    pipeline.run_verify(params)


@app.command("eval")
def evaluate(variant: str = typer.Argument(..., help="no_draft, draft (strict) or draft_relaxed"), params: Path = ParamsOption) -> None:
    """Closed-loop evaluation on libero_spatial's benchmark init states."""
    pipeline.run_eval(variant, params)


@app.command()
def bench(params: Path = ParamsOption) -> None:
    """Time no-draft, strict and relaxed decoding on the same recorded observations (metrics/bench.json)."""
    pipeline.run_bench(params)


@app.command()
def report(params: Path = ParamsOption) -> None:
    """Write reports/report.md and its plots from the metrics files."""
    pipeline.run_report(params)


@app.command()
def doctor(
    params: Path = ParamsOption,
    root: Path = typer.Option(Path("."), "--root", help="project folder (dvc.yaml, models/)"),
    skip: list[str] = typer.Option([], "--skip", help="a check not to run (repeatable), e.g. libero"),
    min_free_gb: float = typer.Option(5.0, "--min-free-gb", help="least free disk space, GiB"),
    strict: bool = typer.Option(False, "--strict", help="count optional checks (the remote) as required"),
) -> None:
    """Check the machine and the project before a run: one line per check; exits 1 if a required one failed."""
    from rsd.doctor import DoctorConfig, run_doctor, summary

    try:
        config = DoctorConfig(root=root, params_file=params, skip=tuple(skip), min_free_gb=min_free_gb, strict=strict)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    line, ok = summary(run_doctor(config, echo=typer.echo))
    typer.echo(line)
    raise typer.Exit(0 if ok else 1)


@app.command()
def profile(
    name: str = typer.Argument(..., help="a profile in profiles/: smoke or full"),
    params: Path = ParamsOption,
    profiles_dir: Path = typer.Option(Path("profiles"), "--profiles-dir", help="folder of <name>.yaml profiles"),
) -> None:
    """Write a profile's values into params.yaml (`git checkout params.yaml` returns to the default)."""
    from rsd.profiles import apply_profile

    try:
        changes = apply_profile(name, params, profiles_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from exc
    for key, old, new in changes:
        typer.echo(f"{key}: {old} -> {new}")
    typer.echo(f"{params}: profile {name} applied ({len(changes)} value(s) changed)")


if __name__ == "__main__":
    app()
