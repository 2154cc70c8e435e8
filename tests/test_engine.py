"""The RSD engine: speculative decoding must reproduce no-draft decoding in strict mode, whatever the draft says."""
from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rsd.engine import EngineConfig, RSDEngine, load_engine
from rsd.evaluation import EvalConfig
from rsd.policy.config import PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

INSTRUCTION = "pick up the black bowl and place it on the plate"


class ScriptedDraft(torch.nn.Module):
    """A stand-in draft that proposes given codes, to drive every acceptance path on purpose."""

    def __init__(self, hidden: int, proposal: torch.Tensor) -> None:
        super().__init__()
        self.config = SimpleNamespace(input_dim=hidden, num_coarse_layers=proposal.shape[1], hidden_dim=512)
        self.proposal = proposal

    def logits(self, hidden: torch.Tensor, layer0: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.proposal, 7).float()


@pytest.fixture(scope="module")
def parts() -> tuple[MainPolicy, RFSQTokenizer]:
    torch.manual_seed(0)
    policy = MainPolicy(PolicyConfig(vocab=build_vocab([INSTRUCTION]), num_layers=4)).eval()
    tokenizer = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()
    return policy, tokenizer


def observation(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "agentview": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.normal(size=8).astype(np.float32),
        "instruction": INSTRUCTION,
    }


def plain_codes(policy: MainPolicy, tokenizer: RFSQTokenizer, inputs: dict) -> torch.Tensor:
    return RSDEngine(policy, tokenizer).predict(inputs).tokens.flatten(0, 1).T[None]  # [1, L, 128]


@pytest.mark.parametrize("wrong_layers,expected_accepted", [((), 2), ((2,), 1), ((1,), 0), ((0,), 2), ((0, 1, 2), 0)])
def test_strict_speculation_equals_plain_decoding(parts, wrong_layers, expected_accepted):
    """A draft wrong on `wrong_layers`: same actions as no draft; main passes saved = draft layers 1.. kept.
    Layer 0 always comes from main's prefill, so a wrong draft layer 0 costs nothing."""
    policy, tokenizer = parts
    inputs = observation(len(wrong_layers) * 10 + sum(wrong_layers))
    truth = plain_codes(policy, tokenizer, inputs)  # [1, 4, 128]
    proposal = truth[:, :3].clone()
    for layer in wrong_layers:
        proposal[:, layer] = (proposal[:, layer] + 1) % 7
    engine = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode="strict"))
    spec, plain = engine.predict(inputs), RSDEngine(policy, tokenizer).predict(inputs)
    chunk, stats, plain_stats = spec.chunk, spec.stats, plain.stats
    assert torch.equal(spec.tokens, plain.tokens) and np.array_equal(chunk, plain.chunk)
    assert torch.equal(spec.hidden_state, plain.hidden_state) and spec.hidden_state.shape == (256,)
    assert stats["accepted_layers"] == expected_accepted
    assert stats["main_passes"] == 4 - expected_accepted and plain_stats["main_passes"] == 4
    for layer in range(3):  # token acceptance is measured against main's own codes
        assert stats[f"token_acceptance_L{layer}"] == (0.0 if layer in wrong_layers else 1.0)
    assert chunk.shape == (8, 7)


def test_lean_draft_matches_the_draft_model():
    """The draft's inference form computes the draft model's logits (to float rounding) with less work."""
    from rsd.draft.model import LeanDraft, RFSQDraftModelWithProjection, proposer

    torch.manual_seed(1)
    draft = RFSQDraftModelWithProjection(96, hidden_dim=64, num_heads=4, ff_dim=128).eval()
    lean = LeanDraft.from_draft(draft)
    assert lean is not None
    hidden = torch.randn(5, 96)
    with torch.no_grad():
        expected = draft(hidden)
    assert torch.allclose(lean.logits(hidden), expected, atol=1e-5)
    assert torch.equal(lean.logits(hidden).argmax(-1), draft.propose(hidden))
    assert isinstance(proposer(draft).__self__, LeanDraft)
    scripted = ScriptedDraft(96, torch.zeros(1, 3, 128, dtype=torch.long))
    assert LeanDraft.from_draft(scripted) is None and proposer(scripted) == scripted.logits  # the stand-in's own


def test_a_draft_conditioned_on_layer0_reads_it_and_its_lean_form_agrees():
    from rsd.draft.model import LeanDraft, RFSQDraftModelWithProjection

    torch.manual_seed(2)
    draft = RFSQDraftModelWithProjection(96, hidden_dim=64, num_heads=4, ff_dim=128, condition_on_layer0=True).eval()
    hidden, layer0 = torch.randn(3, 96), torch.randint(0, 7, (3, 128))
    lean = LeanDraft.from_draft(draft)
    assert lean is not None
    with torch.no_grad():
        expected = draft(hidden, layer0)
        other = draft(hidden, (layer0 + 1) % 7)
    assert expected.shape == (3, 3, 128, 7) and not torch.allclose(expected, other)  # layer 0 moves the logits
    assert torch.allclose(lean.logits(hidden, layer0), expected, atol=1e-5)
    with pytest.raises(ValueError, match="reads main's layer-0 codes"):
        draft(hidden)
    plain = RFSQDraftModelWithProjection(96, hidden_dim=64, num_heads=4, ff_dim=128)
    assert "layer0_embed.weight" not in plain.state_dict()  # the seed's draft keeps its keys


