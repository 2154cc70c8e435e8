"""The scripted expert solves a real libero_spatial episode from a fresh placement, recorded as LIBERO records demos."""
from __future__ import annotations

import numpy as np

from rsd.sim.env import LiberoEnv, SimConfig
from rsd.sim.expert import rollout_expert

TASK = 2  # bowl at the table centre: the quickest task (~70 steps)
SEED = 5


def test_expert_solves_an_easy_task_within_budget():
    config = SimConfig()
    with LiberoEnv(TASK, config, render=False) as env:
        episode = rollout_expert(env, seed=SEED, max_steps=config.max_steps)
        env.reset(seed=SEED)
        start = env.get_state()

    assert episode.success and episode.length <= config.max_steps
    T = episode.length
    assert episode.actions.shape == (T, 7) and episode.actions.dtype == np.float32
    assert np.abs(episode.actions).max() <= 1.0
    assert episode.states.shape == (T, start.shape[0])
    np.testing.assert_array_equal(episode.states[0], start)  # recording starts after the settle steps
    assert episode.ee_pos.shape == episode.ee_ori.shape == (T, 3)
    assert episode.gripper_states.shape == (T, 2) and episode.joint_states.shape == (T, 7)
    # The gripper closed on the bowl at some point, and every recorded state is a different moment.
    assert (episode.actions[:, 6] > 0).any()
    assert len(np.unique(episode.states[:, 0])) == T


def test_expert_grasps_the_bowl_on_the_cabinet_at_the_first_try():
    """The arm reaches up to the cabinet sluggishly; the descent must still end low enough to pinch the wall.

    (A descent that waited for the last millimetres along the wall stalled over the rim, pinched air and
    regrasped: two grasp modes in the demos, which the policy imitated by closing too high.)
    """
    config = SimConfig()
    with LiberoEnv(9, config, render=False) as env:
        episode = rollout_expert(env, seed=1000, max_steps=config.max_steps)
    closed = episode.actions[:, 6] > 0
    assert episode.success
    assert np.count_nonzero(closed[1:] & ~closed[:-1]) == 1  # the gripper closed once and held on
