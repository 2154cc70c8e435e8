"""DVC stage `policy`: the main policy, trained by behaviour cloning on the demos' RFSQ tokens.

    python stages/policy.py DEMOS_DIR TOKENIZER POLICY METRICS LIVE_DIR
"""
import logging

from rsd.data import read_demos
from rsd.io import write_json
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.policy.train import PolicyTrainConfig, train_policy
from rsd.progress import live_run
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.policy")


def main() -> None:
    args = stage_args(__doc__, "demos_dir", "tokenizer", "policy", "metrics", "live_dir")
    params = load_params()
    config = section(params, "policy", PolicyTrainConfig, seed=section(params, "base", BaseConfig).seed)
    tokenizer = RFSQTokenizer.load(args.tokenizer)
    log.info("RFSQ tokenizer loaded: %d layers", tokenizer.config.num_layers)
    tasks = read_demos(args.demos_dir)
    with live_run(args.live_dir) as live:
        policy, metrics = train_policy(tasks, tokenizer, config, live)
    policy.save(args.policy)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
