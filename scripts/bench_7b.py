"""RSD at OpenVLA's scale: the engine with a Llama-2-7B-shaped main backbone on one GPU, bf16, random weights.

Times engine calls (`RSDEngine.predict`: inputs to action chunk) without the draft and with it, the
draft's acceptance pinned, and records peak GPU memory. Random weights decide nothing about acceptance,
so the draft's proposals are built from main's own codes:

- for each observation, main's codes as strict speculation checks them are found first (untimed): an
  oracle proposal that the verify pass accepts whole;
- a call "with k accepted layers" proposes layers 1..k from the oracle and layer k+1 with one code
  changed, so strict acceptance keeps exactly k draft layers (k = 0..K-1);
- the draft model itself (input_dim 4096, bf16) still runs in every call, so its cost is real.

Measured: median ms per call without the draft and for each k, then the mixture given by the share of
calls with k accepted layers (`--accepted-share`, by default the strict mode's `accepted_layers_share`
of metrics/bench.json, the LIBERO measurement), drawn per call in a fixed shuffled order; the main
policy's passes alone (prefill, one position, the K-position verify pass) against the floor of reading
its weights once at the copy bandwidth measured on the same GPU.

`--compile` runs the compiled path (rsd.compiled: static KV cache, CUDA graphs) and also counts the
observations whose compiled no-draft tokens differ from eager decoding's.

    python scripts/bench_7b.py --compile --out metrics/bench_7b.json [--accepted-share 0.3 0.2 0.5]
    python scripts/bench_7b.py --out metrics/bench_7b_eager.json

Needs a CUDA GPU with ~16 GB free; runs from the repository root without installing the package.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor  # noqa: E402

from rsd.bench import PinnedDraft, breakdown, explain_difference, perfect_proposal  # noqa: E402
from rsd.compiled import CompiledDraft, CompiledPolicy, CompiledTokenizer  # noqa: E402
from rsd.draft.model import LeanDraft, RFSQDraftModelWithProjection  # noqa: E402
from rsd.engine import EngineConfig, RSDEngine  # noqa: E402
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab  # noqa: E402
from rsd.policy.model import MainPolicy  # noqa: E402
from rsd.tokenizer.config import TokenizerConfig  # noqa: E402
from rsd.tokenizer.model import RFSQTokenizer  # noqa: E402

INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (default metrics/bench_7b.json; a --dry-run writes none unless asked)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="vision/proprio sizes come from policy.model")
    parser.add_argument("--bench", type=Path, default=ROOT / "metrics/bench.json",
                        help="where the default --accepted-share is read (strict.accepted_layers_share)")
    parser.add_argument("--accepted-share", type=float, nargs="+", default=None,
                        help="share of calls whose strict check keeps k = 0, 1, ... draft layers (sums to 1)")
    parser.add_argument("--observations", type=int, default=8, help="distinct random observations")
    parser.add_argument("--repetitions", type=int, default=10, help="timed calls per observation and variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    parser.add_argument("--vision-grid", type=int, default=None,
                        help="visual tokens per camera side (default: params.yaml; 11 gives OpenVLA's ~256 image tokens)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for the host side (inputs, the tokenizer's decode): many threads slow tiny work")
    parser.add_argument("--compile", action="store_true", help="the compiled path: static KV cache and CUDA graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="the small default backbone on the CPU in float32: checks the script, measures nothing of note")
    return parser.parse_args(argv)


def accepted_share(args: argparse.Namespace, layers: int) -> tuple[list[float], str]:
    """The pinned distribution of accepted draft layers and where it came from."""
    if args.accepted_share is not None:
        share, source = list(args.accepted_share), "command line"
    elif args.bench.is_file():
        share = json.loads(args.bench.read_text())["strict"]["accepted_layers_share"]
        bench = args.bench.resolve()  # named relative to the repository, as the result is committed
        source = str(bench.relative_to(ROOT)) if bench.is_relative_to(ROOT) else bench.name
    else:
        raise SystemExit(f"no --accepted-share given and {args.bench} (the LIBERO benchmark) is missing")
    if len(share) != layers or any(s < 0 for s in share) or abs(sum(share) - 1) > 1e-3:
        raise SystemExit(f"--accepted-share needs {layers} non-negative numbers summing to 1, got {share}")
    return share, source


def benchmark_shares_speedup(bench: Path, med: dict[str, float], layers: int) -> dict[str, float] | None:
    """For each mode of the LIBERO benchmark (strict, relaxed, each ratio of the acceptance sweep): no-draft ms
    over the mixture of the per-k median ms weighted by that mode's share of calls keeping k draft layers, a call
    its gate held back (no draft run) costing a no-draft call; None without the benchmark file."""
    if not bench.is_file():
        return None
    result = json.loads(bench.read_text())
    modes = {mode: result.get(mode, {}) for mode in ("strict", "relaxed")}
    modes.update({f"min_ratio={e['min_ratio']:g}": e for e in result.get("acceptance_sweep", [])})
    out = {}
    for mode, summary in modes.items():
        share = summary.get("accepted_layers_share")
        if share is None or len(share) != layers:
            continue
        held_back = 1.0 - summary.get("speculated_share", 1.0)  # counted among the calls keeping 0 layers
        ms = held_back * med["none"] + (share[0] - held_back) * med["k0"] + sum(p * med[f"k{k}"] for k, p in enumerate(share) if k)
        out[mode] = round(med["none"] / ms, 4)
    return out


def build(args: argparse.Namespace, device: torch.device) -> tuple[MainPolicy, RFSQTokenizer, RFSQDraftModelWithProjection]:
    model = dict((yaml.safe_load(args.params.read_text()).get("policy") or {}).get("model") or {})
    model.pop("backbone", None)
    if args.vision_grid is not None:
        model["vision_grid"] = args.vision_grid
    backbone = BackboneConfig() if args.dry_run else BackboneConfig.llama2_7b()
    backbone.attn_implementation = args.attn
    config = PolicyConfig.from_dict({**model, "vocab": build_vocab(INSTRUCTIONS), "num_layers": 4, "levels": 7,
                                     "backbone": dataclasses.asdict(backbone)})
    torch.manual_seed(args.seed)
    tokenizer = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()  # CPU, float32
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    draft = RFSQDraftModelWithProjection(backbone.hidden_size).to(device, dtype).eval()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the GPU: no float32 copy of 7B weights
    try:
        with torch.device(device):
            policy = MainPolicy(config).eval()
    finally:
        torch.set_default_dtype(default)
    return policy, tokenizer, draft


def observations(n: int, size: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"agentview": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "wrist": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "proprio": rng.normal(size=8).astype(np.float32),
             "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)]} for i in range(n)]


def pinned(proposal: Tensor, k: int) -> Tensor:
    """Layers 1..k as main's, layer k+1 (if any) with one code changed: strict keeps exactly k layers."""
    out = proposal.clone()
    if k + 1 < out.shape[1]:
        out[:, k + 1, 0] = (out[:, k + 1, 0] + 1) % 7
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB, bytes read plus written over the median time: the floor's bandwidth."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        _sync()
        start = time.perf_counter()
        dst.copy_(src)
        _sync()
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * 2**31 / float(np.median(times[2:])) / 1e9


