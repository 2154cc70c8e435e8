"""Demonstration files in LIBERO's own HDF5 layout, and the action chunks cut from them.

One file per task, `<task_name>_demo.hdf5`, as LIBERO ships them, so that the official LIBERO
demonstrations can be dropped in place of the expert's:

    data/                       attrs: problem_info (JSON: problem_name, domain_name, language_instruction),
                                       env_args (JSON), bddl_file_name, num_demos, total, images_upright
    data/demo_<i>/              attrs: num_samples, seed (ours only)
        actions      [T, 7]     float
        states       [T, S]     flattened MuJoCo state before each action
        rewards      [T], dones [T]
        robot_states [T, 9]     gripper qpos (2), eef pos (3), eef quat (4)
        obs/agentview_rgb    [T, H, W, 3] uint8
        obs/eye_in_hand_rgb  [T, H, W, 3] uint8
        obs/ee_pos [T, 3], obs/ee_ori [T, 3] (axis-angle), obs/gripper_states [T, 2], obs/joint_states [T, 7]

LIBERO's own files store images upside down (as MuJoCo renders them); ours store them upright and
say so in `images_upright`. The reader returns upright images either way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from rsd.contract import ACTION_DIM, CHUNK_LEN
from rsd.io import atomic_path

DEMO_SUFFIX = "_demo.hdf5"


def proprio_vector(ee_pos: np.ndarray, ee_ori: np.ndarray, gripper_states: np.ndarray) -> np.ndarray:
    """The policy's proprio input, float32 [..., PROPRIO_DIM]: eef position (3), eef axis-angle (3), gripper
    finger qpos (2), for one step ([3], [3], [2]) or an episode ([T, 3], ...). The one definition, so that
    the policy is trained (from demos) and run (from live observations) on the same vector."""
    return np.concatenate([ee_pos, ee_ori, gripper_states], axis=-1).astype(np.float32)


@dataclass
class Demo:
    """One demonstration episode of T steps."""

    actions: np.ndarray  # [T, 7] float32
    states: np.ndarray  # [T, S] float64
    ee_pos: np.ndarray  # [T, 3]
    ee_ori: np.ndarray  # [T, 3] axis-angle
    gripper_states: np.ndarray  # [T, 2]
    joint_states: np.ndarray  # [T, 7]
    agentview: np.ndarray | None = None  # [T, H, W, 3] uint8, upright
    wrist: np.ndarray | None = None  # [T, H, W, 3] uint8, upright
    seed: int | None = None  # placement seed, for demos we made
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def proprio(self) -> np.ndarray:
        """[T, 8] float32: the policy's proprio input at every step (see `proprio_vector`)."""
        return proprio_vector(self.ee_pos, self.ee_ori, self.gripper_states)


@dataclass
class TaskDemos:
    """All demonstrations of one task, with the task's identity."""

    task_name: str
    instruction: str
    demos: list[Demo]
    bddl_file: str = ""


def demo_path(folder: str | Path, task_name: str) -> Path:
    return Path(folder) / f"{task_name}{DEMO_SUFFIX}"


