"""COCO AP: the wrapper agrees with pycocotools run by hand; known answers for perfect, empty and crowd cases."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mimicdet.data.records import ImageRecord
from mimicdet.detection.metrics.coco import STAT_NAMES, COCOEvaluator


def record(image_id, boxes, labels, ignore=None) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(
        image_id=image_id, path=Path(f"{image_id}.jpg"), width=300, height=200, boxes=boxes,
        labels=np.asarray(labels, np.int64).reshape(n),
        ignore=np.zeros(n, bool) if ignore is None else np.asarray(ignore, bool),
    )


def dets(boxes, scores, labels) -> dict:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.int64)}


# Medium boxes only (40x40 = 1600 px^2, between 32^2 and 96^2).
RECORDS = [
    record("7", [[10, 10, 50, 50], [100, 20, 140, 60]], [1, 2]),
    record("9", [[60, 60, 100, 100]], [1]),
]


def test_perfect_detections_give_ap_one_and_nan_for_empty_size_ranges():
    ev = COCOEvaluator(classes=["cat", "dog"])
    for r in RECORDS:
        ev.process(r, dets(r.boxes, np.linspace(0.9, 0.8, len(r.boxes)), r.labels))
    res = ev.evaluate()
    for key in ("AP", "AP50", "AP75", "APm", "AR100"):
        assert res[key] == pytest.approx(1.0), key
    assert math.isnan(res["APs"]) and math.isnan(res["APl"])  # no small or large GT (pycocotools: -1)
    assert res["AP_per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert "Average Precision" in ev.summary


def test_no_detections_give_zero(capsys):
    ev = COCOEvaluator(classes=["cat", "dog"])
    for r in RECORDS:
        ev.process(r, dets(np.zeros((0, 4)), [], []))
    res = ev.evaluate()
    assert res["AP"] == 0.0 and res["AP50"] == 0.0 and res["AR100"] == 0.0
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured


def test_crowd_region_absorbs_detections():
    # One real box and a 200x200 crowd region; a .95 detection (40x40) inside the crowd, a .9 hit on the box.
    # Crowd: intersection / detection area = 1 -> the .95 detection is ignored, AP50 = 1.
    # Same region as a plain box: 2 positives, IoU = 1600 / 40000 = .04 -> FP ranked first, then the TP:
    #   recall reaches .5 at precision .5; 51 of the 101 recall points (0, .01, ..., .5) get precision .5
    #   -> AP50 = .5 * 51 / 101.
    boxes = [[10, 10, 50, 50], [100, 0, 300, 200]]
    r = record("1", boxes, [1, 1], [False, True])
    d = dets([[110, 10, 150, 50], [10, 10, 50, 50]], [0.95, 0.9], [1, 1])
    ev = COCOEvaluator(classes=["person"])
    ev.process(r, d)
    assert ev.evaluate()["AP50"] == pytest.approx(1.0)
    ev_plain = COCOEvaluator(classes=["person"])
    ev_plain.process(record("1", boxes, [1, 1]), d)
    assert ev_plain.evaluate()["AP50"] == pytest.approx(0.5 * 51 / 101)


def _pycocotools_by_hand(records, detections) -> np.ndarray:
    """The same evaluation written directly against pycocotools, without the wrapper."""
    images, anns, results = [], [], []
    for img_id, (r, d) in enumerate(zip(records, detections), start=1):
        images.append({"id": img_id, "width": r.width, "height": r.height})
        for b, lab, ign in zip(r.boxes.tolist(), r.labels.tolist(), r.ignore.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": lab,
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(ign)})
        for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": img_id, "category_id": lab,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_wrapper_matches_pycocotools_directly():
    # Small (20x20), medium and large boxes, a crowd box, misses, duplicates and wrong-class detections.
    records = [
        record("a", [[0, 0, 20, 20], [30, 30, 90, 90], [100, 0, 250, 150]], [1, 1, 2]),
        record("b", [[5, 5, 45, 45], [50, 50, 200, 190]], [2, 1], [False, True]),
    ]
    detections = [
        dets([[1, 1, 21, 19], [30, 32, 88, 90], [32, 30, 90, 92], [100, 5, 240, 150], [0, 0, 20, 20]],
             [0.9, 0.85, 0.7, 0.6, 0.3], [1, 1, 1, 2, 2]),
        dets([[8, 5, 45, 40], [60, 60, 100, 100], [150, 150, 170, 170]], [0.8, 0.75, 0.2], [2, 1, 1]),
    ]
    ev = COCOEvaluator(classes=["cat", "dog"])
    for r, d in zip(records, detections):
        ev.process(r, d)
    res = ev.evaluate()
    expected = _pycocotools_by_hand(records, detections)
    got = np.array([res[k] for k in STAT_NAMES])
    np.testing.assert_allclose(got, np.where(expected < 0, np.nan, expected), equal_nan=True)
    assert 0.0 < res["AP"] < 1.0


def test_write_results_json(tmp_path):
    ev = COCOEvaluator(classes=["cat", "dog"])
    ev.process(RECORDS[0], dets([[10, 10, 50, 40]], [0.5], [2]))
    ev.process(RECORDS[1], dets(np.zeros((0, 4)), [], []))
    path = ev.write_results(tmp_path / "out" / "results.json")
    # Decimal record ids are kept as COCO image ids; bbox is [x, y, w, h].
    assert json.loads(path.read_text()) == [
        {"image_id": 7, "category_id": 2, "bbox": [10.0, 10.0, 40.0, 30.0], "score": 0.5}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp left behind


def test_non_numeric_ids_are_numbered_in_order():
    ev = COCOEvaluator(classes=["cat", "dog"])
    ev.process(record("x", [[0, 0, 10, 10]], [1]), dets([[0, 0, 10, 10]], [0.5], [1]))
    ev.process(record("y", [[0, 0, 10, 10]], [1]), dets([[0, 0, 10, 10]], [0.5], [1]))
    assert [d["image_id"] for d in ev.results()] == [1, 2]
    assert ev.ground_truth().getImgIds() == [1, 2]


def test_bad_inputs():
    ev = COCOEvaluator(classes=["cat"])
    with pytest.raises(ValueError, match="1..1"):
        ev.process(RECORDS[0], dets([[0, 0, 1, 1]], [0.5], [1]))  # GT has label 2
    with pytest.raises(ValueError, match="no images"):
        COCOEvaluator(classes=["cat"]).evaluate()
    with pytest.raises(ValueError, match="classes"):
        COCOEvaluator(classes=[])
