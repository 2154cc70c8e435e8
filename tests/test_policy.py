"""Main policy: cached decoding equals recomputation, batching/padding is invisible, 7B shape, training,
checkpoints and config validation. Small random-weight models, random images made here."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import FakeLive
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.policy.config import UNK_ID

torch.set_num_threads(1)

INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the bowl",
]
L = 5
FINGERPRINT = "ab" * 32  # a tokenizer's fingerprint (a sha256), which a saved policy records


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


def greedy_tokens(model: MainPolicy, obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Greedy decoding with the cache, prefill then one `step` per layer (the engine's no-draft decoding, for a
    batch) -> tokens [B, 8, 16, L]."""
    _, logits, cache = model.prefill(obs)
    codes = [logits.argmax(dim=-1)]  # L x [B, 128]
    for layer in range(1, model.config.num_layers):
        codes.append(model.step(codes[-1], layer, cache).argmax(dim=-1))
    return torch.stack(codes, dim=-1).unflatten(1, (8, 16))


@pytest.fixture(scope="module")
def model() -> MainPolicy:
    torch.manual_seed(0)
    return MainPolicy(small_config(), FINGERPRINT).eval()


@pytest.fixture(scope="module")
def obs(model: MainPolicy) -> dict[str, torch.Tensor]:
    return make_obs(model, INSTRUCTIONS)


