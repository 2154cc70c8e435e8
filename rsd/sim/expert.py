"""A scripted expert for libero_spatial: pinch the target bowl's wall, carry it, set it on the plate.

The akita black bowl (~10.7 cm across) is wider than the Panda gripper opens (~8 cm), so the expert
pinches its wall: one finger inside the bowl, one outside. Where along the rim it pinches is chosen
per episode from the scene's collision geometry (the outer finger and the hand must stay clear of
other objects, drawer walls and cabinet panels) and the arm's reach. Then, in phases:

    hover -> descend -> close -> lift -> carry -> lower        (contact with the plate: success, done)
    a lift that leaves the bowl behind, or a bowl slipping out  -> plan again from hover (twice at most)
    a lowering that stalls short of success                     -> release -> retreat -> plan again

Every target is recomputed each step from the current object poses, so the expert corrects for the
bowl swinging in the grasp. Success in libero_spatial is contact of the bowl with the plate with
their centres within 3 cm, so the bowl is placed, not dropped; the gripper opens only to recover.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import robosuite.utils.transform_utils as T
from robosuite.utils.binding_utils import MjSim

from rsd.sim.env import LiberoEnv, low_dim_obs

# Control. OSC_POSE scales a position action of 1 to 5 cm per step, but the arm tops out at ~1.25 cm
# per step and keeps coasting after a command stops, so position is steered by a PD law.
POS_GAIN = 40.0  # action per metre of position error
VEL_GAIN = 100.0  # action per metre-per-step of eef velocity (damps the coasting)
ROT_GAIN = 1.5  # action per radian of orientation error (1 -> 0.5 rad per step)
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0
# Gripper pointing straight down, fingers closing along world y: a yaw of 0 (the start pose).
DOWN = np.diag([1.0, -1.0, -1.0])

# Grasp geometry (metres).
WALL_INSET = 0.006  # pinch the wall this far inside the bowl's outer radius (the wall's middle)
GRASP_DEPTH = 0.025  # finger pads this far below the rim
APPROACH_HEIGHT = 0.06  # hover this far above the grasp point before descending
HOVER_RADIUS = 0.02  # start descending once this close (horizontally) above the pinch point
FUNNEL_SLOPE = 4.0  # while descending, stay this many times the horizontal error above the pinch point
# Errors the pinch tolerates: across the wall a few mm (the open fingers clear it by ~3.5 cm), along
# it more. An arm near the end of its reach (the bowl on the cabinet) may never close them, and a
# funnel that waits for it stalls high and pinches the rim, or air.
ACROSS_SLACK = 0.003
ALONG_SLACK = 0.008
# Choosing where to pinch: score = min(clearance, CLEARANCE_ENOUGH) - reach and turning penalties.
CLEARANCE_ENOUGH = 0.02  # metres; gripper sample points sit 1 cm apart, so under ~5 mm may be a collision
REACH = 0.76  # horizontal distance from the arm's base beyond which reaching down gets hard
REACH_PENALTY = 2.0  # score lost per metre beyond REACH
TURN_PENALTY = 0.004  # score lost for a 90-degree wrist turn: a tie-breaker towards the start pose

# Transport (heights of the bowl's bottom, metres; the table top is at 0.90).
LIFT_MARGIN = 0.03  # lift the bowl this far above its start and anything tall around it
CARRY_BOTTOM = 0.99  # carry height, clear of the ramekin, cookie box and the other bowl
PULL_OUT = 0.03  # for a bowl inside a drawer: pull it this far out while lifting

# Phase endings.
AT_TARGET = 0.008  # a phase ends within 8 mm of its target
ALIGNED = 0.012  # bowl-over-plate xy error at which lowering starts
OVERSHOOT = 0.03  # aim this far past a height that only has to be passed
STALL_SPEED = 0.0015  # metres per step: slower than this while pushing for STALL_STEPS steps is a stall
PUSHING = 0.3  # position action magnitude that counts as pushing
STALL_STEPS = 3
DROPPED = 0.03  # the bowl hanging this much lower than when lifted has slipped out of the grasp
MAX_REGRASPS = 2


class Phase(enum.Enum):
    HOVER = enum.auto()
    DESCEND = enum.auto()
    CLOSE = enum.auto()
    LIFT = enum.auto()
    CARRY = enum.auto()
    LOWER = enum.auto()
    RELEASE = enum.auto()
    RETREAT = enum.auto()


# A phase that runs this many steps gives up and moves on (RETREAT, out of regrasps, stays put).
PHASE_CAP = {
    Phase.HOVER: 90, Phase.DESCEND: 30, Phase.CLOSE: 14, Phase.LIFT: 40,
    Phase.CARRY: 90, Phase.LOWER: 40, Phase.RELEASE: 6, Phase.RETREAT: 15,
}


@dataclass
class Boxes:
    """Oriented collision boxes of the obstacles: centres [N, 3], rotations [N, 3, 3], half sizes [N, 3]."""

    centres: np.ndarray
    rotations: np.ndarray
    halves: np.ndarray

    def distances(self, points: np.ndarray) -> np.ndarray:
        """Distance [P, N] from each point [P, 3] to each box (0 inside it)."""
        local = np.einsum("nji,pnj->pni", self.rotations, points[:, None, :] - self.centres[None])
        outside = np.maximum(np.abs(local) - self.halves[None], 0.0)  # [P, N, 3]
        return np.linalg.norm(outside, axis=-1)

    def clearance(self, points: np.ndarray) -> float:
        """Distance from the points [P, 3] to the nearest box."""
        return float(self.distances(points).min())

    def corners(self) -> np.ndarray:
        """World corners [N, 8, 3] of every box."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        return self.centres[:, None] + np.einsum("nij,nkj->nki", self.rotations, signs[None] * self.halves[:, None])

    def top_near(self, xy: np.ndarray, radius: float) -> float:
        """Highest box top within `radius` of the vertical line through `xy` (-inf if none)."""
        column = np.array([[xy[0], xy[1], z] for z in np.arange(0.85, 1.45, 0.01)])  # [P, 3]
        near = self.distances(column).min(axis=0) < radius  # [N]
        return float(self.corners()[near, :, 2].max()) if near.any() else -np.inf


