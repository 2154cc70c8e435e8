"""The speed benchmark's timing and bookkeeping, on a small random policy and synthetic observations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rsd.bench import BenchConfig, benchmark, explain_difference, load_observations, save_observations
from rsd.recording import _quotas
from rsd.draft.model import RFSQDraftModelWithProjection
from rsd.engine import EngineConfig, RSDEngine
from rsd.policy.config import PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

INSTRUCTION = "pick up the black bowl and place it on the plate"


@pytest.fixture(scope="module")
def engines() -> dict[str, RSDEngine]:
    torch.manual_seed(0)
    policy = MainPolicy(PolicyConfig(vocab=build_vocab([INSTRUCTION]), num_layers=4)).eval()
    tokenizer = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()
    draft = RFSQDraftModelWithProjection(256, hidden_dim=64, num_heads=4, ff_dim=64)
    return {mode: RSDEngine(policy, tokenizer, None if mode == "none" else draft, EngineConfig(mode=mode, min_ratio=0.1))
            for mode in ("none", "strict", "relaxed")}


def observations(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"agentview": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
             "wrist": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
             "proprio": rng.normal(size=8).astype(np.float32), "instruction": INSTRUCTION} for _ in range(n)]


def test_benchmark_reports_both_modes(engines):
    config = BenchConfig(observations=4, repetitions=2, warmup=1)
    metrics = benchmark(engines, observations(4), config, progress=False)
    for key in ("no_draft_ms", "draft_ms", "speedup", "speedup_p10", "speedup_p90", "device", "acceptance_mode",
                "token_acceptance", "action_mismatches", "near_ties"):
        assert key in metrics, key
    assert metrics["acceptance_mode"] == "strict" and metrics["observations"] == 4 and metrics["repetitions"] == 2
    assert metrics["speedup_p10"] <= metrics["speedup_p90"]
    noise = metrics["timing_noise"]  # no-draft decoding against itself
    assert set(noise) == {"speedup", "speedup_p10", "speedup_p90", "speedup_mean_per_observation"}
    assert 0 < noise["speedup_p10"] <= noise["speedup_p90"]
    assert metrics["speedup"] == pytest.approx(metrics["no_draft_ms"] / metrics["draft_ms"], rel=1e-3)
    for mode in ("strict", "relaxed"):
        m = metrics[mode]
        assert 0 <= m["token_acceptance"] <= 1 and len(m["token_acceptance_per_layer"]) == 3
        assert sum(m["accepted_layers_share"]) == pytest.approx(1.0)
        assert m["main_passes_per_chunk"] == pytest.approx(4 - m["accepted_layers_per_chunk"])
    assert metrics["strict"]["action_mismatches"] == metrics["near_ties"] == 0  # lossless
    assert metrics["token_acceptance"] == metrics["strict"]["token_acceptance"]
    assert metrics["relaxed"]["min_ratio"] == 0.1 and metrics["relaxed"]["mean_action_deviation"] >= 0
    # the acceptance sweep: one entry per ratio, from strict (1) to keep-all (0), kept layers never fewer
    sweep = metrics["acceptance_sweep"]
    assert [s["min_ratio"] for s in sweep] == config.min_ratios
    kept = [s["accepted_layers_per_chunk"] for s in sweep]
    assert kept == sorted(kept) and kept[-1] == 2 and sweep[-1]["max_action_deviation"] >= 0
    assert sweep[0]["token_mismatches"] == 0  # ratio 1 keeps only main's own choices
    # the call's breakdown, and main's one-layer pass beside the draft's call
    assert set(metrics["strict"]["breakdown_ms"]) == {"inputs", "prefill", "draft", "verify", "passes", "decode", "rest"}
    assert set(metrics["no_draft"]["breakdown_ms"]) == {"inputs", "prefill", "passes", "decode", "rest"}
    assert metrics["no_draft"]["layer_pass_ms"] > 0 and metrics["strict"]["draft_model_ms"] > 0
    assert set(metrics["draft_call_ms"]) == {"fp32", "bf16"} and min(metrics["draft_call_ms"].values()) > 0
    assert metrics["gate"]["strict"]["min_kept_layers"] == 0 and metrics["strict"]["speculated_share"] == 1.0  # ungated
    assert metrics["gate"]["strict"]["right_share"] + metrics["gate"]["strict"]["wasted_share"] == pytest.approx(1.0)
    assert metrics["break_even_layers"] == pytest.approx(
        (metrics["perfect"]["breakdown_ms"]["draft"] + metrics["perfect"]["breakdown_ms"]["verify"]
         - metrics["no_draft"]["layer_pass_ms"]) / metrics["no_draft"]["layer_pass_ms"], abs=1e-3)
    # the ceiling: a perfect draft has every proposed layer kept, at the real draft's cost
    perfect = metrics["perfect"]
    assert perfect["accepted_layers_per_chunk"] == 2 and perfect["main_passes_per_chunk"] == 2
    assert perfect["token_acceptance"] == 1.0 and perfect["draft_model_ms"] > 0
    assert metrics["speedup_perfect_draft"] == perfect["speedup"]


def test_benchmark_reports_how_the_gate_chose(engines):
    """With a gate, the bench says how often each draft mode speculated and how often that matched what
    speculating would have kept (the same engine ungated); a bar no draft can reach holds strict back on all but
    the probing calls, and strict stays exact on every call speculating."""
    from rsd.bench import variant
    from rsd.engine import PROBE_EVERY

    gated = {**engines, "strict": variant(engines["strict"], min_kept_layers=3.0)}  # more than K - 1 = 2 layers
    n = 2 * PROBE_EVERY
    metrics = benchmark(gated, observations(n), BenchConfig(observations=n, repetitions=1, warmup=0, min_ratios=[1.0]),
                        progress=False)
    gate = metrics["gate"]["strict"]
    # the first call speculates, then one call in PROBE_EVERY; warm-up off, the first timed round sees them
    assert gate["min_kept_layers"] == 3.0 and gate["speculated_share"] == pytest.approx(2 / n, abs=1e-4)
    assert metrics["strict"]["speculated_share"] == gate["speculated_share"]
    assert gate["right_share"] + gate["wasted_share"] + gate["missed_share"] <= 1.0 + 1e-9
    assert metrics["strict"]["action_mismatches"] == 0
    assert metrics["gate"]["relaxed"]["min_kept_layers"] == 0 and metrics["gate"]["relaxed"]["speculated_share"] == 1.0


def test_benchmark_refuses_missing_engines(engines):
    with pytest.raises(ValueError, match="missing relaxed"):
        benchmark({k: engines[k] for k in ("none", "strict")}, observations(1), BenchConfig())


def test_explain_difference_finds_the_first_differing_layer(engines):
    inputs = observations(1)[0]
    plain = engines["none"].predict(inputs).tokens
    assert explain_difference(engines["none"], inputs, plain, 1e-4) is None
    other = plain.clone()
    other[0, 0, 2] = (other[0, 0, 2] + 1) % 7
    layer, margin = explain_difference(engines["none"], inputs, other, 1e-4)
    assert layer == 2 and margin > 0


def test_quotas_spread_observations_over_tasks():
    assert _quotas(10, [0, 1, 2], {0: 100, 1: 100, 2: 100}) == {0: 4, 1: 3, 2: 3}
    assert _quotas(10, [0, 1], {0: 2, 1: 100}) == {0: 2, 1: 8}
    assert _quotas(10, [0, 1], {0: 2, 1: 3}) == {0: 2, 1: 3}


@pytest.mark.parametrize("field,value", [("observations", 0), ("repetitions", 0), ("warmup", -1), ("tasks", [10]),
                                         ("near_tie_margin", 0), ("execute_steps", 9), ("min_ratios", [0.5, 2])])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"bench.{field}"):
        BenchConfig(**{field: value})


def test_observations_file_round_trip(tmp_path):
    path = tmp_path / "observations.npz"
    written = observations(3)
    save_observations(path, written)
    read = load_observations(path)
    assert len(read) == 3
    for a, b in zip(written, read):
        assert a["instruction"] == b["instruction"]
        for key in ("agentview", "wrist", "proprio"):
            assert b[key].dtype == a[key].dtype and np.array_equal(a[key], b[key])


def test_observations_file_refuses_garbage(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="text.npz is not an observations file"):
        load_observations(text)
    wrong = tmp_path / "wrong.npz"
    arrays = {k: np.stack([o[k] for o in observations(2)]) for k in ("agentview", "wrist", "proprio")}
    np.savez(wrong, instruction=np.array([INSTRUCTION] * 2), **{**arrays, "proprio": arrays["proprio"].astype(np.float64)})
    with pytest.raises(ValueError, match="wrong.npz .*proprio is float64"):
        load_observations(wrong)


def test_rsd_bench_times_checkpoints_from_a_file(tmp_path):
    """`rsd bench --observations`: the checkpoints and recorded inputs alone, no simulator."""
    from test_checkpoints import H, save_draft
    from typer.testing import CliRunner

    from rsd.cli import app
    from rsd.policy.config import BackboneConfig

    torch.manual_seed(0)
    RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).save(tmp_path / "tokenizer.pt")
    backbone = BackboneConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=2, max_position_embeddings=64)
    config = PolicyConfig(vocab=build_vocab([INSTRUCTION]), max_instruction_words=12, image_size=32,
                          vision_channels=(8, 16), vision_grid=2, num_layers=4, backbone=backbone)
    MainPolicy(config, RFSQTokenizer.load(tmp_path / "tokenizer.pt").fingerprint()).save(tmp_path / "policy.pt")
    save_draft(tmp_path / "draft.pt")
    save_observations(tmp_path / "obs.npz", observations(3))
    (tmp_path / "params.yaml").write_text("bench: {repetitions: 2, warmup: 1}\neval: {min_ratio: 0.05}\n")
    args = ["bench", "--label", "tiny", "--observations", str(tmp_path / "obs.npz"), "--policy", str(tmp_path / "policy.pt"),
            "--tokenizer", str(tmp_path / "tokenizer.pt"), "--draft", str(tmp_path / "draft.pt"),
            "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out.json").read_text())
    eager = metrics["eager"]
    assert metrics["observations"] == eager["observations"] == 3 and "compiled" not in metrics
    assert metrics["checkpoints"] == "tiny" and len(metrics["checkpoint_sha256"]["policy"]) == 64
    assert eager["action_mismatches"] == 0 and eager["relaxed"]["min_ratio"] == 0.05 and eager["repetitions"] == 2
    refused = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "x.json"), "--device", "tpu"])
    assert refused.exit_code != 0 and "expected cpu or cuda" in refused.output
    assert not (tmp_path / "x.json").exists()
