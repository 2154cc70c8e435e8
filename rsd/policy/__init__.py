"""The main policy (the VLA whose decoding the draft model speeds up): config, model and training."""
