"""The demos stage end to end on a tiny real run, and the demo file format."""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from rsd.data import (BadDemoData, Demo, TaskDemos, action_chunks, demo_files, read_demos, read_task_demos,
                      write_task_demos)
from rsd.demos import DemosConfig, make_demos
from rsd.params import section
from rsd.sim.env import SimConfig

TASK = 2  # bowl at the table centre: the expert's quickest task


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demos") / "demos"
    config = DemosConfig(tasks=[TASK], attempts_per_task=1, extra_attempts={TASK: 1, 5: 3}, workers=1)
    metrics = make_demos(config, SimConfig(image_size=32), seed=7, out_dir=out)
    return out, metrics


def test_stage_writes_libero_layout_that_reads_back(stage_run):
    out, metrics = stage_run
    assert metrics["episodes"] == 2 and metrics["kept"] >= 1, metrics  # 1 + 1 extra; task 5 is not demonstrated
    assert set(metrics) >= {"success_rate", "episodes", "kept", "per_task", "mean_length", "within_budget", "frames", "wall_seconds"}
    (path,) = demo_files(out)
    task = read_task_demos(path)
    assert "black bowl" in task.instruction
    # relative to LIBERO's bddl_files folder: the same demos written on another machine are the same bytes
    assert task.bddl_file.startswith("libero_spatial/") and task.bddl_file.endswith(".bddl"), task.bddl_file
    assert len(task.demos) == metrics["kept"]
    demo = task.demos[0]
    T = len(demo)
    assert sum(len(d) for d in task.demos) == metrics["frames"]
    assert demo.actions.shape == (T, 7) and np.abs(demo.actions).max() <= 1.0
    assert demo.agentview.shape == demo.wrist.shape == (T, 32, 32, 3) and demo.agentview.dtype == np.uint8
    assert demo.proprio.shape == (T, 8) and demo.joint_states.shape == (T, 7)
    assert demo.states.shape[0] == T and demo.seed is not None
    with h5py.File(path) as f:  # the keys LIBERO's own loaders read
        assert {"problem_info", "env_args", "num_demos", "total"} <= set(f["data"].attrs)
        assert {"agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states", "joint_states"} <= set(f["data/demo_0/obs"])
    assert not out.with_name(out.name + ".partial").exists()


def test_official_layout_images_are_turned_upright(stage_run, tmp_path):
    """A file without our `images_upright` flag is LIBERO's: its frames come back flipped."""
    out, _ = stage_run
    (path,) = demo_files(out)
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    with h5py.File(copy, "a") as f:
        del f["data"].attrs["images_upright"]
    ours, official = read_task_demos(path).demos[0], read_task_demos(copy).demos[0]
    assert not np.array_equal(ours.agentview, official.agentview)
    assert np.array_equal(ours.agentview[:, ::-1], official.agentview)


def test_copies_official_demo_folder(stage_run, tmp_path):
    out, _ = stage_run
    metrics = make_demos(DemosConfig(source=str(out)), SimConfig(), seed=0, out_dir=tmp_path / "copy")
    assert metrics["kept"] == len(read_demos(tmp_path / "copy")[0].demos)


