"""DVC stage `tokenizer`: see rsd.pipeline.run_tokenizer."""
from rsd.pipeline import run_tokenizer
from rsd.progress import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_tokenizer()
