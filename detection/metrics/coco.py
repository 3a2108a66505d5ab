"""COCO box AP (AP, AP50, AP75, APs, APm, APl and the AR numbers) through pycocotools, all in memory.

Shapes: D detections and G ground-truth boxes per image; boxes ``[K, 4]`` x1y1x2y2 in pixels of the original
image, converted to COCO's ``[x, y, w, h]`` with ``w = x2 - x1`` (continuous coordinates, as pycocotools).

The ground truth becomes a ``COCO()`` object built from a dict (no temp files): category id ``k + 1`` for
label ``k + 1`` (``classes[k]``); ``ignore`` boxes become ``iscrowd=1`` (pycocotools then lets them absorb
any number of detections, scored by intersection over the detection's area); the GT ``area`` used for the
small/medium/large split is ``extras["area"]`` when the reader provides it (COCO's segment area), else the
box area. Image ids are the records' ids when all are decimal integers (so ``write_results`` output is a
valid COCO submission), else 1..N in processing order.

Values are fractions in [0, 1]; where a subset has no ground truth (pycocotools reports -1) they are NaN.
pycocotools' prints are captured; the text of ``summarize()`` is kept in ``summary``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mimicdet.data.records import ImageRecord

from ._common import box_area, check_detections, check_labels, check_record

# Order of COCOeval.stats for iouType="bbox".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class COCOEvaluator:
    """``reset / process(record, detections) / evaluate() -> dict``; ``write_results(path)`` writes the JSON.

    ``evaluate()`` returns the twelve ``STAT_NAMES`` plus ``AP_per_class`` (AP@[.5:.95] per class name).
    """

    primary_metric = "AP"
    higher_is_better = True

    def __init__(self, *, classes: Sequence[str]) -> None:
        if len(classes) == 0:
            raise ValueError("classes: expected at least one foreground class name, got none")
        self.classes = tuple(classes)
        self.summary = ""
        self.reset()

    def reset(self) -> None:
        self._records: list[ImageRecord] = []
        self._dets: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.summary = ""

    def process(self, record: ImageRecord, detections: Mapping[str, Any]) -> None:
        check_record(record)
        boxes, scores, labels = check_detections(detections, image_id=record.image_id, need_labels=True)
        check_labels(record, labels, num_classes=len(self.classes))
        self._records.append(record)
        self._dets.append((boxes, scores, labels))

    # --- building the pycocotools inputs -------------------------------------------------------------
    def _image_ids(self) -> list[int]:
        ids = [r.image_id for r in self._records]
        if all(i.isdigit() for i in ids) and len({int(i) for i in ids}) == len(ids):
            return [int(i) for i in ids]
        return list(range(1, len(ids) + 1))

    def ground_truth(self) -> COCO:
        """The processed records as an in-memory pycocotools ``COCO`` object."""
        images, annotations = [], []
        for img_id, r in zip(self._image_ids(), self._records):
            images.append({"id": img_id, "width": int(r.width), "height": int(r.height), "file_name": str(r.path)})
            areas = r.extras.get("area")
            areas = box_area(r.boxes) if areas is None else np.asarray(areas, np.float64).reshape(-1)
            for b, lab, ign, area in zip(r.boxes.astype(np.float64), r.labels, r.ignore, areas):
                annotations.append({
                    "id": len(annotations) + 1,  # pycocotools treats id 0 as "unmatched": start at 1
                    "image_id": img_id,
                    "category_id": int(lab),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "area": float(area),
                    "iscrowd": int(bool(ign)),
                })
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def results(self) -> list[dict[str, Any]]:
        """Detections as COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}``."""
        out = []
        for img_id, (boxes, scores, labels) in zip(self._image_ids(), self._dets):
            for b, s, lab in zip(boxes, scores, labels):
                out.append({
                    "image_id": img_id,
                    "category_id": int(lab),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "score": float(s),
                })
        return out

    def write_results(self, path: str | os.PathLike) -> Path:
        """Write the COCO results JSON atomically (temp file in the same folder, then rename)."""
        from mimicdet.data.paths import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.results()))
        return path

    # --- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        if not self._records:
            raise ValueError("COCOEvaluator.evaluate: no images were processed")
        gt = self.ground_truth()
        results = self.results()
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            if results:
                dt = gt.loadRes(copy.deepcopy(results))  # loadRes edits the dicts in place
            else:  # loadRes cannot take an empty list; an empty result set scores 0 where there is GT
                dt = COCO()
                dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                              "categories": copy.deepcopy(gt.dataset["categories"])}
                dt.createIndex()
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            summary = io.StringIO()
            with contextlib.redirect_stdout(summary):
                ev.summarize()
        self.summary = summary.getvalue()
        out: dict[str, Any] = {name: _nan_if_missing(v) for name, v in zip(STAT_NAMES, ev.stats)}
        out["AP_per_class"] = _per_class_ap(ev, self.classes)
        out["num_images"] = len(self._records)
        return out


def _nan_if_missing(v: float) -> float:
    return float("nan") if v < 0 else float(v)


def _per_class_ap(ev: COCOeval, classes: Sequence[str]) -> dict[str, float]:
    # precision: [T iou thresholds, R recall points, K categories, A areas, M max dets]; area "all", 100 dets.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    out = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k]
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else float("nan")
    return out
