"""DVC stage `verify`: see rsd.pipeline.run_verify."""
from rsd.pipeline import run_verify
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_verify()
