"""evaluate_model: boxes mapped back to original pixels (known answers from an oracle), report contents, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mimicdet.data import load_dataset
from mimicdet.data.errors import DataError
from mimicdet.data.records import Dataset, empty_record
from mimicdet.data.transforms import Preprocess
from mimicdet.detection.detector import Detector, DetectorConfig
from mimicdet.detection.evaluate import evaluate_model, format_report, report_json, typical_input_size
from tests.test_teacher_cli import write_tiny_voc

PRE = Preprocess(min_size=64, max_size=128)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(tmp_path) -> Dataset:
    # Every image in one split; sizes 64x64 to 128x96 are resized by factors from 0.8 to 1.
    root = write_tiny_voc(tmp_path / "voc", {"all": [f"img{i}" for i in range(6)]})
    return load_dataset(root, "all")


class Oracle(nn.Module):
    """Answers with each image's ground truth placed in input pixels by the input size it is handed
    (``image_sizes``), independently of evaluate's inverse mapping. ``map_boxes=False`` forgets the resize."""

    def __init__(self, dataset: Dataset, *, map_boxes: bool = True) -> None:
        super().__init__()
        self.queue = list(dataset.records)  # evaluation visits images in dataset order
        self.map_boxes = map_boxes
        self.weight = nn.Parameter(torch.zeros(1))

    def predict(self, images, image_sizes):
        out = []
        for h, w in image_sizes:
            r = self.queue.pop(0)
            f = torch.tensor([w / r.width, h / r.height] * 2) if self.map_boxes else torch.ones(4)
            boxes = torch.from_numpy(r.boxes) * f
            scores = torch.linspace(0.9, 0.5, len(boxes))
            out.append({"boxes": boxes, "scores": scores, "labels": torch.from_numpy(r.labels),
                        "proposals": boxes, "proposal_scores": scores})
        return out


def meta_for(dataset: Dataset, scale: float = 1.0) -> dict:
    return {"classes": list(dataset.classes), "preprocess": PRE.to_dict(), "input_scale": scale}


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_oracle_scores_perfectly_at_full_and_half_input_scale(tiny, scale):
    r = evaluate_model(Oracle(tiny), meta_for(tiny, scale), tiny, metrics=("voc", "coco", "recall"),
                       device="cpu", batch_size=4)
    s = r["summary"]
    assert r["dataset"]["num_images"] == 6 and r["recall"]["num_gt"] == 9
    assert s["mAP@0.5_area"] == pytest.approx(1.0) and s["mAP@0.5_11pt"] == pytest.approx(1.0)
    assert s["recall@100_iou0.7"] == 1.0 and s["AR@100"] == pytest.approx(1.0)
    assert s["coco_AP"] == pytest.approx(1.0) and s["coco_AP75"] == pytest.approx(1.0)
    assert r["input"]["input_scale"] == scale


def test_forgetting_the_resize_is_caught(tiny):
    r = evaluate_model(Oracle(tiny, map_boxes=False), meta_for(tiny, 0.5), tiny, metrics=("voc", "recall"),
                       device="cpu")
    assert r["summary"]["mAP@0.5_area"] < 0.3
    assert r["summary"]["recall@100_iou0.7"] < 0.3


def test_max_images_takes_the_first_images(tiny):
    r = evaluate_model(Oracle(tiny), meta_for(tiny), tiny, metrics=("recall",), device="cpu", max_images=2)
    assert r["dataset"]["num_images"] == 2 and r["recall"]["num_gt"] == 3  # img0: 2 squares, img1: 1


def test_real_detector_report_is_complete_and_strict_json(tiny, tmp_path):
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=tiny.num_classes, width=0.125, head="rfcn"))
    r = evaluate_model(model, meta_for(tiny), tiny, metrics=("voc", "coco", "recall", "caltech"), device="cpu",
                       profile=True, plots_dir=tmp_path / "plots", name="w1/8")
    assert model.training  # mode restored
    s = r["summary"]
    for key in ("recall@100_iou0.5", "recall@100_iou0.7", "recall@300_iou0.5", "recall@300_iou0.7", "AR@100",
                "AR@300", "mAP@0.5_11pt", "mAP@0.5_area", "coco_AP", "coco_AP50", "coco_AP75", "LAMR"):
        assert s[key] is None or 0.0 <= s[key] <= 1.0, key
    assert s["params_total"] == model.param_counts()["total"]
    assert s["gflops"] > 0 and s["ms_per_image"] > 0
    assert r["profile"]["input_size"] == [64, 96]  # median input: img0 96x64 -> 96x64
    text = format_report(r)
    assert "w1/8 on voc/all (6 images" in text and "COCO APs / APm / APl" in text
    doc = json.loads(json.dumps(report_json(r), allow_nan=False))
    assert "curves" not in doc["voc"] and doc["summary"] == s
    assert len(r["plots"]) == 3 and all(p.endswith(".png") for p in r["plots"])


def test_headless_model_on_several_classes_reports_recall_only(tiny):
    model = Detector(DetectorConfig(num_classes=tiny.num_classes, width=0.125, head="none"))
    r = evaluate_model(model, meta_for(tiny), tiny, metrics=("voc", "recall"), device="cpu")
    assert "recall" in r and "voc" not in r
    assert r["notes"] == ["voc skipped: the model has no box head and the data has several classes"]


def test_mismatched_checkpoint_and_data_are_refused(tiny):
    with pytest.raises(DataError, match=r"has classes \['blue', 'red'\] but the model was trained on \['cat'\]"):
        evaluate_model(Oracle(tiny), {"classes": ["cat"], "preprocess": PRE.to_dict()}, tiny, device="cpu")
    with pytest.raises(DataError, match="no field 'preprocess'"):
        evaluate_model(Oracle(tiny), {"classes": list(tiny.classes)}, tiny, device="cpu")
    with pytest.raises(ValueError, match="metrics must be a non-empty subset of voc, coco, recall, caltech"):
        evaluate_model(Oracle(tiny), meta_for(tiny), tiny, metrics=("map",), device="cpu")


def test_typical_input_size_known_answers(tmp_path):
    records = tuple(empty_record(f"i{k}", tmp_path / f"i{k}.jpg", w, h)
                    for k, (w, h) in enumerate([(100, 50), (50, 100), (200, 200)]))
    ds = Dataset("d", "s", ("a",), records)
    # (100,50) -> 128x64; (50,100) -> 64x128; (200,200) -> 64x64. Lower median by area: 64 high, 128 wide.
    assert typical_input_size(ds, {"preprocess": PRE.to_dict()}) == (64, 128)
    # Half scale: 64x32, 32x64, 32x32 (padded to 16): same order, halved.
    assert typical_input_size(ds, {"preprocess": PRE.to_dict(), "input_scale": 0.5}) == (32, 64)
    np.testing.assert_equal(typical_input_size(ds.subset([2]), {"preprocess": PRE.to_dict()}), (64, 64))
