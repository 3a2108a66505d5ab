"""`mimic train-teacher` and `mimic evaluate` end to end on a tiny hand-written VOC folder (and on raccoon)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mimicdet.cli import main
from mimicdet.detection.detector import load_detector
from mimicdet.detection.trainer import Hook, load_checkpoint
from mimicdet.pipeline.teacher import TeacherConfig, train_teacher

from tests.voc_fixtures import RACCOON

# (width, height) of each image and its squares: (class, x1, y1, side) in 0-based pixels.
TINY_IMAGES = {
    "img0": ((96, 64), [("red", 10, 12, 30), ("blue", 55, 20, 24)]),
    "img1": ((80, 112), [("blue", 20, 50, 40)]),
    "img2": ((128, 96), [("red", 70, 10, 36), ("red", 8, 50, 20)]),
    "img3": ((64, 64), [("blue", 16, 16, 32)]),
    "img4": ((112, 80), [("red", 40, 20, 44)]),
    "img5": ((96, 96), [("blue", 5, 60, 28), ("red", 50, 8, 30)]),
}
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


def write_tiny_voc(root: Path, splits: dict[str, list[str]] | None = None) -> Path:
    """PNG images with coloured squares on grey noise, VOC XML annotations and split files."""
    splits = splits or {"train": ["img0", "img1", "img2", "img3"], "test": ["img4", "img5"]}
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, ((w, h), squares) in TINY_IMAGES.items():
        pixels = rng.integers(90, 150, (h, w, 3), dtype=np.uint8)
        objects = []
        for name, x1, y1, side in squares:
            pixels[y1 : y1 + side, x1 : x1 + side] = COLOURS[name]
            # VOC: 1-based inclusive pixel indices.
            objects.append(
                f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                f"<ymin>{y1 + 1}</ymin><xmax>{x1 + side}</xmax><ymax>{y1 + side}</ymax></bndbox></object>"
            )
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{''.join(objects)}</annotation>"
        )
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    return write_tiny_voc(tmp_path / "voc")


TINY_TRAIN = ["--width", "0.125", "--batch-size", "2", "--min-size", "64", "--max-size", "128",
              "--workers", "0", "--device", "cpu", "--seed", "3"]


def test_train_teacher_then_evaluate(tiny_voc, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-teacher", "--data", str(tiny_voc), "--out", str(run), "--iters", "3",
                                  "--checkpoint-every", "2", "--eval-every", "3", "--flip", *TINY_TRAIN])
    assert r.exit_code == 0, r.output
    assert "s/iter" in r.output
    assert {p.name for p in run.iterdir()} >= {"model.pt", "checkpoint.pt", "run.json", "metrics.jsonl", "eval.jsonl"}
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 3

    model, meta = load_detector(run / "model.pt")
    assert meta["role"] == "teacher" and meta["classes"] == ["blue", "red"] and meta["iterations"] == 3
    assert meta["preprocess"]["min_size"] == 64 and meta["input_scale"] == 1.0
    assert meta["dataset"]["name"] == "voc" and len(meta["dataset"]["digest"]) == 64
    assert model.config.width == 0.125 and model.config.num_classes == 3

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 3
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "lr", "s_per_iter"} <= set(rows[-1])
    evals = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [3]
    assert 0 <= evals[0]["recall@300_iou0.5"] <= 1 and 0 <= evals[0]["mAP@0.5_area"] <= 1

    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(run / "model.pt"), "--data", str(tiny_voc),
                                  "--metrics", "voc,coco,recall,caltech", "--out", str(report_path),
                                  "--plots", str(plots), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "mAP@0.5" in r.output and "COCO AP" in r.output and "GFLOPs" in r.output
    report = json.loads(report_path.read_text())
    s = report["summary"]
    for key in ("recall@100_iou0.5", "recall@300_iou0.7", "AR@300", "mAP@0.5_11pt", "mAP@0.5_area"):
        assert 0.0 <= s[key] <= 1.0, key
    for key in ("coco_AP", "coco_AP50", "coco_AP75", "LAMR"):
        assert s[key] is None or 0.0 <= s[key] <= 1.0, key
    assert s["params_total"] == sum(s[f"params_{k}"] for k in ("backbone", "rpn", "head")) > 0
    assert s["gflops"] > 0 and s["ms_per_image"] > 0
    # Inputs: img4 112x80 -> 90x64 padded to 96x64; img5 96x96 -> 64x64; the lower median by area is img5.
    assert report["profile"]["input_size"] == [64, 64]
    assert report["dataset"]["num_images"] == 2 and report["recall"]["num_gt"] == 3
    assert sorted(p.name for p in plots.iterdir()) == ["mr_fppi.png", "pr_curves.png", "recall_iou.png"]
    assert (plots / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"

    # --score-thresh reaches the head: the untrained head's class scores sit near 1/3, so 0.999 keeps no detection.
    strict_path = tmp_path / "strict.json"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(run / "model.pt"), "--data", str(tiny_voc),
                                  "--metrics", "voc", "--no-profile", "--score-thresh", "0.999",
                                  "--out", str(strict_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    strict = json.loads(strict_path.read_text())
    assert strict["model"]["score_thresh"] == 0.999 and strict["summary"]["mAP@0.5_area"] == 0.0
    images = torch.rand(1, 3, 64, 64)
    for thresh, has_detections in ((0.999, False), (0.0, True)):
        model.head.score_thresh = thresh
        assert (len(model.predict(images, [(64, 64)])[0]["boxes"]) > 0) is has_detections
    r = CliRunner().invoke(main, ["evaluate", "--model", str(run / "model.pt"), "--data", str(tiny_voc),
                                  "--score-thresh", "1.5"])
    assert r.exit_code == 2 and "--score-thresh" in r.output


def test_rerun_resumes_changed_config_is_refused_overwrite_restarts(tiny_voc, tmp_path):
    run = tmp_path / "run"
    args = ["train-teacher", "--data", str(tiny_voc), "--out", str(run), "--iters", "2", *TINY_TRAIN]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = torch.load(run / "model.pt", weights_only=True)["model"]

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "already trained (2 iterations)" in r.output

    r = CliRunner().invoke(main, [*args, "--lr", "0.005", "--head", "rfcn"])
    assert r.exit_code == 1
    assert "other settings" in r.output and "train.optim.lr: 0.02 -> 0.005" in r.output
    assert "detector.head: 'fast-rcnn' -> 'rfcn'" in r.output and "--overwrite" in r.output
    assert "Traceback" not in r.output

    r = CliRunner().invoke(main, [*args, "--lr", "0.005", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "trained iterations 0..2" in r.output
    second = torch.load(run / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)


class CrashAt(Hook):
    def __init__(self, at: int):
        self.at = at

    def after_step(self, trainer):
        if trainer.iter == self.at:
            raise KeyboardInterrupt


def test_interrupted_teacher_resumes_to_the_same_weights(tiny_voc, tmp_path):
    def cfg(out):
        return TeacherConfig(data=tiny_voc, out=out, width=0.125, iters=4, batch_size=2, min_size=64, max_size=96,
                             flip=True, checkpoint_every=2, workers=0, device="cpu", seed=1, progress=False)

    whole = train_teacher(cfg(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg(tmp_path / "b"), hooks=[CrashAt(3)])
    assert not (tmp_path / "b" / "model.pt").exists()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["iteration"] == 2
    resumed = train_teacher(cfg(tmp_path / "b"))
    assert resumed["start_iteration"] == 2 and resumed["steps"] == 2
    assert resumed["losses"] == whole["losses"]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_options_give_one_line_errors(tiny_voc, tmp_path):
    base = ["train-teacher", "--data", str(tiny_voc), "--out", str(tmp_path / "run"), "--iters", "1", *TINY_TRAIN]
    r = CliRunner().invoke(main, [*base, "--anchor-sizes", "16,big"])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    r = CliRunner().invoke(main, [*base, "--eval-every", "1", "--eval-split", "val"])
    assert r.exit_code == 1 and "val.txt" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*base, "--split", "nope"])
    assert r.exit_code == 1 and "nope.txt" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_voc / "ImageSets" / "Main" / "test.txt"),
                                  "--data", str(tiny_voc), "--device", "cpu"])
    assert r.exit_code == 1 and "not a readable detector checkpoint" in r.output


def test_subset_trains_on_the_images_a_student_subset_draws(tiny_voc, tmp_path):
    """A control teacher (--subset N --subset-seed S) learns from exactly the N images train-student's --subset
    gives a student of seed S, and no others."""
    from mimicdet.data import load_dataset

    train = load_dataset(tiny_voc, "train")
    picks = {seed: train.seeded_subset(2, seed) for seed in range(6)}
    seed = next(s for s in picks if [r.image_id for r in picks[s].records] != [r.image_id for r in picks[0].records])
    for s in (0, seed):
        run = tmp_path / f"run{s}"
        r = CliRunner().invoke(main, ["train-teacher", "--data", str(tiny_voc), "--out", str(run), "--iters", "1",
                                      "--subset", "2", "--subset-seed", str(s), *TINY_TRAIN])
        assert r.exit_code == 0, r.output
        recorded = json.loads((run / "run.json").read_text())["dataset"]
        assert recorded["num_images"] == 2 and recorded["digest"] == picks[s].digest() != train.digest()
        assert load_detector(run / "model.pt")[1]["dataset"]["digest"] == picks[s].digest()
    r = CliRunner().invoke(main, ["train-teacher", "--data", str(tiny_voc), "--out", str(tmp_path / "big"),
                                  "--iters", "1", "--subset", "5", *TINY_TRAIN])
    assert r.exit_code == 1 and "--subset must be in [1, 4]" in r.output and "voc/train" in r.output, r.output
    assert not (tmp_path / "big" / "model.pt").exists()


@pytest.mark.slow
def test_raccoon_real_jpegs_train_and_evaluate(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-teacher", "--data", str(RACCOON), "--out", str(run), "--iters", "4",
                                  "--width", "0.125", "--batch-size", "4", "--min-size", "128", "--max-size", "224",
                                  "--workers", "0", "--device", "cpu", "--flip"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", "--model", str(run / "model.pt"), "--data", str(RACCOON),
                                  "--max-images", "12", "--out", str(tmp_path / "r.json"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dataset"]["num_images"] == 12 and report["dataset"]["classes"] == ["raccoon"]
    assert 0 <= report["summary"]["AR@300"] <= 1 and 0 <= report["summary"]["mAP@0.5_area"] <= 1
    # Raccoon images come in many sizes; the typical input keeps the shorter side at 128 (padded to 32).
    assert min(report["profile"]["input_size"]) == 128
