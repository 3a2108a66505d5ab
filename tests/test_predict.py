"""`mimic predict` and the Predictor API: the same boxes as `mimic evaluate`, COCO results pycocotools takes,
a bad file skipped with a warning; `mimic evaluate --detections` with the ground truth's image ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mimicdet.cli import main
from mimicdet.data import load_dataset
from mimicdet.detection.detector import load_detector
from mimicdet.detection.evaluate import evaluate_model
from mimicdet.detection.inference import Predictor, image_rgb
from mimicdet.detection.metrics import COCOEvaluator
from mimicdet.detection.predict import find_images
from tests.pipeline_fixtures import CLASSES, make_squares_voc, make_tiny_teacher
from tests.test_evaluate import Oracle, meta_for
from tests.test_teacher_cli import write_tiny_voc


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only contends with other test processes
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An untrained seeded tiny detector (calibrated BN): about a hundred detections per image at 0.05."""
    return make_tiny_teacher(tmp_path_factory.mktemp("model") / "model.pt", size=64)


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_squares_voc(tmp_path_factory.mktemp("voc") / "voc", {"test": 3}, size=64)


def _assert_same(got, expected_boxes, expected_scores, expected_labels, atol=1e-4) -> None:
    assert len(got) == len(expected_boxes) > 0
    np.testing.assert_allclose(got.boxes, expected_boxes, atol=atol)
    np.testing.assert_allclose(got.scores, expected_scores, atol=1e-5)
    np.testing.assert_array_equal(got.labels, expected_labels)


