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
def evaluate(variant: str = typer.Argument(..., help="no_draft or draft"), params: Path = ParamsOption) -> None:
    """Closed-loop evaluation on libero_spatial's benchmark init states."""
    pipeline.run_eval(variant, params)


if __name__ == "__main__":
    app()
