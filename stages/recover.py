"""DVC stage `recover`: the trained policy rolled out from fresh placements, the scripted expert taking over
part-way; its successful corrections are recovery demos, one HDF5 file per task (the demos' layout).

    python stages/recover.py POLICY TOKENIZER RECOVERY_DIR METRICS
"""
import logging
from functools import partial

from rsd.engine import EngineConfig, load_engine
from rsd.io import write_json
from rsd.parallel import use_cluster
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.recovery import RecoverConfig, make_recoveries
from rsd.sim.env import SimConfig

log = logging.getLogger("rsd.recover")


def main() -> None:
    args = stage_args(__doc__, "policy", "tokenizer", "recovery_dir", "metrics")
    params = load_params()
    base = section(params, "base", BaseConfig)
    use_cluster(base.ray_address)
    make_agent = partial(load_engine, str(args.policy), str(args.tokenizer), None, EngineConfig(), base.torch_device())
    metrics = make_recoveries(make_agent, section(params, "recover", RecoverConfig), section(params, "sim", SimConfig),
                              base.seed, args.recovery_dir)
    write_json(args.metrics, metrics)
    log.info("recover: %d of %d takeovers kept (%d rollouts, %d succeeded before the takeover) in %s s",
             metrics["kept"], metrics["takeovers"], metrics["episodes"], metrics["policy_successes"],
             metrics["wall_seconds"])


if __name__ == "__main__":
    main()
