"""Any teacher: torchvision's Faster R-CNNs fill a feature store that trains this tool's Inception student.

Models are built with ``weights=None`` (nothing is downloaded), their batch norm calibrated on noise so the maps
have a trained network's scale, and saved as state dicts in torchvision's own layout, as a user's file would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mimicdet.cli import main
from mimicdet.detection.detector import load_detector, save_detector
from mimicdet.detection.torchvision_detector import ARCHS, TorchvisionConfig, TorchvisionDetector, coco_categories
from mimicdet.pipeline.teachers import TeacherSpec, map_classes, open_teacher
from mimicdet.store import open_store, verify_store
from tests.pipeline_fixtures import CLASSES, make_squares_voc

SIZE = 64


def torchvision_state(path: Path, arch: str, num_classes: int) -> Path:
    torch.manual_seed(0)
    model = TorchvisionDetector(TorchvisionConfig(arch=f"torchvision:{arch}", num_classes=num_classes))
    with torch.no_grad():
        model.backbone.train()
        for _ in range(2):
            model.backbone(torch.randn(2, 3, SIZE, SIZE))
    torch.save(model.model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_squares_voc(tmp_path_factory.mktemp("tv") / "voc", {"train": 6, "test": 2}, size=SIZE)


def extract(voc: Path, out: Path, *args) -> object:
    return CliRunner().invoke(main, ["extract-teacher", "--data", str(voc), "--out", str(out), "--proposals", "20",
                                     "--min-size", str(SIZE), "--max-size", str(SIZE), *map(str, args)])


def train(voc: Path, store: Path, out: Path, *args) -> object:
    return CliRunner().invoke(main, ["train-student", "--store", str(store), "--data", str(voc), "--out", str(out),
                                     "--width", "1/8", "--iters", "2", "--batch-size", "2", "--workers", "0",
                                     "--rois-per-image", "8", *map(str, args)])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_torchvision_store_trains_an_inception_student(tmp_path, voc, arch):
    weights = torchvision_state(tmp_path / "weights.pth", arch, num_classes=3)
    store = tmp_path / "store"
    r = extract(voc, store, "--teacher", f"torchvision:{arch}", "--weights", weights)
    assert r.exit_code == 0, r.output
    m = open_store(str(store)).manifest
    assert (m.teacher_arch, m.stride, m.channels, m.teacher_head) == (f"torchvision:{arch}", 16, 256, "none")
    assert m.feature_layer == ("fpn.0 (stride 32) upsampled x2" if "mobilenet" in arch else "fpn.2 (stride 16)")
    assert m.preprocess["min_size"] == SIZE and m.preprocess["std"] == [0.229, 0.224, 0.225]
    assert m.classes == CLASSES  # no class map: the dataset's own, and the head's columns left empty (zeros)
    rec = open_store(str(store)).read(0)
    assert rec.features.shape == (256, SIZE // 16, SIZE // 16) and not rec.class_logits.any()
    assert verify_store(str(store)).ok
    s1 = train(voc, store, tmp_path / "s1")
    assert s1.exit_code == 0, s1.output
    s2 = train(voc, store, tmp_path / "s2", "--stage", "2", "--init", tmp_path / "s1" / "model.pt")
    assert s2.exit_code == 0, s2.output
    said = [line for line in s2.output.splitlines() if "holds no head outputs" in line]
    assert len(said) == 1 and "trains its head on ground truth alone" in said[0], s2.output
    config = json.loads((tmp_path / "s2" / "student_config.json").read_text())
    assert config["logits_weight"] == 0.0
    r = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "s2" / "model.pt"), "--data", str(voc),
                                  "--split", "test", "--out", str(tmp_path / "eval.json"), "--no-profile"])
    assert r.exit_code == 0, r.output


def test_a_class_map_gives_the_store_the_datasets_logits(tmp_path, voc):
    arch = "fasterrcnn_mobilenet_v3_large_fpn"
    names = coco_categories(arch)
    weights = torchvision_state(tmp_path / "coco.pth", arch, num_classes=len(names))
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"person": "red", "car": "red", "bicycle": "blue"}))
    store = tmp_path / "store"
    r = extract(voc, store, "--teacher", f"torchvision:{arch}", "--weights", weights, "--class-map", class_map)
    assert r.exit_code == 0, r.output
    m = open_store(str(store)).manifest
    assert m.classes == ("red", "blue") and m.teacher_head == "fast-rcnn"
    rec = open_store(str(store)).read(0)
    assert rec.class_logits.shape == (len(rec.proposals), 3) and rec.box_deltas.shape == (len(rec.proposals), 12)
    # The stored logits are the teacher's, mapped: red = logsumexp(person, car), blue = bicycle.
    teacher = open_teacher(TeacherSpec(f"torchvision:{arch}", weights=str(weights)), torch.device("cpu"))
    raw = torch.randn(5, len(names))
    mapped, deltas = map_classes(raw, torch.randn(5, 4 * len(names)), [[0], [1, 3], [2]])
    torch.testing.assert_close(mapped[:, 1], torch.logsumexp(raw[:, [names.index("person"), names.index("car")]], 1))
    assert deltas.shape == (5, 12) and teacher.head == "none"
    s1 = train(voc, store, tmp_path / "s1")
    assert s1.exit_code == 0, s1.output
    s2 = train(voc, store, tmp_path / "s2", "--stage", "2", "--init", tmp_path / "s1" / "model.pt")
    assert s2.exit_code == 0, s2.output
    assert json.loads((tmp_path / "s2" / "student_config.json").read_text())["logits_weight"] == 0.3


def test_refusals_name_both_sides(tmp_path, voc, monkeypatch):
    arch = "fasterrcnn_mobilenet_v3_large_fpn"
    weights = torchvision_state(tmp_path / "w.pth", arch, num_classes=3)
    spec = f"torchvision:{arch}"
    r = extract(voc, tmp_path / "a", "--teacher", spec, "--weights", weights, "--feature-stride", "8")
    assert r.exit_code == 1 and "has FPN levels at strides 0: 32, 1: 32, pool: 64; none at 8 or 16" in r.output
    r = extract(voc, tmp_path / "b", "--teacher", spec)
    assert r.exit_code == 1 and "needs --weights" in r.output, r.output
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    r = extract(voc, tmp_path / "c", "--teacher", spec, "--weights", "COCO_V1")
    assert r.exit_code == 1 and "not in torchvision's cache" in r.output and "https://download.pytorch.org" in r.output
    other = torchvision_state(tmp_path / "r50.pth", "fasterrcnn_resnet50_fpn", num_classes=3)
    r = extract(voc, tmp_path / "d", "--teacher", spec, "--weights", other)
    assert r.exit_code == 1 and f"not {spec} weights with 3 classes" in r.output and "r50.pth" in r.output
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"unicorn": "red"}))
    r = extract(voc, tmp_path / "e", "--teacher", spec, "--weights", weights, "--class-map", bad_map)
    assert r.exit_code == 1 and "'unicorn' is not a class of the teacher" in r.output
    # A stride-32 store cannot teach a stride-16 student: both are named.
    store = tmp_path / "p5"
    r = extract(voc, store, "--teacher", "torchvision:fasterrcnn_resnet50_fpn", "--weights", other,
                "--feature-stride", "32")
    assert r.exit_code == 0, r.output
    r = train(voc, store, tmp_path / "s")
    assert r.exit_code == 1 and "store features.stride 32 != student stride 16" in r.output, r.output


def test_train_teacher_fine_tunes_a_torchvision_detector(tmp_path, voc):
    """--arch torchvision:NAME: this tool's trainer on torchvision's model; the checkpoint is a teacher like any."""
    out = tmp_path / "teacher"
    r = CliRunner().invoke(main, ["train-teacher", "--arch", "torchvision:fasterrcnn_mobilenet_v3_large_fpn",
                                  "--data", str(voc), "--out", str(out), "--iters", "2", "--batch-size", "2",
                                  "--min-size", str(SIZE), "--max-size", str(SIZE), "--workers", "0"])
    assert r.exit_code == 0, r.output
    model, meta = load_detector(out / "model.pt")
    assert isinstance(model, TorchvisionDetector) and meta["classes"] == list(CLASSES)
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["extract-teacher", "--teacher", str(out / "model.pt"), "--data", str(voc),
                                  "--out", str(store), "--proposals", "20"])
    assert r.exit_code == 0, r.output
    m = open_store(str(store)).manifest
    assert m.teacher_head == "fast-rcnn" and m.classes == CLASSES and m.stride == 16
    # Saved and loaded again, the detector computes the same outputs.
    save_detector(tmp_path / "again.pt", model, meta)
    again, _ = load_detector(tmp_path / "again.pt")
    x = torch.randn(1, 3, SIZE, SIZE)
    a, b = model.predict(x, [(SIZE, SIZE)]), again.predict(x, [(SIZE, SIZE)])
    torch.testing.assert_close(a[0]["proposals"], b[0]["proposals"])
