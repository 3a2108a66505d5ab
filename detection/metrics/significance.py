"""Paired significance tests between two models scored on the same boxes (e.g. ``recall.per_box_hits``).

Inputs are ``bool[B]`` hit flags, one per test box, in the same box order for both models.
"""

from __future__ import annotations

import numpy as np


def _hits(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of hit flags, got shape {list(a.shape)}")
    if a.dtype != np.bool_:
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1, got values like {a[~np.isin(a, (0, 1))][0]!r}")
        a = a.astype(bool)
    return a


def _pair(hits_a, hits_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _hits("hits_a", hits_a), _hits("hits_b", hits_b)
    if a.shape != b.shape:
        raise ValueError(f"hits_a and hits_b must score the same boxes, got {a.shape[0]} and {b.shape[0]} flags")
    return a, b


def mcnemar(hits_a, hits_b) -> dict[str, float]:
    """Exact McNemar test: ``b`` = boxes only A hits, ``c`` = boxes only B hits, two-sided binomial p-value."""
    from scipy.stats import binomtest  # scipy.stats takes ~0.5 s to import; only pay for it here

    a, b_ = _pair(hits_a, hits_b)
    b = int(np.count_nonzero(a & ~b_))
    c = int(np.count_nonzero(~a & b_))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p_value": p}


def paired_bootstrap(
    hits_a, hits_b, n: int = 10000, seed: int = 0, confidence: float = 0.95, chunk: int = 500
) -> dict[str, float]:
    """Percentile bootstrap CI of ``mean(hits_a) - mean(hits_b)``, resampling boxes (pairs kept together)."""
    a, b = _pair(hits_a, hits_b)
    if a.size == 0:
        raise ValueError("paired_bootstrap: no boxes to resample")
    if n < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: need n >= 1 and 0 < confidence < 1, got n={n}, confidence={confidence}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for start in range(0, n, chunk):  # chunks keep memory at chunk x B indices
        k = min(chunk, n - start)
        means[start:start + k] = diff[rng.integers(0, diff.size, size=(k, diff.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean_diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high)}
