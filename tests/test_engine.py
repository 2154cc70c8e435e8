"""The RSD engine: speculative decoding must reproduce no-draft decoding in strict mode, whatever the draft says."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rsd.engine import EngineConfig, RSDEngine
from rsd.policy import MainPolicy, PolicyConfig, build_vocab
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


@pytest.mark.parametrize("correct_layers,expected_passes", [(3, 2), (2, 3), (1, 4), (0, 4)])
def test_strict_speculation_equals_plain_decoding(parts, correct_layers, expected_passes):
    """A draft right on its first `correct_layers` layers: same actions as no draft, fewer main passes."""
    policy, tokenizer = parts
    inputs = observation(correct_layers)
    truth = plain_codes(policy, tokenizer, inputs)  # [1, 4, 128]
    proposal = truth[:, :3].clone()
    if correct_layers < 3:
        proposal[:, correct_layers] = (proposal[:, correct_layers] + 1) % 7  # wrong from here on
    engine = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode="strict"))
    spec, plain = engine.predict(inputs), RSDEngine(policy, tokenizer).predict(inputs)
    chunk, stats, plain_stats = spec.chunk, spec.stats, plain.stats
    assert torch.equal(spec.tokens, plain.tokens) and np.array_equal(chunk, plain.chunk)
    assert torch.equal(spec.hidden_state, plain.hidden_state) and spec.hidden_state.shape == (256,)
    assert stats["accepted_layers"] == correct_layers
    assert stats["main_passes"] == expected_passes and plain_stats["main_passes"] == 4
    assert chunk.shape == (8, 7)


def test_relaxed_accepts_codes_within_tolerance(parts):
    policy, tokenizer = parts
    inputs = observation(10)
    truth = plain_codes(policy, tokenizer, inputs)
    proposal = truth[:, :3].clone()
    first = proposal[:, 0, :5]
    proposal[:, 0, :5] = torch.where(first < 6, first + 1, first - 1)  # five codes one level off
    relaxed = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode="relaxed", tolerance=1))
    strict = RSDEngine(policy, tokenizer, ScriptedDraft(256, proposal), EngineConfig(mode="strict"))
    assert relaxed.predict(inputs).stats["accepted_layers"] == 3
    assert strict.predict(inputs).stats["accepted_layers"] == 0


def test_engine_refuses_mismatched_parts(parts):
    policy, tokenizer = parts
    with pytest.raises(ValueError, match="needs a draft"):
        RSDEngine(policy, tokenizer, None, EngineConfig(mode="strict"))
    with pytest.raises(ValueError, match="hidden states of size 128"):
        RSDEngine(policy, tokenizer, ScriptedDraft(128, torch.zeros(1, 3, 128, dtype=torch.long)), EngineConfig(mode="strict"))
    with pytest.raises(ValueError, match="engine mode"):
        EngineConfig(mode="fast")
