"""DVC stage `bench`: see rsd.pipeline.run_bench."""
from rsd.pipeline import run_bench
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_bench()
