"""VOC AP with hand-computed answers (both the 11-point and the area rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mimicdet.data.records import ImageRecord, empty_record
from mimicdet.detection.metrics.voc import VOCConfig, VOCEvaluator, pr_curve, voc_ap, voc_match


def record(image_id, boxes, labels, ignore=None) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(
        image_id=image_id, path=Path(f"{image_id}.jpg"), width=200, height=200, boxes=boxes,
        labels=np.asarray(labels, np.int64).reshape(n),
        ignore=np.zeros(n, bool) if ignore is None else np.asarray(ignore, bool),
    )


def dets(boxes, scores, labels) -> dict:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.int64)}


# One image, class 1: GT A, B, C and a difficult D.
GT = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]
DETS = dets(
    [[0, 0, 10, 10],       # .90 -> A: TP
     [100, 100, 110, 110],  # .80 -> nothing: FP
     [60, 0, 70, 10],      # .75 -> D (difficult): ignored
     [20, 0, 30, 10],      # .70 -> B: TP
     [0, 0, 10, 9]],       # .60 -> IoU .9 with A, already taken: FP (duplicate)
    [0.9, 0.8, 0.75, 0.7, 0.6], [1, 1, 1, 1, 1],
)


def test_known_sequence_both_rules():
    # Kept sequence TP, FP, TP, FP with 3 positives (C is missed, D is difficult):
    #   precision 1, 1/2, 2/3, 1/2; recall 1/3, 1/3, 2/3, 2/3.
    # Area rule: envelope over recall steps 0->1/3 (p=1), 1/3->2/3 (p=2/3), 2/3->1 (p=0):
    #   AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9.
    # 11-point: t = 0, .1, .2, .3 -> max p with rec >= t is 1 (4 points); t = .4, .5, .6 -> 2/3 (3 points);
    #   t = .7 .. 1.0 -> 0 (4 points): AP = (4 + 3 * 2/3) / 11 = 6/11.
    ev = VOCEvaluator(classes=["cat"])
    ev.process(record("a", GT, [1, 1, 1, 1], [False, False, False, True]), DETS)
    res = ev.evaluate()
    assert res["AP_area"]["cat"] == pytest.approx(5 / 9)
    assert res["AP_11pt"]["cat"] == pytest.approx(6 / 11)
    assert res["mAP"] == pytest.approx(5 / 9)
    assert res["num_positives"] == {"cat": 3}
    np.testing.assert_allclose(res["curves"]["cat"]["precision"], [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(res["curves"]["cat"]["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    ev07 = VOCEvaluator(classes=["cat"], config=VOCConfig(use_07_metric=True))
    ev07.process(record("a", GT, [1, 1, 1, 1], [False, False, False, True]), DETS)
    assert ev07.evaluate()["mAP"] == pytest.approx(6 / 11)


def test_difficult_box_changes_the_answer_when_not_ignored():
    # Same boxes, D not difficult: 4 positives, sequence TP FP TP TP FP:
    #   precision 1, .5, 2/3, .75, .6; recall .25, .25, .5, .75, .75.
    # Area: .25 * 1 + .25 * .75 + .25 * .75 + .25 * 0 = .625.
    ev = VOCEvaluator(classes=["cat"])
    ev.process(record("a", GT, [1, 1, 1, 1]), DETS)
    res = ev.evaluate()
    assert res["AP_area"]["cat"] == pytest.approx(0.625)
    assert res["num_positives"] == {"cat": 4}


def test_voc_match_flags():
    m = voc_match(DETS["boxes"], DETS["scores"], np.asarray(GT, np.float32), np.array([0, 0, 0, 1], bool))
    assert m.tolist() == [1, 0, -1, 1, 0]


def test_voc_ap_rules_on_simple_curves():
    assert voc_ap(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert voc_ap(np.array([1.0]), np.array([1.0]), use_07_metric=True) == pytest.approx(1.0)
    # Half recall at precision 1: area .5; 11-point counts t = 0, .1, ..., .5 -> 6/11.
    assert voc_ap(np.array([0.5]), np.array([1.0])) == pytest.approx(0.5)
    assert voc_ap(np.array([0.5]), np.array([1.0]), use_07_metric=True) == pytest.approx(6 / 11)
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_scores_are_sorted_across_images():
    # Image x: a .9 false positive; image y: a .8 hit on the only GT. Global order FP, TP:
    #   precision 0, .5; recall 0, 1 -> area AP = 1 * .5 = .5, whatever the processing order.
    x = (record("x", [[0, 0, 10, 10]], [2]), dets([[50, 50, 60, 60]], [0.9], [1]))
    y = (record("y", [[0, 0, 10, 10]], [1]), dets([[0, 0, 10, 10]], [0.8], [1]))
    for order in ([x, y], [y, x]):
        ev = VOCEvaluator(classes=["cat", "dog"])
        for r, d in order:
            ev.process(r, d)
        res = ev.evaluate()
        assert res["AP_area"]["cat"] == pytest.approx(0.5)
        assert res["AP_area"]["dog"] == 0.0  # one positive, no detection
        assert res["mAP"] == pytest.approx(0.25)


def test_class_without_positives_is_nan_and_left_out_of_the_mean():
    ev = VOCEvaluator(classes=["cat", "bird"])
    ev.process(record("a", [[0, 0, 10, 10]], [1]), dets([[0, 0, 10, 10], [5, 5, 9, 9]], [0.9, 0.5], [1, 2]))
    ev.process(empty_record("b", Path("b.jpg"), 20, 20), dets(np.zeros((0, 4)), [], []))
    res = ev.evaluate()
    assert res["AP_area"]["cat"] == pytest.approx(1.0)
    assert np.isnan(res["AP_area"]["bird"])
    assert res["mAP"] == pytest.approx(1.0)
    assert res["num_images"] == 2
    ev.reset()
    assert ev.num_images == 0


def test_pr_curve_without_positives_is_nan():
    p, r = pr_curve(np.array([0.5]), np.array([0]), 0)
    assert p.tolist() == [0.0] and np.isnan(r).all()


def test_bad_inputs_name_the_problem():
    ev = VOCEvaluator(classes=["cat"])
    with pytest.raises(ValueError, match="labels.*1..1"):
        ev.process(record("a", [[0, 0, 1, 1]], [1]), dets([[0, 0, 1, 1]], [0.5], [3]))
    with pytest.raises(ValueError, match=r"boxes'\] must be \[D, 4\]"):
        ev.process(record("a", [[0, 0, 1, 1]], [1]), {"boxes": np.zeros((2, 3)), "scores": np.zeros(2),
                                                      "labels": np.ones(2, np.int64)})
    with pytest.raises(KeyError, match="labels"):
        ev.process(record("a", [[0, 0, 1, 1]], [1]), {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)})
    with pytest.raises(ValueError, match="unlabelled"):
        ev.process(empty_record("u", Path("u.jpg"), 5, 5, labelled=False), dets(np.zeros((0, 4)), [], []))
    with pytest.raises(ValueError, match="iou_threshold"):
        VOCConfig(iou_threshold=0.0)


# ------------------------------------------------------------------ paired image bootstrap of mAP


def _random_set(seed: int, images: int = 30, noise: float = 6.0):
    """Records with 1-3 boxes of 2 classes (some difficult) and noisy detections with false positives."""
    rng = np.random.default_rng(seed)
    recs, detections = [], []
    for i in range(images):
        g = int(rng.integers(1, 4))
        xy = rng.uniform(0, 150, (g, 2))
        boxes = np.c_[xy, xy + rng.uniform(15, 45, (g, 2))]
        labels = rng.integers(1, 3, g)
        recs.append(record(f"im{i}", boxes, labels, rng.random(g) < 0.15))
        jitter = boxes + rng.normal(0, noise, boxes.shape)
        fp = rng.uniform(0, 150, (2, 2))
        dboxes = np.r_[jitter, np.c_[fp, fp + 30]]
        detections.append(dets(dboxes, rng.random(g + 2), np.r_[labels, rng.integers(1, 3, 2)]))
    return recs, detections


def _evaluated(recs, detections) -> VOCEvaluator:
    ev = VOCEvaluator(classes=["cat", "dog"])
    for r, d in zip(recs, detections):
        ev.process(r, d)
    return ev


def test_weighted_map_with_unit_weights_is_the_evaluators_map():
    from mimicdet.detection.metrics.significance import _weighted_map

    ev = _evaluated(*_random_set(0))
    res, per = ev.evaluate(), ev.per_image()
    ones = np.ones((1, 30))
    assert _weighted_map(per, ones, use_07_metric=True)[0] == pytest.approx(res["mAP_11pt"])
    assert _weighted_map(per, ones, use_07_metric=False)[0] == pytest.approx(res["mAP_area"])


def test_weights_count_images_as_drawn_with_replacement():
    # Drawing image 0 twice, image 1 never, the rest once must score like an evaluator fed exactly that list.
    from mimicdet.detection.metrics.significance import _weighted_map

    recs, detections = _random_set(1)
    weights = np.ones(30)
    weights[0], weights[1] = 2.0, 0.0
    drawn = [0, 0] + list(range(2, 30))
    again = _evaluated([recs[i] for i in drawn], [detections[i] for i in drawn]).evaluate()
    per = _evaluated(recs, detections).per_image()
    for rule, key in ((True, "mAP_11pt"), (False, "mAP_area")):
        assert _weighted_map(per, weights[None], use_07_metric=rule)[0] == pytest.approx(again[key])


def test_paired_bootstrap_map_separates_a_good_model_from_a_poor_one():
    from mimicdet.detection.metrics.significance import paired_bootstrap_map

    recs, good = _random_set(2, images=60, noise=1.0)
    _, poor = _random_set(2, images=60, noise=12.0)
    a, b = _evaluated(recs, good), _evaluated(recs, poor)
    res = paired_bootstrap_map(a.per_image(), b.per_image(), n=400, seed=0)
    assert res["mean_diff"] == pytest.approx(a.evaluate()["mAP_11pt"] - b.evaluate()["mAP_11pt"])
    assert 0 < res["ci_low"] <= res["mean_diff"] <= res["ci_high"]
    assert res["p_value"] == pytest.approx(1 / 400)  # no draw at or below zero: floored at 1/n
    same = paired_bootstrap_map(a.per_image(), a.per_image(), n=200)
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert paired_bootstrap_map(a.per_image(), b.per_image(), n=100, seed=5) == \
        paired_bootstrap_map(a.per_image(), b.per_image(), n=100, seed=5)


def test_paired_bootstrap_map_refuses_different_images():
    from mimicdet.detection.metrics.significance import paired_bootstrap_map

    recs, detections = _random_set(3)
    a = _evaluated(recs, detections).per_image()
    b = _evaluated(recs[:-1], detections[:-1]).per_image()
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap_map(a, b)


def test_paired_bootstrap_map_of_a_model_without_detections():
    # A detector that outputs nothing has AP 0 on every class with positives (as the evaluator says).
    from mimicdet.detection.metrics.significance import paired_bootstrap_map

    recs, detections = _random_set(4)
    empty = [dets(np.zeros((0, 4)), [], []) for _ in recs]
    a, b = _evaluated(recs, detections), _evaluated(recs, empty)
    assert b.evaluate()["mAP_11pt"] == 0.0
    res = paired_bootstrap_map(a.per_image(), b.per_image(), n=100)
    assert res["mean_diff"] == pytest.approx(a.evaluate()["mAP_11pt"]) and res["ci_low"] > 0
