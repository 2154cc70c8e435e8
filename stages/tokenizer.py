"""DVC stage `tokenizer`: the RFSQ action tokenizer, trained on every action chunk of the demos.

    python stages/tokenizer.py DEMOS_DIR TOKENIZER METRICS
"""
import logging

from rsd.data import read_demos
from rsd.io import write_json
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.train import train_tokenizer

log = logging.getLogger("rsd.tokenizer")


def main() -> None:
    args = stage_args(__doc__, "demos_dir", "tokenizer", "metrics")
    params = load_params()
    config = section(params, "tokenizer", TokenizerConfig, seed=section(params, "base", BaseConfig).seed)
    episodes = [demo.actions for task in read_demos(args.demos_dir, images=False) for demo in task.demos]
    log.info("RFSQ tokenizer: %d demos from %s", len(episodes), args.demos_dir)
    tokenizer, metrics = train_tokenizer(episodes, config, progress=True)
    tokenizer.save(args.tokenizer)
    write_json(args.metrics, metrics)
    log.info("tokenizer: MAE by layers %s", metrics["mae_by_layers"])


if __name__ == "__main__":
    main()
