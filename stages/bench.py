"""DVC stage `bench`: real observations recorded with the main policy, then timed through no-draft,
strict, relaxed and perfect-draft decoding, interleaved, in one process.

    python stages/bench.py POLICY TOKENIZER DRAFT VERIFY_METRICS METRICS OBSERVATIONS

OBSERVATIONS gets the recorded policy inputs (`rsd bench --observations` times them elsewhere, e.g. on a GPU).
"""
import json
import time
from functools import partial

from rsd.bench import BenchConfig, benchmark, save_observations
from rsd.recording import record_observations
from rsd.engine import MODES, EngineConfig, load_engine
from rsd.evaluation import EvalConfig
from rsd.io import write_json
from rsd.parallel import use_cluster
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.sim.env import SimConfig


def main() -> None:
    args = stage_args(__doc__, "policy", "tokenizer", "draft", "verdict", "metrics", "observations")
    params = load_params()
    base = section(params, "base", BaseConfig)
    use_cluster(base.ray_address)
    config = section(params, "bench", BenchConfig)
    engines = section(params, "eval", EvalConfig)  # the draft's precision, the gate and the relaxed rule, as evaluated
    device = base.torch_device()
    start = time.monotonic()
    observations, recorded = record_observations(
        partial(load_engine, str(args.policy), str(args.tokenizer), None, EngineConfig(), device), config,
        section(params, "sim", SimConfig), base.seed)
    save_observations(args.observations, [o.inputs for o in observations])
    timed = {mode: load_engine(str(args.policy), str(args.tokenizer), None if mode == "none" else str(args.draft),
                               engines.engine_config(mode), device) for mode in MODES}
    metrics = benchmark(timed, [o.inputs for o in observations], config)
    metrics = {**metrics, **recorded, "draft_verified": bool(json.loads(args.verdict.read_text())["passed"]),
               "wall_seconds": round(time.monotonic() - start, 1)}
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
