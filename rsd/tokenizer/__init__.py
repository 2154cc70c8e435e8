"""RFSQ action tokenizer: action chunks <-> residual FSQ codes, coarse to fine (config, model, training)."""
