"""Draft model: samples file, model contract, training and the post-training checks.

Training runs on a small synthetic dataset whose codes are a fixed function of the hidden state, like
the main policy's: each (task, phase of the episode) has its own hidden-state centre and its own codes,
so a draft that learns anything beats chance (1/7) by far.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from conftest import FakeLive
from rsd.draft.config import DraftConfig, DraftTrainConfig, VerifyConfig
from rsd.draft.model import REQUIRED_KEYS, RFSQDraftModelWithProjection, load_draft, num_parameters
from rsd.draft.samples import DraftSamples
from rsd.draft.train import train_draft
from rsd.draft.verify import malformed, verify_checkpoint
from rsd.io import save_torch
from rsd.training import lr_factor, warmup_cosine

H = 32  # hidden size of the synthetic main policy: small keeps training fast
CHECKPOINT_KEYS = {"model_state_dict", "optimizer_state_dict", "epoch", "val_accuracy", "val_accuracies_per_layer",
                   "config", "layer_exact_match", "format_version"}
SMALL = dict(hidden_dim=64, num_heads=4, ff_dim=64, dropout=0.0)  # a draft that trains in seconds


def synthetic_tensors(num_tasks: int, episodes_per_task: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """One policy call per 8-step chunk, stacked as `DraftSamples` takes them (hidden_state, coarse_tokens,
    coarse_probs, task, episode, step); episodes are numbered per task (episode 0 exists in every task)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (num_tasks, 2, H))  # (task, phase) -> hidden-state centre
    codes = rng.integers(0, 7, (num_tasks, 2, 8, 16, 3))  # (task, phase) -> coarse tokens
    hidden, coarse, calls = [], [], []
    for task in range(num_tasks):
        for episode in range(episodes_per_task):
            for step in range(0, 8 * steps, 8):
                phase = int(step >= 4 * steps)
                hidden.append((centres[task, phase] + rng.normal(0, 0.1, H)).astype(np.float32))
                coarse.append(codes[task, phase])
                calls.append((task, episode, step))
    task, episode, step = torch.tensor(calls).T
    tokens = torch.from_numpy(np.stack(coarse))
    return {"hidden_state": torch.from_numpy(np.stack(hidden)), "coarse_tokens": tokens,
            "coarse_probs": main_probs(tokens), "task": task, "episode": episode, "step": step}


def main_probs(tokens: torch.Tensor, sure: float = 0.76) -> torch.Tensor:
    """Coarse tokens [N, 8, 16, C] -> probabilities [N, C, 128, 7] a main policy this sure of its codes gives."""
    one_hot = torch.nn.functional.one_hot(tokens.long().flatten(1, 2).transpose(1, 2), 7).float()  # [N, C, 128, 7]
    return one_hot * (sure - (1 - sure) / 6) + (1 - sure) / 6