def pass_ms(policy: MainPolicy | CompiledPolicy, batch: dict[str, Tensor], K: int, repetitions: int) -> dict[str, float]:
    """Median ms of the main policy's passes alone: the prefill, a one-position pass, the K-position verify pass."""
    times: dict[str, list[float]] = {"prefill": [], "one_position_pass": [], "verify_pass": []}
    for _ in range(repetitions + 2):
        _sync()
        start = time.perf_counter()
        _, logits0, cache = policy.prefill(batch)
        _sync()
        times["prefill"].append(time.perf_counter() - start)
        codes = logits0.argmax(-1)
        for name, fed in (("one_position_pass", codes[:, None]), ("verify_pass", codes[:, None].expand(-1, K, -1))):
            _sync()
            start = time.perf_counter()
            policy.step_many(fed, 0, cache)
            _sync()
            times[name].append(time.perf_counter() - start)
            cache.crop(cache.prompt_length)
    return {f"{name}_ms": round(float(np.median(t[2:])) * 1e3, 3) for name, t in times.items()}


def timed(engine: RSDEngine, inputs: dict[str, Any]) -> tuple[float, Any]:
    _sync()
    start = time.perf_counter()
    prediction = engine.predict(inputs)
    _sync()
    return (time.perf_counter() - start) * 1e3, prediction


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("bench_7b needs a CUDA GPU (or --dry-run)")
    start = time.monotonic()
    torch.set_num_threads(args.threads)
    policy, tokenizer, draft = build(args, device)
    dtype = next(policy.backbone.parameters()).dtype
    K = draft.config.num_coarse_layers
    share, source = accepted_share(args, K)
    weights_gb = sum(p.numel() * p.element_size() for p in policy.parameters()) / 1e9
    bandwidth = copy_bandwidth_gbs(device)
    words = max(len(policy.config.encode_instruction(t)) for t in INSTRUCTIONS)
    obs = observations(args.observations, 128, args.seed)
    eager = RSDEngine(policy, tokenizer)
    eager_tokens = [eager.predict(o).tokens for o in obs] if args.compile else None  # what compiling changes
    compile_start = time.monotonic()
    main_policy = CompiledPolicy(policy, max_words=words) if args.compile else policy
    decoder = CompiledTokenizer(tokenizer, device) if args.compile else tokenizer  # the decode on the GPU too
    plain_engine = RSDEngine(main_policy, decoder)
    pinned_draft = PinnedDraft(CompiledDraft(draft) if args.compile else draft)
    spec_engine = RSDEngine(main_policy, decoder, pinned_draft, EngineConfig(mode="strict"))
    prompt = policy.config.num_visual_tokens + 1 + words + 1

    # no draft alone first: its peak memory without the draft
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup):
        plain_engine.predict(obs[i % len(obs)])
    plain = [plain_engine.predict(o) for o in obs]
    peak_plain = _peak_gb()
    oracles = [perfect_proposal(spec_engine, pinned_draft, o, p.tokens) for o, p in zip(obs, plain)]
    # observations whose coarse codes from the multi-position verify pass differ from one-position decoding
    mismatches = sum(not torch.equal(o.flatten(), p.tokens.flatten(0, 1).T[:K].flatten()) for o, p in zip(oracles, plain))
    for i in range(args.warmup):
        for k in range(K):  # every k: the compiled path captures its passes on first use
            pinned_draft.proposal = pinned(oracles[i % len(obs)], k)
            spec_engine.predict(obs[i % len(obs)])
    warm_seconds = time.monotonic() - compile_start
    passes = pass_ms(main_policy, plain_engine._batch(obs[0]), K, args.repetitions * 2)
    compiled_vs_eager = None
    if eager_tokens is not None:  # where compiled tokens differ: eager's top-2 margin there (bf16 rounds differently)
        where = [explain_difference(eager, o, p.tokens, 0.0) for o, p in zip(obs, plain)]
        differing = [w for w in where if w is not None]
        compiled_vs_eager = {
            "observations_differing": len(differing),
            "codes_differing_share": round(float(np.mean([(e != p.tokens).float().mean().item()
                                                          for e, p in zip(eager_tokens, plain)])), 5),
            "largest_eager_margin_at_a_difference": round(max((m for _, m in differing), default=0.0), 5),
        }

    # interleaved timing: per observation and repetition, no draft and every k, order rotating
    variants = ["none", *[f"k{k}" for k in range(K)]]
    ms: dict[str, list[float]] = {v: [] for v in variants}
    stats: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    rounds = 0
    for _ in range(args.repetitions):
        for i, inputs in enumerate(obs):
            shift = rounds % len(variants)
            for v in variants[shift:] + variants[:shift]:
                if v == "none":
                    t, p = timed(plain_engine, inputs)
                else:
                    k = int(v[1:])
                    pinned_draft.proposal = pinned(oracles[i], k)
                    t, p = timed(spec_engine, inputs)
                    if p.stats["accepted_layers"] != k:
                        raise RuntimeError(f"pinned {k} accepted layers, the engine kept {p.stats['accepted_layers']}")
                ms[v].append(t)
                stats[v].append(p.stats)
            rounds += 1

    # the pinned mixture: each call's k drawn from the share, in a fixed shuffled order
    rng = np.random.default_rng(args.seed)
    calls = args.repetitions * len(obs)
    counts = np.floor(np.asarray(share) * calls).astype(int)
    counts[np.argmax(share)] += calls - counts.sum()
    ks = rng.permutation(np.repeat(np.arange(K), counts))
    mix_ms, mix_plain = [], []
    for j, k in enumerate(ks):
        i = j % len(obs)
        pinned_draft.proposal = pinned(oracles[i], int(k))
        order = [(spec_engine, "spec"), (plain_engine, "none")][:: 1 if j % 2 else -1]
        for engine, name in order:
            t, _ = timed(engine, obs[i])
            (mix_ms if name == "spec" else mix_plain).append(t)
    peak_draft = _peak_gb()
    ratios = np.asarray(mix_plain) / np.asarray(mix_ms)
    med = {v: float(np.median(x)) for v, x in ms.items()}
    result = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (dry run on the CPU)",
        "backbone": ("the small default backbone (dry run)" if args.dry_run else
                     "Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, MLP 11008), random weights"),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn,
        "compiled": args.compile,
        "threads": args.threads,
        "build_and_warmup_seconds": round(warm_seconds, 1),
        "policy_parameters_b": round(sum(p.numel() for p in policy.parameters()) / 1e9, 3),
        "draft_parameters_m": round(sum(p.numel() for p in draft.parameters()) / 1e6, 3),
        "weights_gb": round(weights_gb, 3),
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "pass_floor_ms": round(weights_gb / bandwidth * 1e3, 3),
        **passes,
        "prompt_positions": prompt,
        "accepted_share": share,
        "accepted_share_source": source,
        "no_draft_ms": round(float(np.median(mix_plain)), 3),
        "draft_ms": round(float(np.median(mix_ms)), 3),
        "speedup": round(float(np.median(mix_plain) / np.median(mix_ms)), 4),
        "speedup_p10": round(float(np.percentile(ratios, 10)), 4),
        "speedup_p90": round(float(np.percentile(ratios, 90)), 4),
        "ms_by_accepted_layers": {str(k): round(med[f"k{k}"], 3) for k in range(K)},
        "no_draft_ms_interleaved": round(med["none"], 3),
        "speedup_by_accepted_layers": {str(k): round(med["none"] / med[f"k{k}"], 4) for k in range(K)},
        # each mode's shares of the LIBERO benchmark applied to the per-k medians above: expected ms per call
        "speedup_at_benchmark_shares": benchmark_shares_speedup(args.bench, med, K),
        "draft_model_ms": round(float(np.median([s["draft_ms"] for v in variants[1:] for s in stats[v]])), 3),
        "main_passes_by_accepted_layers": {str(k): stats[f"k{k}"][0]["main_passes"] for k in range(K)},
        # where a call's time goes (median ms per span, rsd.engine.Marks): no draft and each k
        "breakdown_ms": {v: breakdown(stats[v]) for v in variants},
        "peak_memory_gb_no_draft": round(peak_plain, 3),
        "peak_memory_gb_draft": round(peak_draft, 3),
        "peak_memory_gib_draft": round(peak_draft * 1e9 / 2**30, 3),
        "verify_pass_code_mismatches": int(mismatches),
        "compiled_vs_eager": compiled_vs_eager,
        "observations": len(obs),
        "repetitions": args.repetitions,
        "lean_draft": LeanDraft.from_draft(draft) is not None,  # the draft ran through its lean inference form
        "torch": torch.__version__,
        "wall_seconds": round(time.monotonic() - start, 1),
    }
    out = args.out or (None if args.dry_run else Path("metrics/bench_7b.json"))  # a dry run never replaces GPU figures
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
