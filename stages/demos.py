"""DVC stage `demos`: scripted-expert demonstrations from fresh placements (or LIBERO's own files, see
`demos.source`), one HDF5 file per task.

    python stages/demos.py DEMOS_DIR METRICS
"""
import logging

from rsd.demos import DemosConfig, make_demos
from rsd.io import write_json
from rsd.parallel import use_cluster
from rsd.params import BaseConfig, load_params, section, stage_args
from rsd.sim.env import SimConfig

log = logging.getLogger("rsd.demos")


def main() -> None:
    args = stage_args(__doc__, "demos_dir", "metrics")
    params = load_params()
    base = section(params, "base", BaseConfig)
    use_cluster(base.ray_address)
    metrics = make_demos(section(params, "demos", DemosConfig), section(params, "sim", SimConfig), base.seed,
                         args.demos_dir)
    write_json(args.metrics, metrics)
    log.info("demos: kept %s of %s episodes (success %s) in %s s", metrics["kept"], metrics["episodes"],
             metrics["success_rate"], metrics["wall_seconds"])


if __name__ == "__main__":
    main()
