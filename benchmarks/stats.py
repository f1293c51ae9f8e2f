"""Latency summaries. Percentiles use linear interpolation (numpy's default), so p99 of a
small sample is an interpolation, not the max: the sample count is always reported beside it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def summarize(samples_ms: Sequence[float], items_per_sample: int = 1) -> dict[str, float | int]:
    """``{"n", "p50", "p90", "p99", "mean", "min", "max", "fps"}``; fps = items per second at the mean."""
    if not samples_ms:
        raise ValueError("no samples to summarize")
    values = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    mean = float(values.mean())
    return {
        "n": int(values.size),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(mean, 3),
        "min": round(float(values.min()), 3),
        "max": round(float(values.max()), 3),
        "fps": round(1000.0 * items_per_sample / mean, 3) if mean > 0 else 0.0,
    }
