"""Box overlaps and input checks shared by the evaluators (pure numpy).

Boxes are ``[K, 4]`` x1y1x2y2 in pixels of the original image, continuous coordinates: a box's area is
``(x2 - x1) * (y2 - y1)`` with no ``+1``. The official VOC devkit and the older Caltech code count pixels
inclusively (``+1``); this codebase stores boxes as continuous coordinates (see ``data.records``), so every
metric here uses the continuous convention, like pycocotools and torchvision.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mimicdet.data.records import ImageRecord


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``float64[K]`` areas of ``[K, 4]`` boxes; degenerate boxes have area 0."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``float64[A, B]`` intersection areas between ``[A, 4]`` and ``[B, 4]`` boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``float64[A, B]`` intersection over union; 0 where the union is empty."""
    inter = box_intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``float64[A, B]`` intersection over the area of the FIRST box (``a``); 0 where that area is 0."""
    inter = box_intersection(a, b)
    area = np.broadcast_to(box_area(a)[:, None], inter.shape)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def check_record(record: ImageRecord) -> None:
    if not isinstance(record, ImageRecord):
        raise TypeError(f"record: expected data.records.ImageRecord, got {type(record).__name__}")
    if not record.labelled:
        raise ValueError(
            f"image {record.image_id!r}: record is unlabelled (labelled=False); evaluation needs annotations"
        )


def check_detections(
    detections: Mapping[str, Any], *, image_id: str, need_labels: bool, what: str = "detections"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate ``{"boxes": [D,4], "scores": [D], "labels": [D]}`` and return float64/float64/int64 arrays.

    Accepts numpy arrays or anything ``np.asarray`` takes (CPU tensors included).
    """
    for key in ("boxes", "scores") + (("labels",) if need_labels else ()):
        if key not in detections:
            raise KeyError(f"image {image_id!r}: {what} lack {key!r}; expected keys boxes, scores"
                           + (", labels" if need_labels else ""))
    boxes = np.asarray(detections["boxes"], np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {image_id!r}: {what}['boxes'] must be [D, 4], got shape {list(boxes.shape)}")
    d = len(boxes)
    scores = np.asarray(detections["scores"], np.float64).reshape(-1)
    if scores.shape != (d,):
        raise ValueError(f"image {image_id!r}: {what}['scores'] must be [{d}], got shape {list(scores.shape)}")
    if not np.all(np.isfinite(boxes)) or not np.all(np.isfinite(scores)):
        raise ValueError(f"image {image_id!r}: {what} contain NaN or infinite boxes/scores")
    labels = None
    if need_labels:
        labels = np.asarray(detections["labels"]).reshape(-1)
        if labels.shape != (d,):
            raise ValueError(f"image {image_id!r}: {what}['labels'] must be [{d}], got shape {list(labels.shape)}")
        if d and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"image {image_id!r}: {what}['labels'] must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
    return boxes, scores, labels


def descending(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` high to low; stable, so ties keep their input order (as MATLAB's sort)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def check_labels(record, labels: np.ndarray, *, num_classes: int) -> None:
    """Ground-truth and detected labels must be foreground classes 1..num_classes."""
    k = num_classes
    for name, lab in (("ground-truth labels", record.labels), ("detections['labels']", labels)):
        bad = lab[(lab < 1) | (lab > k)]
        if bad.size:
            raise ValueError(f"image {record.image_id!r}: {name} must be in 1..{k} for {k} classes, got {int(bad[0])}")
