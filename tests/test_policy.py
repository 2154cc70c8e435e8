"""Main policy: cached decoding equals recomputation, batching/padding is invisible, 7B shape, training,
checkpoints and config validation. Small random-weight models, random images made here."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rsd.policy import BackboneConfig, MainPolicy, PolicyConfig, build_vocab
from rsd.policy.config import UNK_ID

torch.set_num_threads(1)

INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the bowl",
]
L = 5


def small_config(**changes) -> PolicyConfig:
    backbone = BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)
    base = dict(vocab=build_vocab(INSTRUCTIONS), max_instruction_words=20, image_size=32, vision_channels=(8, 16),
                vision_grid=2, num_layers=L, backbone=backbone)
    return PolicyConfig(**{**base, **changes})


def make_obs(model: MainPolicy, instructions: list[str], size: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = len(instructions)
    return {
        "agentview": torch.randint(0, 256, (B, size, size, 3), dtype=torch.uint8, generator=g),
        "wrist": torch.randint(0, 256, (B, size, size, 3), dtype=torch.uint8, generator=g),
        "proprio": torch.randn(B, 8, generator=g),
        **model.encode_instructions(instructions),
    }


def layer_codes(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, 8, 16, L] -> codes [B, L, 128]."""
    return tokens.flatten(1, 2).transpose(1, 2)


@pytest.fixture(scope="module")
def model() -> MainPolicy:
    torch.manual_seed(0)
    return MainPolicy(small_config()).eval()


@pytest.fixture(scope="module")
def obs(model: MainPolicy) -> dict[str, torch.Tensor]:
    return make_obs(model, INSTRUCTIONS)


