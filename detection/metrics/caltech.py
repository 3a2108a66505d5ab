"""Caltech pedestrian metric: log-average miss rate (LAMR) over FPPI in [1e-2, 1e0], as Dollar's toolbox.

Shapes: D detections and G ground-truth boxes per image; boxes ``[K, 4]`` x1y1x2y2 in pixels of the
original image. This follows ``dbEval.m`` (Caltech Pedestrian 3.2.1) and ``bbGt.m`` (``evalRes``,
``compRoc``, ``compOas``):

* Ground truth (``loadGt``/``filterGtFun``): a box is an ignore region if the record marks it ``ignore``
  (the reader's "people"/"person?" regions) or it is outside the setting: height outside ``[hmin, hmax)``,
  visibility outside ``[vmin, vmax]``, or, when ``bounds`` is set, not inside those pixel bounds
  (the toolbox uses ``(5, 5, 635, 475)`` on 640x480 Caltech frames; off by default).
  Height is ``extras["height"]`` when present, else the box height; visibility is ``extras["visibility"]``
  when present, else 1 (fully visible; the toolbox's ``inf`` for fully visible passes the same ranges).
* Aspect-ratio normalisation (on by default, like the toolbox's ``aspectRatio = .41``): every non-ignored
  GT box and every detection is resized about its centre to width = 0.41 * height
  (``bbApply('resize', bb, 1, 0, .41)``); ignore regions keep their shape. ``aspect_ratio=None`` skips it.
* Detections (``evalAlgs``): kept when their height is in ``[hmin / 1.25, hmax * 1.25)``.
* Matching (``evalRes``): detections high score first; GT ignore regions last. A detection takes the
  unmatched non-ignored GT with the highest IoU >= 0.5 (ties: the later GT, as the toolbox's ``>=``);
  failing that it lands on an ignore region when intersection / (detection area) >= 0.5, and is then
  neither TP nor FP; an ignore region can absorb any number of detections. Continuous coordinates.
* Curve (``compRoc``): over all images, ignored detections and ignore GT dropped, sorted by score:
  FPPI = cumulative FP / number of images, recall = cumulative TP / number of non-ignored GT. At each of
  the 9 reference FPPI ``10 ** (-2:.25:0)``, the recall at the LAST curve point with FPPI <= ref (the curve
  starts at recall 0 at FPPI -inf). Miss rate = 1 - recall; LAMR = exp(mean(log(max(MR, 1e-10)))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mimicdet.data.records import ImageRecord

from ._common import box_ioa, box_iou, check_detections, check_record, descending

TP, FP, IGNORED = 1, 0, -1

# name -> (height range [lo, hi), visibility range [lo, hi]), from dbEval.m's ``exps`` table.
SETTINGS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "reasonable": ((50.0, math.inf), (0.65, math.inf)),
    "all": ((20.0, math.inf), (0.2, math.inf)),
}

REFERENCE_FPPI = 10.0 ** np.arange(-2.0, 0.001, 0.25)  # 9 points, 1e-2 .. 1e0


@dataclass(frozen=True)
class CaltechConfig:
    setting: str = "reasonable"
    iou_threshold: float = 0.5
    expand: float = 1.25  # detection height filter: [hmin / expand, hmax * expand)
    aspect_ratio: float | None = 0.41  # width / height that boxes are normalised to; None = keep boxes
    bounds: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 GT must lie in
    label: int | None = None  # evaluate only this label (GT and detections); None = every box

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"CaltechConfig.setting must be one of {sorted(SETTINGS)}, got {self.setting!r}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"CaltechConfig.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.expand < 1.0:
            raise ValueError(f"CaltechConfig.expand must be >= 1, got {self.expand}")
        if self.aspect_ratio is not None and self.aspect_ratio <= 0:
            raise ValueError(f"CaltechConfig.aspect_ratio must be > 0 or None, got {self.aspect_ratio}")


def resize_to_aspect(boxes: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Boxes with the same centre and height and width = ``aspect_ratio`` * height (``bbApply('resize')``)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    cx = (b[:, 0] + b[:, 2]) / 2
    half = aspect_ratio * (b[:, 3] - b[:, 1]) / 2
    b[:, 0], b[:, 2] = cx - half, cx + half
    return b


def caltech_match(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_ignore: np.ndarray,
    *,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """``bbGt('evalRes')`` on one image: ``(det int8[D], gt int8[G])`` in input order.

    det: 1 TP, 0 FP, -1 on an ignore region. gt: 1 matched, 0 missed, -1 ignore region.
    """
    gt_ignore = np.asarray(gt_ignore, bool)
    det = np.full(len(det_boxes), FP, np.int8)
    gt = np.where(gt_ignore, IGNORED, 0).astype(np.int8)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return det, gt
    # Overlap: IoU against normal GT, intersection over the detection's area against ignore regions.
    overlap = np.where(gt_ignore[None, :], box_ioa(det_boxes, gt_boxes), box_iou(det_boxes, gt_boxes))
    normal = np.flatnonzero(~gt_ignore)
    regions = np.flatnonzero(gt_ignore)
    for d in descending(det_scores):
        free = normal[gt[normal] == 0]
        if free.size:
            o = overlap[d, free]
            best = o.max()
            if best >= iou_threshold:
                g = free[len(o) - 1 - int(np.argmax(o[::-1]))]  # last of the ties, as the toolbox's ">="
                gt[g] = TP
                det[d] = TP
                continue
        if regions.size and np.any(overlap[d, regions] >= iou_threshold):
            det[d] = IGNORED
    return det, gt


def miss_rate_curve(
    scores: np.ndarray, det_matches: np.ndarray, num_positives: int, num_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """``bbGt('compRoc')``: ``(fppi, miss_rate)`` over detections sorted by score; ignored ones dropped."""
    scores = np.asarray(scores, np.float64)
    det_matches = np.asarray(det_matches)
    keep = det_matches != IGNORED
    m = det_matches[keep][descending(scores[keep])]
    tp = np.cumsum(m == TP, dtype=np.float64)
    fp = np.cumsum(m != TP, dtype=np.float64)
    fppi = fp / max(num_images, 1)
    recall = tp / num_positives if num_positives > 0 else np.full_like(tp, np.nan)
    return fppi, 1.0 - recall


def log_average_miss_rate(
    fppi: np.ndarray, miss_rate: np.ndarray, reference: np.ndarray = REFERENCE_FPPI
) -> tuple[float, np.ndarray]:
    """``(LAMR, MR at each reference FPPI)``; the MR at a reference is that of the last point with FPPI <= ref."""
    xs = np.concatenate(([-np.inf], np.asarray(fppi, np.float64)))
    mr = np.concatenate(([1.0], np.asarray(miss_rate, np.float64)))
    # fppi is non-decreasing, so the last index with xs <= ref is searchsorted(side="right") - 1 (>= 0).
    at_ref = mr[np.searchsorted(xs, reference, side="right") - 1]
    return float(np.exp(np.mean(np.log(np.maximum(at_ref, 1e-10))))), at_ref


class CaltechEvaluator:
    """``reset / process(record, detections) / evaluate() -> dict`` for one pedestrian setting.

    ``evaluate()`` returns ``LAMR`` (lower is better), ``miss_rates`` at ``reference_fppi``,
    ``num_positives``, ``num_images``, ``setting`` and ``curves = {"fppi": float64[D], "miss_rate": float64[D]}``.
    """

    primary_metric = "LAMR"
    higher_is_better = False

    def __init__(self, *, config: CaltechConfig = CaltechConfig()) -> None:
        self.config = config
        (self._hmin, self._hmax), (self._vmin, self._vmax) = SETTINGS[config.setting]
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._matches: list[np.ndarray] = []
        self._npos = 0
        self.num_images = 0

    def ground_truth(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes float64[G,4], ignore bool[G])`` for this setting, normalised when ``aspect_ratio`` is set."""
        cfg = self.config
        boxes = record.boxes.astype(np.float64)
        ignore = record.ignore.copy()
        if cfg.label is not None:
            keep = record.labels == cfg.label
            boxes, ignore = boxes[keep], ignore[keep]
        else:
            keep = slice(None)
        n = len(boxes)
        height = _extra(record, "height", keep)
        if height is None:
            height = boxes[:, 3] - boxes[:, 1]
        visibility = _extra(record, "visibility", keep)
        if visibility is None:
            visibility = np.ones(n)
        ignore |= (height < self._hmin) | (height >= self._hmax)
        ignore |= (visibility < self._vmin) | (visibility > self._vmax)
        if cfg.bounds is not None:
            x1, y1, x2, y2 = cfg.bounds
            inside = (boxes[:, 0] >= x1) & (boxes[:, 1] >= y1) & (boxes[:, 2] <= x2) & (boxes[:, 3] <= y2)
            ignore |= ~inside
        if cfg.aspect_ratio is not None:
            boxes[~ignore] = resize_to_aspect(boxes[~ignore], cfg.aspect_ratio)
        return boxes, ignore

    def process(self, record: ImageRecord, detections: Mapping[str, Any]) -> None:
        check_record(record)
        cfg = self.config
        boxes, scores, labels = check_detections(
            detections, image_id=record.image_id, need_labels=cfg.label is not None
        )
        if cfg.label is not None:
            boxes, scores = boxes[labels == cfg.label], scores[labels == cfg.label]
        h = boxes[:, 3] - boxes[:, 1]
        keep = (h >= self._hmin / cfg.expand) & (h < self._hmax * cfg.expand)
        boxes, scores = boxes[keep], scores[keep]
        if cfg.aspect_ratio is not None:
            boxes = resize_to_aspect(boxes, cfg.aspect_ratio)
        gt_boxes, gt_ignore = self.ground_truth(record)
        det, gt = caltech_match(boxes, scores, gt_boxes, gt_ignore, iou_threshold=cfg.iou_threshold)
        self._scores.append(scores)
        self._matches.append(det)
        self._npos += int(np.count_nonzero(gt != IGNORED))
        self.num_images += 1

    def evaluate(self) -> dict[str, Any]:
        if self.num_images == 0:
            raise ValueError("CaltechEvaluator.evaluate: no images were processed")
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        matches = np.concatenate(self._matches) if self._matches else np.zeros(0, np.int8)
        fppi, mr = miss_rate_curve(scores, matches, self._npos, self.num_images)
        if self._npos == 0:
            lamr, at_ref = float("nan"), np.full(len(REFERENCE_FPPI), np.nan)
        else:
            lamr, at_ref = log_average_miss_rate(fppi, mr)
        return {
            "LAMR": lamr,
            "miss_rates": [float(v) for v in at_ref],
            "reference_fppi": [float(v) for v in REFERENCE_FPPI],
            "num_positives": self._npos,
            "num_images": self.num_images,
            "setting": self.config.setting,
            "curves": {"fppi": fppi, "miss_rate": mr},
        }


def _extra(record: ImageRecord, key: str, keep) -> np.ndarray | None:
    value = record.extras.get(key)
    if value is None:
        return None
    value = np.asarray(value, np.float64).reshape(-1)
    if len(value) != len(record.boxes):
        raise ValueError(f"image {record.image_id!r}: extras[{key!r}] must have {len(record.boxes)} values "
                         f"(one per box), got {len(value)}")
    return value[keep]
