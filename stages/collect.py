"""DVC stage `collect`: see rsd.pipeline.run_collect."""
from rsd.pipeline import run_collect
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_collect()