def _second_choice(logits: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, float]:
    """Layer logits [128, 7] -> main's second choice at `positions` (its top choice elsewhere), and the least
    probability ratio second / top among them."""
    top2 = logits.topk(2, dim=-1)
    codes = top2.indices[:, 0].clone()
    codes[positions] = top2.indices[positions, 1]
    ratios = (top2.values[positions, 1] - top2.values[positions, 0]).exp()
    return codes, float(ratios.min())


def test_relaxed_keeps_a_layer_whose_codes_main_finds_plausible(parts):
    """min_ratio moves acceptance from strict (1) to keep-all (0): a layer with some codes at main's second choice is
    kept exactly when the least of their probability ratios reaches it."""
    policy, tokenizer = parts
    inputs = observation(10)
    plain_engine = RSDEngine(policy, tokenizer)
    logits = plain_engine.plain_logits(inputs)  # [4, 128, 7], no-draft decoding's
    truth = logits.argmax(-1)[None]  # [1, 4, 128]
    proposal = truth[:, :3].clone()
    proposal[0, 1], ratio = _second_choice(logits[1], [3, 40, 77, 100, 127])  # five codes at main's second choice
    proposal[0, 2, 9] = logits[2, 9].argmin()  # main's least likely code: only keep-all keeps layer 2

    def run(mode: str, min_ratio: float) -> dict:
        engine = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode=mode, min_ratio=min_ratio))
        return engine.predict(inputs)

    kept = run("relaxed", ratio * 0.9)
    assert kept.stats["accepted_layers"] == 1 and kept.stats["main_passes"] == 3
    # the codes decoded are main's own: layer 1 exactly no-draft's, later layers conditioned on the draft's
    assert torch.equal(kept.tokens[..., :2].flatten(0, 1).T, truth[0, :2])
    assert run("relaxed", min(1.0, ratio * 1.1)).stats["accepted_layers"] == 0
    assert run("relaxed", 1.0).stats["accepted_layers"] == 0 == run("strict", 0.0).stats["accepted_layers"]
    assert run("relaxed", 0.0).stats["accepted_layers"] == 2  # every proposal


def test_the_gate_holds_speculation_back_while_it_does_not_pay(parts):
    """While main keeps fewer draft layers per speculating call than min_kept_layers (on the episode's running
    average), calls decode as without a draft, not even running it: same tokens, every main pass, no verify pass;
    a probing call still speculates, the PROBE_EVERY-th at first, each probe that keeps nothing doubling the wait
    up to MAX_PROBE_EVERY, and reset() (a new episode) starts over."""
    from rsd.engine import MAX_PROBE_EVERY, PROBE_EVERY

    policy, tokenizer = parts
    inputs = observation(11)
    truth = plain_codes(policy, tokenizer, inputs)
    wrong = truth[:, :3].clone()
    wrong[0, 1:] = (wrong[0, 1:] + 1) % 7  # layers 1 and 2 wrong everywhere: strict keeps nothing
    config = EngineConfig(mode="strict", min_kept_layers=0.5)
    engine = RSDEngine(policy, tokenizer, ScriptedDraft(256, wrong), config)
    waits = [min(PROBE_EVERY * 2 ** i, MAX_PROBE_EVERY) for i in range(5)]  # 7, 14, 28, 56, 56
    assert waits[-2:] == [MAX_PROBE_EVERY] * 2
    runs = [engine.predict(inputs) for _ in range(1 + sum(waits))]
    went = [p.stats["speculated"] for p in runs]
    assert went == [1] + sum(([0] * (wait - 1) + [1] for wait in waits), [])
    held = runs[1]
    assert held.stats["main_passes"] == 4 and held.stats["verify_ms"] == 0.0 and "token_acceptance" not in held.stats
    for prediction in runs:
        assert torch.equal(prediction.tokens.flatten(0, 1).T[None], truth)
    engine.reset()
    assert engine.predict(inputs).stats["speculated"] == 1
    # a draft that pays keeps the gate open: every call speculates
    paying = RSDEngine(policy, tokenizer, ScriptedDraft(256, truth[:, :3]), config)
    assert [paying.predict(inputs).stats["accepted_layers"] for _ in range(3)] == [2, 2, 2]
    # probes that keep a layer, though too few for the bar, keep probing every PROBE_EVERY-th call
    one_right = truth[:, :3].clone()
    one_right[0, 2] = (one_right[0, 2] + 1) % 7
    short = RSDEngine(policy, tokenizer, ScriptedDraft(256, one_right), EngineConfig(mode="strict", min_kept_layers=1.5))
    runs = [short.predict(inputs) for _ in range(1 + 3 * PROBE_EVERY)]
    assert [p.stats["speculated"] for p in runs] == [1] + ([0] * (PROBE_EVERY - 1) + [1]) * 3
    assert {p.stats["accepted_layers"] for p in runs if p.stats["speculated"]} == {1}


