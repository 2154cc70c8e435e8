"""DVC stage `train`: the draft model, trained to propose the main policy's coarse codes from its
hidden state; the checkpoint of its best validation epoch is written once, at the end.

    python stages/train.py SAMPLES DRAFT METRICS LIVE_DIR
"""
from rsd.draft.config import DraftTrainConfig
from rsd.draft.samples import DraftSamples
from rsd.draft.train import train_draft
from rsd.io import save_torch, write_json
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.progress import live_run


def main() -> None:
    args = stage_args(__doc__, "samples", "draft", "metrics", "live_dir")
    params = load_params()
    base = section(params, "base", BaseConfig)
    config = section(params, "train", DraftTrainConfig, seed=base.seed)
    samples = DraftSamples.load(args.samples)
    with live_run(args.live_dir) as live:
        checkpoint, metrics = train_draft(samples, config, live, device=base.torch_device())
    save_torch(args.draft, checkpoint)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
