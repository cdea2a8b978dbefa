"""Percentiles and medians shared by the orchestrator and the report."""

from __future__ import annotations

import math
import statistics
from typing import Any


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[Any]) -> float | None:
    """The median of the numeric, non-NaN values (None, missing figures and NaN are skipped)."""
    clean = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.median(clean) if clean else None
