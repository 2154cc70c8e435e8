"""The `rsd` command: the tools around the pipeline (`rsd doctor`, `rsd profile`).

The stages themselves run through DVC (`dvc repro STAGE`), or by hand with the command line dvc.yaml
gives them (`dvc stage list` shows the stages; each `python stages/NAME.py --help` its arguments).
"""
from __future__ import annotations

from pathlib import Path

import typer

from rsd.progress import setup_logging

app = typer.Typer(help="Residual speculative decoding for RFSQ-token VLA policies on LIBERO.", no_args_is_help=True)
ParamsOption = typer.Option(Path("params.yaml"), "--params", help="params file to read")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    import logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)


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
