"""Each plot writes a readable, non-blank PNG from the evaluators' real outputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from mimicdet.data.records import ImageRecord
from mimicdet.detection.metrics.caltech import CaltechEvaluator
from mimicdet.detection.metrics.plots import plot_lines, plot_mr_fppi, plot_pr_curves, plot_recall_iou, plot_speed_accuracy
from mimicdet.detection.metrics.recall import ProposalRecallEvaluator
from mimicdet.detection.metrics.voc import VOCEvaluator

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


# --- one unit for AP: stored as fractions, shown in percent -----------------------------------------------------
@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, in order (the PNGs are still written)."""
    from mimicdet.detection.metrics import plots

    saved = []
    real = plots._save

    def spy(fig, path):
        saved.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return saved


def test_ap_is_shown_in_percent_in_plots(tmp_path, figures):
    voc = VOCEvaluator(classes=["person"])
    voc.process(record(BOXES), DETS)
    res = voc.evaluate()
    ap = res["AP_area"]["person"]
    assert 0 < ap < 1  # the evaluator and the JSON report keep fractions
    plot_pr_curves(res["curves"], tmp_path / "pr.png", ap=res["AP_area"])
    (legend,) = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert legend == f"person (AP {100 * ap:.1f}%)"

    points = [("w=1/2", 12.0, 0.61), ("w=1/4", 6.5, 0.55)]
    plot_speed_accuracy(points, ("teacher", 30.0, 0.66), tmp_path / "speed.png")
    ax = figures[-1].axes[0]
    assert ax.get_ylabel() == "mAP (%)"
    drawn = sorted(float(c.get_offsets()[0][1]) for c in ax.collections)
    assert drawn == pytest.approx([55.0, 61.0, 66.0])
    assert ax.lines[0].get_ydata()[0] == pytest.approx(66.0)  # the teacher's guide line
    lo, hi = ax.get_ylim()
    assert 40 < lo < 55 and 66 < hi < 80  # a percent axis, not 0-1

    # A metric named by the caller (student/family.py passes e.g. "mAP@0.5") gets the unit too.
    plot_speed_accuracy(points, None, tmp_path / "family.png", ylabel="recall@0.7 (300 proposals)")
    assert figures[-1].axes[0].get_ylabel() == "recall@0.7 (300 proposals) (%)"


def test_speed_accuracy_refuses_a_percentage(tmp_path):
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\].*got 66.0 for 'teacher'"):
        plot_speed_accuracy([("w=1/2", 12.0, 0.61)], ("teacher", 30.0, 66.0), tmp_path / "s.png")
    assert not any(tmp_path.iterdir())


def test_console_report_shows_ap_in_percent_like_the_plots():
    from mimicdet.detection.evaluate import format_report

    summary = {"mAP@0.5_11pt": 0.5, "mAP@0.5_area": 0.5512, "coco_AP": 0.25, "coco_AP50": 0.5, "coco_AP75": 0.2,
               "coco_APs": 0.1, "coco_APm": 0.3, "coco_APl": float("nan"), "LAMR": 0.42}
    report = {"summary": summary, "model": {"name": "student"}, "input": {"input_scale": 1.0},
              "dataset": {"name": "voc", "split": "test", "num_images": 3}}
    rows = [" ".join(line.split()) for line in format_report(report).splitlines()]
    assert "mAP@0.5 (%, VOC07 11-pt / area) 50.0 / 55.1" in rows
    assert "COCO AP / AP50 / AP75 (%) 25.0 / 50.0 / 20.0" in rows
    assert "COCO APs / APm / APl (%) 10.0 / 30.0 / n/a" in rows
    assert "Caltech log-average miss rate (%) 42.0" in rows
