"""RFSQ tokenizer: round trip, every layer prefix, token contract, checkpoints and input validation.

The episodes are synthetic but shaped like the scripted expert's: a proportional controller
(`clip(12 * error_m)`) through pick-and-place waypoints, so xyz actions saturate at +-1 during long moves
and decay near each waypoint, rotation deltas are small and smooth, and the gripper closes and opens once.
"""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer
from rsd.tokenizer.train import evaluate_tokenizer, train_tokenizer
from rsd.tokenizer.train import chunks_of


def synthetic_episode(rng: np.random.Generator) -> np.ndarray:
    """One pick-and-place episode of raw OSC actions `[T, 7]`, T roughly 100-200."""
    pos = rng.uniform([-0.15, -0.15, 0.15], [0.15, 0.15, 0.30])  # end effector, metres
    obj = np.append(rng.uniform(-0.2, 0.2, 2), 0.02)
    goal = np.append(rng.uniform(-0.2, 0.2, 2), 0.04)
    hover = np.array([0.0, 0.0, 0.12])
    # (waypoint, gripper, hold steps after arrival): hover, descend, close, lift, carry, descend, open, retreat
    phases = [(obj + hover, -1.0, 0), (obj, -1.0, 0), (obj, 1.0, 10), (obj + hover, 1.0, 0),
              (goal + hover, 1.0, 0), (goal, 1.0, 0), (goal, -1.0, 8), (goal + hover, -1.0, 0)]
    gain = rng.uniform(0.15, 0.35)  # share of the commanded 5 cm/step the arm actually moves
    rot_err = rng.normal(0, 0.02, 3)  # orientation error the expert corrects (it holds the start pose)
    actions = []
    for target, gripper, hold in phases:
        arrived_at = None
        for step in range(60):  # step cap per phase
            xyz = np.clip(12 * (target - pos) + rng.normal(0, 0.01, 3), -1, 1)
            rot = np.clip(-2.0 * rot_err, -1, 1)
            actions.append(np.concatenate([xyz, rot, [gripper]]))
            pos = pos + 0.05 * gain * xyz
            rot_err = 0.9 * rot_err + 0.5 * 0.1 * rot + rng.normal(0, 0.01, 3)  # contact and arm disturbances
            if arrived_at is None and np.linalg.norm(target - pos) < 0.008:
                arrived_at = step
            if arrived_at is not None and step - arrived_at >= hold:
                break
    return np.asarray(actions, dtype=np.float32)