def test_missing_and_corrupt_demo_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_demos(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no .*_demo.hdf5 files"):
        read_demos(tmp_path)
    bad = tmp_path / "task_demo.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="task_demo.hdf5"):
        read_demos(tmp_path)


@pytest.mark.parametrize("tasks", [[12], [], [True], ["3"], 3])
def test_task_lists_are_checked_by_every_stage(tasks) -> None:
    from rsd.bench import BenchConfig
    from rsd.collect import CollectConfig
    from rsd.evaluation import EvalConfig

    # a list of ints that are not task indices is a range error, anything else a type error: both name the field
    expected = r"a list of ints? or null" if tasks in (3, [True], ["3"]) else r"null or a non-empty list of task indices in 0\.\.9"
    for name, config in (("demos", DemosConfig), ("collect", CollectConfig), ("eval", EvalConfig), ("bench", BenchConfig)):
        with pytest.raises(ValueError, match=rf"{name}\.tasks must be {expected}, got {re.escape(repr(tasks))}"):
            config(tasks=tasks)
    assert DemosConfig(tasks=[2, 0]).task_indices == [2, 0] and EvalConfig().task_indices == list(range(10))


def test_bad_demos_params_are_refused():
    with pytest.raises(ValueError, match="demos.attempts_per_task"):
        DemosConfig(attempts_per_task=0)
    for extra in ({10: 5}, {4: -1}):
        with pytest.raises(ValueError, match=r"demos.extra_attempts must be a mapping of task indices 0\.\.9 to non-negative ints"):
            DemosConfig(extra_attempts=extra)
    for extra in ({"4": 5}, [4, 7]):
        with pytest.raises(ValueError, match=r"demos.extra_attempts must be a mapping of .*ints? or null, got"):
            DemosConfig(extra_attempts=extra)
    assert [DemosConfig(attempts_per_task=3, extra_attempts={4: 2}).attempts(t) for t in (3, 4)] == [3, 5]
    with pytest.raises(ValueError, match="demos.bogus"):
        section({"demos": {"bogus": 1}}, "demos", DemosConfig)


def test_action_chunks_pad_with_last_action():
    actions = np.arange(3 * 7, dtype=np.float32).reshape(3, 7)
    chunks = action_chunks(actions)
    assert chunks.shape == (3, 8, 7)
    assert np.array_equal(chunks[0, :3], actions) and np.array_equal(chunks[0, 3:], np.repeat(actions[-1:], 5, 0))
    with pytest.raises(ValueError, match=r"\[T>0, 7\]"):
        action_chunks(np.zeros((4, 6)))


# --- garbage demo data never trains a model ---------------------------------------------------------

def _write_demos(folder: Path, steps: int = 6) -> Path:
    """A task file of two small demos, synthetic (no simulator), in the stage's layout."""
    rng = np.random.default_rng(0)

    def demo() -> Demo:
        return Demo(actions=rng.uniform(-1, 1, (steps, 7)).astype(np.float32), states=rng.normal(size=(steps, 9)),
                    ee_pos=rng.normal(size=(steps, 3)), ee_ori=rng.normal(size=(steps, 3)),
                    gripper_states=rng.normal(size=(steps, 2)), joint_states=rng.normal(size=(steps, 7)),
                    agentview=rng.integers(0, 256, (steps, 8, 8, 3), dtype=np.uint8),
                    wrist=rng.integers(0, 256, (steps, 8, 8, 3), dtype=np.uint8))

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pick_bowl_demo.hdf5"
    write_task_demos(path, TaskDemos("pick_bowl", "pick up the black bowl", [demo(), demo()]))
    return path


def _replace(path: Path, name: str, data: np.ndarray) -> None:
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_dataset(name, data=data)


def test_synthetic_demos_read_back_whole(tmp_path: Path) -> None:
    path = _write_demos(tmp_path)
    with h5py.File(path) as f:
        actions = f["data/demo_1/actions"][()]
    task = read_task_demos(path)
    assert len(task.demos) == 2 and np.array_equal(task.demos[1].actions, actions)


@pytest.mark.parametrize("dataset, step, value", [
    ("actions", 3, np.nan), ("obs/ee_pos", 0, np.inf), ("obs/ee_ori", 5, -np.inf), ("obs/gripper_states", 2, np.nan),
    ("states", 4, np.nan)])
@pytest.mark.parametrize("images", [True, False])
def test_non_finite_demo_data_is_refused_naming_file_dataset_and_step(tmp_path: Path, dataset: str, step: int,
                                                                      value: float, images: bool) -> None:
    path = _write_demos(tmp_path)
    name = f"data/demo_1/{dataset}"
    with h5py.File(path) as f:
        data = f[name][()]
    data[step, 1] = value
    data[step + 1:, 0] = value  # later bad steps too: the first is named
    _replace(path, name, data)
    kind = "NaN" if np.isnan(value) else "inf"
    with pytest.raises(BadDemoData, match=rf"^{re.escape(str(path))}: {name} holds {kind} at step {step} "
                                          rf"\(\d of 6 steps not finite\)$"):
        read_task_demos(path, images=images)


@pytest.mark.parametrize("frames, message", [
    (np.zeros((6, 8, 8, 3), np.float32), "holds float32 images, expected uint8"),
    (np.zeros((6, 8, 8, 4), np.uint8), r"has shape \[6, 8, 8, 4\], expected \[T, H, W, 3\]"),
    (np.zeros((6, 8, 8), np.uint8), r"has shape \[6, 8, 8\], expected \[T, H, W, 3\]"),
    (np.zeros((4, 8, 8, 3), np.uint8), r"holds 4 frames for 6 actions, expected one per action \(step 4 is the first"),
])
@pytest.mark.parametrize("images", [True, False])  # checked from the file's metadata where the frames are not read
def test_images_of_the_wrong_kind_or_count_are_refused(tmp_path: Path, frames: np.ndarray, message: str,
                                                      images: bool) -> None:
    path = _write_demos(tmp_path)
    _replace(path, "data/demo_0/obs/eye_in_hand_rgb", frames)
    with pytest.raises(BadDemoData, match=rf"^{re.escape(str(path))}: data/demo_0/obs/eye_in_hand_rgb {message}"):
        read_task_demos(path, images=images)


def test_proprio_of_another_length_is_refused(tmp_path: Path) -> None:
    path = _write_demos(tmp_path)
    _replace(path, "data/demo_0/obs/ee_pos", np.zeros((5, 3), np.float32))
    with pytest.raises(BadDemoData, match=r"data/demo_0/obs/ee_pos has shape \[5, 3\], expected \[6, 3\]"):
        read_task_demos(path, images=False)


def test_imported_demos_are_checked_before_any_is_used(tmp_path: Path) -> None:
    """`demos.source` files: a NaN refuses the folder, and the stage's earlier demos stay as they were."""
    source = tmp_path / "libero"
    path = _write_demos(source)
    with h5py.File(path) as f:
        actions = f["data/demo_0/actions"][()]
    actions[2, 6] = np.nan
    _replace(path, "data/demo_0/actions", actions)
    out = tmp_path / "demos"
    out.mkdir()
    (out / "earlier_demo.hdf5").write_text("the demos dvc.lock describes")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: data/demo_0/actions holds NaN at step 2"):
        make_demos(DemosConfig(source=str(source)), SimConfig(), seed=0, out_dir=out)
    assert [p.name for p in out.iterdir()] == ["earlier_demo.hdf5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos", "libero"]  # no half-filled folder left


def test_demos_source_is_expert_or_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    for source in (str(tmp_path / "nowhere"), str(tmp_path / "a_file"), "Expert", ""):
        with pytest.raises(ValueError, match=rf"^demos\.source must be 'expert' or an existing folder of LIBERO "
                                             rf"<task>_demo\.hdf5 files, got {re.escape(repr(source))}$"):
            section({"demos": {"source": source}}, "demos", DemosConfig)
    assert DemosConfig(source=str(tmp_path)).source == str(tmp_path) and DemosConfig().source == "expert"
