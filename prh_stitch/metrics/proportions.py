"""Intervals of a proportion (an accuracy over n trials): the one Wilson score interval the reports share."""

from __future__ import annotations

import math
from typing import Tuple

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(proportion: float, n: int, z: float = Z_95) -> Tuple[float, float]:
    """The Wilson score interval of a proportion observed as ``proportion`` over ``n`` trials (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1. ``proportion`` may
    be fractional (e.g. ties counted as 1/2)."""
    if n < 1:
        raise ValueError(f"an interval needs at least one trial, got n = {n}")
    centre = (proportion + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or 1 the bound is exactly that end; computed, it can miss it by round-off.
    return (0.0 if proportion == 0 else max(0.0, centre - half)), (1.0 if proportion == 1 else min(1.0, centre + half))
