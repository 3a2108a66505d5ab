"""Evaluation metrics: VOC AP, COCO AP (pycocotools), Caltech log-average miss rate, proposal recall.

Each evaluator follows ``reset() / process(record, detections) / evaluate() -> dict`` and names its headline
number in ``primary_metric`` (``higher_is_better`` says which way is good). Detections are numpy dicts
``{"boxes": float32[D,4], "scores": float32[D], "labels": int64[D]}`` in original-image pixels; proposals
are ``{"boxes": float32[P,4], "scores": float32[P]}``. Result dicts hold floats, dicts of floats and, under
``"curves"``, numpy arrays for plotting; ``to_jsonable`` turns one into plain JSON types.
Plots live in ``detection.metrics.plots`` (imported on demand: matplotlib is slow to import).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .caltech import CaltechConfig, CaltechEvaluator, log_average_miss_rate
from .coco import COCOEvaluator
from .recall import ProposalRecallEvaluator, RecallConfig, per_box_hits
from .significance import mcnemar, paired_bootstrap, paired_bootstrap_map
from .voc import VOCConfig, VOCEvaluator, voc_ap

__all__ = [
    "CaltechConfig",
    "CaltechEvaluator",
    "COCOEvaluator",
    "ProposalRecallEvaluator",
    "RecallConfig",
    "VOCConfig",
    "VOCEvaluator",
    "log_average_miss_rate",
    "mcnemar",
    "paired_bootstrap",
    "paired_bootstrap_map",
    "per_box_hits",
    "to_jsonable",
    "voc_ap",
]


def to_jsonable(value: Any) -> Any:
    """Arrays to lists, numpy scalars to Python numbers, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
