"""Caltech log-average miss rate on hand-made cases (ignore regions, small boxes, aspect normalisation)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mimicdet.data.records import ImageRecord
from mimicdet.detection.metrics.caltech import (
    REFERENCE_FPPI,
    CaltechConfig,
    CaltechEvaluator,
    caltech_match,
    log_average_miss_rate,
    resize_to_aspect,
)


def ped(x, y, h=100.0):
    """A box already at the toolbox's aspect ratio (w = .41 h), so normalisation leaves it unchanged."""
    return [x, y, x + 0.41 * h, y + h]


def record(image_id, boxes, ignore=None, **extras) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(
        image_id=image_id, path=Path(f"{image_id}.jpg"), width=640, height=480, boxes=boxes,
        labels=np.ones(n, np.int64), ignore=np.zeros(n, bool) if ignore is None else np.asarray(ignore, bool),
        extras={k: np.asarray(v, np.float32) for k, v in extras.items()},
    )


def dets(boxes, scores) -> dict:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.ones(len(scores), np.int64)}


def run(pairs, **cfg) -> dict:
    ev = CaltechEvaluator(config=CaltechConfig(**cfg))
    for r, d in pairs:
        ev.process(r, d)
    return ev.evaluate()


# Four images, one 100 px pedestrian each (A, B, C, D) plus:
#   image 0: a 45 px pedestrian S (below 50: ignored in "reasonable", counted in "all");
#   image 1: an ignore region R ("people"), 200x200;
#   image 3: a 30 px detection (dropped in "reasonable": below 50 / 1.25 = 40 px; kept in "all").
CASE = [
    (record("0", [ped(10, 10), ped(300, 10, 45)]),
     dets([ped(10, 10), ped(300, 10, 45)], [0.9, 0.5])),              # .9 -> A TP; .5 -> S
    (record("1", [ped(10, 10), [200, 0, 400, 200]], [False, True]),
     dets([ped(250, 50)], [0.8])),                                    # .8 inside R: ignored, not a FP
    (record("2", [ped(10, 10)]),
     dets([ped(500, 10), ped(10, 10)], [0.7, 0.6])),                  # .7 FP; .6 -> C TP
    (record("3", [ped(10, 10)]),
     dets([ped(200, 10), ped(400, 300, 30)], [0.4, 0.95])),           # .4 FP; .95 the 30 px box
]


def test_reasonable_known_answer():
    # Kept, by score: .9 TP, .8 ignored (region), .7 FP, .6 TP, .5 ignored (S is an ignored GT), .4 FP.
    # 4 positives, 4 images: (FPPI, recall) = (0, .25), (.25, .25), (.25, .5), (.5, .5).
    # Refs .01 .. .178 (6 of them) see FPPI 0 -> MR .75; refs .316, .562, 1 see recall .5 -> MR .5.
    # LAMR = exp((6 ln .75 + 3 ln .5) / 9).
    res = run(CASE)
    assert res["num_positives"] == 4 and res["num_images"] == 4
    np.testing.assert_allclose(res["miss_rates"], [0.75] * 6 + [0.5] * 3)
    assert res["LAMR"] == pytest.approx(math.exp((6 * math.log(0.75) + 3 * math.log(0.5)) / 9))
    assert res["LAMR"] == pytest.approx(0.65519, abs=1e-5)
    np.testing.assert_allclose(res["curves"]["fppi"], [0, 0.25, 0.25, 0.5])
    np.testing.assert_allclose(res["curves"]["miss_rate"], [0.75, 0.75, 0.5, 0.5])


def test_all_setting_counts_small_boxes_and_the_curve_starts_at_miss_rate_one():
    # "all": S (45 px) is a positive and the .5 detection hits it; the 30 px detection (>= 20 / 1.25) stays
    # and is the top-scoring FP. Kept: .95 FP, .9 TP, .7 FP, .6 TP, .5 TP, .4 FP; 5 positives:
    #   (FPPI, recall) = (.25, 0), (.25, .2), (.5, .2), (.5, .4), (.5, .6), (.75, .6).
    # Refs below .25 (6) see only the curve's start -> MR 1; .316 -> .8; .562 and 1 -> .4.
    # LAMR = exp((ln .8 + 2 ln .4) / 9) = .79578.
    res = run(CASE, setting="all")
    assert res["num_positives"] == 5
    np.testing.assert_allclose(res["miss_rates"], [1.0] * 6 + [0.8, 0.4, 0.4])
    assert res["LAMR"] == pytest.approx(math.exp((math.log(0.8) + 2 * math.log(0.4)) / 9))