def write_task_demos(path: str | Path, task: TaskDemos, env_args: dict | None = None) -> None:
    """Write one task's demos to `path` (atomically: a crash leaves no file that looks complete)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": task.task_name, "domain_name": "libero_spatial", "language_instruction": task.instruction}
        )
        data.attrs["env_args"] = json.dumps(env_args or {})
        data.attrs["bddl_file_name"] = task.bddl_file
        data.attrs["num_demos"] = len(task.demos)
        data.attrs["total"] = sum(len(d) for d in task.demos)
        data.attrs["images_upright"] = True
        for i, d in enumerate(task.demos):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = len(d)
            if d.seed is not None:
                g.attrs["seed"] = d.seed
            g.create_dataset("actions", data=d.actions.astype(np.float32))
            g.create_dataset("states", data=d.states)
            rewards = np.zeros(len(d), dtype=np.uint8)
            rewards[-1] = 1  # only successful episodes are kept; success on the last step
            g.create_dataset("rewards", data=rewards)
            g.create_dataset("dones", data=rewards)
            g.create_dataset("robot_states", data=np.concatenate([d.gripper_states, d.ee_pos, _axis_angle_to_quat(d.ee_ori)], axis=1))
            obs = g.create_group("obs")
            for key, value in (("ee_pos", d.ee_pos), ("ee_ori", d.ee_ori), ("gripper_states", d.gripper_states), ("joint_states", d.joint_states)):
                obs.create_dataset(key, data=value.astype(np.float32))
            for key, images in (("agentview_rgb", d.agentview), ("eye_in_hand_rgb", d.wrist)):
                if images is not None:
                    obs.create_dataset(key, data=images, chunks=(1, *images.shape[1:]), compression="gzip", compression_opts=1)


class BadDemoData(ValueError):
    """Demo data no model may train on (NaN or inf, images of the wrong kind or count), named by file, dataset
    and first bad step."""


def read_task_demos(path: str | Path, images: bool = True) -> TaskDemos:
    """Read one task's demo file (ours or LIBERO's). Raises ValueError naming the file if it is not one, and
    BadDemoData (a ValueError naming the file, the dataset and the first bad step) if its data is not fit to
    train on (`_read_demo`): the expert's files and those imported through `demos.source` alike."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demos file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError("no 'data' group")
            data = f["data"]
            info = json.loads(data.attrs["problem_info"])
            upright = bool(data.attrs.get("images_upright", False))
            names = sorted((k for k in data.keys() if k.startswith("demo_")), key=lambda k: int(k[5:]))
            demos = [_read_demo(data[name], images, upright) for name in names]
            bddl = str(data.attrs.get("bddl_file_name", ""))
    except BadDemoData as exc:
        raise BadDemoData(f"{path}: {exc}") from None
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable LIBERO demos file: {exc}") from exc
    if not demos:
        raise ValueError(f"{path} holds no demonstrations (expected data/demo_0, data/demo_1, ...)")
    instruction = "".join(info["language_instruction"]).strip('"')
    return TaskDemos(task_name=info.get("problem_name", path.name[: -len(DEMO_SUFFIX)]), instruction=instruction, demos=demos, bddl_file=bddl)


def _read_demo(g: h5py.Group, images: bool, upright: bool) -> Demo:
    """One demo, refused (BadDemoData) where its data would train a model on garbage: NaN or inf in the actions,
    the proprio inputs or the states, a length that differs from the actions', images that are not [T, H, W, 3]
    uint8 (checked from the file's metadata even where the frames are not read)."""
    obs, where = g["obs"], g.name.lstrip("/")  # data/demo_3, as h5py tools name it
    actions = g["actions"][()].astype(np.float32)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
        raise ValueError(f"{where}/actions has shape {actions.shape}, expected [T, {ACTION_DIM}]")
    steps = len(actions)
    _check_finite(actions, f"{where}/actions")
    states = _steps(g["states"][()], f"{where}/states", steps, None)
    proprio = {key: _steps(obs[key][()].astype(np.float32), f"{where}/obs/{key}", steps, width)
               for key, width in (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2))}
    for key in ("agentview_rgb", "eye_in_hand_rgb"):
        if images or key in obs:
            _check_frames(obs[key], f"{where}/obs/{key}", steps)

    def frames(key: str) -> np.ndarray | None:
        if not images:
            return None
        x = obs[key][()]
        return x if upright else np.ascontiguousarray(x[:, ::-1])  # MuJoCo's rows run bottom to top

    return Demo(
        actions=actions,
        states=states,
        ee_pos=proprio["ee_pos"],
        ee_ori=proprio["ee_ori"],
        gripper_states=proprio["gripper_states"],
        joint_states=obs["joint_states"][()].astype(np.float32),
        agentview=frames("agentview_rgb"),
        wrist=frames("eye_in_hand_rgb"),
        seed=int(g.attrs["seed"]) if "seed" in g.attrs else None,
    )


