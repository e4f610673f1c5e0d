"""kolora.core.stats: bootstrap intervals of mean scores and paired LoRA − base differences."""

from __future__ import annotations

import numpy as np
import pytest

from kolora.core.stats import distinguishable, mean_interval, paired_difference


def test_interval_brackets_the_mean_and_repeats_exactly():
    values = [0.31, 0.29, 0.35, 0.27, 0.33, 0.30, 0.28, 0.36]
    a, b = mean_interval(values), mean_interval(values)
    assert a == b  # seeded: the same scores give the same interval in every report
    assert a.mean == pytest.approx(np.mean(values))
    assert a.low < a.mean < a.high and a.n == 8
    # a percentile bootstrap of the mean is about ±1.96 standard errors wide
    se = np.std(values, ddof=1) / np.sqrt(len(values))
    assert 2.5 * se < a.high - a.low < 4.5 * se


def test_constant_and_single_values_have_no_width():
    c = mean_interval([0.5] * 8)
    assert (c.low, c.mean, c.high) == (0.5, 0.5, 0.5)
    assert mean_interval([0.7]).low == mean_interval([0.7]).high == 0.7
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([0.1, float("nan")])


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        i = mean_interval(rng.normal(1.0, 0.2, 40), resamples=500)
        hits += i.low <= 1.0 <= i.high
    assert 175 <= hits <= 199, hits


def test_paired_difference_sees_a_shift_that_unpaired_intervals_miss():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.4, 8)  # tiles differ a lot between prompts...
    lora = base + 0.01 + rng.normal(0, 0.001, 8)  # ...but the LoRA lifts every one of them a little
    diff = paired_difference(lora, base)
    assert diff.excludes_zero() and diff.mean == pytest.approx(0.01, abs=0.002)
    assert not distinguishable(mean_interval(lora), mean_interval(base))  # unpaired: overlapping
    noise = paired_difference(base + rng.normal(0, 0.01, 8), base)
    assert not noise.excludes_zero()  # a wobble of 0.01 per tile around no change
    with pytest.raises(ValueError, match="same tiles"):
        paired_difference([0.1, 0.2], [0.1])


def test_distinguishable_only_without_overlap():
    assert distinguishable(mean_interval([0.9, 0.91, 0.92, 0.9]), mean_interval([0.1, 0.11, 0.12, 0.1]))
    assert not distinguishable(mean_interval([0.5, 0.6, 0.4, 0.55]), mean_interval([0.52, 0.58, 0.45, 0.5]))