def _results_by_image(results: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    by: dict[int, list[dict]] = {}
    for r in results:
        by.setdefault(r["image_id"], []).append(r)
    out = {}
    for i, rs in by.items():
        x, y, w, h = np.array([r["bbox"] for r in rs], np.float64).T
        out[i] = (np.stack([x, y, x + w, y + h], 1), np.array([r["score"] for r in rs]),
                  np.array([r["category_id"] for r in rs]))
    return out


# --- the Predictor gives evaluate's boxes -------------------------------------------------------------------
def test_predictor_boxes_match_evaluate_in_original_pixels(model_path, tmp_path):
    # Images of several sizes and aspects, so the resize (factors 0.8 to 1) and its inverse are exercised.
    data = load_dataset(write_tiny_voc(tmp_path / "voc", {"all": [f"img{i}" for i in range(6)]}), "all")
    model, meta = load_detector(model_path)
    model.head.score_thresh = 0.2  # as evaluate --score-thresh 0.2 sets it: fewer, better separated detections
    evaluate_model(model, meta, data, metrics=("coco",), device="cpu", batch_size=1,
                   detections_path=tmp_path / "eval.json", progress=False)
    expected = _results_by_image(json.loads((tmp_path / "eval.json").read_text()))

    predictor = Predictor.from_checkpoint(model_path, device="cpu", score_thresh=0.2)
    for image_id, record in enumerate(data.records, start=1):  # VOC ids are names: the file numbers images 1..N
        det = predictor(record.path)
        assert (det.width, det.height) == (record.width, record.height)
        _assert_same(det, *expected[image_id])
        assert det.names == tuple(CLASSES[k - 1] for k in det.labels)
        assert det.boxes.dtype == np.float32 and det.labels.dtype == np.int64
        assert (det.boxes[:, 2] <= record.width).all() and (det.boxes[:, 3] <= record.height).all()


def test_pil_tensor_array_and_path_inputs_agree_and_batches_match_single_images(model_path, voc):
    predictor = Predictor.from_checkpoint(model_path, device="cpu", score_thresh=0.2)
    paths = sorted((voc / "JPEGImages").glob("*.png"))
    one = predictor(paths[0])
    pil = Image.open(paths[0])
    tensor = torch.from_numpy(image_rgb(paths[0])).permute(2, 0, 1).float() / 255
    for image in (pil, image_rgb(paths[0]), tensor, str(paths[0])):
        _assert_same(predictor(image), one.boxes, one.scores, one.labels, atol=1e-6)
    streamed = list(predictor.stream(iter(paths), batch_size=2))  # same-size images: padding does not differ
    assert len(streamed) == len(paths)
    for path, det in zip(paths, streamed):
        single = predictor(path)
        _assert_same(det, single.boxes, single.scores, single.labels)
    assert (one.scores > 0.2).all()


def test_bad_inputs_name_what_was_expected(model_path):
    predictor = Predictor.from_checkpoint(model_path, device="cpu")
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\], got \[0, 255\]"):
        predictor(torch.full((3, 8, 8), 255.0).index_fill_(1, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match=r"must be float\[3,H,W\] RGB in \[0,1\], got torch.float32\[8, 8, 3\]"):
        predictor(torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match="image must be a file path, a PIL image"):
        predictor(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="score_thresh must be in"):
        Predictor.from_checkpoint(model_path, score_thresh=1.5)


# --- the command ----------------------------------------------------------------------------------------------
def _photo_folder(root: Path, voc: Path) -> Path:
    """Two PNGs at the top, a JPEG in a subfolder, a corrupt .jpg, a hidden file and a text file."""
    (root / "sub").mkdir(parents=True)
    pngs = sorted((voc / "JPEGImages").glob("*.png"))
    for p in pngs[:2]:
        (root / p.name).write_bytes(p.read_bytes())
    Image.open(pngs[2]).save(root / "sub" / "c.jpg", quality=95)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / ".hidden.png").write_bytes(pngs[0].read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_predict_writes_coco_results_and_drawings_and_skips_a_bad_file(model_path, voc, tmp_path):
    photos = _photo_folder(tmp_path / "photos", voc)
    out = tmp_path / "pred"
    r = CliRunner().invoke(main, ["predict", "--model", str(model_path), str(photos), "--out", str(out), "--draw",
                                  "--device", "cpu", "--score-thresh", "0.2"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "cannot decode image" in warnings[0]
    assert "3 images (1 skipped)" in r.output and "ms per image" in r.output

    info = json.loads((out / "images.json").read_text())
    # Sorted by relative path; the bad file keeps its number (1), hidden and non-image files are not read.
    assert [(im["id"], im["file_name"]) for im in info["images"]] == [
        (2, "sub/c.jpg"), (3, "test-0000.png"), (4, "test-0001.png")]
    assert info["categories"] == [{"id": 1, "name": "blue"}, {"id": 2, "name": "red"}]
    assert [s["file_name"] for s in info["skipped"]] == ["broken.jpg"]
    results = json.loads((out / "detections.json").read_text())
    assert results and set(results[0]) == {"image_id", "file_name", "category_id", "bbox", "score"}
    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "detections.json"))
    assert set(dt.getImgIds()) == {2, 3, 4} and len(dt.getAnnIds()) == len(results)

    drawn = sorted(p.relative_to(out / "drawn").as_posix() for p in (out / "drawn").rglob("*.*"))
    assert drawn == ["sub/c.jpg", "test-0000.png", "test-0001.png"]
    with Image.open(out / "drawn" / "test-0000.png") as im:
        assert im.size == (64, 64) and im.format == "PNG"
    assert Image.open(out / "drawn" / "sub" / "c.jpg").format == "JPEG"

    args = ["predict", "--model", str(model_path), str(photos), str(photos / "sub" / "c.jpg"), "--out", str(photos),
            "--device", "cpu", "--score-thresh", "0.2", "--draw"]
    for _ in range(2):  # the second time, photos/drawn/ holds drawings, which are not inputs
        again = CliRunner().invoke(main, args)
        assert again.exit_code == 0, again.output  # the same file twice counts once; --out may be the folder
        assert json.loads((photos / "detections.json").read_text()) == results


def test_cli_predict_refuses_a_folder_without_images_and_an_onnx_file_under_torch(model_path, tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["predict", "--model", str(model_path), str(tmp_path / "empty"),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no images found in" in r.output
    (tmp_path / "m.onnx").write_bytes(b"")
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "m.onnx"), str(tmp_path / "empty"),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "an .onnx model runs with --backend onnxruntime" in r.output


def test_find_images_names_are_relative_to_the_common_folder(tmp_path):
    for name in ("a/x.png", "a/deep/y.jpg", "b/z.PNG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path / "b", tmp_path / "a"])
    assert [n for _, n in found] == ["b/z.PNG", "a/deep/y.jpg", "a/x.png"]
    assert [n for _, n in find_images([tmp_path / "a" / "x.png"])] == ["x.png"]


# --- evaluate --detections ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_evaluate_detections_carry_the_ground_truths_image_ids(tmp_path, fmt):
    """An oracle's detections (each image's own ground truth) score AP 1 against a ground truth built as the coco
    metric builds it only if every detection carries its own image's id."""
    data = load_dataset(write_tiny_voc(tmp_path / "voc", {"all": [f"img{i}" for i in range(6)]}), "all")
    if fmt == "coco":  # integer image ids, not in file order: the file keeps them
        from dataclasses import replace

        records = tuple(replace(r, image_id=str(100 - 7 * k)) for k, r in enumerate(data.records))
        data = type(data)(data.name, data.split, data.classes, records, data.root)
    path = tmp_path / "dets.json"
    report = evaluate_model(Oracle(data), meta_for(data), data, metrics=("coco",), device="cpu", batch_size=4,
                            detections_path=path, progress=False)
    results = json.loads(path.read_text())
    gt = COCOEvaluator(classes=data.classes)
    for r in data.records:
        gt.process(r, {"boxes": r.boxes, "scores": np.ones(len(r.boxes), np.float32), "labels": r.labels})
    ev = COCOeval(gt.ground_truth(), gt.ground_truth().loadRes(results), iouType="bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(report["coco"]["AP"]) == pytest.approx(1.0)
    ids = sorted({r["image_id"] for r in results})
    assert ids == (list(range(1, 7)) if fmt == "voc" else sorted(100 - 7 * k for k in range(6)))
    assert {r["file_name"] for r in results} == {f"JPEGImages/img{i}.png" for i in range(6)}


def test_cli_evaluate_detections_equal_predict_on_the_same_images(model_path, voc, tmp_path):
    dets = tmp_path / "eval" / "dets.json"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model_path), "--data", str(voc), "--split", "test",
                                  "--metrics", "coco", "--no-profile", "--batch-size", "1", "--device", "cpu",
                                  "--detections", str(dets), "--out", str(tmp_path / "report.json")])
    assert r.exit_code == 0, r.output
    evaluated = json.loads(dets.read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    data = load_dataset(voc, "test", classes=CLASSES)
    gt = COCOEvaluator(classes=CLASSES)
    for rec in data.records:
        gt.process(rec, {"boxes": rec.boxes, "scores": np.ones(len(rec.boxes), np.float32), "labels": rec.labels})
    ev = COCOeval(gt.ground_truth(), gt.ground_truth().loadRes(evaluated), iouType="bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(report["coco"]["AP"], nan_ok=True)

    # The split lists JPEGImages/ in name order, so predict numbers the same images the same way.
    r = CliRunner().invoke(main, ["predict", "--model", str(model_path), str(voc / "JPEGImages"),
                                  "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    predicted = _results_by_image(json.loads((tmp_path / "pred" / "detections.json").read_text()))
    expected = _results_by_image(evaluated)
    assert predicted.keys() == expected.keys() == {1, 2, 3}
    for i, (boxes, scores, labels) in expected.items():
        np.testing.assert_allclose(predicted[i][0], boxes, atol=1e-4)
        np.testing.assert_allclose(predicted[i][1], scores, atol=1e-5)
        np.testing.assert_array_equal(predicted[i][2], labels)


# --- the ONNX backend -----------------------------------------------------------------------------------------
def test_onnxruntime_backend_agrees_with_torch(model_path, voc, tmp_path):
    pytest.importorskip("onnxruntime")
    paths = sorted((voc / "JPEGImages").glob("*.png"))
    torch_p = Predictor.from_checkpoint(model_path, device="cpu", score_thresh=0.2)
    onnx_p = Predictor.from_checkpoint(model_path, backend="onnxruntime", score_thresh=0.2)
    assert onnx_p.device == "cpu (onnxruntime)" and onnx_p.classes == CLASSES
    for path in paths:
        # 64x64 images are their own padded input: the graph's valid area is the image's, as in predict.
        t, o = torch_p(path), onnx_p(path)
        _assert_same(o, t.boxes, t.scores, t.labels, atol=1e-3)
