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

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proposal


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
    assert torch.equal(lean.propose(hidden), draft.propose(hidden))
    assert isinstance(proposer(draft).__self__, LeanDraft)
    scripted = ScriptedDraft(96, torch.zeros(1, 3, 128, dtype=torch.long))
    assert LeanDraft.from_draft(scripted) is None and proposer(scripted) == scripted.propose  # the module's own


def test_relaxed_accepts_codes_within_tolerance(parts):
    policy, tokenizer = parts
    inputs = observation(10)
    truth = plain_codes(policy, tokenizer, inputs)
    proposal = truth[:, :3].clone()
    layer1 = proposal[:, 1, :5]
    proposal[:, 1, :5] = torch.where(layer1 < 6, layer1 + 1, layer1 - 1)  # five codes one level off
    proposal[:, 2, 7] = (proposal[:, 2, 7] + 3) % 7  # three or four levels off: beyond the tolerance
    relaxed = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode="relaxed", tolerance=1))
    strict = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode="strict"))
    kept = relaxed.predict(inputs)
    assert kept.stats["accepted_layers"] == 1 and kept.stats["main_passes"] == 3
    # the codes decoded are main's own: layer 1 exactly no-draft's, later layers conditioned on the draft's
    assert torch.equal(kept.tokens[..., :2].flatten(0, 1).T, truth[0, :2])
    assert strict.predict(inputs).stats["accepted_layers"] == 0


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
    with pytest.raises(ValueError, match="eval.tolerance must be an int, got 1.5"):
        EngineConfig(mode="relaxed", tolerance=1.5)


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
                       + ".*retrain the policy on this one, `dvc repro policy`"):
        load_engine(str(tmp_path / "policy.pt"), str(tmp_path / "other.pt"), None, EngineConfig())


def test_eval_params_configure_the_draft_engines():
    config = EvalConfig(tolerance=2, draft_precision="bf16", init_states=6)
    engine = config.engine_config("relaxed")
    assert (engine.mode, engine.tolerance, engine.draft_precision) == ("relaxed", 2, "bf16")
    assert EvalConfig().engine_config("strict") == EngineConfig(mode="strict", tolerance=1, draft_precision="auto")
    with pytest.raises(ValueError, match="eval.tolerance must be a non-negative int, got -1"):
        EvalConfig(tolerance=-1)
    with pytest.raises(ValueError, match="eval.draft_precision must be one of auto, fp32, bf16, got 'int8'"):
        EvalConfig(draft_precision="int8")
    with pytest.raises(ValueError, match="eval.mode must be one of none, strict, relaxed, got 'fast'"):
        EvalConfig().engine_config("fast")
