"""The learning-rate schedule every training loop here uses: linear warmup, then a half cosine."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then a half cosine from 1 down to `floor` at step `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
