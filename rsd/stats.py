"""Success rates with their uncertainty: a 95% Wilson interval for one rate, and the paired comparison of
two variants evaluated on the same episodes (same tasks and init states)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95


def success_interval(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (scipy): honest at 0 or n successes, unlike the normal one."""
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    ci = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return round(float(ci.low), 4), round(float(ci.high), 4)


def paired_difference(baseline: Sequence[bool], variant: Sequence[bool], resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float | int | list[float]]:
    """`variant` against `baseline`, episode by episode (the same episodes, in the same order): the difference
    in successes and in rate, its 95% bootstrap interval over episodes (resampled in pairs), and McNemar's exact
    p-value (a binomial test on the episodes where exactly one of the two succeeded)."""
    a, b = np.asarray(baseline, dtype=bool), np.asarray(variant, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired outcomes need two equal, non-empty lists, got {a.shape} and {b.shape}")
    gained, lost = int((b & ~a).sum()), int((a & ~b).sum())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(resamples, a.size))
    differences = b[picks].mean(axis=1) - a[picks].mean(axis=1)
    low, high = np.quantile(differences, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    p = binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
    return {"episodes": int(a.size), "difference": gained - lost, "gained": gained, "lost": lost,
            "rate_difference": round(float(b.mean() - a.mean()), 4),
            "rate_difference_ci95": [round(float(low), 4), round(float(high), 4)],
            "mcnemar_p": round(float(p), 4)}
