"""DVC stage `report`: see rsd.pipeline.run_report."""
from rsd.pipeline import run_report
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_report()
