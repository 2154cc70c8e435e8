"""LIBERO libero_spatial environments: build, reset, step, and replay recorded states as images.

The wrapper hides LIBERO quirks the rest of the pipeline should not have to know:

- camera images come out of MuJoCo upside down; here they are always upright;
- a fresh placement after a soft reset puts objects that sit on fixtures (cabinet, stove) in mid-air,
  some seeds place objects inside each other, and the gripper command carries over from the last
  episode; here `reset(seed=s)` gives a valid scene that depends on `s` alone, in ~0.2 s;
- fixtures are placed in the MuJoCo *model*, not the state, so replaying states is only faithful
  after resetting with the same seed (or init state) that produced them.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

# Headless rendering on the CPU; must be decided before robosuite is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import robosuite.utils.transform_utils as T  # noqa: E402
from libero.libero import benchmark, get_libero_path  # noqa: E402
from libero.libero.envs import OffScreenRenderEnv  # noqa: E402
from libero.libero.envs.env_wrapper import ControlEnv  # noqa: E402
from robosuite.utils.binding_utils import MjSim  # noqa: E402

from rsd.config import Config, is_int  # noqa: E402
from rsd.sim.suite import NUM_TASKS, SUITE  # noqa: E402
from rsd.data import proprio_vector  # noqa: E402

AGENTVIEW = "agentview"
WRIST = "robot0_eye_in_hand"
# Fresh placements whose objects interpenetrate by more than this (metres) are resampled.
PENETRATION = 0.001
MAX_PLACEMENT_TRIES = 100
# Gripper open, no motion: what the suite's evaluation sends while objects settle.
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


@dataclass
class SimConfig(Config):
    """How LIBERO environments are built.

    image_size: height = width of both camera images, in pixels (> 0).
    fast_render: turn off what costs most on a CPU renderer and matters least to a policy: 4x MSAA
        (model.vis.quality.offsamples = 0) and reflections (material reflectance zeroed). Measured
        ~2.9x faster (both cameras: 5.4 -> 15 frames/s); images lose anti-aliasing and the table's
        reflections. Shadows cost nothing measurable (within 7%) and stay on.
    mesh_cell_mm: simplify the visual meshes for rendering (see `simplify_visual_meshes`): vertices
        within one cube of this side (mm) merge into one; 0 keeps the meshes whole (>= 0). The
        renderer's cost is the scene's triangles, most of them far below a pixel at 128 px: at 4 mm a
        libero_spatial scene keeps ~35% of its ~290k faces, both cameras render ~2.4x faster (68 ->
        28 ms), and a pixel differs from the whole meshes' image by ~1.4/255 on average. Physics
        never reads a visual mesh's faces.
    settle_steps: no-op steps after every reset so objects settle before recording (>= 0).
    max_steps: the suite's step budget per episode, not counting settle steps (> 0).
    """

    prefix: ClassVar[str] = "sim"

    image_size: int = 128
    fast_render: bool = True
    mesh_cell_mm: float = 4.0
    settle_steps: int = 10
    max_steps: int = 220

    def validate(self) -> None:
        self.check(self.image_size >= 1, "image_size", "an int >= 1")
        self.check(self.mesh_cell_mm >= 0, "mesh_cell_mm", "a number >= 0 (0 = whole meshes)")
        self.check(self.settle_steps >= 0, "settle_steps", "an int >= 0")
        self.check(self.max_steps >= 1, "max_steps", "an int >= 1")


VISUAL_GROUP = 1  # robosuite and LIBERO put visual geoms in group 1, collision geoms in group 0 (not rendered)


def simplify_visual_meshes(model: mujoco.MjModel, cell: float) -> None:
    """Vertex clustering of the visual geoms' meshes, in place: in each cube of side `cell` (metres, mesh
    frame) one vertex stands for all, and the faces that collapse are dropped.

    Only the face lists shrink (each mesh's first `mesh_facenum` faces are the kept ones): vertices,
    normals and texture coordinates stay where they are, so a kept face's corners keep their own normal
    and texture coordinate. The renderer reads faces when its context is made; physics never does
    (collisions use convex hulls and inertia was computed at compile time).
    """
    meshes = {int(model.geom_dataid[g]) for g in range(model.ngeom)
              if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH and model.geom_group[g] == VISUAL_GROUP}
    for mesh in sorted(meshes):
        v0, nv = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
        f0, nf = model.mesh_faceadr[mesh], model.mesh_facenum[mesh]
        cells = np.floor(model.mesh_vert[v0:v0 + nv] / cell).astype(np.int64)  # [nv, 3]
        _, first, cluster = np.unique(cells, axis=0, return_index=True, return_inverse=True)
        faces = first[cluster.reshape(-1)][model.mesh_face[f0:f0 + nf]]  # [nf, 3] corners moved to their cell's vertex
        keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        kept = int(keep.sum())
        normals, texcoords = model.mesh_facenormal[f0:f0 + nf][keep], model.mesh_facetexcoord[f0:f0 + nf][keep]  # copies
        model.mesh_face[f0:f0 + kept] = faces[keep]
        model.mesh_facenormal[f0:f0 + kept] = normals
        model.mesh_facetexcoord[f0:f0 + kept] = texcoords
        model.mesh_facenum[mesh] = kept


# Rendering envs still open at exit. They are closed by an atexit hook registered after robosuite's
# own (which terminates the EGL display); atexit runs hooks last-in first-out, so ours runs first
# and the GL contexts are freed while EGL is alive, instead of raising EGLError noise at teardown.
_OPEN_RENDER_ENVS: weakref.WeakSet[LiberoEnv] = weakref.WeakSet()


def _close_open_render_envs() -> None:
    for env in list(_OPEN_RENDER_ENVS):
        env.close()


@contextlib.contextmanager
def reused_forward(sim: MjSim) -> Iterator[None]:
    """Inside the block, `sim.forward()` and `sim.step()` skip MuJoCo's position and velocity stages
    where a full pass would recompute them from the very same numbers; results stay bit-identical.

    robosuite's env step runs three full forward passes per 2 ms physics substep on one state: its
    loop's `sim.forward()`, the OSC controller's update (another `sim.forward()`) and `mj_step`'s own.
    The position stage (kinematics, collision, mass matrix) and the velocity stage are most of a
    pass's cost and depend on qpos and qvel alone, so the later two passes may reuse the first's:
    `mj_forwardSkip(mjSTAGE_VEL)` reruns only actuation (the controller changes ctrl), acceleration
    and the constraint solver (which warm-starts from the previous pass, so it still runs each time).
    A full pass normalises the quaternions in qpos in place, which can move a normalised one by an
    ulp: the stages are reused only when that normalisation would leave qpos exactly as the last full
    pass left it and qvel has not changed. Other integrators than Euler take robosuite's own path.
    """
    model, data = sim.model._model, sim.data._data
    if model.opt.integrator != mujoco.mjtIntegrator.mjINT_EULER:
        yield
        return
    last: tuple[np.ndarray, np.ndarray] | None = None  # (qpos, qvel) the last full pass computed from

    def forward() -> None:
        nonlocal last
        qpos = data.qpos.copy()
        mujoco.mj_normalizeQuat(model, qpos)  # what a full pass would do to qpos first
        if last is not None and np.array_equal(qpos, last[0]) and np.array_equal(data.qvel, last[1]):
            mujoco.mj_forwardSkip(model, data, mujoco.mjtStage.mjSTAGE_VEL, 0)
        else:
            mujoco.mj_forward(model, data)
            last = (data.qpos.copy(), data.qvel.copy())

    def step() -> None:  # mj_step, with its forward pass replaced by the one above
        mujoco.mj_checkPos(model, data)
        mujoco.mj_checkVel(model, data)
        forward()
        mujoco.mj_checkAcc(model, data)
        mujoco.mj_Euler(model, data)

    sim.forward, sim.step = forward, step  # instance attributes shadow MjSim's methods
    try:
        yield
    finally:
        del sim.forward, sim.step


def _suite() -> benchmark.Benchmark:
    """The libero_spatial benchmark in its canonical task order (its constructor prints; silence it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[SUITE]()


def _bddl_path(task: benchmark.Task) -> str:
    return os.path.normpath(os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file))


def _check_task_index(task_index: Any) -> None:
    if not (is_int(task_index) or isinstance(task_index, np.integer)) or not 0 <= task_index < NUM_TASKS:
        raise ValueError(f"task_index must be an int in 0..{NUM_TASKS - 1} ({SUITE}), got {task_index!r}")


def placement_seed(base_seed: int, stream: int, task: int, episode: int) -> int:
    """A `reset(seed=...)` seed in [0, 2**32), distinct per (base seed, stream, task, episode).

    Each stage that needs fresh placements takes its own `stream` (demos 0, collect 1, ...), so no
    two stages, tasks or episodes share a scene by accident; numpy's SeedSequence mixes the parts.
    """
    return int(np.random.SeedSequence([base_seed, stream, task, episode]).generate_state(1)[0])


class LiberoEnv:
    """One libero_spatial task: reset to a benchmark init state or a fresh seeded placement, step, render.

    render=False builds the task without cameras or a GL context (physics only, ~5x faster per
    step); such an env cannot render, but its states can be replayed by a rendering env of the
    same task after `reset` with the same seed. Physics does not depend on rendering: both reach
    bit-identical states from the same seed and actions.
    """

    def __init__(self, task_index: int, config: SimConfig, render: bool = True) -> None:
        _check_task_index(task_index)
        suite = _suite()
        task = suite.get_task(task_index)
        self.config = config
        self.task_index = int(task_index)
        self.render = render
        self._task = task
        self.init_states = suite.get_task_init_states(task_index)  # [50, S] the benchmark's evaluation scenes
        kwargs: dict[str, Any] = dict(
            bddl_file_name=_bddl_path(task),
            hard_reset=False,  # ~0.05 s resets; _home_fixtures keeps fresh placements right
            ignore_done=True,  # episode length is ours to decide, not robosuite's horizon
        )
        if render:
            self._env = OffScreenRenderEnv(
                camera_heights=config.image_size, camera_widths=config.image_size, **kwargs
            )
            if config.fast_render or config.mesh_cell_mm:
                self._make_render_fast()
            if not _OPEN_RENDER_ENVS:
                atexit.unregister(_close_open_render_envs)  # keep ours after robosuite's hook
                atexit.register(_close_open_render_envs)
            _OPEN_RENDER_ENVS.add(self)
        else:
            self._env = ControlEnv(has_offscreen_renderer=False, use_camera_obs=False, **kwargs)
        self._closed = False

    # ---- task facts -------------------------------------------------------------------------

    @staticmethod
    def task_info(task_index: int) -> tuple[str, str, str]:
        """(task name, instruction, BDDL file relative to LIBERO's bddl_files folder) of a task, without building its simulator."""
        _check_task_index(task_index)
        task = _suite().get_task(task_index)
        return task.name, task.language, os.path.join(task.problem_folder, task.bddl_file)

    @property
    def instruction(self) -> str:
        """The task's language instruction, as the benchmark states it."""
        return self._task.language

    @property
    def task_name(self) -> str:
        return self._task.name

    @property
    def num_init_states(self) -> int:
        return len(self.init_states)

    @property
    def target_object(self) -> str:
        """The object the goal moves (the black bowl), read from the task's BDDL goal `(On bowl plate)`."""
        return self._goal[1]

    @property
    def goal_object(self) -> str:
        """The object the target must end up on (the plate)."""
        return self._goal[2]

    @property
    def _goal(self) -> list[str]:
        (goal,) = self.problem["goal_state"]  # [["on", "akita_black_bowl_1", "plate_1"]]
        return goal

    @property
    def problem(self) -> dict[str, Any]:
        """The task's parsed BDDL problem: objects, fixtures, regions, initial and goal predicates."""
        return self._env.env.parsed_problem

    @property
    def object_names(self) -> list[str]:
        """Movable objects (bowls, plate, ramekin, cookie box)."""
        return list(self._env.env.objects_dict)

    @property
    def fixture_names(self) -> list[str]:
        """Fixed furniture (cabinet, stove); the table is part of the arena, not listed."""
        return list(self._env.env.fixtures_dict)

    @property
    def sim(self) -> MjSim:
        """robosuite's MjSim (model and data), for privileged readers such as the scripted expert."""
        return self._env.sim

    # ---- episode ----------------------------------------------------------------------------

    def reset(self, init_state: int | None = None, seed: int | None = None) -> dict[str, Any]:
        """Start an episode from benchmark init state `init_state` or a fresh placement from `seed`.

        Exactly one of the two. The fresh placement, and for both where the fixtures stand (that
        is in the model, not the state), come from numpy's global RNG seeded with `seed` (or
        `init_state`, so init-state episodes are reproducible too), drawn again from the same
        stream while objects interpenetrate; the caller's RNG state is restored afterwards. Then
        `settle_steps` no-op steps with the gripper open. Returns the raw observation dict, images
        upright.
        """
        if (init_state is None) == (seed is None):
            raise ValueError("reset takes exactly one of init_state or seed")
        if init_state is not None and not 0 <= init_state < self.num_init_states:
            raise ValueError(f"init_state must be in 0..{self.num_init_states - 1}, got {init_state}")
        if seed is not None and not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32 - 1 (numpy's legacy seeding), got {seed}")
        with self._cameras_off():  # nobody sees the frames until the scene has settled (~80 ms each)
            rng_state = np.random.get_state()
            try:
                np.random.seed(seed if seed is not None else init_state)
                for _ in range(MAX_PLACEMENT_TRIES):
                    self._home_fixtures()
                    self._env.reset()
                    if init_state is not None or not self._placement_overlaps():
                        break
                else:
                    raise RuntimeError(f"no valid placement for task {self.task_index}, seed {seed}")
            finally:
                np.random.set_state(rng_state)
            # The gripper's command is stateful (it ramps towards +-1) and a soft reset keeps the
            # previous episode's; start from a fresh env's zero so episodes don't depend on history.
            gripper = self._env.env.robots[0].gripper
            gripper.current_action = np.zeros_like(gripper.current_action)
            if init_state is not None:
                self._env.set_init_state(self.init_states[init_state])
            with reused_forward(self._env.sim):
                for _ in range(self.config.settle_steps):
                    self._env.step(NOOP_ACTION)
        return self._observe()

    def _observe(self) -> dict[str, Any]:
        """The observation of the current state, cameras read afresh (into this env's GL context)."""
        if self.render:
            self._use_own_gl_context()
        return self._upright(self._env.env._get_observations(force_update=True))

    def _use_own_gl_context(self) -> None:
        """robosuite renders into whichever GL context is current: make it this env's, since several
        rendering envs may live in one process."""
        self._env.sim._render_context_offscreen.gl_ctx.make_current()

    @contextlib.contextmanager
    def _cameras_off(self) -> Iterator[None]:
        """Stop rendering camera observations inside the block (physics is unaffected)."""
        cameras = [o for o in self._env.env._observables.values() if o.modality == "image"]
        for camera in cameras:
            camera.set_enabled(False)
        try:
            yield
        finally:
            for camera in cameras:
                camera.set_enabled(True)

    def _home_fixtures(self) -> None:
        """Put the fixtures back where the XML has them (the origin), as a hard reset would.

        LIBERO places an object on a fixture at `fixture_pos + R(fixture_quat) @ site_xpos`, which
        is right only while the fixture still stands at the origin when the site is read. A soft
        reset leaves it where the previous episode put it, and the bowl lands in mid-air; a hard
        reset (reloading the XML, 2-6 s) is the other way to get this right.
        """
        model = self._env.sim.model
        for fixture in self._env.env.fixtures_dict.values():
            body = model.body_name2id(fixture.root_body)
            model.body_pos[body] = 0.0
            model.body_quat[body] = (1.0, 0.0, 0.0, 0.0)

    def _placement_overlaps(self) -> bool:
        """Whether two objects (or an object and a fixture) interpenetrate after placement.

        LIBERO's samplers let some regions overlap (in task 0 the bowl's and the plate's, for ~40%
        of seeds); such scenes explode or start with the bowl on the plate's rim. The benchmark's
        init states were pruned of them; fresh placements are resampled instead.
        """
        model, data = self.sim.model, self.sim.data
        roots = {self.body_id(name) for name in self.object_names + self.fixture_names}
        for contact in data.contact[: data.ncon]:
            a = model.body_rootid[model.geom_bodyid[contact.geom1]]
            b = model.body_rootid[model.geom_bodyid[contact.geom2]]
            if a != b and a in roots and b in roots and contact.dist < -PENETRATION:
                return True
        return False

    def step(self, action: np.ndarray, render: bool = True) -> tuple[dict[str, Any], bool]:
        """Apply one 7-d OSC_POSE action in [-1, 1]; returns (raw obs, task success).

        Cameras stay off during the physics substeps and, with `render` (and a rendering env), are
        read once at the end. `render=False` skips them (most of a step's cost): the obs then has no
        images, which suits steps whose observation no policy reads. The substeps reuse forward passes
        (`reused_forward`): physics ~25% faster than robosuite's own step, with the same bits.
        """
        with self._cameras_off(), reused_forward(self._env.sim):
            obs, _, done, _ = self._env.step(np.asarray(action, dtype=np.float64))
        if render and self.render:
            return self._observe(), bool(done)
        return self._upright(obs), bool(done)

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state [S] = [time, qpos, qvel], what LIBERO stores as `states` in demos."""
        return self._env.get_sim_state().copy()

    def object_pos(self, name: str) -> np.ndarray:
        """World position [3] of an object's or fixture's root body."""
        return self.sim.data.body_xpos[self.body_id(name)].copy()

    def holds(self, name: str) -> bool:
        """Both finger pads touch object `name`: the gripper holds it (robosuite's own grasp check)."""
        env = self._env.env
        return bool(env._check_grasp(env.robots[0].gripper, env.objects_dict[name]))

    def body_id(self, name: str) -> int:
        """MuJoCo body id of an object's or fixture's root body."""
        return self._env.env.obj_body_id[name]

    # ---- rendering --------------------------------------------------------------------------

    def render_states(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replay states [T, S] without physics; returns upright (agentview, wrist), each [T, H, W, 3] uint8.

        The fixtures are part of the model, not the state: reset this env with the seed (or init
        state) the states were recorded from first. The simulator state is restored afterwards.
        Frames match those `step` returns up to one physics substep (2 ms) of motion, since a
        step's kinematics lag the state it ends in by that substep. ~30 ms a frame (both
        cameras, 128 px, fast_render, 4 mm mesh cells, this 2-core CPU machine); ~65 ms with whole
        meshes; ~200 ms without fast_render either.
        """
        if not self.render:
            raise RuntimeError("render_states needs an env built with render=True")
        states = np.asarray(states)
        if states.ndim != 2:
            raise ValueError(f"states must be [T, S], got shape {states.shape}")
        size = self.config.image_size
        self._use_own_gl_context()
        agentview = np.empty((len(states), size, size, 3), dtype=np.uint8)
        wrist = np.empty_like(agentview)
        saved = self.get_state()
        sim = self._env.sim
        for t, state in enumerate(states):
            sim.set_state_from_flattened(state)
            sim.forward()
            agentview[t] = sim.render(camera_name=AGENTVIEW, width=size, height=size)[::-1]
            wrist[t] = sim.render(camera_name=WRIST, width=size, height=size)[::-1]
        sim.set_state_from_flattened(saved)
        sim.forward()
        return agentview, wrist

    def _make_render_fast(self) -> None:
        """What `fast_render` and `mesh_cell_mm` ask for, then a new rendering context: the MSAA sample
        count and the meshes are read when the context is made; reflections go with the materials."""
        sim = self._env.sim
        if self.config.fast_render:
            sim.model.vis.quality.offsamples = 0
            sim.model.mat_reflectance[:] = 0.0
        if self.config.mesh_cell_mm:
            simplify_visual_meshes(sim.model._model, self.config.mesh_cell_mm / 1000)
        ctx = sim._render_context_offscreen
        ctx.gl_ctx.make_current()
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()

    @staticmethod
    def _upright(obs: dict[str, Any]) -> dict[str, Any]:
        """Flip camera images the right way up (MuJoCo reads pixels bottom row first)."""
        for key in (f"{AGENTVIEW}_image", f"{WRIST}_image"):
            if key in obs:
                obs[key] = np.ascontiguousarray(obs[key][::-1])
        return obs

    # ---- observations for models and demo files ---------------------------------------------

    def model_inputs(self, obs: dict[str, Any]) -> dict[str, Any]:
        """What a policy sees: upright images [H, W, 3] uint8, proprio [8] float32, instruction."""
        return {
            "agentview": obs[f"{AGENTVIEW}_image"],
            "wrist": obs[f"{WRIST}_image"],
            "proprio": proprio(obs),
            "instruction": self.instruction,
        }

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Free the simulator and, while EGL is still alive, its GL context (avoids teardown noise at exit)."""
        if self._closed:
            return
        self._closed = True
        _OPEN_RENDER_ENVS.discard(self)
        self._env.close()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CACHED_ENVS: dict[tuple[int, bool], LiberoEnv] = {}


def cached_env(task: int, config: SimConfig, render: bool = True) -> LiberoEnv:
    """This process's env of `task` (with or without rendering), built once and reused across episodes:
    building one takes seconds, a reset a fraction of one. Envs of other tasks (or another config) are
    closed first to bound a worker's memory; the rendering and the physics-only env of one task live side
    by side (the demos stage records with one and renders with the other)."""
    key = (task, render)
    env = _CACHED_ENVS.get(key)
    if env is None or env.config != config:
        for other in [k for k, e in _CACHED_ENVS.items() if k[0] != task or k == key or e.config != config]:
            _CACHED_ENVS.pop(other).close()
        _CACHED_ENVS[key] = env = LiberoEnv(task, config, render=render)
    return env


def low_dim_obs(obs: dict[str, Any]) -> dict[str, np.ndarray]:
    """LIBERO's low-dim demo observations for one step, with the names its demo files use."""
    return {
        "ee_pos": np.asarray(obs["robot0_eef_pos"], dtype=np.float64),  # [3]
        "ee_ori": T.quat2axisangle(np.array(obs["robot0_eef_quat"], dtype=np.float64)),  # [3] axis-angle
        "gripper_states": np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),  # [2]
        "joint_states": np.asarray(obs["robot0_joint_pos"], dtype=np.float64),  # [7]
    }


def proprio(obs: dict[str, Any]) -> np.ndarray:
    """The policy's proprio input [8] float32 from a live observation: `rsd.data.proprio_vector` of the
    low-dim values a demo file records for the same step."""
    low = low_dim_obs(obs)
    return proprio_vector(low["ee_pos"], low["ee_ori"], low["gripper_states"])
