"""DVC stage `verify`: every check of the draft checkpoint, recorded in METRICS.

A well-formed draft below the accuracy bar is a result: the verdict is recorded and the evaluations
and the benchmark still run and say so. A malformed checkpoint (unreadable, keys, shapes, config)
stops the pipeline here with one line naming the failed checks.

    python stages/verify.py DRAFT POLICY METRICS
"""
import logging
import sys

from rsd.draft.config import VerifyConfig
from rsd.draft.verify import malformed, verify_checkpoint
from rsd.io import write_json
from rsd.params import load_params, section, stage_args
from rsd.policy.model import MainPolicy

log = logging.getLogger("rsd.draft")


def main() -> None:
    args = stage_args(__doc__, "draft", "policy", "metrics")
    config = section(load_params(), "verify", VerifyConfig)
    hidden = MainPolicy.load(args.policy).config.backbone.hidden_size
    result = verify_checkpoint(args.draft, config.min_val_accuracy, input_dim=hidden)
    write_json(args.metrics, result)
    problems = malformed(result)
    if problems:
        sys.exit(f"verify: {args.draft} is malformed: {problems}")
    if result["passed"]:
        log.info("draft checkpoint %s passed every check", args.draft)
    else:
        log.warning("draft checkpoint %s is below the accuracy bar: %s (recorded in %s; the evaluations still run)",
                    args.draft, result["val_accuracy"]["detail"], args.metrics)


if __name__ == "__main__":
    main()