def synthetic_samples(seed: int = 0) -> DraftSamples:
    return DraftSamples(**synthetic_tensors(num_tasks=4, episodes_per_task=5, steps=16, seed=seed),
                        task_names=[f"task {i}" for i in range(4)])


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: a second thread costs more than it gains, more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One training run shared by the tests: checkpoint (and where it is saved), metrics, log lines, DVCLive steps."""
    path = tmp_path_factory.mktemp("draft") / "best_draft_with_projection.pt"
    capture, live = Capture(), FakeLive()
    logger = logging.getLogger("rsd.draft")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        checkpoint, metrics = train_draft(synthetic_samples(), DraftTrainConfig(
            model=SMALL, epochs=8, batch_size=16, lr=5e-3, lr_schedule="cosine", seed=0), live)
    finally:
        logger.removeHandler(capture)
    save_torch(path, checkpoint)  # as the train stage does
    return {"path": path, "checkpoint": checkpoint, "metrics": metrics, "lines": capture.lines, "live": live}


# ---- samples ------------------------------------------------------------------------------------------

def test_samples_save_load_shapes_and_dtypes(tmp_path: Path) -> None:
    tensors = synthetic_tensors(num_tasks=2, episodes_per_task=2, steps=3, seed=1)
    samples = DraftSamples(**tensors, task_names=["a", "b"])
    samples.save(tmp_path / "samples.pt")
    data = DraftSamples.load(tmp_path / "samples.pt")

    assert len(data) == 12 and data.hidden_size == H and data.task_names == ["a", "b"]
    assert data.hidden_state.dtype == torch.float16 and data.hidden_state.shape == (12, H)
    assert data.coarse_tokens.dtype == torch.uint8 and data.coarse_tokens.shape == (12, 8, 16, 3)
    assert data.coarse_probs.dtype == torch.float16 and data.coarse_probs.shape == (12, 3, 128, 7)
    torch.testing.assert_close(data.coarse_probs.float(), tensors["coarse_probs"], rtol=1e-3, atol=1e-3)
    assert (data.task.dtype, data.episode.dtype, data.step.dtype) == (torch.int16, torch.int32, torch.int32)
    torch.testing.assert_close(data.hidden_state.float(), tensors["hidden_state"], rtol=1e-3, atol=1e-3)
    assert torch.equal(data.coarse_tokens.long(), tensors["coarse_tokens"])
    assert (int(data.task[5]), int(data.episode[5]), int(data.step[5])) == (0, 1, 16)


def test_samples_keep_float32_beyond_float16_range_and_refuse_nan() -> None:
    tensors = synthetic_tensors(num_tasks=1, episodes_per_task=2, steps=2, seed=0)
    tensors["hidden_state"][0] *= 1e5
    assert DraftSamples(**tensors).hidden_state.dtype == torch.float32
    tensors["hidden_state"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DraftSamples(**tensors)


def test_samples_join_and_refuse_bad_tensors() -> None:
    a, b = synthetic_samples(seed=0), synthetic_samples(seed=1)
    joined = DraftSamples.concat([a, b])
    assert len(joined) == len(a) + len(b) and torch.equal(joined.hidden_state[len(a):], b.hidden_state)
    tensors = synthetic_tensors(num_tasks=1, episodes_per_task=1, steps=2, seed=0)
    with pytest.raises(ValueError, match=r"step must be an integer tensor \[N=2\]"):
        DraftSamples(**{**tensors, "step": tensors["step"][:1]})
    with pytest.raises(ValueError, match="task indices"):
        DraftSamples(**synthetic_tensors(2, 1, 2, 0), task_names=["only one"])
    with pytest.raises(ValueError, match=r"coarse_probs must be float \[N, C, 128, levels\]"):
        DraftSamples(**{**tensors, "coarse_probs": tensors["coarse_probs"][:, :2]})
    with pytest.raises(ValueError, match=r"coarse_probs must be probabilities in \[0, 1\]"):
        DraftSamples(**{**tensors, "coarse_probs": tensors["coarse_probs"] * 2})


def test_samples_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        DraftSamples.load(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        DraftSamples.load(tmp_path / "garbage.pt")
    torch.save({"format": "something else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt.*not a draft samples file"):
        DraftSamples.load(tmp_path / "foreign.pt")


def test_split_by_episode_shares_no_episode() -> None:
    samples = synthetic_samples()
    train_idx, val_idx = samples.split_by_episode(0.25, seed=3)
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(len(samples)))
    episodes = {int(t) * 1000 + int(e) for t, e in zip(samples.task, samples.episode)}
    train_eps = {int(samples.task[i]) * 1000 + int(samples.episode[i]) for i in train_idx}
    val_eps = {int(samples.task[i]) * 1000 + int(samples.episode[i]) for i in val_idx}
    assert not train_eps & val_eps and train_eps | val_eps == episodes and len(val_eps) == 5  # 25% of 20
    again_train, again_val = samples.split_by_episode(0.25, seed=3)
    assert torch.equal(train_idx, again_train) and torch.equal(val_idx, again_val)


# ---- model and config ---------------------------------------------------------------------------------

def test_model_size_keys_and_output_shape() -> None:
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(input_dim=4096, hidden_dim=512, num_coarse_layers=3).eval()
    assert 4.23e6 <= num_parameters(model) <= 5.17e6
    assert list(model.state_dict())[:3] == ["input_projection.weight", "input_projection.bias",
                                            "decoder.decoder_layer.self_attn.in_proj_weight"]
    hidden = torch.randn(2, 4096)
    assert model(hidden).shape == (2, 3, 128, 7)
    codes = model.propose(hidden)
    assert codes.dtype == torch.long and codes.shape == (2, 3, 128) and 0 <= codes.min() and codes.max() <= 6
    assert RFSQDraftModelWithProjection(DraftConfig(input_dim=4096)).config == model.config


def test_logits_are_timestep_major() -> None:
    """Query (layer l, timestep t) predicts the 16 codes t*16 .. t*16+15 of layer l: the main policy's order."""
    torch.manual_seed(0)
    model = RFSQDraftModelWithProjection(DraftConfig(input_dim=H, **SMALL)).eval()
    hidden = torch.randn(1, H)
    with torch.no_grad():
        per_query = model.head(model.decoder(model.input_projection(hidden)))  # [1, 3 * 8, 16 * 7]
        logits = model(hidden)  # [1, 3, 128, 7]
    layer, t, d = 1, 2, 5
    assert torch.equal(logits[0, layer, t * 16 + d], per_query[0, layer * 8 + t, d * 7:(d + 1) * 7])


