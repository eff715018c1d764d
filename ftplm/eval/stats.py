"""Small statistics shared by the suites: bootstrap confidence intervals over items, and over seeds.

Across seeds (3 is typical) a normal interval is too narrow and can leave a bounded metric's range (a cosine's
upper bound above 1): a metric with per-item scores gets a hierarchical bootstrap (resample seeds, then items
within each), one without them a t interval (scipy.stats.t) of the seed means.
"""

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
    return {
        "value": float(values.mean()) if len(values) else float("nan"),
        "ci95": list(bootstrap_ci(values, seed, n_boot)),
        "n": len(values),
    }


def paired_diff(a: Any, b: Any, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Mean of a - b over paired items (same prompts / documents) with a bootstrap CI of the difference."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return mean_ci(d, seed, n_boot)


def mean_std(values: Any, level: float = 0.95) -> dict[str, Any]:
    """Across seeds: mean, sample std, and the t interval of the mean (n - 1 degrees of freedom; none for one seed)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"value": float("nan"), "std": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if len(v) > 1 and std > 0:
        lo, hi = stats.t.interval(level, len(v) - 1, loc=v.mean(), scale=std / np.sqrt(len(v)))
    else:
        lo = hi = float(v.mean()) if len(v) > 1 else float("nan")
    return {"value": float(v.mean()), "std": std, "ci95": [float(lo), float(hi)], "n": len(v)}


def hierarchical_ci(
    groups: list[Any], seed: int = 0, n_boot: int = 2000, weights: list[Any] | None = None, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the mean over seeds of each seed's (weighted) item mean: every replicate resamples the seeds
    with replacement, then the items of each drawn seed. It stays inside the items' range (a cosine's CI is <= 1)
    and widens with the spread between seeds, which item-level resampling of pooled seeds ignores."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    ws = [
        np.ones_like(a) if weights is None else np.asarray(w, dtype=np.float64)
        for a, w in zip(arrays, weights or arrays)
    ]
    if not arrays or any(len(a) == 0 for a in arrays):
        return float("nan"), float("nan")
    S = len(arrays)
    picks = rng.integers(0, S, (n_boot, S))
    stat = np.zeros(n_boot)
    for s, (a, w) in enumerate(zip(arrays, ws)):
        slots = picks == s  # (n_boot, S): where seed s was drawn
        idx = rng.integers(0, len(a), (int(slots.sum()), len(a)))
        means = (a[idx] * w[idx]).sum(1) / np.maximum(w[idx].sum(1), 1e-12)
        np.add.at(stat, np.nonzero(slots)[0], means)
    stat /= S
    alpha = (1 - level) / 2
    return float(np.quantile(stat, alpha)), float(np.quantile(stat, 1 - alpha))


def seeds_summary(
    values: list[float], items: list[Any] | None = None, seed: int = 0, weights: list[Any] | None = None
) -> dict[str, Any]:
    """A metric over seeds: mean ± std of the per-seed values, with the hierarchical CI where per-item scores
    exist and the t interval where they do not."""
    out = mean_std(values)
    if items is not None and len(items) > 1:
        out["ci95"] = list(hierarchical_ci(items, seed, weights=weights))
        out["ci"] = "hierarchical bootstrap (seeds, then items)"
    else:
        out["ci"] = "t over seeds"
    return out


def paired_seed_diff(a: list[Any], b: list[Any], seed: int = 0) -> dict[str, Any]:
    """FTP - GPT over paired items (same prompts / documents / problems) of each seed: the mean over seeds of each
    seed's mean difference, with the hierarchical CI."""
    diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)]
    value = float(np.mean([d.mean() for d in diffs]))
    if len(diffs) == 1:
        return {**mean_ci(diffs[0], seed), "seeds": 1}
    lo, hi = hierarchical_ci(diffs, seed)
    return {"value": value, "ci95": [lo, hi], "n": int(sum(len(d) for d in diffs)), "seeds": len(diffs)}
