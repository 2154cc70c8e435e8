"""RFSQ action tokenizer ("phase 1"): action chunks <-> residual FSQ codes, coarse to fine."""
from rsd.tokenizer.config import TokenizerConfig
from rsd.tokenizer.model import RFSQTokenizer
from rsd.tokenizer.train import evaluate_tokenizer, train_tokenizer

__all__ = ["TokenizerConfig", "RFSQTokenizer", "evaluate_tokenizer", "train_tokenizer"]