def test_shapes(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    B, H = len(INSTRUCTIONS), model.config.backbone.hidden_size
    hidden, logits0, cache = model.prefill(obs)
    assert hidden.shape == (B, H) and logits0.shape == (B, 128, 7)
    assert model.step(logits0.argmax(-1), 1, cache).shape == (B, 128, 7)
    assert model.step_many(torch.zeros(B, 3, 128, dtype=torch.long), 1, cache).shape == (B, 3, 128, 7)
    tokens = model.generate(obs)
    assert tokens.shape == (B, 8, 16, L) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() <= 6
    assert model.forward_teacher(obs, tokens).shape == (B, L, 128, 7)


def test_cached_generate_equals_recompute(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    tokens = model.generate(obs)
    with torch.no_grad():
        teacher = model.forward_teacher(obs, tokens)  # one pass, no cache
    assert torch.equal(teacher.argmax(-1), layer_codes(tokens))
    _, logits0, cache = model.prefill(obs)
    stepped = [logits0] + [model.step(layer_codes(tokens)[:, l - 1], l, cache) for l in range(1, L)]
    torch.testing.assert_close(torch.stack(stepped, 1), teacher, rtol=0, atol=1e-5)


def test_step_many_equals_single_steps_and_crop(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    codes = layer_codes(model.generate(obs))  # [B, L, 128]
    _, _, cache = model.prefill(obs)
    prompt = cache.num_positions
    singles = torch.stack([model.step(codes[:, l - 1], l, cache) for l in range(1, L)], 1)  # layers 1..L-1
    assert cache.num_positions == prompt + L - 1

    cache.crop(prompt)
    many = model.step_many(codes[:, : L - 1], 0, cache)  # one pass, L-1 positions
    torch.testing.assert_close(many, singles, rtol=0, atol=1e-5)

    cache.crop(prompt + 2)  # keep layers 0 and 1 fed, as after a partly accepted draft
    again = model.step_many(codes[:, 2:4], 2, cache)
    torch.testing.assert_close(again, singles[:, 2:4], rtol=0, atol=1e-5)
    assert cache.num_positions == prompt + 4


def test_cache_misuse_is_refused(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    _, logits0, cache = model.prefill(obs)
    codes = logits0.argmax(-1)
    with pytest.raises(ValueError, match="crop it first"):
        model.step(codes, 2, cache)  # layer 1 was never fed
    with pytest.raises(ValueError, match="cannot feed layers"):
        model.step_many(codes[:, None].expand(-1, L, -1), 0, cache)  # layer L does not exist
    with pytest.raises(ValueError, match="codes must lie"):
        model.step(codes + 7, 1, cache)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(cache.prompt_length - 1)


def test_batching_and_left_padding_are_invisible(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    hidden, _, _ = model.prefill(obs)
    tokens = model.generate(obs)
    for i, text in enumerate(INSTRUCTIONS):  # alone, each instruction is unpadded
        single = {k: v[i : i + 1] for k, v in obs.items()} | model.encode_instructions([text])
        torch.testing.assert_close(model.prefill(single)[0][0], hidden[i], rtol=0, atol=1e-5)
        assert torch.equal(model.generate(single)[0], tokens[i])


def test_encode_instructions(model: MainPolicy) -> None:
    enc = model.encode_instructions(["Pick up the bowl.", "pick up the purple bowl"])
    ids, mask = enc["instruction_ids"], enc["instruction_mask"]
    assert ids.shape == mask.shape == (2, 5)
    assert mask[0].tolist() == [0, 1, 1, 1, 1] and mask[1].tolist() == [1] * 5
    assert ids[1, 3] == UNK_ID and (ids[0, 1:] == ids[1, [0, 1, 2, 4]]).all()
    with pytest.raises(ValueError, match="max_instruction_words"):
        model.encode_instructions(["bowl " * 21])


def test_llama2_7b_shape_builds_on_meta() -> None:
    config = PolicyConfig(vocab=build_vocab(INSTRUCTIONS), backbone=BackboneConfig.llama2_7b())
    with torch.device("meta"):
        model = MainPolicy(config)
    assert all(p.is_meta for p in model.parameters())
    layers = sum(p.numel() for p in model.backbone.layers.parameters())
    assert 6.4e9 < layers < 6.6e9, layers  # 32 x (4 x 4096² + 3 x 4096 x 11008) + norms
    assert model.backbone.config.hidden_size == 4096 and len(model.backbone.layers) == 32


def test_training_lowers_loss() -> None:
    torch.manual_seed(1)
    model = MainPolicy(small_config())
    obs = make_obs(model, INSTRUCTIONS + ["pick up the plate"], seed=1)
    target = torch.randint(0, 7, (4, 8, 16, L), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model.loss(obs, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(7.0)).item(), abs=0.5)  # near uniform at init
    assert losses[-1] < 0.5 * losses[0], losses


def test_layer_weights_weigh_each_layers_cross_entropy(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    target = torch.randint(0, 7, (3, 8, 16, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model.forward_teacher(obs, target)  # [B, L, 128, 7]
        per_layer = [torch.nn.functional.cross_entropy(logits[:, i].flatten(0, 1), layer_codes(target)[:, i].flatten())
                     for i in range(L)]
        assert model.loss(obs, target).item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-5)
        only_first = torch.tensor([2.0] + [0.0] * (L - 1))
        assert model.loss(obs, target, only_first).item() == pytest.approx(per_layer[0].item(), rel=1e-5)


def test_proprio_is_standardised_by_the_training_statistics() -> None:
    torch.manual_seed(0)
    policy = MainPolicy(small_config())
    samples = torch.randn(500, 8) * torch.tensor([0.1, 0.2, 0.08, 0.1, 0.5, 0.04, 0.02, 0.0]) + 1.0  # last: constant
    policy.set_proprio_stats(samples)
    standardised = (samples - policy.proprio_mean) / policy.proprio_std
    torch.testing.assert_close(standardised[:, :7].mean(0), torch.zeros(7), rtol=0, atol=1e-5)
    torch.testing.assert_close(standardised[:, :7].std(0), torch.ones(7), rtol=0, atol=1e-5)
    assert policy.proprio_std[7] == pytest.approx(1e-3) and torch.isfinite(standardised).all()
    obs = make_obs(policy, INSTRUCTIONS[:1])
    before = policy.prefill(obs)[0]
    policy.set_proprio_stats(samples * 2)
    assert not torch.allclose(policy.prefill(obs)[0], before)  # the statistics reach the prompt


def test_checkpoint_round_trip(model: MainPolicy, obs: dict[str, torch.Tensor], tmp_path) -> None:
    path = tmp_path / "main.pt"
    model = copy.deepcopy(model)
    model.proprio_mean.fill_(0.5)  # as if trained: the statistics travel with the weights
    model.save(path)
    loaded = MainPolicy.load(path, config=small_config())
    assert loaded.config == model.config and torch.equal(loaded.proprio_mean, model.proprio_mean)
    assert torch.equal(loaded.generate(obs), model.generate(obs))
    assert torch.equal(loaded.prefill(obs)[1], model.prefill(obs)[1])
    model.save(tmp_path / "again.pt")  # equal weights, equal bytes: a rerun that reproduces a model keeps its DVC hash
    assert (tmp_path / "again.pt").read_bytes() == path.read_bytes()


def test_bad_checkpoints_are_refused(model: MainPolicy, tmp_path) -> None:
    path = tmp_path / "main.pt"
    model.save(path)
    other = small_config(backbone=dataclasses.replace(small_config().backbone, hidden_size=32))
    with pytest.raises(ValueError, match=r"main\.pt.*backbone\.hidden_size: 32 vs 64"):
        MainPolicy.load(path, config=other)

    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["heads.0.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "shapes.pt")
    with pytest.raises(ValueError, match=r"shapes\.pt does not fit its config: heads\.0\.weight: \(3, 3\)"):
        MainPolicy.load(tmp_path / "shapes.pt")

    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="unreadable"):
        MainPolicy.load(tmp_path / "cut.pt")
    torch.save({"model_state_dict": {}}, tmp_path / "draft.pt")
    with pytest.raises(ValueError, match="not a main policy checkpoint"):
        MainPolicy.load(tmp_path / "draft.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        MainPolicy.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("field, value", [
    ("image_size", 0), ("vision_grid", -1), ("num_layers", 1.5), ("codes_per_layer", 64), ("levels", 1),
    ("vision_channels", ()), ("vocab", ("Pick",)), ("vocab", ("bowl", "bowl")), ("max_instruction_words", 100),
])
def test_bad_config_values_name_the_field(field: str, value) -> None:
    name = "max_position_embeddings" if field == "max_instruction_words" else field  # prompt outgrows the backbone
    with pytest.raises(ValueError, match=name):
        small_config(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("num_attention_heads", 3), ("num_key_value_heads", 3), ("rope_theta", -1.0),
    ("attn_implementation", "flash"),
])
def test_bad_backbone_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"backbone.{field}"):
        BackboneConfig(**{field: value})


def test_config_dict_round_trip_and_tokenizer_check() -> None:
    config = small_config()
    assert PolicyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown PolicyConfig field"):
        PolicyConfig.from_dict({**config.to_dict(), "hiden": 1})
    config.check_tokenizer(num_layers=L, levels=7)
    with pytest.raises(ValueError, match="num_layers=5"):
        config.check_tokenizer(num_layers=4, levels=7)


@pytest.mark.parametrize("weights", [[], [1.0, -0.5], [0.0, 0.0], "1,1"])
def test_bad_layer_weights_name_the_param(weights) -> None:
    from rsd.policy.train import PolicyTrainConfig

    with pytest.raises(ValueError, match="policy.layer_weights"):
        PolicyTrainConfig(layer_weights=weights)


def test_bad_precision_names_the_param() -> None:
    from rsd.policy.train import PolicyTrainConfig

    with pytest.raises(ValueError, match="policy.precision"):
        PolicyTrainConfig(precision="fp16")