def test_shapes(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    B, H = len(INSTRUCTIONS), model.config.backbone.hidden_size
    hidden, logits0, cache = model.prefill(obs)
    assert hidden.shape == (B, H) and logits0.shape == (B, 128, 7)
    assert model.step(logits0.argmax(-1), 1, cache).shape == (B, 128, 7)
    assert model.step_many(torch.zeros(B, 3, 128, dtype=torch.long), 1, cache).shape == (B, 3, 128, 7)
    tokens = greedy_tokens(model, obs)
    assert tokens.shape == (B, 8, 16, L) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() <= 6
    assert model.forward_teacher(obs, tokens).shape == (B, L, 128, 7)


def test_cached_decoding_equals_recompute(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    tokens = greedy_tokens(model, obs)
    with torch.no_grad():
        teacher = model.forward_teacher(obs, tokens)  # one pass, no cache
    assert torch.equal(teacher.argmax(-1), layer_codes(tokens))
    _, logits0, cache = model.prefill(obs)
    stepped = [logits0] + [model.step(layer_codes(tokens)[:, l - 1], l, cache) for l in range(1, L)]
    torch.testing.assert_close(torch.stack(stepped, 1), teacher, rtol=0, atol=1e-5)


def test_step_many_equals_single_steps_and_crop(model: MainPolicy, obs: dict[str, torch.Tensor]) -> None:
    codes = layer_codes(greedy_tokens(model, obs))  # [B, L, 128]
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
    tokens = greedy_tokens(model, obs)
    for i, text in enumerate(INSTRUCTIONS):  # alone, each instruction is unpadded
        single = {k: v[i : i + 1] for k, v in obs.items()} | model.encode_instructions([text])
        torch.testing.assert_close(model.prefill(single)[0][0], hidden[i], rtol=0, atol=1e-5)
        assert torch.equal(greedy_tokens(model, single)[0], tokens[i])


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
    assert loaded.tokenizer_fingerprint == FINGERPRINT
    assert torch.equal(greedy_tokens(loaded, obs), greedy_tokens(model, obs))
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


def test_a_checkpoint_records_its_tokenizer(model: MainPolicy, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"cannot save the main policy to .*unrecorded\.pt: it records no tokenizer"):
        MainPolicy(small_config()).save(tmp_path / "unrecorded.pt")
    assert not (tmp_path / "unrecorded.pt").exists()
    path = tmp_path / "main.pt"
    model.save(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["tokenizer_fingerprint"] == FINGERPRINT and "tokenizer_fingerprint" not in ckpt["state_dict"]
    older = {k: v for k, v in ckpt.items() if k != "tokenizer_fingerprint"} | {"format_version": 2}
    torch.save(older, tmp_path / "v2.pt")
    with pytest.raises(ValueError, match=r"v2\.pt is of format v2, from before a policy recorded the tokenizer it was "
                                         r"trained on; this code reads v3: retrain it, `dvc repro policy`"):
        MainPolicy.load(tmp_path / "v2.pt")
    torch.save({**ckpt, "tokenizer_fingerprint": None}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"none\.pt has tokenizer_fingerprint=None, expected the sha256"):
        MainPolicy.load(tmp_path / "none.pt")


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
        PolicyTrainConfig(model={}, layer_weights=weights)


def test_bad_precision_names_the_param() -> None:
    from rsd.policy.train import PolicyTrainConfig

    with pytest.raises(ValueError, match="policy.precision"):
        PolicyTrainConfig(model={}, precision="fp16")


@pytest.mark.parametrize("changes, message", [
    ({"epochs": True}, "policy.epochs must be an int, got True"),  # a bool is not an int
    ({"lr": "1e-3"}, "policy.lr must be a finite number, got '1e-3'"),  # nor a string a number
    ({"model": {"image_size": 0}}, "policy.model.image_size must be a positive int, got 0"),
    ({"model": {"backbone": {"hidden_size": 0}}}, "policy.model.backbone.hidden_size must be a positive int, got 0"),
    ({"model": {"hiden": 1}}, "policy.model.hiden is not a PolicyConfig field"),
    ({"model": {"backbone": {"layers": 2}}}, "policy.model.backbone.layers is not a BackboneConfig field"),
    ({"model": {"num_layers": 3}}, "policy.model.num_layers cannot be set: it comes from the demos and the tokenizer"),
])
def test_bad_train_config_names_the_param(changes: dict, message: str) -> None:
    import re

    from rsd.policy.train import PolicyTrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        PolicyTrainConfig(**{"model": {}, **changes})


def tiny_tasks() -> list:
    """Two tasks of three short demos with random 40x40 images (resized to the policy's 32)."""
    import numpy as np

    from rsd.data import Demo, TaskDemos

    rng = np.random.default_rng(0)

    def demo(T: int) -> Demo:
        return Demo(actions=rng.uniform(-1, 1, (T, 7)).astype(np.float32), states=rng.normal(size=(T, 9)),
                    ee_pos=rng.normal(size=(T, 3)), ee_ori=rng.normal(size=(T, 3)),
                    gripper_states=rng.normal(size=(T, 2)), joint_states=rng.normal(size=(T, 7)),
                    agentview=rng.integers(0, 256, (T, 40, 40, 3), dtype=np.uint8),
                    wrist=rng.integers(0, 256, (T, 40, 40, 3), dtype=np.uint8))

    return [TaskDemos("a", INSTRUCTIONS[0], [demo(12) for _ in range(3)]),
            TaskDemos("b", INSTRUCTIONS[2], [demo(10) for _ in range(3)])]


def test_train_policy_builds_the_model_from_its_config_and_restores_threads(tmp_path) -> None:
    import numpy as np

    from rsd.policy.train import PolicyTrainConfig, train_policy
    from rsd.tokenizer.config import TokenizerConfig
    from rsd.tokenizer.model import RFSQTokenizer

    torch.manual_seed(0)
    tokenizer = RFSQTokenizer(TokenizerConfig(hidden_dim=32), np.full(7, -1.0), np.full(7, 1.0)).eval()
    model = dict(image_size=32, vision_channels=[8, 16], vision_grid=2, max_instruction_words=20,
                 backbone=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=64))
    config = PolicyTrainConfig(model=model, epochs=2, batch_size=8, warmup_steps=2, val_fraction=0.34, num_threads=2)
    runs = []
    for _ in range(2):
        live = FakeLive()
        policy, metrics = train_policy(tiny_tasks(), tokenizer, config, live)
        assert torch.get_num_threads() == 1  # the module's setting, restored after training with 2
        runs.append((policy, metrics, live))
    (policy, metrics, live), (again, _, _) = runs
    assert policy.config.image_size == 32 and policy.config.backbone.hidden_size == 32
    assert policy.config.num_layers == tokenizer.config.num_layers and not policy.training
    assert metrics["epochs"] == 2
    assert metrics["train_samples"] == 2 * 12 + 2 * 10 and metrics["val_samples"] == 12 + 10  # 1 demo of 3 held out
    assert len(live.steps) == 3 and live.steps[-1] == {}  # one DVCLive step per epoch
    assert set(live.steps[0]) == {"train/loss", "val/loss"} | {f"val/token_accuracy_L{i}" for i in range(4)}
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), again.state_dict().values()))
    assert policy.tokenizer_fingerprint == tokenizer.fingerprint()  # recorded for the checkpoint
    policy.save(tmp_path / "policy.pt")  # as the policy stage does; it loads as data only
    assert MainPolicy.load(tmp_path / "policy.pt").tokenizer_fingerprint == tokenizer.fingerprint()
