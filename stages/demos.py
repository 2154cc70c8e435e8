"""DVC stage `demos`: see rsd.pipeline.run_demos."""
from rsd.pipeline import run_demos
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_demos()