def test_configs_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="input_dim"):
        DraftConfig(input_dim=0)
    with pytest.raises(ValueError, match="num_heads"):
        DraftConfig(input_dim=8, hidden_dim=100, num_heads=8)
    with pytest.raises(ValueError, match="dropout"):
        DraftConfig(input_dim=8, dropout=1.0)
    with pytest.raises(ValueError, match="unknown DraftConfig field"):
        DraftConfig.from_dict({"input_dim": 8, "depth": 2})
    with pytest.raises(ValueError, match="lr"):
        DraftTrainConfig(lr=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DraftTrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="lr_schedule must be 'constant' or 'cosine', got 'linear'"):
        DraftTrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="min_val_accuracy"):
        VerifyConfig(min_val_accuracy=1.5)


@pytest.mark.parametrize("build, message", [
    (lambda: DraftTrainConfig(epochs=True), "train.epochs must be an int, got True"),  # a bool is not an int
    (lambda: DraftTrainConfig(lr="1e-3"), "train.lr must be a finite number, got '1e-3'"),  # nor a string a number
    (lambda: DraftTrainConfig(model={"hidden_dim": 100, "num_heads": 8}),
     "train.model.num_heads must be a divisor of hidden_dim=100, got 8"),
    (lambda: DraftTrainConfig(model={"dropout": "0.1"}), "train.model.dropout must be a finite number, got '0.1'"),
    (lambda: DraftTrainConfig(model={"depth": 2}), "train.model.depth is not a DraftConfig field"),
    (lambda: DraftTrainConfig(model={"input_dim": 64}), "train.model.input_dim cannot be set"),
    (lambda: DraftConfig(input_dim=8, latent_dim=8), "train.model.latent_dim must be 16 (rsd.contract.LATENT_DIM"),
    (lambda: DraftConfig(input_dim=8, chunk_len=16), "train.model.chunk_len must be 8 (rsd.contract.CHUNK_LEN"),
    (lambda: VerifyConfig(min_val_accuracy=1.5), "verify.min_val_accuracy must be a number in [0, 1], got 1.5"),
])
def test_config_messages_name_the_param_and_what_was_expected(build: Any, message: str) -> None:
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        build()


# ---- training -----------------------------------------------------------------------------------------

