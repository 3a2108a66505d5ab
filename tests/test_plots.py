"""Each plot writes a readable, non-blank PNG from the evaluators' real outputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from data.records import ImageRecord
from detection.metrics.caltech import CaltechEvaluator
from detection.metrics.plots import plot_lines, plot_mr_fppi, plot_pr_curves, plot_recall_iou, plot_speed_accuracy
from detection.metrics.recall import ProposalRecallEvaluator
from detection.metrics.voc import VOCEvaluator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn
    assert not list(path.parent.glob("*.tmp"))  # written atomically, no temp file left


def record(boxes) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32)
    return ImageRecord(image_id="a", path=Path("a.jpg"), width=200, height=200, boxes=boxes,
                       labels=np.ones(len(boxes), np.int64), ignore=np.zeros(len(boxes), bool))


BOXES = [[10, 10, 51, 110], [100, 10, 141, 110]]
DETS = {"boxes": np.array([[10, 10, 51, 110], [60, 60, 101, 160], [100, 12, 141, 112]], np.float32),
        "scores": np.array([0.9, 0.8, 0.7], np.float32), "labels": np.ones(3, np.int64)}


def test_pr_mr_and_recall_plots(tmp_path):
    voc = VOCEvaluator(classes=["person"])
    voc.process(record(BOXES), DETS)
    res = voc.evaluate()
    check_png(plot_pr_curves(res["curves"], tmp_path / "pr" / "pr.png", ap=res["AP_area"]))

    cal = CaltechEvaluator()
    cal.process(record(BOXES), DETS)
    c = cal.evaluate()
    # The first curve point has FPPI 0 and MR .5: the log axes must clip it, not fail.
    check_png(plot_mr_fppi({"student": c["curves"], "teacher": c["curves"]}, tmp_path / "mr.png",
                           lamr={"student": c["LAMR"]}))

    rec = ProposalRecallEvaluator()
    rec.process(record(BOXES), {"boxes": DETS["boxes"], "scores": DETS["scores"]})
    check_png(plot_recall_iou({"teacher": rec.evaluate()["curves"]}, tmp_path / "recall.png"))


def test_lines_and_speed_accuracy(tmp_path):
    x = np.linspace(0, 1, 5)
    check_png(plot_lines({"a": (x, x**2), "b": (x, x)}, tmp_path / "lines.png", xlabel="x", ylabel="y",
                         title="t", markers=True))
    points = [("w=1/2", 12.0, 0.61), ("w=1/4", 6.5, 0.55), ("w=1/8", 3.9, 0.47)]
    check_png(plot_speed_accuracy(points, ("teacher", 30.0, 0.66), tmp_path / "speed.png"))


def test_plot_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plot_lines({"a": ([0, 1], [0, 1])}, tmp_path / "x.jpg", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="shape"):
        plot_lines({"a": ([0, 1], [0, 1, 2])}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="empty"):
        plot_lines({}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="no points"):
        plot_speed_accuracy([], None, tmp_path / "s.png")
    assert not any(tmp_path.iterdir())
