"""DVC stage `policy`: see rsd.pipeline.run_policy."""
from rsd.pipeline import run_policy
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_policy()
