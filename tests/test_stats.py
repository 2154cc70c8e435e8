"""Success-rate uncertainty: the Wilson interval and the paired comparison of two variants."""
from __future__ import annotations

import pytest

from rsd.stats import paired_difference, success_interval


def test_wilson_interval_known_values():
    assert success_interval(82, 100) == (0.7333, 0.883)
    low, high = success_interval(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28  # never the normal interval's [0, 0] at 0 successes
    assert success_interval(10, 10)[1] == 1.0


def test_paired_difference_counts_discordant_episodes():
    baseline = [True] * 8 + [False] * 4
    variant = [False] + [True] * 7 + [True, True, False, False]  # one lost, two gained
    p = paired_difference(baseline, variant)
    assert (p["episodes"], p["difference"], p["gained"], p["lost"]) == (12, 1, 2, 1)
    assert p["rate_difference"] == pytest.approx(1 / 12, abs=1e-4)
    low, high = p["rate_difference_ci95"]
    assert low <= p["rate_difference"] <= high
    assert p["mcnemar_p"] == 1.0  # 2 against 1 is no evidence of a difference
    same = paired_difference(baseline, baseline)
    assert same["difference"] == 0 and same["rate_difference_ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    assert paired_difference([False] * 20, [True] * 20)["mcnemar_p"] < 1e-5


@pytest.mark.parametrize("args", [((5, 4),), ((-1, 4),), ((0, 0),)])
def test_bad_counts_are_refused(args):
    with pytest.raises(ValueError, match="successes <= trials"):
        success_interval(*args[0])


def test_unpaired_outcomes_are_refused():
    with pytest.raises(ValueError, match="two equal, non-empty lists"):
        paired_difference([True, False], [True])


def test_evaluation_metrics_carry_the_interval_and_each_episode():
    from rsd.evaluation import Episode, summarize

    calls = [{"total_ms": 10.0, "main_ms": 9.0, "main_passes": 4}]
    episodes = [Episode(task=t, init_state=i, success=(t + i) % 3 != 0, steps=100, calls=calls, peak_memory_gb=1.0)
                for t in (0, 1) for i in range(3)]
    metrics = summarize(episodes, {0: "a", 1: "b"}, 1.0)
    assert metrics["successes"] == 4 and metrics["trials"] == 6
    assert metrics["success_rate_ci95"] == list(success_interval(4, 6))
    assert metrics["episodes"] == {"task": [0, 0, 0, 1, 1, 1], "init_state": [0, 1, 2, 0, 1, 2],
                                   "success": [0, 1, 1, 1, 1, 0]}
