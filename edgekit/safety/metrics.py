"""Per-layer metrics with 95% bootstrap intervals: ASR, over-refusal and utility are all means of 0/1 outcomes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    value: float | None  # None when there was nothing to measure
    low: float | None
    high: float | None
    n: int


def bootstrap_mean(outcomes: list[bool] | np.ndarray, seed: int = 0) -> Estimate:
    """Mean of 0/1 outcomes and its percentile bootstrap 95% interval (seeded, so reports are reproducible)."""
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        return Estimate(None, None, None, 0)
    resampled = np.random.default_rng(seed).choice(x, size=(BOOTSTRAP_SAMPLES, x.size), replace=True).mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))
