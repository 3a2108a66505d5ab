"""Proposal recall / AR known answers, per-box hits, and the paired significance tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mimicdet.data.records import ImageRecord
from mimicdet.detection.metrics.recall import (
    AR_THRESHOLDS,
    ProposalRecallEvaluator,
    RecallConfig,
    best_overlaps,
    per_box_hits,
)
from mimicdet.detection.metrics.significance import mcnemar, paired_bootstrap


def record(image_id, boxes, ignore=None, labels=None) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(
        image_id=image_id, path=Path(f"{image_id}.jpg"), width=100, height=100, boxes=boxes,
        labels=np.ones(n, np.int64) if labels is None else np.asarray(labels, np.int64),
        ignore=np.zeros(n, bool) if ignore is None else np.asarray(ignore, bool),
    )


def props(boxes, scores=None) -> dict:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.linspace(1.0, 0.5, len(boxes)) if scores is None else scores
    return {"boxes": boxes, "scores": np.asarray(scores, np.float32)}


# GT A = [0,0,10,10], B = [20,20,30,30] (label 2: proposals are class-agnostic), C ignored.
REC = record("a", [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [False, False, True], [1, 2, 1])
# p1 equals A (IoU 1); p2 = [20,20,30,35] with B: 100 / 150 = 2/3; p3 equals the ignored C.
PROPS = props([[0, 0, 10, 10], [20, 20, 30, 35], [50, 50, 60, 60]])


def test_known_recall_and_ar():
    ev = ProposalRecallEvaluator(config=RecallConfig(top_n=(1, 2), iou_thresholds=(0.5, 0.7)))
    ev.process(REC, PROPS)
    res = ev.evaluate()
    # top-1: A recalled at any IoU, B not -> 1/2 at .5 and .7; AR = 1/2.
    assert res["recall@1_iou0.5"] == 0.5 and res["recall@1_iou0.7"] == 0.5
    assert res["AR@1"] == pytest.approx(0.5)
    # top-2: B at 2/3 passes .5 but not .7. AR: A passes all 10 thresholds, B passes .5,.55,.6,.65 (4):
    #   (10 + 4) / 20 = .7.
    assert res["recall@2_iou0.5"] == 1.0 and res["recall@2_iou0.7"] == 0.5
    assert res["AR@2"] == pytest.approx(0.7)
    assert res["num_gt"] == 2  # the ignored box does not count
    curve = res["curves"]
    assert curve["iou"][0] == 0.5 and curve["iou"][-1] == 1.0
    np.testing.assert_allclose(curve["recall@2"], np.where(curve["iou"] <= 2 / 3, 1.0, 0.5))
    assert ev.primary_metric == "AR@2"


def test_default_config_and_ar_thresholds():
    np.testing.assert_allclose(AR_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    ev = ProposalRecallEvaluator()
    ev.process(REC, PROPS)
    assert set(k for k in ev.evaluate() if k.startswith(("recall@", "AR@"))) == {
        "recall@100_iou0.5", "recall@100_iou0.7", "recall@300_iou0.5", "recall@300_iou0.7", "AR@100", "AR@300"}


def test_unsorted_proposals_are_ranked_by_score():
    ev = ProposalRecallEvaluator(config=RecallConfig(top_n=(1,), iou_thresholds=(0.5,)))
    # The box matching B carries the top score, so top-1 recalls B, not A.
    ev.process(REC, props([[0, 0, 10, 10], [20, 20, 30, 30]], [0.2, 0.9]))
    assert ev.per_box_hits(top_n=1, iou_threshold=0.5).tolist() == [False, True]


def test_one_proposal_can_recall_several_boxes_and_empty_cases():
    r = record("b", [[0, 0, 10, 10], [0, 0, 10, 11]])
    np.testing.assert_allclose(best_overlaps(r.boxes, np.array([[0, 0, 10, 10]])), [1.0, 100 / 110])
    assert best_overlaps(r.boxes, np.zeros((0, 4))).tolist() == [0.0, 0.0]
    ev = ProposalRecallEvaluator()
    ev.process(record("c", np.zeros((0, 4))), props(np.zeros((0, 4))))
    res = ev.evaluate()
    assert res["num_gt"] == 0 and np.isnan(res["AR@300"])


def test_per_box_hits_order_and_module_function():
    recs = [REC, record("b", [[0, 0, 20, 20]])]
    proposals = [PROPS, props([[0, 0, 20, 10]])]  # IoU .5 with b's box
    ev = ProposalRecallEvaluator()
    for r, p in zip(recs, proposals):
        ev.process(r, p)
    assert ev.box_keys == [("a", 0), ("a", 1), ("b", 0)]
    assert ev.per_box_hits(top_n=300, iou_threshold=0.7).tolist() == [True, False, False]
    assert per_box_hits(recs, proposals, top_n=300, iou_threshold=0.5).tolist() == [True, True, True]
    assert per_box_hits(recs, proposals, top_n=1, iou_threshold=0.5).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="top_n=5"):
        ev.per_box_hits(top_n=5, iou_threshold=0.5)
    with pytest.raises(ValueError, match="2 records but 1"):
        per_box_hits(recs, proposals[:1])


def test_mcnemar_exact_known_answers():
    # b = 5 boxes only A hits, c = 0: p = 2 * (1/2)^5 = .0625.
    a = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 1, 0], bool)
    assert mcnemar(a, b) == {"b": 5, "c": 0, "p_value": pytest.approx(0.0625)}
    # b = 7, c = 1: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18 / 256.
    a = np.array([1] * 7 + [0] + [1, 0], bool)
    b = np.array([0] * 7 + [1] + [1, 0], bool)
    assert mcnemar(a, b) == {"b": 7, "c": 1, "p_value": pytest.approx(18 / 256)}
    assert mcnemar(a, a)["p_value"] == 1.0
    assert mcnemar([1, 0], [0, 1]) == {"b": 1, "c": 1, "p_value": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="same boxes"):
        mcnemar(a, a[:3])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([2, 0], [1, 0])


def test_paired_bootstrap():
    ones, zeros = np.ones(50, bool), np.zeros(50, bool)
    assert paired_bootstrap(ones, zeros, n=200) == {"mean_diff": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert paired_bootstrap(ones, ones, n=200) == {"mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    # Differences: 200 of +1 and 200 of 0 -> mean .5, bootstrap SE ~ sqrt(.25 / 400) = .025,
    # so the 95% interval is about .5 -+ 1.96 * .025 = [.451, .549].
    a = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    b = np.zeros(400, bool)
    res = paired_bootstrap(a, b, n=4000, seed=1)
    assert res["mean_diff"] == 0.5
    assert res["ci_low"] == pytest.approx(0.451, abs=0.01) and res["ci_high"] == pytest.approx(0.549, abs=0.01)
    assert paired_bootstrap(a, b, n=300, seed=3) == paired_bootstrap(a, b, n=300, seed=3)
    with pytest.raises(ValueError, match="no boxes"):
        paired_bootstrap(np.zeros(0, bool), np.zeros(0, bool))
