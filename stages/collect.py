"""DVC stage `collect`: the main policy rolled out in LIBERO from fresh placements; for every policy
call its hidden state and the coarse codes it decoded, the draft's training samples.

    python stages/collect.py POLICY TOKENIZER SAMPLES METRICS
"""
from functools import partial

from rsd.collect import CollectConfig, collect
from rsd.engine import EngineConfig, load_engine
from rsd.io import write_json
from rsd.parallel import use_cluster
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.sim.env import SimConfig


def main() -> None:
    args = stage_args(__doc__, "policy", "tokenizer", "samples", "metrics")
    params = load_params()
    base = section(params, "base", BaseConfig)
    use_cluster(base.ray_address)
    make_agent = partial(load_engine, str(args.policy), str(args.tokenizer), None, EngineConfig(), base.torch_device())
    samples, metrics = collect(make_agent, section(params, "collect", CollectConfig), section(params, "sim", SimConfig),
                               base.seed)
    samples.save(args.samples)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