def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    total, warmup = 200, 10  # warmup is 5% of the steps
    assert DraftTrainConfig().warmup_steps(total) == warmup
    factors = [lr_factor("cosine", step, total, warmup) for step in range(total)]
    assert factors[0] == pytest.approx(1 / warmup) and factors[warmup - 1] == 1.0
    assert all(a >= b for a, b in zip(factors[warmup - 1:], factors[warmup:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-3) and factors[total // 2] == pytest.approx(0.5, abs=0.05)
    assert {lr_factor("constant", step, total, warmup) for step in range(total)} == {1.0}
    # the main policy's variant keeps a floor of 10% of the peak
    assert warmup_cosine(total, total, warmup, floor=0.1) == pytest.approx(0.1)


def test_training_learns_and_returns_the_checkpoint(trained: dict[str, Any]) -> None:
    metrics = trained["metrics"]
    assert metrics["best_val_accuracy"] > 0.8  # chance is 1/7
    assert metrics["train_samples"] + metrics["val_samples"] == 320 and metrics["val_samples"] == 32  # 2 of 20 episodes
    assert set(metrics) >= {"best_val_accuracy", "val_accuracies_per_layer", "best_epoch", "epochs", "train_seconds",
                            "parameters", "layer_exact_match", "train_samples", "val_samples"}
    assert list(trained["checkpoint"]) == list(REQUIRED_KEYS)
    ckpt = torch.load(trained["path"], weights_only=False)
    assert set(ckpt) == CHECKPOINT_KEYS
    assert ckpt["epoch"] == metrics["best_epoch"]
    assert ckpt["val_accuracy"] == pytest.approx(metrics["best_val_accuracy"])
    assert len(ckpt["val_accuracies_per_layer"]) == 3 and len(ckpt["layer_exact_match"]) == 3
    assert ckpt["config"] == DraftConfig(input_dim=H, **SMALL).to_dict()

    model, record = load_draft(trained["path"])
    assert record["val_accuracy"] == ckpt["val_accuracy"] and model(torch.randn(1, H)).shape == (1, 3, 128, 7)


def test_training_logs_the_lines_runs_are_compared_by(trained: dict[str, Any]) -> None:
    lines = trained["lines"]
    assert lines[:3] == [f"Model created: {trained['metrics']['parameters'] / 1e6:.1f}M parameters",
                         "Train samples: 288", "Val samples: 32"]
    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert len(epochs) == 8 and epochs[0].startswith("Epoch 1/8 | Train Loss: ")
    assert " | Train Acc: L0=" in epochs[0] and " | Val Acc: L0=" in epochs[0] and " | Avg=" in epochs[0]
    assert any(line.startswith("Best model saved: 0.") for line in lines)
    assert lines[-1] == f"Training Complete! Best Val Accuracy: {trained['metrics']['best_val_accuracy']:.3f}"
    steps = trained["live"].steps
    assert len(steps) == 9 and steps[-1] == {}  # one step per epoch, then next_step
    assert {"train/loss", "val/loss", "val/acc_L0", "val/acc_L2", "val/acc_avg"} <= set(steps[0])


def test_training_writes_nothing_is_deterministic_and_checks_its_inputs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    samples = DraftSamples(**synthetic_tensors(2, 3, 4, seed=2))
    config = DraftTrainConfig(model=SMALL, epochs=2, batch_size=8, seed=5)
    monkeypatch.chdir(tmp_path)
    checkpoints = [train_draft(samples, config)[0] for _ in range(2)]
    assert list(tmp_path.iterdir()) == []  # the caller saves the checkpoint; training writes no file
    assert list(checkpoints[0]) == list(REQUIRED_KEYS)
    assert all(t.device.type == "cpu" for t in checkpoints[0]["model_state_dict"].values())
    for name, checkpoint in zip(("a.pt", "b.pt"), checkpoints):
        save_torch(tmp_path / name, checkpoint)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()  # same seed, same bytes
    with pytest.raises(ValueError, match="codes up to 6 vs levels=3"):
        train_draft(samples, DraftTrainConfig(model={**SMALL, "levels": 3}, epochs=1, batch_size=8))


def test_a_conditioned_draft_trains_with_distillation_and_verifies(tmp_path: Path) -> None:
    """The draft that reads main's layer 0 and learns from main's probabilities too: it learns, its checkpoint
    rebuilds from itself and passes verify, and the distillation term changes what is learnt."""
    samples = synthetic_samples()
    config = DraftTrainConfig(model={**SMALL, "condition_on_layer0": True}, epochs=8, batch_size=16, lr=5e-3, seed=0)
    checkpoint, metrics = train_draft(samples, dataclasses.replace(config, distill_weight=1.0))
    assert metrics["best_val_accuracy"] > 0.7 and checkpoint["config"]["condition_on_layer0"] is True
    save_torch(tmp_path / "draft.pt", checkpoint)
    assert verify_checkpoint(tmp_path / "draft.pt", 0.5, input_dim=H)["passed"]
    model, _ = load_draft(tmp_path / "draft.pt")
    assert model(torch.randn(1, H), torch.zeros(1, 128, dtype=torch.long)).shape == (1, 3, 128, 7)
    hard_only, _ = train_draft(samples, config)
    assert not torch.equal(hard_only["model_state_dict"]["head.weight"], checkpoint["model_state_dict"]["head.weight"])
    with pytest.raises(ValueError, match="train.distill_weight must be a number >= 0, got -1"):
        DraftTrainConfig(distill_weight=-1)


# ---- verify -------------------------------------------------------------------------------------------

def edited(trained: dict[str, Any], tmp_path: Path, edit: Any) -> Path:
    """A copy of the good checkpoint after `edit(ckpt)`."""
    ckpt = torch.load(trained["path"], weights_only=False)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


def assert_refused(result: dict[str, Any], check: str) -> None:
    """Failed `check`, so the checkpoint is malformed: verify stops the pipeline naming the check."""
    assert not result["passed"] and not result[check]["passed"] and not result["well_formed"]
    assert check in malformed(result)


def test_verify_accepts_the_trained_checkpoint(trained: dict[str, Any]) -> None:
    result = verify_checkpoint(trained["path"], min_val_accuracy=0.8, input_dim=H)
    assert result["passed"], result
    assert set(result) == {"file_readable", "required_keys", "val_accuracy", "projection_present",
                           "loads_into_fresh_model", "output_shape", "finite_logits", "well_formed", "passed"}
    assert result["well_formed"] and malformed(result) == ""


def test_verify_refuses_missing_keys(trained: dict[str, Any], tmp_path: Path) -> None:
    def drop(ckpt: dict) -> None:
        del ckpt["optimizer_state_dict"], ckpt["val_accuracies_per_layer"]
    result = verify_checkpoint(edited(trained, tmp_path, drop), 0.8)
    assert_refused(result, "required_keys")
    assert "optimizer_state_dict" in result["required_keys"]["detail"]


def test_verify_refuses_a_checkpoint_without_projection(trained: dict[str, Any], tmp_path: Path) -> None:
    def drop(ckpt: dict) -> None:
        del ckpt["model_state_dict"]["input_projection.weight"], ckpt["model_state_dict"]["input_projection.bias"]
    result = verify_checkpoint(edited(trained, tmp_path, drop), 0.8)
    assert_refused(result, "projection_present")
    assert not result["loads_into_fresh_model"]["passed"]
    assert result["output_shape"]["detail"].startswith("skipped:")


def test_verify_refuses_a_wrong_output_shape(trained: dict[str, Any], tmp_path: Path) -> None:
    def two_layers(ckpt: dict) -> None:
        ckpt["config"]["num_coarse_layers"] = 2
        ckpt["model_state_dict"] = RFSQDraftModelWithProjection(DraftConfig.from_dict(ckpt["config"])).state_dict()
    result = verify_checkpoint(edited(trained, tmp_path, two_layers), 0.8)
    assert result["loads_into_fresh_model"]["passed"]
    assert_refused(result, "output_shape")
    assert "[1, 2, 128, 7]" in result["output_shape"]["detail"]


def test_verify_records_a_draft_below_the_bar_as_well_formed(trained: dict[str, Any], tmp_path: Path) -> None:
    """Below the bar is a result (evaluated, with the verdict), not a malformed checkpoint."""
    def worse(ckpt: dict) -> None:
        ckpt["val_accuracy"], ckpt["val_accuracies_per_layer"] = 0.5, [0.6, 0.5, 0.4]
    result = verify_checkpoint(edited(trained, tmp_path, worse), 0.85)
    assert not result["passed"] and result["well_formed"] and malformed(result) == ""
    assert result["val_accuracy"] == {"passed": False, "below_bar": True,
                                      "detail": "0.500 is below the bar 0.850 (per layer 0.600, 0.500, 0.400)"}
    assert [name for name, check in result.items() if isinstance(check, dict) and not check["passed"]] == ["val_accuracy"]


def test_verify_calls_a_non_numeric_accuracy_malformed(trained: dict[str, Any], tmp_path: Path) -> None:
    def broken(ckpt: dict) -> None:
        ckpt["val_accuracy"] = float("nan")
    result = verify_checkpoint(edited(trained, tmp_path, broken), 0.85)
    assert_refused(result, "val_accuracy")
    assert result["val_accuracy"]["below_bar"] is False


def test_verify_refuses_a_truncated_file(trained: dict[str, Any], tmp_path: Path) -> None:
    data = trained["path"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    result = verify_checkpoint(tmp_path / "truncated.pt", 0.8)
    assert_refused(result, "file_readable")
    assert "truncated.pt" in result["file_readable"]["detail"]
    assert all(result[name]["detail"].startswith("skipped:") for name in ("required_keys", "finite_logits"))