def synthetic_episodes(num_episodes: int, seed: int) -> list[np.ndarray]:
    """`num_episodes` independent episodes, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return [synthetic_episode(rng) for _ in range(num_episodes)]


SMALL = dict(num_layers=4, hidden_dim=128, steps=400, warmup_steps=40, seed=0)  # trains in seconds, not minutes


@pytest.fixture(scope="module")
def trained() -> tuple[RFSQTokenizer, dict]:
    """One small tokenizer for the whole module: training is the slow part."""
    threads = torch.get_num_threads()
    result = train_tokenizer(synthetic_episodes(24, seed=1), TokenizerConfig(**SMALL), progress=False)
    assert torch.get_num_threads() == threads  # training runs single-threaded but restores the caller's setting
    return result


@pytest.fixture(scope="module")
def test_chunks() -> torch.Tensor:
    """Raw chunks `[N, 8, 7]` of episodes the tokenizer never saw."""
    return chunks_of(synthetic_episodes(4, seed=2), chunk_len=8)


def prefix_maes(tokenizer: RFSQTokenizer, chunks: torch.Tensor) -> list[float]:
    """Normalized-unit MAE of the round trip through the first k layers, for k = 1..L."""
    tokens = tokenizer.encode(chunks)
    target = tokenizer.normalize(chunks)
    return [(tokenizer.decode_normalized(tokens[..., :k]) - target).abs().mean().item()
            for k in range(1, tokenizer.config.num_layers + 1)]


def test_synthetic_episodes_look_like_expert_demos() -> None:
    episodes = synthetic_episodes(20, seed=0)
    assert all(90 <= len(e) <= 250 and e.shape[1] == 7 for e in episodes)
    actions = np.concatenate(episodes)
    assert np.abs(actions[:, :3]).max() <= 1 and (np.abs(actions[:, :3]) > 0.99).mean() > 0.05  # saturated moves
    assert np.abs(actions[:, 3:6]).max() < 0.3  # small rotations
    assert set(np.unique(actions[:, 6])) == {-1.0, 1.0}


def test_round_trip_meets_bound_after_short_training(trained, test_chunks) -> None:
    tokenizer, metrics = trained
    assert metrics["num_layers"] == SMALL["num_layers"]
    assert metrics["mae_by_layers"][-1] <= 0.02  # the full-size default reaches ~0.005
    assert metrics["mae_by_layers"][2] <= 0.05  # the 3 coarse layers alone
    assert prefix_maes(tokenizer, test_chunks)[-1] <= 0.02
    assert all(usage >= 6 / 7 for usage in metrics["codebook_usage"])
    raw_error = (tokenizer.decode(tokenizer.encode(test_chunks)) - test_chunks).abs()  # raw units, [N, 8, 7]
    assert raw_error[..., :3].mean() <= 0.02 and raw_error[..., 6].mean() <= 0.05


def test_metrics_are_complete_and_split_by_episode(trained) -> None:
    _, metrics = trained
    num_layers = metrics["num_layers"]
    for key in ("mae_by_layers", "max_error_by_layers", "codebook_usage", "codebook_perplexity", "no_correction_share"):
        assert len(metrics[key]) == num_layers
    assert metrics["val_episodes"] == round(0.1 * 24) and metrics["train_episodes"] == 24 - metrics["val_episodes"]
    assert metrics["train_chunks"] + metrics["val_chunks"] == sum(len(e) for e in synthetic_episodes(24, seed=1))
    assert metrics["train_seconds"] > 0


def test_fine_residual_weight_makes_fine_codes_mostly_no_correction(trained, test_chunks) -> None:
    """Without the penalty the fine layers' codes are near-uniform digits; with it, layers 1..L-2 mostly
    hold the middle level ("no correction"), while the full prefix still decodes well."""
    tokenizer, plain = trained
    sparse_tokenizer, sparse = train_tokenizer(synthetic_episodes(24, seed=1),
                                               TokenizerConfig(**SMALL, fine_residual_weight=5.0), progress=False)
    middle = tokenizer.config.levels // 2

    def no_correction_share(t: RFSQTokenizer) -> list[float]:
        return (t.encode(test_chunks) == middle).float().mean(dim=(0, 1, 2)).tolist()  # per layer

    assert evaluate_tokenizer(tokenizer, test_chunks)["no_correction_share"] == pytest.approx(no_correction_share(tokenizer))
    for layer in (1, 2):
        assert sparse["codebook_perplexity"][layer] < plain["codebook_perplexity"][layer] - 0.3
        assert no_correction_share(sparse_tokenizer)[layer] > no_correction_share(tokenizer)[layer] + 0.1
    assert sparse["mae_by_layers"][-1] <= 0.03


def test_every_prefix_decodes_and_error_does_not_grow_with_k(trained, test_chunks) -> None:
    tokenizer, metrics = trained
    maes = prefix_maes(tokenizer, test_chunks)
    assert evaluate_tokenizer(tokenizer, test_chunks)["mae_by_layers"] == pytest.approx(maes)
    for maes in (maes, metrics["mae_by_layers"]):
        assert all(finer <= coarser + 1e-4 for coarser, finer in zip(maes, maes[1:])), maes
    assert maes[0] > maes[-1]


def test_tokens_shape_and_range(trained, test_chunks) -> None:
    tokenizer, _ = trained
    num_layers = tokenizer.config.num_layers
    tokens = tokenizer.encode(test_chunks)
    assert tokens.shape == (len(test_chunks), 8, 16, num_layers) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() <= 6
    assert tokenizer.encode(test_chunks[0]).shape == (8, 16, num_layers)  # unbatched
    assert tokenizer.encode(test_chunks[:6].view(2, 3, 8, 7)).shape == (2, 3, 8, 16, num_layers)
    assert torch.equal(tokenizer.encode(test_chunks[:6].double()), tokens[:6])
    assert tokenizer.decode(tokens[..., :2]).shape == test_chunks.shape


def test_save_load_round_trip(trained, test_chunks, tmp_path: Path) -> None:
    tokenizer, _ = trained
    path = tmp_path / "tokenizer.pt"
    tokenizer.save(path)
    loaded = RFSQTokenizer.load(path)
    assert loaded.config == tokenizer.config
    assert torch.equal(loaded.action_q01, tokenizer.action_q01) and torch.equal(loaded.action_q99, tokenizer.action_q99)
    tokens = tokenizer.encode(test_chunks)
    assert torch.equal(loaded.encode(test_chunks), tokens)
    assert torch.equal(loaded.decode(tokens), tokenizer.decode(tokens))


def test_fingerprint_is_the_checkpoints_sha256_and_tells_tokenizers_apart(trained, tmp_path: Path) -> None:
    tokenizer, _ = trained
    path = tmp_path / "tokenizer.pt"
    tokenizer.save(path)
    fingerprint = tokenizer.fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", fingerprint)
    assert fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()  # `sha256sum models/tokenizer.pt` shows it
    assert RFSQTokenizer.load(path).fingerprint() == fingerprint  # what the engine computes from the file
    same_shapes = copy.deepcopy(tokenizer)
    with torch.no_grad():
        same_shapes.decoder.shortcut.bias[0] += 1e-6
    assert same_shapes.fingerprint() != fingerprint
    other_bounds = RFSQTokenizer(tokenizer.config, tokenizer.action_q01, tokenizer.action_q99 + 1e-3)
    other_bounds.load_state_dict(tokenizer.state_dict())
    assert other_bounds.fingerprint() != fingerprint


@pytest.mark.parametrize("shape", [(5, 8, 16, 0), (5, 8, 16, 5), (5, 8, 15, 2), (5, 16, 8, 2), (16, 2)])
def test_decode_rejects_bad_shapes(trained, shape: tuple[int, ...]) -> None:
    tokenizer, _ = trained
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, 16, k\] with 1 <= k <= 4"):
        tokenizer.decode(torch.zeros(shape, dtype=torch.long))


def test_decode_rejects_bad_values_and_dtypes(trained) -> None:
    tokenizer, _ = trained
    with pytest.raises(ValueError, match="codes in 0..6"):
        tokenizer.decode(torch.full((1, 8, 16, 2), 7))
    with pytest.raises(ValueError, match="codes in 0..6"):
        tokenizer.decode(torch.full((1, 8, 16, 2), -1))
    with pytest.raises(ValueError, match="integer tokens"):
        tokenizer.decode(torch.zeros(1, 8, 16, 2))


@pytest.mark.parametrize("actions", [torch.zeros(5, 8, 6), torch.zeros(5, 7, 7), torch.zeros(7), torch.zeros(5, 8, 7, dtype=torch.long)])
def test_encode_rejects_bad_actions(trained, actions: torch.Tensor) -> None:
    tokenizer, _ = trained
    with pytest.raises(ValueError, match=r"float actions of shape \[\.\.\., 8, 7\]"):
        tokenizer.encode(actions)


@pytest.mark.parametrize("field, value", [
    ("chunk_len", 0), ("action_dim", 6), ("latent_len", 4), ("latent_dim", -1), ("levels", 6), ("levels", 1),
    ("num_layers", 0), ("hidden_dim", 2.5), ("steps", True), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")),
    ("warmup_steps", 10_000), ("weight_decay", -1.0), ("first_layer_loss_weight", 0.0), ("val_fraction", 0.0),
    ("fine_residual_weight", -0.1),
    ("val_fraction", 1.0), ("seed", "0"),
])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"tokenizer.{field} .*got {re.escape(repr(value))}"):
        TokenizerConfig(**{field: value})


@pytest.mark.parametrize("changes, message", [
    ({"steps": True}, "tokenizer.steps must be an int, got True"),  # a bool is not an int
    ({"lr": "0.01"}, "tokenizer.lr must be a finite number, got '0.01'"),  # nor a string a number
    ({"chunk_len": 16}, "tokenizer.chunk_len must be 8 (rsd.contract.CHUNK_LEN"),
    ({"latent_dim": 8}, "tokenizer.latent_dim must be 16 (rsd.contract.LATENT_DIM"),
])
def test_config_messages_say_what_was_expected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TokenizerConfig(**changes)


def test_load_missing_truncated_and_foreign_files(trained, tmp_path: Path) -> None:
    tokenizer, _ = trained
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        RFSQTokenizer.load(missing)
    good = tmp_path / "good.pt"
    tokenizer.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        RFSQTokenizer.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model_state_dict": {}, "epoch": 3}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not an RFSQ tokenizer"):
        RFSQTokenizer.load(foreign)


def test_constant_dimension_normalizes_without_dividing_by_zero() -> None:
    config = TokenizerConfig(**SMALL)
    q01, q99 = np.array([-1, -1, -1, -0.1, -0.1, -0.1, -1.0]), np.array([1, 1, 1, 0.1, 0.1, 0.1, -1.0])  # gripper never closes
    tokenizer = RFSQTokenizer(config, q01, q99)
    actions = torch.zeros(3, 8, 7)
    actions[..., 6] = -1.0
    normalized = tokenizer.normalize(actions)
    assert torch.isfinite(normalized).all() and torch.equal(normalized[..., 6], torch.zeros(3, 8))
    assert torch.allclose(tokenizer.unnormalize(normalized), actions)
    assert torch.isfinite(tokenizer.decode(tokenizer.encode(actions))).all()


def test_training_needs_two_episodes() -> None:
    with pytest.raises(ValueError, match="at least 2 episodes"):
        train_tokenizer(synthetic_episodes(1, seed=0), TokenizerConfig(**SMALL), progress=False)
