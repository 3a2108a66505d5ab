"""Proposal recall: recall at IoU thresholds for the top-N proposals, average recall (AR), recall-vs-IoU.

Shapes: P proposals (sorted by score, high first) and G ground-truth boxes per image; boxes ``[K, 4]``
x1y1x2y2 in pixels of the original image, continuous coordinates (no ``+1``). Proposals are class-agnostic,
so every non-ignored GT box counts whatever its label; ignored boxes are left out.

Definition: a GT box is recalled at IoU t by the top-N proposals when any of them has IoU >= t with it
(each GT counted once; one proposal may recall several GT). Recall = recalled GT / all non-ignored GT over
the dataset. AR@N is the mean recall over t in 0.5:0.05:0.95 (the COCO discretisation of Hosang et al.'s
2 * integral of recall over IoU in [0.5, 1]).

``per_box_hits`` gives the recalled/missed flag of every GT box in a fixed order (records in processing
order, then the record's non-ignored boxes in their stored order), so two models evaluated on the same
records can be compared box by box (``significance.mcnemar`` / ``paired_bootstrap``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from mimicdet.data.records import ImageRecord

from ._common import box_iou, check_detections, check_record, descending

AR_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # 0.5:0.05:0.95
CURVE_IOU = np.round(np.linspace(0.5, 1.0, 21), 3)  # x axis of the recall-vs-IoU curve


@dataclass(frozen=True)
class RecallConfig:
    top_n: tuple[int, ...] = (100, 300)
    iou_thresholds: tuple[float, ...] = (0.5, 0.7)

    def __post_init__(self) -> None:
        if not self.top_n or any(int(n) != n or n < 1 for n in self.top_n):
            raise ValueError(f"RecallConfig.top_n must be positive integers, got {self.top_n}")
        if any(not 0.0 < t <= 1.0 for t in self.iou_thresholds):
            raise ValueError(f"RecallConfig.iou_thresholds must be in (0, 1], got {self.iou_thresholds}")


def best_overlaps(gt_boxes: np.ndarray, proposal_boxes: np.ndarray) -> np.ndarray:
    """``float64[G]``: the best IoU of each GT box with any of the given proposals (0 if there are none)."""
    if len(gt_boxes) == 0:
        return np.zeros(0)
    if len(proposal_boxes) == 0:
        return np.zeros(len(gt_boxes))
    return box_iou(gt_boxes, proposal_boxes).max(axis=1)


def recall_at(best: np.ndarray, thresholds: Iterable[float]) -> np.ndarray:
    """``float64[T]``: fraction of GT whose best IoU is >= each threshold (NaN when there is no GT)."""
    best = np.asarray(best, np.float64)
    t = np.asarray(list(thresholds), np.float64)
    if best.size == 0:
        return np.full(t.shape, np.nan)
    return (best[None, :] >= t[:, None]).mean(axis=1)


class ProposalRecallEvaluator:
    """``reset / process(record, proposals) / evaluate() -> dict``; ``per_box_hits(top_n=, iou_threshold=)``.

    ``evaluate()`` returns ``recall@{N}_iou{t}`` for every N in ``top_n`` and t in ``iou_thresholds``
    (e.g. ``recall@300_iou0.7``), ``AR@{N}``, ``num_gt``, ``num_images`` and
    ``curves = {"iou": float64[21], "recall@{N}": float64[21]}`` (IoU 0.5 to 1.0).
    """

    higher_is_better = True

    def __init__(self, *, config: RecallConfig = RecallConfig()) -> None:
        self.config = config
        self.primary_metric = f"AR@{max(config.top_n)}"
        self.reset()

    def reset(self) -> None:
        self._best: dict[int, list[np.ndarray]] = {n: [] for n in self.config.top_n}
        self.box_keys: list[tuple[str, int]] = []  # (image_id, index of the box in the record)
        self.num_images = 0

    def process(self, record: ImageRecord, proposals: Mapping[str, Any]) -> None:
        check_record(record)
        boxes, scores, _ = check_detections(proposals, image_id=record.image_id, need_labels=False,
                                            what="proposals")
        boxes = boxes[descending(scores)]  # a no-op for sorted input; guards against unsorted input
        keep = np.flatnonzero(~record.ignore)
        gt = record.boxes[keep]
        iou = box_iou(gt, boxes[: max(self.config.top_n)])  # [G, P]: once, then sliced per N
        for n in self.config.top_n:
            self._best[n].append(iou[:, :n].max(axis=1) if iou.shape[1] else np.zeros(len(gt)))
        self.box_keys.extend((record.image_id, int(i)) for i in keep)
        self.num_images += 1

    def best_ious(self, top_n: int) -> np.ndarray:
        """``float64[num_gt]``: best IoU of every GT box with the top-``top_n`` proposals, in ``box_keys`` order."""
        if top_n not in self._best:
            raise ValueError(f"top_n={top_n} was not evaluated; RecallConfig.top_n is {self.config.top_n}")
        return np.concatenate(self._best[top_n]) if self._best[top_n] else np.zeros(0)

    def per_box_hits(self, *, top_n: int, iou_threshold: float) -> np.ndarray:
        """``bool[num_gt]``: recalled or not, one per non-ignored GT box, in ``box_keys`` order."""
        return self.best_ious(top_n) >= iou_threshold

    def evaluate(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        curves: dict[str, np.ndarray] = {"iou": CURVE_IOU.copy()}
        for n in self.config.top_n:
            best = self.best_ious(n)
            for t, r in zip(self.config.iou_thresholds, recall_at(best, self.config.iou_thresholds)):
                out[f"recall@{n}_iou{t:g}"] = float(r)
            out[f"AR@{n}"] = float(np.mean(recall_at(best, AR_THRESHOLDS)))
            curves[f"recall@{n}"] = recall_at(best, CURVE_IOU)
        out["num_gt"] = len(self.box_keys)
        out["num_images"] = self.num_images
        out["curves"] = curves
        return out


def per_box_hits(
    records: Iterable[ImageRecord],
    proposals: Iterable[Mapping[str, Any]],
    *,
    top_n: int = 300,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """``bool[num_gt]`` for paired tests: records and their proposals, zipped in order (lengths must agree)."""
    records, proposals = list(records), list(proposals)
    if len(records) != len(proposals):
        raise ValueError(f"per_box_hits: {len(records)} records but {len(proposals)} proposal sets")
    ev = ProposalRecallEvaluator(config=RecallConfig(top_n=(top_n,), iou_thresholds=(iou_threshold,)))
    for r, p in zip(records, proposals):
        ev.process(r, p)
    return ev.per_box_hits(top_n=top_n, iou_threshold=iou_threshold)
