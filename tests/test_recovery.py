"""DAgger recovery: the scripted expert takes over real libero_spatial scenes as another controller left
them, and the `recover` stage's corrections read back as demos; bad params are refused by name."""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd.data import TaskDemos, demo_path, read_demos, read_task_demos
from rsd.engine import EngineConfig, load_engine
from rsd.params import section
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.policy.train import DaggerConfig, check_recoveries
from rsd.recovery import RECOVER_STREAM, RecoverConfig, make_recoveries
from rsd.sim.env import LiberoEnv, SimConfig, placement_seed
from rsd.sim.expert import Phase, ScriptedExpert, take_over
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

TASK = 2  # bowl at the table centre: the quickest task
SEED = 5
CLOSE = 1.0  # gripper command: > 0 closes


def expert_until(env: LiberoEnv, obs: dict, phase: Phase, max_steps: int = 200) -> dict:
    """Step a fresh expert from `obs` until it enters `phase`; the observation there."""
    expert = ScriptedExpert(env)
    expert.reset(obs)
    for _ in range(max_steps):
        obs, _ = env.step(expert.act(obs), render=False)
        if expert.phase is phase:
            return obs
    raise AssertionError(f"the expert never reached {phase}")


def test_the_expert_carries_on_with_a_bowl_the_gripper_holds() -> None:
    with LiberoEnv(TASK, SimConfig(), render=False) as env:
        obs = expert_until(env, env.reset(seed=SEED), Phase.CARRY)  # lifted: both pads on the bowl
        assert env.holds(env.target_object)
        episode = take_over(env, obs, max_steps=200)
    assert episode.success
    assert (episode.actions[:10, 6] > 0).all(), "the held bowl was let go instead of carried on"


def test_the_expert_reopens_a_gripper_closed_on_nothing_and_grasps_again() -> None:
    with LiberoEnv(TASK, SimConfig(), render=False) as env:
        obs = env.reset(seed=SEED)
        for _ in range(15):  # a policy that closed the gripper in mid-air
            obs, _ = env.step(np.array([0, 0, 0, 0, 0, 0, CLOSE]), render=False)
        assert not env.holds(env.target_object)
        episode = take_over(env, obs, max_steps=300)
    assert episode.success
    assert episode.actions[0, 6] <= 0  # it opens first
    closed = episode.actions[:, 6] > 0
    assert np.count_nonzero(closed[1:] & ~closed[:-1]) == 1  # then closes once, on the bowl


def tiny_parts(root: Path) -> tuple[Path, Path]:
    """An untrained main policy and tokenizer, saved as the pipeline saves them: a real agent that acts badly."""
    torch.manual_seed(0)
    tokenizer = RFSQTokenizer(TokenizerConfig(hidden_dim=32, num_layers=4), np.full(7, -0.3), np.full(7, 0.3)).eval()
    backbone = BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)
    config = PolicyConfig(vocab=build_vocab([LiberoEnv.task_info(TASK)[1]]), max_instruction_words=20, image_size=32,
                          vision_channels=(8, 16), vision_grid=2, num_layers=4, backbone=backbone)
    tokenizer.save(root / "tokenizer.pt")
    MainPolicy(config, tokenizer.fingerprint()).save(root / "policy.pt")
    return root / "policy.pt", root / "tokenizer.pt"


def test_a_takeover_from_the_policys_state_is_a_demo_that_reads_back(tmp_path: Path) -> None:
    policy, tokenizer = tiny_parts(tmp_path)
    make_agent = partial(load_engine, str(policy), str(tokenizer), None, EngineConfig())
    config = RecoverConfig(episodes_per_task=1, takeover_steps=[12, 12], tasks=[TASK], workers=1)
    sim = SimConfig()
    metrics = make_recoveries(make_agent, config, sim, base_seed=0, out_dir=tmp_path / "recovery")

    assert metrics["episodes"] == metrics["takeovers"] == metrics["kept"] == 1, metrics
    assert metrics["policy_successes"] == 0 and metrics["mean_takeover_step"] == 12.0
    name, instruction, _ = LiberoEnv.task_info(TASK)
    assert [p.name for p in (tmp_path / "recovery").iterdir()] == [demo_path(tmp_path / "recovery", name).name]
    (task,) = read_demos(tmp_path / "recovery")  # the loader the policy trains from
    assert task.task_name == name and task.instruction == instruction
    (demo,) = task.demos
    T = len(demo)
    assert metrics["frames"] == T and 0 < T <= config.max_steps
    assert demo.seed == placement_seed(0, RECOVER_STREAM, TASK, 0)
    assert demo.actions.shape == (T, 7) and demo.agentview.shape == demo.wrist.shape == (T, sim.image_size, sim.image_size, 3)

    with LiberoEnv(TASK, sim, render=False) as env:  # it starts where the policy left the scene, not at the reset
        env.reset(seed=demo.seed)
        assert not np.array_equal(demo.states[0], env.get_state())
    check_recoveries([task], [read_task_demos(demo_path(tmp_path / "recovery", name))])


def test_recoveries_of_a_task_the_demos_do_not_hold_are_refused() -> None:
    demos = [TaskDemos("KITCHEN_SCENE1_put_the_bowl_away", "put the bowl away", [], "")]
    renamed = TaskDemos("KITCHEN_SCENE1_put_the_bowl_away", "put the bowl elsewhere", [], "")
    check_recoveries(demos, demos)
    with pytest.raises(ValueError, match=re.escape("recovery demos of task 'KITCHEN_SCENE1_put_the_bowl_away' match no "
                                                   "task of the demos (known: KITCHEN_SCENE1_put_the_bowl_away)")):
        check_recoveries(demos, [renamed])  # same name, another instruction


@pytest.mark.parametrize(("values", "message"), [
    ({"takeover_steps": [50, 20]}, "recover.takeover_steps must be [first, last]: two ints with 1 <= first <= last, got [50, 20]"),
    ({"takeover_steps": [5]}, "recover.takeover_steps must be [first, last]"),
    ({"episodes_per_task": 0}, "recover.episodes_per_task must be at least 1, got 0"),
    ({"execute_steps": 9}, "recover.execute_steps must be in 1..8 (the chunk length), got 9"),
    ({"tasks": [10]}, "recover.tasks must be null or a non-empty list of task indices in 0..9, got [10]"),
    ({"max_steps": "x"}, "recover.max_steps must be an int, got 'x'"),
    ({"takeover": 5}, "params: unknown key(s) recover.takeover"),
])
def test_bad_recover_params_are_refused_by_name(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        section({"recover": values}, "recover", RecoverConfig)


@pytest.mark.parametrize(("values", "message"), [
    ({"epochs": 0}, "dagger.epochs must be a positive int, got 0"),
    ({"lr": 0.0}, "dagger.lr must be > 0, got 0.0"),
    ({"warmup_steps": -1}, "dagger.warmup_steps must be a non-negative int, got -1"),
])
def test_bad_dagger_params_are_refused_by_name(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        section({"dagger": values}, "dagger", DaggerConfig)