def _check_finite(x: np.ndarray, name: str) -> None:
    """NaN or inf in per-step data `x` [T, ...]: refused with the first bad step."""
    bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if bad.any():
        step = int(np.argmax(bad))
        kind = "NaN" if np.isnan(x[step]).any() else "inf"
        raise BadDemoData(f"{name} holds {kind} at step {step} ({int(bad.sum())} of {len(x)} steps not finite)")


def _steps(x: np.ndarray, name: str, steps: int, width: int | None) -> np.ndarray:
    """Per-step data `x`, checked: [steps, width] (any width if None), finite."""
    if x.ndim != 2 or len(x) != steps or (width is not None and x.shape[1] != width):
        raise BadDemoData(f"{name} has shape {list(x.shape)}, expected [{steps}, {width or 'S'}] "
                          f"(one row per action)")
    _check_finite(x, name)
    return x


def _check_frames(dataset: h5py.Dataset, name: str, steps: int) -> None:
    """Camera frames: [steps, H, W, 3] uint8, from the dataset's metadata (the frames need not be read)."""
    shape = list(dataset.shape)
    if dataset.dtype != np.uint8:
        raise BadDemoData(f"{name} holds {dataset.dtype} images, expected uint8 (RGB 0..255)")
    if len(shape) != 4 or shape[-1] != 3:
        raise BadDemoData(f"{name} has shape {shape}, expected [T, H, W, 3] (RGB frames)")
    if shape[0] != steps:
        raise BadDemoData(f"{name} holds {shape[0]} frames for {steps} actions, expected one per action "
                          f"(step {min(shape[0], steps)} is the first without its pair)")


def demo_files(folder: str | Path) -> list[Path]:
    """The task demo files of a folder, sorted by name; an error naming the folder if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"demos folder not found: {folder}")
    files = sorted(folder.glob(f"*{DEMO_SUFFIX}"))
    if not files:
        raise ValueError(f"no *{DEMO_SUFFIX} files in {folder}")
    return files


def read_demos(folder: str | Path, images: bool = True) -> list[TaskDemos]:
    """Every task's demos in a folder."""
    return [read_task_demos(p, images=images) for p in demo_files(folder)]


def action_chunks(actions: np.ndarray, chunk_len: int = CHUNK_LEN) -> np.ndarray:
    """All chunks of one episode: `[T, 7] -> [T, chunk_len, 7]`, chunk t = actions[t : t + chunk_len].

    Chunks that run past the episode's end repeat its last action (the robot holds still), as in
    LIBERO's own chunked policies.
    """
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or len(actions) == 0:
        raise ValueError(f"expected actions of shape [T>0, {ACTION_DIM}], got {actions.shape}")
    padded = np.concatenate([actions, np.repeat(actions[-1:], chunk_len - 1, axis=0)])
    index = np.arange(len(actions))[:, None] + np.arange(chunk_len)[None, :]  # [T, chunk_len]
    return padded[index]


def _axis_angle_to_quat(axis_angle: np.ndarray) -> np.ndarray:
    """[T, 3] axis-angle -> [T, 4] quaternion (x, y, z, w), robosuite's convention."""
    angle = np.linalg.norm(axis_angle, axis=1, keepdims=True)
    axis = np.divide(axis_angle, angle, out=np.zeros_like(axis_angle), where=angle > 1e-12)
    return np.concatenate([axis * np.sin(angle / 2), np.cos(angle / 2)], axis=1)


def split_episodes(num_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, held-out) episode indices, at least one of each.

    Splits are by episode because the samples of one episode overlap (chunk t and t+1 share 7 actions,
    neighbouring frames look alike): a split by sample would leak the held-out set into training.
    """
    if num_episodes < 2:
        raise ValueError(f"need at least 2 episodes to hold some out, got {num_episodes}")
    order = np.random.default_rng(seed).permutation(num_episodes)
    num_val = min(max(1, round(val_fraction * num_episodes)), num_episodes - 1)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
