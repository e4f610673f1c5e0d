"""Means with 95 % intervals, for scores over a handful of (prompt, seed) tiles: a percentile bootstrap over the
tiles, seeded (the same scores give the same interval in every report), and the paired version for LoRA − base
(each tile against the base tile of the same prompt and seed). With 8 tiles a difference of 0.002 is noise;
these say so instead of ranking it.

Written here rather than taken from scipy.stats.bootstrap: scipy is not a dependency, and the few lines below
fix the resampling (seed, count) that reports and tests rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def mean_interval(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = SEED) -> Interval:
    """The mean of `values` and its percentile-bootstrap interval (resampling the values with replacement).
    One value: the interval is that value (nothing to resample); none: ValueError."""
    import numpy as np

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval of no values")
    if not np.isfinite(x).all():
        raise ValueError(f"mean_interval: non-finite values {x[~np.isfinite(x)].tolist()}")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # the quantiles of a constant sample can differ from its mean in the last bit
    return Interval(mean, min(float(low), mean), max(float(high), mean), int(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                      seed: int = SEED) -> Interval:
    """mean(a − b) with its interval, a[i] paired with b[i] (the same prompt and seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}; pairs need the same tiles")
    return mean_interval([float(x) - float(y) for x, y in zip(a, b, strict=True)], resamples, level, seed)


def distinguishable(best: Interval, runner_up: Interval) -> bool:
    """Whether `best` is told apart from `runner_up`: their intervals do not overlap (conservative; a paired
    difference is sharper where the same tiles were scored, see paired_difference)."""
    return not best.overlaps(runner_up)