def test_perfect_half_and_empty_detectors():
    recs = [record("a", [ped(10, 10)]), record("b", [ped(100, 50, 120)])]
    perfect = run([(r, dets(r.boxes, [0.9])) for r in recs])
    assert perfect["LAMR"] == pytest.approx(1e-10)  # MR 0 everywhere, floored at 1e-10
    # Finds one of two, no false positive: MR .5 at every reference point.
    half = run([(recs[0], dets(recs[0].boxes, [0.9])), (recs[1], dets(np.zeros((0, 4)), []))])
    assert half["LAMR"] == pytest.approx(0.5)
    none = run([(r, dets(np.zeros((0, 4)), [])) for r in recs])
    assert none["LAMR"] == pytest.approx(1.0)


def test_ignore_region_absorbs_many_detections():
    r = record("a", [ped(10, 10), [200, 0, 600, 400]], [False, True])
    d = dets([ped(10, 10)] + [ped(220 + 60 * i, 50) for i in range(5)], [0.5, 0.9, 0.8, 0.7, 0.6, 0.95])
    res = run([(r, d)])
    assert res["LAMR"] == pytest.approx(1e-10)
    assert res["curves"]["fppi"].tolist() == [0.0]  # only the TP is left on the curve


def test_visibility_and_bounds_make_boxes_ignored():
    # A half-visible pedestrian (.5 < .65) is not a positive in "reasonable" (a detection on it is ignored),
    # but it is in "all" (.5 >= .2). With bounds (5, 5, 635, 475) a box at x = 2 becomes an ignore region.
    r = record("a", [ped(10, 10), ped(200, 10)], visibility=[1.0, 0.5])
    d = dets([ped(10, 10), ped(200, 10)], [0.9, 0.8])
    assert run([(r, d)])["num_positives"] == 1
    assert run([(r, d)])["LAMR"] == pytest.approx(1e-10)
    assert run([(r, d)], setting="all")["num_positives"] == 2
    edge = record("b", [ped(2, 10), ped(100, 10)])
    assert run([(edge, dets(np.zeros((0, 4)), []))])["num_positives"] == 2
    assert run([(edge, dets(np.zeros((0, 4)), []))], bounds=(5, 5, 635, 475))["num_positives"] == 1


def test_height_extra_overrides_box_height():
    r = record("a", [ped(10, 10)], height=[40.0])  # a reader-provided height below 50
    assert run([(r, dets(np.zeros((0, 4)), []))])["num_positives"] == 0


def test_aspect_ratio_normalisation():
    # GT 41x100; a detection 100 wide with the same centre and height. Normalised to w = .41 h both are
    # the same box (TP); without normalisation IoU = 41*100 / (100*100) = .41 < .5 (FP, and A is missed).
    gt = ped(10, 10)
    cx = (gt[0] + gt[2]) / 2
    wide = [cx - 50, 10, cx + 50, 110]
    np.testing.assert_allclose(resize_to_aspect(np.array([wide]), 0.41), [gt], atol=1e-9)
    pair = [(record("a", [gt]), dets([wide], [0.9]))]
    assert run(pair)["LAMR"] == pytest.approx(1e-10)
    assert run(pair, aspect_ratio=None)["LAMR"] == pytest.approx(1.0)


def test_match_prefers_real_boxes_over_ignore_regions_and_takes_each_box_once():
    gt = np.array([ped(10, 10), [0, 0, 300, 300]], np.float64)
    d = np.array([ped(10, 10), ped(12, 10)], np.float64)
    det, g = caltech_match(d, np.array([0.6, 0.9]), gt, np.array([False, True]))
    # .9 (shifted by 2 px, IoU 3900 / 4300 = .91) takes the pedestrian; the .6 exact box then falls on the region.
    assert det.tolist() == [-1, 1] and g.tolist() == [1, -1]


def test_lamr_reference_points_and_curve_start():
    assert len(REFERENCE_FPPI) == 9
    np.testing.assert_allclose(REFERENCE_FPPI[[0, 4, 8]], [0.01, 0.1, 1.0])
    # First point at FPPI .05: refs .01, .0178, .0316 precede it -> MR 1 there (the curve's start).
    lamr, at_ref = log_average_miss_rate(np.array([0.05, 2.0]), np.array([0.2, 0.1]))
    np.testing.assert_allclose(at_ref, [1, 1, 1] + [0.2] * 6)
    assert lamr == pytest.approx(math.exp(6 * math.log(0.2) / 9))


def test_no_positives_and_config_errors():
    res = run([(record("a", np.zeros((0, 4))), dets([ped(0, 0)], [0.5]))])
    assert math.isnan(res["LAMR"]) and res["num_positives"] == 0
    with pytest.raises(ValueError, match="setting"):
        CaltechConfig(setting="near")
    with pytest.raises(ValueError, match="extras\\['height'\\]"):
        run([(record("a", [ped(0, 0)], height=[50.0, 60.0]), dets(np.zeros((0, 4)), []))])
