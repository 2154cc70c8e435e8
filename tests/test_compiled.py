"""The compiled path's static-cache passes decode what the dynamic cache decodes (run eagerly on the CPU:
the same code `torch.compile` captures on a GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd.compiled import CompiledPolicy, compiled_engines
from rsd.draft.config import DraftConfig
from rsd.draft.model import RFSQDraftModelWithProjection
from rsd.engine import EngineConfig, RSDEngine
from rsd.policy.config import PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "pick up the bowl"]


@pytest.fixture(scope="module")
def parts() -> tuple[MainPolicy, RFSQTokenizer, RFSQDraftModelWithProjection]:
    torch.manual_seed(0)
    policy = MainPolicy(PolicyConfig(vocab=build_vocab(INSTRUCTIONS), num_layers=4, max_instruction_words=12)).eval()
    tokenizer = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()
    draft = RFSQDraftModelWithProjection(DraftConfig(input_dim=policy.config.backbone.hidden_size, hidden_dim=64)).eval()
    return policy, tokenizer, draft


def observation(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"agentview": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "wrist": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "proprio": rng.normal(size=8).astype(np.float32),
            "instruction": INSTRUCTIONS[seed % 2]}


def test_static_cache_logits_equal_dynamic_cache(parts):
    """Layer by layer, on a padded prompt: the same logits as the dynamic cache, so the same codes."""
    policy, tokenizer, _ = parts
    plain = RSDEngine(policy, tokenizer)
    static = RSDEngine(CompiledPolicy(policy, compile=False), tokenizer)
    for seed in range(4):
        expected, found = plain.plain_logits(observation(seed)), static.plain_logits(observation(seed))
        assert found.shape == expected.shape == (4, 128, 7)
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(found.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("mode", ["none", "strict", "relaxed"])
def test_compiled_engines_decode_as_eager(parts, mode):
    """Every mode, the cache cut back after rejected draft layers included: the tokens of the dynamic-cache
    engine, and (strict) of no-draft decoding."""
    policy, tokenizer, draft = parts
    eager = {mode: RSDEngine(policy, tokenizer, None if mode == "none" else draft, EngineConfig(mode=mode)),
             "none": RSDEngine(policy, tokenizer)}
    static = compiled_engines(eager, max_words=11, compile=False)
    assert static[mode].policy is static["none"].policy  # one compiled policy for engines sharing a policy
    for seed in range(4):
        inputs = observation(seed)
        a, b = eager[mode].predict(inputs), static[mode].predict(inputs)
        assert torch.equal(a.tokens, b.tokens)
        assert a.stats.get("accepted_layers") == b.stats.get("accepted_layers")
        np.testing.assert_allclose(a.chunk, b.chunk, atol=1e-6)
        if mode == "strict":
            assert torch.equal(b.tokens, static["none"].predict(inputs).tokens)


def test_compiled_policy_refusals(parts):
    policy, tokenizer, _ = parts
    with pytest.raises(ValueError, match=r"max_words must be in 1\.\.12"):
        CompiledPolicy(policy, max_words=13, compile=False)
    short = CompiledPolicy(policy, max_words=4, compile=False)
    with pytest.raises(ValueError, match="an instruction of 11 words does not fit .* of 4 words"):
        short.encode_instructions([INSTRUCTIONS[0]])
    static = CompiledPolicy(policy, compile=False)
    obs = RSDEngine(static, tokenizer)._batch(observation(1))
    _, logits0, old = static.prefill(obs)
    static.prefill(obs)
    with pytest.raises(ValueError, match="not the compiled policy's current one"):
        static.step(logits0.argmax(-1), 1, old)
    _, logits0, cache = static.prefill(obs)
    with pytest.raises(ValueError, match="crop it first"):
        static.step(logits0.argmax(-1), 2, cache)
