"""DVC stage `train`: see rsd.pipeline.run_train."""
from rsd.pipeline import run_train
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_train()
