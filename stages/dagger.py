"""DVC stage `dagger`: the behaviour-cloned policy trained further on the demos and the recovery demos
together (DAgger's aggregated data); validated on the same held-out demos as the policy stage.

    python stages/dagger.py DEMOS_DIR RECOVERY_DIR TOKENIZER POLICY POLICY_OUT METRICS LIVE_DIR
"""
import dataclasses
import logging

from rsd.data import DEMO_SUFFIX, read_demos, read_task_demos
from rsd.io import write_json
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.policy.model import MainPolicy
from rsd.policy.train import DaggerConfig, PolicyTrainConfig, train_policy
from rsd.progress import live_run
from rsd.tokenizer.model import RFSQTokenizer

log = logging.getLogger("rsd.policy")


def main() -> None:
    args = stage_args(__doc__, "demos_dir", "recovery_dir", "tokenizer", "policy", "policy_out", "metrics", "live_dir")
    params = load_params()
    policy_config = section(params, "policy", PolicyTrainConfig, seed=section(params, "base", BaseConfig).seed)
    dagger = section(params, "dagger", DaggerConfig)
    config = dataclasses.replace(policy_config, epochs=dagger.epochs, lr=dagger.lr, warmup_steps=dagger.warmup_steps)
    tokenizer = RFSQTokenizer.load(args.tokenizer)
    policy = MainPolicy.load(args.policy)
    tasks = read_demos(args.demos_dir)
    # a task the policy never failed at has no file; no recoveries at all leaves the folder empty
    recoveries = [read_task_demos(p) for p in sorted(args.recovery_dir.glob(f"*{DEMO_SUFFIX}"))]
    log.info("%d recovery demos of %d tasks", sum(len(t.demos) for t in recoveries), len(recoveries))
    with live_run(args.live_dir) as live:
        policy, metrics = train_policy(tasks, tokenizer, config, live, init=policy, recoveries=recoveries)
    policy.save(args.policy_out)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
