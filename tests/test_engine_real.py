"""Strict speculation over real LIBERO observations: the tokens, hence the actions, of no-draft decoding.

Rendered camera images and proprio from a libero_spatial scene, a small random-initialised main policy,
and drafts that are right on some layers and wrong on others (main's own codes, some changed), plus a
real, untrained draft model. Any token difference must trace to a floating-point near-tie: a top-2
logit margin below 1e-4 in no-draft decoding.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rsd.bench import explain_difference
from rsd.draft.model import RFSQDraftModelWithProjection
from rsd.engine import EngineConfig, RSDEngine
from rsd.policy.config import PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.policy.config import BackboneConfig
from rsd.sim.env import LiberoEnv, SimConfig
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

TASK = 0
STEPS = 8  # observations: the settled scene, then one per step of a short reach
NEAR_TIE = 1e-4
# which draft layers are right, per observation: every acceptance path, cycled
PATTERNS = [(0, 1, 2), (1, 2), (0, 1), (0, 2), (), (1,), (0, 1, 2), (2,)]


class ForcedDraft(torch.nn.Module):
    """Proposes main's own codes on the layers the current pattern names and changed codes elsewhere."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(input_dim=hidden, num_coarse_layers=3, hidden_dim=512)
        self.proposal = torch.zeros(1, 3, 128, dtype=torch.long)

    def logits(self, hidden: torch.Tensor, layer0: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.proposal, 7).float()


@pytest.fixture(scope="module")
def observations() -> list[dict]:
    """Real policy inputs: a fresh placement of task 0, then a short scripted reach."""
    with LiberoEnv(TASK, SimConfig(image_size=128)) as env:
        obs = env.reset(seed=123)
        out = [env.model_inputs(obs)]
        for step in range(STEPS - 1):
            action = np.array([0.4, -0.3 + 0.1 * step, -0.2, 0.0, 0.0, 0.05 * step, -1.0 if step < 4 else 1.0])
            obs, _ = env.step(action)
            out.append(env.model_inputs(obs))
    return out


@pytest.fixture(scope="module")
def parts(observations) -> tuple[MainPolicy, RFSQTokenizer]:
    torch.manual_seed(0)
    config = PolicyConfig(vocab=build_vocab([observations[0]["instruction"]]), num_layers=4, vision_grid=4,
                          backbone=BackboneConfig(hidden_size=192, intermediate_size=512))
    policy = MainPolicy(config).eval()
    tokenizer = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()
    return policy, tokenizer


def _check_same_or_near_tie(plain_engine: RSDEngine, inputs: dict, plain, spec) -> int:
    """1 if the tokens differ by a near-tie, 0 if equal; fails on any other difference."""
    if torch.equal(spec.tokens, plain.tokens):
        assert np.array_equal(spec.chunk, plain.chunk)
        return 0
    layer, margin = explain_difference(plain_engine, inputs, spec.tokens, NEAR_TIE)
    assert margin < NEAR_TIE, f"strict tokens differ from no-draft at layer {layer} with top-2 margin {margin:.2e}"
    return 1


def test_strict_mode_decodes_no_draft_tokens_on_real_observations(parts, observations):
    policy, tokenizer = parts
    plain_engine = RSDEngine(policy, tokenizer)
    draft = ForcedDraft(policy.config.backbone.hidden_size)
    strict = RSDEngine(policy, tokenizer, draft, EngineConfig(mode="strict"))
    generator = torch.Generator().manual_seed(0)
    near_ties, accepted = 0, []
    for i, inputs in enumerate(observations):
        plain = plain_engine.predict(inputs)
        truth = plain.tokens.flatten(0, 1).T[None, :3]  # [1, 3, 128] main's coarse codes
        proposal = truth.clone()
        for layer in set(range(3)) - set(PATTERNS[i % len(PATTERNS)]):
            changed = torch.rand(128, generator=generator) < 0.2
            changed[int(torch.randint(128, (1,), generator=generator))] = True
            proposal[0, layer, changed] = (proposal[0, layer, changed] + 1) % 7
        draft.proposal = proposal
        spec = strict.predict(inputs)
        near_ties += _check_same_or_near_tie(plain_engine, inputs, plain, spec)
        accepted.append(spec.stats["accepted_layers"])
        assert spec.stats["main_passes"] == 4 - spec.stats["accepted_layers"]
    assert near_ties <= len(observations) // 4, f"{near_ties} near-ties in {len(observations)} observations"
    assert {0, 1, 2} <= set(accepted), f"acceptance paths not all exercised: {accepted}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_strict_mode_with_a_real_draft_model(parts, observations, precision):
    """The draft model class itself (through the engine's lean path), untrained, in either precision: strict
    decoding is unchanged, and the caller's draft model is left in float32."""
    policy, tokenizer = parts
    torch.manual_seed(1)
    draft = RFSQDraftModelWithProjection(policy.config.backbone.hidden_size, hidden_dim=128, num_heads=4, ff_dim=256)
    plain_engine = RSDEngine(policy, tokenizer)
    strict = RSDEngine(policy, tokenizer, draft, EngineConfig(mode="strict", draft_precision=precision))
    assert strict._draft_logits.__self__.__class__.__name__ == "LeanDraft"
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert strict.draft.input_projection.weight.dtype == expected
    assert draft.input_projection.weight.dtype == torch.float32
    near_ties = 0
    for inputs in observations[:4]:
        plain, spec = plain_engine.predict(inputs), strict.predict(inputs)
        near_ties += _check_same_or_near_tie(plain_engine, inputs, plain, spec)
        assert 0 <= spec.stats["token_acceptance"] <= 1 and spec.stats["draft_ms"] > 0
    assert near_ties <= 1
