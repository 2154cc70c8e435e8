"""DVC stage `eval@<variant>` (no_draft or draft): see rsd.pipeline.run_eval."""
import sys

from rsd.pipeline import run_eval
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_eval(sys.argv[1])
