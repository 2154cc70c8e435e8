"""DVC stage `report`: reports/report.md and its plots, every number read from the metrics files and the
training curves.

    python stages/report.py METRICS_DIR LIVE_DIR REPORTS_DIR
"""
import logging

from rsd.params import load_params, section, stage_args
from rsd.report import ReportConfig, build_report

log = logging.getLogger("rsd.report")


def main() -> None:
    args = stage_args(__doc__, "metrics_dir", "live_dir", "reports_dir")
    path = build_report(args.metrics_dir, args.live_dir, args.reports_dir, section(load_params(), "report", ReportConfig))
    log.info("report written: %s", path)


if __name__ == "__main__":
    main()
