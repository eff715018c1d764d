"""Small statistics shared by the suites: bootstrap confidence intervals, mean ± std across seeds."""

from __future__ import annotations

from typing import Any

import numpy as np


def bootstrap_ci(
    values: np.ndarray, seed: int = 0, n_boot: int = 1000, weights: np.ndarray | None = None, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the (weighted) mean, resampling items with replacement.

    weights: per-item counts, for a ratio mean Σ values·w / Σ w (e.g. per-document sums of per-token scores).
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    if weights is None:
        means = values[idx].mean(1)
    else:
        w = np.asarray(weights, dtype=np.float64)
        means = (values[idx] * w[idx]).sum(1) / np.maximum(w[idx].sum(1), 1e-12)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mean_ci(values: Any, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """{"value": mean, "ci95": [lo, hi], "n": items} for a list of per-item scores."""
    values = np.asarray(values, dtype=np.float64)
    return {"value": float(values.mean()) if len(values) else float("nan"), "ci95": list(bootstrap_ci(values, seed, n_boot)), "n": int(len(values))}


def paired_diff(a: Any, b: Any, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Mean of a - b over paired items (same prompts / documents) with a bootstrap CI of the difference."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return mean_ci(d, seed, n_boot)


def mean_std(values: Any) -> dict[str, Any]:
    """Across seeds: mean, sample std, and a normal-approximation 95% interval of the mean."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"value": float("nan"), "std": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = 1.96 * std / np.sqrt(len(v))
    return {"value": float(v.mean()), "std": std, "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": int(len(v))}
