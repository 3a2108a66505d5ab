"""PASCAL VOC detection metric: per-class AP and mAP at one IoU threshold (0.5 by default).

Shapes: D detections and G ground-truth boxes per image; boxes ``[K, 4]`` x1y1x2y2 in pixels of the original
image. Both AP rules are computed: the VOC2007 11-point rule (mean of the interpolated precision at recall
0, 0.1, ..., 1) and the VOC2010+ area rule (area under the monotone precision envelope).

Protocol (as the VOC devkit's ``VOCevaldet``): detections of a class are taken high score first; each is
matched to the ground-truth box of that class with the largest IoU in its image. If that IoU >= threshold
and the box is difficult (``ignore``), the detection is ignored (neither TP nor FP); if the box is not yet
taken, TP; if already taken, FP (duplicate). Below threshold, FP. Difficult boxes are not positives.

IoU convention: continuous coordinates, area ``(x2 - x1) * (y2 - y1)``, no ``+1`` as the devkit's pixel-
inclusive boxes use; so APs can differ from the devkit's in the third decimal on small boxes.
Matching is done per image in ``process`` (it only depends on the score order within an image), the
global score sort happens once in ``evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mimicdet.data.records import ImageRecord

from ._common import box_iou, check_detections, check_labels, check_record, descending

TP, FP, IGNORED = 1, 0, -1


@dataclass(frozen=True)
class VOCConfig:
    iou_threshold: float = 0.5
    use_07_metric: bool = False  # which rule the headline "mAP" uses; both are always reported

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"VOCConfig.iou_threshold must be in (0, 1], got {self.iou_threshold}")


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool = False) -> float:
    """AP from a precision/recall curve (points in score order), VOC2007 11-point or VOC2010+ area rule."""
    rec = np.asarray(recall, np.float64).reshape(-1)
    prec = np.asarray(precision, np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision must have the same length, got {rec.shape} and {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            above = rec >= t
            ap += (prec[above].max() if above.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: max precision at recall >= r
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_match(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_ignore: np.ndarray,
    *,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Match one image's detections of one class; ``int8[D]`` in input order: 1 TP, 0 FP, -1 ignored."""
    d = len(det_boxes)
    out = np.full(d, FP, np.int8)
    if d == 0 or len(gt_boxes) == 0:
        return out
    iou = box_iou(det_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    ignore = np.asarray(gt_ignore, bool)
    for i in descending(det_scores):
        j = int(np.argmax(iou[i]))
        if iou[i, j] < iou_threshold:
            continue
        if ignore[j]:
            out[i] = IGNORED
        elif not taken[j]:
            taken[j] = True
            out[i] = TP
    return out


def pr_curve(scores: np.ndarray, matches: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """``(precision, recall)`` float64 arrays over detections sorted by score; ignored (-1) matches dropped."""
    scores = np.asarray(scores, np.float64)
    matches = np.asarray(matches)
    keep = matches != IGNORED
    m = matches[keep][descending(scores[keep])]
    tp = np.cumsum(m == TP, dtype=np.float64)
    fp = np.cumsum(m == FP, dtype=np.float64)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    recall = tp / num_positives if num_positives > 0 else np.full_like(tp, np.nan)
    return precision, recall


class VOCEvaluator:
    """``reset / process(record, detections) / evaluate() -> dict``.

    ``evaluate()`` returns ``mAP`` (rule chosen by ``config.use_07_metric``), ``mAP_area``, ``mAP_11pt``,
    per-class ``AP_area`` / ``AP_11pt`` / ``num_positives`` keyed by class name, and ``curves``:
    ``{class: {"precision": float64[D], "recall": float64[D]}}`` (numpy, for plotting). A class with no
    positive box has AP NaN and is left out of the means (the devkit would divide by zero).
    """

    primary_metric = "mAP"
    higher_is_better = True

    def __init__(self, *, classes: Sequence[str], config: VOCConfig = VOCConfig()) -> None:
        if len(classes) == 0:
            raise ValueError("classes: expected at least one foreground class name, got none")
        self.classes = tuple(classes)
        self.config = config
        self.reset()

    def reset(self) -> None:
        k = len(self.classes)
        self._scores: list[list[np.ndarray]] = [[] for _ in range(k)]
        self._matches: list[list[np.ndarray]] = [[] for _ in range(k)]
        self._npos = np.zeros(k, np.int64)
        self._images: list[list[np.ndarray]] = [[] for _ in range(k)]  # image index of each detection
        self._npos_per_image: list[np.ndarray] = []  # int64[K] per image
        self._image_ids: list[str] = []
        self.num_images = 0

    def process(self, record: ImageRecord, detections: Mapping[str, Any]) -> None:
        check_record(record)
        boxes, scores, labels = check_detections(detections, image_id=record.image_id, need_labels=True)
        check_labels(record, labels, num_classes=len(self.classes))
        npos_here = np.zeros(len(self.classes), np.int64)
        for c in np.union1d(np.unique(record.labels), np.unique(labels)):
            g = record.labels == c
            d = labels == c
            matches = voc_match(boxes[d], scores[d], record.boxes[g], record.ignore[g],
                                iou_threshold=self.config.iou_threshold)
            self._scores[c - 1].append(scores[d])
            self._matches[c - 1].append(matches)
            self._images[c - 1].append(np.full(len(matches), self.num_images, np.int64))
            npos_here[c - 1] = int(np.count_nonzero(~record.ignore[g]))
        self._npos += npos_here
        self._npos_per_image.append(npos_here)
        self._image_ids.append(str(record.image_id))
        self.num_images += 1

    def per_image(self) -> dict[str, Any]:
        """What a paired image-level bootstrap of mAP needs (``significance.paired_bootstrap_map``), as plain
        lists: ``image_ids`` (I, processing order), ``num_positives`` ``int[I][K]``, and per class the matched
        detections ``{"scores", "matches" (1 TP / 0 FP / -1 ignored), "image" (index into image_ids)}``."""
        out: dict[str, Any] = {"classes": list(self.classes), "image_ids": list(self._image_ids),
                               "num_positives": [n.tolist() for n in self._npos_per_image], "detections": {}}
        for k, name in enumerate(self.classes):
            cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
            out["detections"][name] = {
                "scores": cat(self._scores[k], np.float32).astype(np.float64).tolist(),
                "matches": cat(self._matches[k], np.int8).astype(int).tolist(),
                "image": cat(self._images[k], np.int64).tolist(),
            }
        return out

    def evaluate(self) -> dict[str, Any]:
        ap_area: dict[str, float] = {}
        ap_11: dict[str, float] = {}
        curves: dict[str, dict[str, np.ndarray]] = {}
        for k, name in enumerate(self.classes):
            scores = np.concatenate(self._scores[k]) if self._scores[k] else np.zeros(0)
            matches = np.concatenate(self._matches[k]) if self._matches[k] else np.zeros(0, np.int8)
            npos = int(self._npos[k])
            precision, recall = pr_curve(scores, matches, npos)
            curves[name] = {"precision": precision, "recall": recall}
            if npos == 0:
                ap_area[name] = ap_11[name] = float("nan")
            else:
                ap_area[name] = voc_ap(recall, precision, use_07_metric=False)
                ap_11[name] = voc_ap(recall, precision, use_07_metric=True)
        m_area = _nanmean(ap_area.values())
        m_11 = _nanmean(ap_11.values())
        return {
            "mAP": m_11 if self.config.use_07_metric else m_area,
            "mAP_area": m_area,
            "mAP_11pt": m_11,
            "AP_area": ap_area,
            "AP_11pt": ap_11,
            "num_positives": {name: int(n) for name, n in zip(self.classes, self._npos)},
            "num_images": self.num_images,
            "iou_threshold": self.config.iou_threshold,
            "curves": curves,
        }


def _nanmean(values) -> float:
    v = np.array(list(values), np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")
