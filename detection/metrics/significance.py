"""Paired significance tests between two models scored on the same test set.

``mcnemar`` / ``paired_bootstrap`` take ``bool[B]`` hit flags, one per test box, in the same box order for both
models (e.g. ``recall.per_box_hits``). ``paired_bootstrap_map`` resamples test images for a difference in VOC
mAP, from each model's ``VOCEvaluator.per_image()``.
"""

from __future__ import annotations

import numpy as np

from ._common import descending


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


def _sorted_class_detections(per_image: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One class's detections in descending score order, ignored ones dropped: ``(is_tp bool[D], image int[D])``."""
    d = per_image["detections"][name]
    scores = np.asarray(d["scores"], np.float64)
    matches = np.asarray(d["matches"], np.int64)
    image = np.asarray(d["image"], np.int64)
    keep = matches != -1
    order = descending(scores[keep])  # the evaluator's own order
    return matches[keep][order] == 1, image[keep][order]


def _weighted_map(
    per_image: dict, weights: np.ndarray, use_07_metric: bool,
    sorted_classes: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """VOC mAP for each row of ``weights`` (``float[n, I]``: how many times each image is drawn); ``float[n]``.
    With all-ones weights this is ``VOCEvaluator.evaluate()``'s mAP. ``sorted_classes`` (one
    ``_sorted_class_detections`` per class) spares a caller with many chunks of draws the sort on each."""
    npos = np.asarray(per_image["num_positives"], np.float64).reshape(len(per_image["image_ids"]), -1)
    if sorted_classes is None:
        sorted_classes = [_sorted_class_detections(per_image, name) for name in per_image["classes"]]
    aps = []
    for k, (is_tp, image) in enumerate(sorted_classes):
        positives = weights @ npos[:, k]  # [n]
        w = weights[:, image]  # [n, D]
        tp = np.cumsum(w * is_tp, axis=1)
        fp = np.cumsum(w * ~is_tp, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = tp / positives[:, None]
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07_metric:
            ap = sum(np.where(recall >= t, precision, 0.0).max(axis=1, initial=0.0) for t in np.linspace(0, 1, 11)) / 11
        else:
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            step = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
            ap = (step * envelope).sum(axis=1)
        aps.append(np.where(positives > 0, ap, np.nan))  # a class absent from the draw has no AP (as the evaluator)
    with np.errstate(all="ignore"):
        return np.nanmean(np.stack(aps), axis=0) if aps else np.full(len(weights), np.nan)


def paired_bootstrap_map(
    per_image_a: dict, per_image_b: dict, n: int = 1000, seed: int = 0, confidence: float = 0.95,
    use_07_metric: bool = True, chunk: int = 100,
) -> dict[str, float]:
    """Percentile bootstrap of ``mAP(a) - mAP(b)`` resampling test images (both models see the same draw).

    Inputs are ``VOCEvaluator.per_image()`` of the two models over the same images in the same order. Returns
    ``mean_diff`` (the observed difference), ``ci_low`` / ``ci_high`` and ``p_value``: twice the smaller share
    of draws on either side of zero (a bootstrap estimate, floored at 1/n)."""
    ids_a, ids_b = per_image_a["image_ids"], per_image_b["image_ids"]
    if ids_a != ids_b:
        raise ValueError(f"paired_bootstrap_map: the two models were scored on different images "
                         f"({len(ids_a)} and {len(ids_b)} images, or a different order)")
    if per_image_a["classes"] != per_image_b["classes"]:
        raise ValueError(f"paired_bootstrap_map: different classes {per_image_a['classes']} and {per_image_b['classes']}")
    if not ids_a:
        raise ValueError("paired_bootstrap_map: no images to resample")
    if n < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap_map: need n >= 1 and 0 < confidence < 1, got n={n}, confidence={confidence}")
    images = len(ids_a)
    sorted_a = [_sorted_class_detections(per_image_a, name) for name in per_image_a["classes"]]
    sorted_b = [_sorted_class_detections(per_image_b, name) for name in per_image_b["classes"]]

    def difference(weights: np.ndarray) -> np.ndarray:
        return (_weighted_map(per_image_a, weights, use_07_metric, sorted_a)
                - _weighted_map(per_image_b, weights, use_07_metric, sorted_b))

    observed = float(difference(np.ones((1, images)))[0])
    rng = np.random.default_rng(seed)
    diffs = np.empty(n)
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        draws = rng.integers(0, images, size=(k, images))
        weights = np.zeros((k, images))
        np.add.at(weights, (np.repeat(np.arange(k), images), draws.ravel()), 1.0)
        diffs[start:start + k] = difference(weights)
    alpha = (1.0 - confidence) / 2
    low, high = np.nanquantile(diffs, [alpha, 1.0 - alpha])
    p = min(1.0, max(2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)), 1.0 / n))
    return {"mean_diff": observed, "ci_low": float(low), "ci_high": float(high), "p_value": float(p), "draws": n}