def test_a_call_reports_where_its_time_went(parts):
    policy, tokenizer = parts
    inputs = observation(12)
    truth = plain_codes(policy, tokenizer, inputs)
    for engine, spans in ((RSDEngine(policy, tokenizer), ("inputs", "prefill", "passes", "decode")),
                          (RSDEngine(policy, tokenizer, ScriptedDraft(256, truth[:, :3]), EngineConfig(mode="strict")),
                           ("inputs", "prefill", "draft", "verify", "passes", "decode"))):
        stats = engine.predict(inputs).stats
        times = [stats[f"{name}_ms"] for name in spans]
        assert all(t >= 0 for t in times) and sum(times) <= stats["total_ms"]
        assert stats["main_ms"] == pytest.approx(stats["prefill_ms"] + stats.get("verify_ms", 0.0) + stats["passes_ms"])


def test_engine_refuses_mismatched_parts(parts):
    policy, tokenizer = parts
    with pytest.raises(ValueError, match="needs a draft"):
        RSDEngine(policy, tokenizer, None, EngineConfig(mode="strict"))
    with pytest.raises(ValueError, match="hidden states of size 128"):
        RSDEngine(policy, tokenizer, ScriptedDraft(128, torch.zeros(1, 3, 128, dtype=torch.long)), EngineConfig(mode="strict"))
    with pytest.raises(ValueError, match="eval.mode must be one of none, strict, relaxed, got 'fast'"):
        EngineConfig(mode="fast")
    with pytest.raises(ValueError, match="eval.draft_precision must be one of auto, fp32, bf16, got 'fp16'"):
        EngineConfig(mode="strict", draft_precision="fp16")
    with pytest.raises(ValueError, match=re.escape("eval.min_ratio must be a number in [0, 1], got 1.5")):
        EngineConfig(mode="relaxed", min_ratio=1.5)
    with pytest.raises(ValueError, match=re.escape("eval.min_kept_layers must be a non-negative number, got -0.1")):
        EngineConfig(mode="strict", min_kept_layers=-0.1)


def test_engine_refuses_a_tokenizer_the_policy_was_not_trained_on(parts, tmp_path):
    """Same shapes, another tokenizer (another run's): every shape check passes, the fingerprint does not."""
    policy, tokenizer = parts
    torch.manual_seed(1)
    other = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()
    trained = copy.deepcopy(policy)
    trained.tokenizer_fingerprint = tokenizer.fingerprint()  # as train_policy records it
    RSDEngine(trained, tokenizer)  # its own tokenizer: accepted
    expected, found = tokenizer.fingerprint()[:12], other.fingerprint()[:12]
    with pytest.raises(ValueError, match=re.escape(f"the main policy was trained with tokenizer {expected}, but the "
                                                   f"tokenizer is tokenizer {found} (sha256 of its checkpoint)")):
        RSDEngine(trained, other)

    trained.save(tmp_path / "policy.pt")
    tokenizer.save(tmp_path / "tokenizer.pt")
    other.save(tmp_path / "other.pt")
    engine = load_engine(str(tmp_path / "policy.pt"), str(tmp_path / "tokenizer.pt"), None, EngineConfig())
    assert engine.policy.tokenizer_fingerprint == tokenizer.fingerprint()
    with pytest.raises(ValueError, match=re.escape(f"main policy {tmp_path / 'policy.pt'} was trained with tokenizer "
                                                   f"{expected}, but {tmp_path / 'other.pt'} is tokenizer {found}")
                       + ".*retrain the policy on this one, `dvc repro dagger`"):
        load_engine(str(tmp_path / "policy.pt"), str(tmp_path / "other.pt"), None, EngineConfig())


def test_eval_params_configure_the_draft_engines():
    config = EvalConfig(min_ratio=0.05, min_kept_layers=0.2, draft_precision="bf16", init_states=6)
    engine = config.engine_config("relaxed")
    assert (engine.mode, engine.min_ratio, engine.min_kept_layers, engine.draft_precision) == ("relaxed", 0.05, 0.2, "bf16")
    assert EngineConfig.for_mode({"min_ratio": 0.05, "min_kept_layers": 0.2, "draft_precision": "bf16", "workers": 2},
                                 "relaxed") == engine  # the eval section as data: its other keys are not the engine's
    assert EvalConfig().engine_config("strict") == EngineConfig(mode="strict", min_ratio=0.1, draft_precision="fp32")
    with pytest.raises(ValueError, match=re.escape("eval.min_ratio must be a number in [0, 1], got -1")):
        EvalConfig(min_ratio=-1)
    with pytest.raises(ValueError, match="eval.draft_precision must be one of auto, fp32, bf16, got 'int8'"):
        EvalConfig(draft_precision="int8")
    with pytest.raises(ValueError, match="eval.mode must be one of none, strict, relaxed, got 'fast'"):
        EvalConfig().engine_config("fast")
