"""Means and spreads over seeds, and their formatting."""
from __future__ import annotations

import math
import statistics
from typing import Iterable, List, Optional, Sequence, Tuple

__all__ = ["mean_sd", "fmt", "curve"]


def mean_sd(values: Iterable[Optional[float]]) -> Tuple[float, float, int]:
    """Mean, sample standard deviation (NaN for one value) and count of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan, len(xs)


def fmt(values: Iterable[Optional[float]], digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± sd`` (just the mean for one seed, ``-`` for none) with ``digits`` decimals."""
    m, sd, n = mean_sd(values)
    if n == 0:
        return "-"
    if n == 1:
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def curve(runs: Sequence[Sequence[Optional[float]]]) -> Tuple[List[float], List[float], List[float]]:
    """Pointwise mean, minimum and maximum of several equally long series (NaN where no run has a value)."""
    mean, low, high = [], [], []
    for column in zip(*runs):
        xs = [float(v) for v in column if v is not None and math.isfinite(float(v))]
        mean.append(statistics.fmean(xs) if xs else math.nan)
        low.append(min(xs) if xs else math.nan)
        high.append(max(xs) if xs else math.nan)
    return mean, low, high
