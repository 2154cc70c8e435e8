"""The `rsd` command: the tools around the pipeline (`rsd doctor`, `rsd profile`, `rsd bench`).

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


@app.command()
def bench(
    observations: Path = typer.Option(..., "--observations", help="recorded policy inputs: the bench stage's "
                                      "data/bench_observations.npz"),
    policy: Path = typer.Option(Path("models/policy.pt"), "--policy", help="main policy checkpoint"),
    tokenizer: Path = typer.Option(Path("models/tokenizer.pt"), "--tokenizer", help="RFSQ tokenizer checkpoint"),
    draft: Path = typer.Option(Path("models/draft.pt"), "--draft", help="draft checkpoint"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="also time the compiled path (static KV "
                                 "cache; CUDA graphs on a GPU), and compare its tokens with eager decoding's"),
    out: Path = typer.Option(Path("metrics/bench_gpu.json"), "--out", help="JSON result"),
    label: str = typer.Option("", "--label", help="what the checkpoints are, recorded in the result (e.g. the profile)"),
    params: Path = ParamsOption,
) -> None:
    """Time the checkpoints on recorded observations, without LIBERO: no draft, strict, relaxed and a perfect
    draft, interleaved as the bench stage does (params `bench`; the acceptance rule, gate and draft precision
    from `eval`)."""
    import torch

    from rsd.bench import BenchConfig, load_observations, time_checkpoints
    from rsd.engine import MODES, EngineConfig
    from rsd.io import write_json
    from rsd.params import load_params, section

    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise typer.BadParameter(f"expected cpu or cuda (with a CUDA GPU torch can see), got {device!r}", param_hint="--device")
    for name, path in (("--observations", observations), ("--policy", policy), ("--tokenizer", tokenizer), ("--draft", draft)):
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint=name)
    try:
        values = load_params(params)
        config = section(values, "bench", BenchConfig)
        evaluation = values.get("eval") or {}  # read as data: rsd.evaluation's EvalConfig would import LIBERO
        engines = {mode: EngineConfig.for_mode(evaluation, mode) for mode in MODES}
        inputs = load_observations(observations)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = time_checkpoints(str(policy), str(tokenizer), str(draft), inputs, config, engines, device, compile, label)
    write_json(out, result)
    for path_name in ("eager", "compiled"):
        if path_name in result:
            r = result[path_name]
            typer.echo(f"{path_name}: no draft {r['no_draft_ms']:.2f} ms, strict x{r['speedup']:.3f}, relaxed "
                       f"x{r['relaxed']['speedup']:.3f}, perfect draft x{r['speedup_perfect_draft']:.3f}")
    typer.echo(f"{out}: written ({result['device']})")


if __name__ == "__main__":
    app()
