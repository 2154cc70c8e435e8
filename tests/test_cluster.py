"""Rollouts on a real two-node Ray cluster on loopback (`ray start --head`, and one more node joining it): a
small evaluation runs on both nodes, a worker killed mid-run is restarted and its episode rerun, and the
episodes equal a one-machine run's, action for action."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from procs import alive, descendants
import rsd.parallel
from rsd.engine import EngineConfig, Prediction, RSDEngine
from rsd.evaluation import EvalConfig, evaluate
from rsd.policy.config import BackboneConfig, PolicyConfig, build_vocab
from rsd.policy.model import MainPolicy
from rsd.sim.env import LiberoEnv, SimConfig
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux only")

RAY = str(Path(sys.executable).with_name("ray"))
TASK = 0
SIM = SimConfig(image_size=64, max_steps=24, settle_steps=2)
EVAL = EvalConfig(init_states=4, tasks=[TASK], workers=2)


class MarkedAgent:
    """A small random-weight policy (the same in every worker: seeded) that leaves a file per episode
    (`<node id>-<pid>-<n>`) and puts a fingerprint of every action chunk in the call's stats."""

    def __init__(self, folder: str) -> None:
        torch.manual_seed(0)
        instruction = LiberoEnv.task_info(TASK)[1]
        backbone = BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2)
        config = PolicyConfig(vocab=build_vocab([instruction]), image_size=SIM.image_size, backbone=backbone)
        policy = MainPolicy(config).eval()
        tokenizer = RFSQTokenizer(TokenizerConfig(num_layers=4), np.full(7, -1.0), np.full(7, 1.0)).eval()
        self.engine = RSDEngine(policy, tokenizer, None, EngineConfig(mode="none"))
        self.folder, self.episodes = Path(folder), 0

    def reset(self) -> None:
        import ray

        self.episodes += 1
        (self.folder / f"{ray.get_runtime_context().get_node_id()}-{os.getpid()}-{self.episodes}").touch()
        self.engine.reset()

    def predict(self, inputs: dict[str, Any]) -> Prediction:
        prediction = self.engine.predict(inputs)
        prediction.stats["chunk_sum"] = float(prediction.chunk.astype(np.float64).sum())
        return prediction


def make_agent(folder: str) -> MarkedAgent:
    return MarkedAgent(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head node and a second node, one CPU each, started with `ray start --block` (so that they are this
    test's children); its address. Every process they started is gone afterwards."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # RAY_AUTH_MODE=token: conftest.py
    logs = tmp_path_factory.mktemp("ray-nodes")
    # `ray start` refuses to make the token itself; on a fresh machine this may be the session's first Ray
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, stdout=subprocess.DEVNULL)
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    nodes = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               "--resources={\"head\": 1}", *common],
                              env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)]
    try:
        _wait_for_nodes(address, 1, nodes)
        nodes.append(subprocess.Popen([RAY, "start", f"--address={address}", "--resources={\"second\": 1}", *common],
                                      env=env, stdout=open(logs / "second.log", "w"), stderr=subprocess.STDOUT))
        _wait_for_nodes(address, 2, nodes)
        yield address
    finally:
        started = [pid for node in nodes for pid in descendants(node.pid)]
        for node in nodes[::-1]:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        deadline = time.monotonic() + 30
        while any(map(alive, started)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in started if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes the nodes started outlived them: {left}"


def _wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen]) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='error'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(node.poll() is None for node in nodes), "a Ray node exited while starting"
        try:
            out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip() == str(count):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} did not reach {count} nodes")


def _episodes(episodes: list) -> list[tuple]:
    return [(e.task, e.init_state, e.success, e.steps, [c["chunk_sum"] for c in e.calls]) for e in episodes]


def _run(folder: Path, address: str | None) -> list[tuple]:
    """The evaluation on a local Ray (None), or on the cluster at `address` joined as a stage joins it."""
    rsd.parallel.use_cluster(address)
    try:
        _, episodes = evaluate(partial(make_agent, str(folder)), EVAL, SIM)
    finally:
        rsd.parallel.use_cluster(None)
    return _episodes(episodes)


def _kill_a_worker_once_it_runs(folder: Path, killed: list[int]) -> None:
    """In the background: SIGKILL the first worker process that starts an episode."""
    def watch() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for marker in folder.glob("*-1"):
                pid = int(marker.name.split("-")[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def test_an_evaluation_runs_on_both_nodes_and_survives_a_killed_worker(cluster: str, tmp_path: Path) -> None:
    local, spread = tmp_path / "local", tmp_path / "cluster"
    local.mkdir()
    spread.mkdir()
    one_machine = _run(local, None)
    killed: list[int] = []
    _kill_a_worker_once_it_runs(spread, killed)
    on_cluster = _run(spread, cluster)

    assert killed, "no worker was killed"
    nodes = {marker.name.split("-")[0] for marker in spread.iterdir()}
    assert len(nodes) == 2, f"episodes ran on {len(nodes)} node(s)"
    episodes_started = len(list(spread.iterdir()))
    assert episodes_started > EVAL.init_states  # the killed worker's episode ran again
    assert [e[:2] for e in on_cluster] == [(TASK, i) for i in range(EVAL.init_states)]  # complete
    assert on_cluster == one_machine, json.dumps({"cluster": on_cluster, "one machine": one_machine})