@dataclass
class Grasp:
    """Where to pinch: the unit radial direction [2] from the bowl's axis to the pinched wall, and the
    gripper yaw (rad, in [-pi/2, pi/2)) that makes the fingers close along it."""

    direction: np.ndarray
    yaw: float


class ScriptedExpert:
    """Solves libero_spatial tasks from privileged object poses and collision geometry.

    Use: `expert = ScriptedExpert(env); expert.reset(obs)` after `env.reset(...)`, then
    `env.step(expert.act(obs))` until done. `act` returns a 7-d action in [-1, 1].
    """

    def __init__(self, env: LiberoEnv) -> None:
        self.env = env
        self.bowl = env.target_object
        self.plate = env.goal_object
        sim = env.sim
        body = env.body_id(self.bowl)
        lo, hi = _body_frame_bounds(sim, [body])
        self.bowl_radius = float((hi[:2] - lo[:2]).mean() / 2)  # outer radius, ~5.35 cm
        self.bowl_height = float(hi[2])  # rim above the body origin (the bowl's bottom)
        self.base_xy = sim.data.body_xpos[sim.model.body_name2id("robot0_base")][:2].copy()
        # A bowl that starts *in* a fixture (the drawer) must be pulled out as it is lifted.
        self.container = next(
            (fixture for pred in env.problem["initial_state"] if pred[0] == "in" and pred[1] == self.bowl
             for fixture in env.fixture_names if pred[2].startswith(fixture)),
            None,
        )

    # ---- episode ----------------------------------------------------------------------------

    def reset(self, obs: dict) -> None:
        """Plan the grasp for the scene in `obs` and start from the first phase."""
        self.regrasps = 0
        self.last_eef = obs["robot0_eef_pos"].copy()
        self.last_action = np.zeros(3)
        self._plan(obs)

    def take_over(self, obs: dict) -> None:
        """Start from the scene as another controller (a policy) left it: a bowl the gripper holds is
        lifted and carried on from where it hangs; otherwise plan afresh from hover, which opens a gripper
        closed on nothing."""
        self.reset(obs)
        if self.env.holds(self.bowl):
            self.grasp_bottom = obs[f"{self.bowl}_pos"][2]
            self._enter(Phase.LIFT, obs)

    def _plan(self, obs: dict) -> None:
        """Choose where to pinch and how high to lift for the scene as it is now, and start hovering."""
        sim = self.env.sim
        others = [n for n in self.env.object_names + self.env.fixture_names if n != self.bowl]
        self.obstacles = _collision_boxes(sim, [self.env.body_id(n) for n in others])
        self.grasp = self._choose_grasp(obs)
        bottom = obs[f"{self.bowl}_pos"][2]
        tall = self.obstacles.top_near(obs[f"{self.bowl}_pos"][:2], self.bowl_radius + 0.02)
        self.lift_bottom = max(bottom, tall) + LIFT_MARGIN
        self.pull = np.zeros(3)
        if self.container is not None:
            away = obs[f"{self.bowl}_pos"][:2] - self.env.object_pos(self.container)[:2]
            self.pull[:2] = PULL_OUT * away / np.linalg.norm(away)
        self._enter(Phase.HOVER, obs)

    def _enter(self, phase: Phase, obs: dict) -> None:
        """Switch to `phase`, remembering where the gripper was when it began."""
        self.phase = phase
        self.phase_steps = 0
        self.phase_start = obs["robot0_eef_pos"].copy()
        self.stalled = 0
        self.last_fingers = obs["robot0_gripper_qpos"].copy()

    def act(self, obs: dict) -> np.ndarray:
        """One action [7] in [-1, 1]: position delta, rotation delta, gripper."""
        eef = obs["robot0_eef_pos"]
        velocity = eef - self.last_eef  # [3] metres per step
        pushing = np.abs(self.last_action).max() > PUSHING
        self.stalled = self.stalled + 1 if pushing and np.linalg.norm(velocity) < STALL_SPEED else 0
        # A phase that ends hands over in the same step, so no step is spent idle.
        for _ in range(len(Phase)):
            self.phase_steps += 1
            target, gripper, next_phase = self._phase_step(obs)
            if next_phase is None:
                break
            if next_phase is Phase.HOVER:  # regrasp: plan again from where the bowl is now
                self.regrasps += 1
                self._plan(obs)
            else:
                self._enter(next_phase, obs)
        self.last_eef = eef.copy()
        self.last_fingers = obs["robot0_gripper_qpos"].copy()
        self.last_action = np.clip(POS_GAIN * (target - eef) - VEL_GAIN * velocity, -1.0, 1.0)
        rotation = _rotation_error(self._target_rotation(), T.quat2mat(obs["robot0_eef_quat"]))
        return np.concatenate([self.last_action, np.clip(ROT_GAIN * rotation, -1.0, 1.0), [gripper]])

    # ---- phases -----------------------------------------------------------------------------

    def _phase_step(self, obs: dict) -> tuple[np.ndarray, float, Phase | None]:
        """(eef target [3], gripper command, phase to switch to or None) for the current phase."""
        eef = obs["robot0_eef_pos"]
        bowl = obs[f"{self.bowl}_pos"]
        capped = self.phase_steps > PHASE_CAP[self.phase]
        if self.phase is Phase.HOVER:
            target = self._pinch_point(obs) + [0.0, 0.0, APPROACH_HEIGHT]
            near = np.linalg.norm(target[:2] - eef[:2]) < HOVER_RADIUS and self._yaw_error(obs) < 0.15
            return target, GRIPPER_OPEN, Phase.DESCEND if near or capped else None
        if self.phase is Phase.DESCEND:
            # A funnel: the lower the fingers, the closer above the pinch point they must be.
            pinch = self._pinch_point(obs)
            off = self._pinch_offset(pinch, eef)
            target = pinch + [0.0, 0.0, min(APPROACH_HEIGHT, FUNNEL_SLOPE * off)]
            arrived = np.hypot(off, eef[2] - pinch[2]) < AT_TARGET
            done = arrived or (self.phase_steps > STALL_STEPS and self._stalled()) or capped
            return target, GRIPPER_OPEN, Phase.CLOSE if done else None
        if self.phase is Phase.CLOSE:
            fingers_still = np.abs(obs["robot0_gripper_qpos"] - self.last_fingers).max() < 5e-4
            done = (self.phase_steps > 4 and fingers_still) or capped
            if done:
                self.grasp_bottom = bowl[2]
            return self.phase_start, GRIPPER_CLOSED, Phase.LIFT if done else None
        if self.phase is Phase.LIFT:
            rise = self.lift_bottom - bowl[2]
            # Aim past the lift height so the arm gets there briskly instead of creeping up to it.
            target = self.phase_start + self.pull + [0.0, 0.0, self.lift_bottom - self.grasp_bottom + OVERSHOOT]
            lifted_eef = eef[2] - self.phase_start[2]
            if (lifted_eef > 0.03 and bowl[2] - self.grasp_bottom < 0.01) or (capped and rise > 0):
                return target, GRIPPER_CLOSED, self._regrasp_or(Phase.RELEASE)
            if rise <= 0:
                self.hold_height = eef[2] - bowl[2]  # how far the bowl's bottom hangs below the eef
            return target, GRIPPER_CLOSED, Phase.CARRY if rise <= 0 else None
        if self.phase is Phase.CARRY:
            # Keep height while anything tall is still underneath (the cabinet a bowl was lifted from).
            tall = self.obstacles.top_near(bowl[:2], self.bowl_radius) + LIFT_MARGIN
            target = self._over_plate(obs, bottom=max(CARRY_BOTTOM, min(tall, bowl[2])))
            if self._dropped(obs):
                return target, GRIPPER_CLOSED, self._regrasp_or(Phase.RELEASE)
            aligned = np.linalg.norm(target[:2] - eef[:2]) < ALIGNED
            return target, GRIPPER_CLOSED, Phase.LOWER if aligned or capped else None
        if self.phase is Phase.LOWER:
            target = self._over_plate(obs, bottom=obs[f"{self.plate}_pos"][2] - OVERSHOOT)
            if self._dropped(obs):
                return target, GRIPPER_CLOSED, self._regrasp_or(Phase.RELEASE)
            done = (self.phase_steps > STALL_STEPS and self._stalled()) or capped
            return target, GRIPPER_CLOSED, Phase.RELEASE if done else None
        if self.phase is Phase.RELEASE:
            return self.phase_start, GRIPPER_OPEN, Phase.RETREAT if capped else None
        # RETREAT: back up, then try again from wherever the bowl ended up.
        target = self.phase_start + [0.0, 0.0, 0.08]
        done = np.linalg.norm(target - eef) < 2 * AT_TARGET or capped
        return target, GRIPPER_OPEN, self._regrasp_or(None) if done else None

    def _regrasp_or(self, fallback: Phase | None) -> Phase | None:
        return Phase.HOVER if self.regrasps < MAX_REGRASPS else fallback

    def _stalled(self) -> bool:
        return self.stalled >= STALL_STEPS

    def _dropped(self, obs: dict) -> bool:
        """The bowl hangs much lower below the gripper than when it was lifted: it slipped out."""
        return obs["robot0_eef_pos"][2] - obs[f"{self.bowl}_pos"][2] > self.hold_height + DROPPED

    def _over_plate(self, obs: dict, bottom: float) -> np.ndarray:
        """Eef target that moves the bowl (as it hangs now) over the plate's centre with its bottom at `bottom`."""
        bowl, plate = obs[f"{self.bowl}_pos"], obs[f"{self.plate}_pos"]
        shift = np.array([plate[0] - bowl[0], plate[1] - bowl[1], bottom - bowl[2]])
        return obs["robot0_eef_pos"] + shift

    # ---- grasp geometry ---------------------------------------------------------------------

    def _rim_centre(self, obs: dict) -> np.ndarray:
        """Centre of the bowl's rim [3] (the bowl may sit tilted, e.g. on the ramekin)."""
        up = T.quat2mat(obs[f"{self.bowl}_quat"])[:, 2]
        return obs[f"{self.bowl}_pos"] + self.bowl_height * up

    def _pinch_point(self, obs: dict) -> np.ndarray:
        """Where the finger pads go [3]: the middle of the wall along the grasp direction, below the rim."""
        rim = self._rim_centre(obs)
        radial = (self.bowl_radius - WALL_INSET) * self.grasp.direction
        return rim + [radial[0], radial[1], -GRASP_DEPTH]

    def _pinch_offset(self, pinch: np.ndarray, eef: np.ndarray) -> float:
        """Horizontal distance (m) of the eef from the pinch point beyond what the pinch tolerates."""
        offset = eef[:2] - pinch[:2]
        u = self.grasp.direction
        across, along = abs(offset @ u), abs(offset @ [-u[1], u[0]])
        return float(np.hypot(max(across - ACROSS_SLACK, 0.0), max(along - ALONG_SLACK, 0.0)))

    def _choose_grasp(self, obs: dict) -> Grasp:
        """Pick the rim direction whose pinch keeps the outer finger and hand clearest, within reach.

        Candidates every 15 degrees. Score: clearance to the nearest obstacle (saturating at
        CLEARANCE_ENOUGH), minus a penalty for pinch points beyond comfortable reach (a far bowl
        gets pinched at its near wall, the wrist turned up to 90 degrees), minus a small one for
        turning the wrist at all (it costs time and looks less like a human demonstration).
        """
        rim = self._rim_centre(obs)
        pinch_z = rim[2] - GRASP_DEPTH
        best, best_score = None, -np.inf
        for angle in np.deg2rad(np.arange(0, 360, 15)):
            u = np.array([np.cos(angle), np.sin(angle)])
            yaw = angle % np.pi - np.pi / 2  # fingers close along u; in [-pi/2, pi/2)
            pinch_xy = rim[:2] + (self.bowl_radius - WALL_INSET) * u
            clearance = self.obstacles.clearance(_gripper_points(pinch_xy, pinch_z, u))
            reach = np.linalg.norm(pinch_xy - self.base_xy)
            score = (min(clearance, CLEARANCE_ENOUGH) - REACH_PENALTY * max(reach - REACH, 0.0)
                     - TURN_PENALTY * abs(yaw) / (np.pi / 2))
            if score > best_score:
                best, best_score = Grasp(direction=u, yaw=float(yaw)), score
        return best

    def _target_rotation(self) -> np.ndarray:
        c, s = np.cos(self.grasp.yaw), np.sin(self.grasp.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ DOWN

    def _yaw_error(self, obs: dict) -> float:
        return float(np.linalg.norm(_rotation_error(self._target_rotation(), T.quat2mat(obs["robot0_eef_quat"]))))


def _rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Axis-angle [3] (world frame) that rotates `current` onto `target`."""
    return T.quat2axisangle(T.mat2quat(target @ current.T))


def _gripper_points(pinch_xy: np.ndarray, pinch_z: float, u: np.ndarray) -> np.ndarray:
    """Sample points [P, 3], 1 cm apart, filling the outer finger and the hand for a pinch at `pinch_xy` along `u`.

    Open, the finger pads sit ~4.2 cm either side of the pinch point; the inner finger is inside
    the bowl, so only the outer one (~2 cm square, reaching ~7 cm up to the hand) and the hand
    (~20 cm long along u, 6 cm wide, from ~7 cm above the pads) can hit anything. Dense enough
    that a thin panel (the cabinet top is 2 mm) cannot slip between the points unnoticed.
    """
    v = np.array([-u[1], u[0]])  # tangential
    finger = [(radial, side, dz) for radial in (0.032, 0.042, 0.052) for side in (-0.01, 0.0, 0.01)
              for dz in np.arange(-0.01, 0.07, 0.01)]
    hand = [(radial, side, dz) for radial in np.arange(-0.1, 0.101, 0.025) for side in (-0.03, 0.0, 0.03)
            for dz in (0.075, 0.1)]
    offsets = np.array(finger + hand)  # [P, 3]: along u, along v, up
    xy = pinch_xy + offsets[:, :1] * u + offsets[:, 1:2] * v
    return np.concatenate([xy, pinch_z + offsets[:, 2:]], axis=1)


def _collision_boxes(sim: MjSim, bodies: list[int]) -> Boxes:
    """World-frame oriented bounding boxes of the collision geoms of the given root bodies (and their children)."""
    model = sim.model
    colliding = (model.geom_contype != 0) | (model.geom_conaffinity != 0)
    geoms = np.nonzero(np.isin(model.body_rootid[model.geom_bodyid], bodies) & colliding)[0]
    rotations = sim.data.geom_xmat[geoms].reshape(-1, 3, 3)
    aabb = sim.model.geom_aabb[geoms]  # [N, 6]: centre and half sizes in the geom's frame
    centres = sim.data.geom_xpos[geoms] + np.einsum("nij,nj->ni", rotations, aabb[:, :3])
    return Boxes(centres=centres, rotations=rotations, halves=aabb[:, 3:])


def _body_frame_bounds(sim: MjSim, bodies: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds (lo [3], hi [3]) of the bodies' collision geoms, in the first body's frame."""
    frame_pos = sim.data.body_xpos[bodies[0]]
    frame_rot = sim.data.body_xmat[bodies[0]].reshape(3, 3)
    local = (_collision_boxes(sim, bodies).corners().reshape(-1, 3) - frame_pos) @ frame_rot
    return local.min(axis=0), local.max(axis=0)


@dataclass
class ExpertEpisode:
    """One expert episode, recorded as LIBERO records demonstrations (all per step, T steps).

    states: the flattened MuJoCo state *before* each action [T, S]; actions [T, 7] float32;
    ee_pos [T, 3], ee_ori [T, 3] (axis-angle), gripper_states [T, 2], joint_states [T, 7]: the
    observation each action was chosen from. Recording starts after the settle steps.
    """

    actions: np.ndarray
    states: np.ndarray
    ee_pos: np.ndarray
    ee_ori: np.ndarray
    gripper_states: np.ndarray
    joint_states: np.ndarray
    success: bool
    length: int


def rollout_expert(env: LiberoEnv, seed: int, max_steps: int) -> ExpertEpisode:
    """Run the expert from the fresh placement of `seed` until success or `max_steps` actions.

    Use a `render=False` env: the expert needs no images, and states can be rendered later by
    `LiberoEnv.render_states` (after `reset(seed=seed)` on a rendering env of the same task).
    """
    obs = env.reset(seed=seed)
    expert = ScriptedExpert(env)
    expert.reset(obs)
    return run_expert(env, obs, expert, max_steps)


def take_over(env: LiberoEnv, obs: dict, max_steps: int) -> ExpertEpisode:
    """Run the expert from the state `env` is in now (`obs` its observation), as a policy left it, until
    success or `max_steps` actions (see `ScriptedExpert.take_over`)."""
    expert = ScriptedExpert(env)
    expert.take_over(obs)
    return run_expert(env, obs, expert, max_steps)


def run_expert(env: LiberoEnv, obs: dict, expert: ScriptedExpert, max_steps: int) -> ExpertEpisode:
    """Step `expert` from `obs` until success or `max_steps` actions, recording what LIBERO's demos record.
    The steps do not render: a rendering env renders the recorded states afterwards, where frames are needed."""
    actions, states, low_dim = [], [], []
    success = False
    for _ in range(max_steps):
        states.append(env.get_state())
        low_dim.append(low_dim_obs(obs))
        action = expert.act(obs)
        actions.append(action)
        obs, success = env.step(action, render=False)
        if success:
            break
    return ExpertEpisode(
        actions=np.asarray(actions, dtype=np.float32),
        states=np.asarray(states),
        ee_pos=np.asarray([o["ee_pos"] for o in low_dim]),
        ee_ori=np.asarray([o["ee_ori"] for o in low_dim]),
        gripper_states=np.asarray([o["gripper_states"] for o in low_dim]),
        joint_states=np.asarray([o["joint_states"] for o in low_dim]),
        success=success,
        length=len(actions),
    )
