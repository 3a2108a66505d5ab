"""train-family: widths parsed strictly, the budget pick on hand-made rows, and a tiny real family through the CLI
(train both stages, evaluate, plot, resume without retraining, refuse a changed recipe)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mimicdet.cli import main
from mimicdet.detection.detector import load_detector
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from mimicdet.student.family import FamilyConfig, parse_widths, pick_within_budget, width_label, width_tag
from mimicdet.student.train import DEFAULT_LOGITS_WEIGHT, StudentConfig
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher


def test_parse_widths_accepts_fractions_and_decimals_widest_first():
    assert parse_widths("1/8,1/2, 0.25") == (0.5, 0.25, 0.125)
    assert parse_widths("1") == (1.0,)
    assert [width_tag(w) for w in (0.5, 0.25, 0.125, 1.0, 0.3)] == ["w1-2", "w1-4", "w1-8", "w1", "w3-10"]
    assert width_label(0.125) == "1/8"


@pytest.mark.parametrize("text,says", [
    ("1/4,abc", "'abc' is not a width"), ("", "expected comma-separated"), ("1/0", "'1/0' is not a width"),
    ("0", "in (0, 1]"), ("3/2", "in (0, 1]"), ("1/4,0.25", "given twice"),
])
def test_parse_widths_refuses_bad_values_naming_them(text, says):
    with pytest.raises(ValueError, match="--widths") as e:
        parse_widths(text)
    assert says in str(e.value)


def test_config_refuses_bad_settings(tmp_path):
    base = dict(store="s", data=tmp_path, out=tmp_path / "run")
    with pytest.raises(ValueError, match="--stage"):
        FamilyConfig(**base, stage=3)
    with pytest.raises(ValueError, match="--budget-ms"):
        FamilyConfig(**base, budget_ms=0.0)
    with pytest.raises(ValueError, match="given twice"):
        FamilyConfig(**base, widths=(0.25, 0.25))
    assert FamilyConfig(**base, iters=9).second_iters == 4 and FamilyConfig(**base).metric == "mAP@0.5_11pt"


def test_family_and_student_share_the_default_logits_weight(tmp_path):
    assert FamilyConfig(store="s", data=tmp_path, out=tmp_path / "f").logits_weight == DEFAULT_LOGITS_WEIGHT
    # The student config records the weight it resolves to, so a run folder says what it trained with.
    two_stage = StudentConfig(store="s", data=tmp_path, out=tmp_path / "r", stage=2, mimic="roi")
    assert two_stage.logits_weight == DEFAULT_LOGITS_WEIGHT == two_stage.to_dict()["logits_weight"]
    assert StudentConfig(store="s", data=tmp_path, out=tmp_path / "r", stage=2, mimic="none").logits_weight == 0.0
    assert StudentConfig(store="s", data=tmp_path, out=tmp_path / "r", stage=1).logits_weight == 0.0


def test_budget_pick_takes_the_most_accurate_width_that_fits():
    rows = [
        {"name": "w1-2", "width": 0.5, "ms_per_image": 40.0, "mAP@0.5_11pt": 0.60},
        {"name": "w1-4", "width": 0.25, "ms_per_image": 15.0, "mAP@0.5_11pt": 0.55},
        {"name": "w1-8", "width": 0.125, "ms_per_image": 6.0, "mAP@0.5_11pt": 0.56},
        {"name": "w1-16", "width": 0.0625, "ms_per_image": 4.0, "mAP@0.5_11pt": None},
    ]
    pick = pick_within_budget(rows, 20.0, "mAP@0.5_11pt")
    assert pick["fits"] == ["w1-4", "w1-8", "w1-16"]
    assert pick["best"] == "w1-8" and pick["fastest"] == "w1-16"
    assert pick_within_budget(rows, 100.0, "mAP@0.5_11pt")["best"] == "w1-2"
    none = pick_within_budget(rows, 3.0, "mAP@0.5_11pt")
    assert none["fits"] == [] and none["best"] is None and none["fastest"] is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("family")
    make_squares_voc(root / "voc", {"train": 6, "test": 3})
    make_tiny_teacher(root / "teacher.pt")
    run_extract(ExtractConfig(teacher=root / "teacher.pt", data=root / "voc", out=str(root / "store"), split="train",
                              shard_size=4, proposals=24, loader_workers=0, progress=False))
    return root


def _args(setup, out, *extra):
    return ["train-family", "--store", str(setup / "store"), "--data", str(setup / "voc"), "--out", str(out),
            "--widths", "1/8,1/4", "--iters", "3", "--stage2-iters", "2", "--batch-size", "2",
            "--rois-per-image", "8", "--anchor-sizes", "16,32", "--workers", "0", "--profile-repeats", "3",
            "--device", "cpu", *extra]


@pytest.mark.slow
def test_tiny_family_trains_evaluates_plots_and_resumes(setup):
    out = setup / "run"
    r = CliRunner().invoke(main, _args(setup, out, "--teacher", str(setup / "teacher.pt"), "--budget-ms", "1e6"))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "family.json").read_text())
    rows = report["rows"]
    assert [row["name"] for row in rows] == ["w1-4", "w1-8"]  # widest first
    assert [row["width"] for row in rows] == [0.25, 0.125]
    assert all(row["stage"] == 2 and row["iterations"] == 2 and row["trained"] == "now" for row in rows)
    assert report["metric"] == "mAP@0.5_11pt" and report["speedup_over"] == "teacher"
    # A wider member has more parameters and more FLOPs on the same input.
    assert rows[0]["params"] > rows[1]["params"] > 0 and rows[0]["gflops"] > rows[1]["gflops"] > 0
    teacher = report["teacher"]
    assert teacher["speedup"] == 1.0 and teacher["width"] == 0.125
    for row in rows:
        assert 0.0 <= row["mAP@0.5_11pt"] <= 1.0 and 0.0 <= row["recall@300_iou0.7"] <= 1.0
        assert row["speedup"] == pytest.approx(teacher["ms_per_image"] / row["ms_per_image"])
        assert row["input_size"] == [64, 64]
        model, meta = load_detector(row["model"])
        assert model.config.head == "fast-rcnn" and model.config.width == row["width"] and meta["stage"] == 2
    assert report["budget"]["fits"] == ["w1-4", "w1-8"]
    assert (out / "speed_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| teacher |" in r.output and "| w1-4 | 1/4 | 2 |" in r.output and "speed-up vs teacher" in r.output
    assert "fastest width within 1e+06 ms:" in r.output and "most accurate width within 1e+06 ms:" in r.output

    # Rerun: every stage of every width is found done; nothing is retrained.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("w*/stage*/model.pt")}
    assert len(stamps) == 4
    r = CliRunner().invoke(main, _args(setup, out, "--budget-ms", "1e-6"))
    assert r.exit_code == 0, r.output
    family_lines = [ln for ln in r.output.splitlines() if ln.startswith("[family] w1-")]
    assert len(family_lines) == 4 and all("done earlier" in ln for ln in family_lines), family_lines
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    report = json.loads((out / "family.json").read_text())
    assert [row["trained"] for row in report["rows"]] == ["earlier", "earlier"]
    assert report["teacher"] is None and report["speedup_over"] == "w1-4" and report["rows"][0]["speedup"] == 1.0
    assert "no width within 1e-06 ms" in r.output

    # Stage 1 only: the stage-1 members are reused, and the curve is judged by recall@0.7.
    r = CliRunner().invoke(main, _args(setup, out, "--stage", "1"))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "family.json").read_text())
    assert report["metric"] == "recall@300_iou0.7"
    assert [(row["stage"], row["iterations"]) for row in report["rows"]] == [(1, 3), (1, 3)]

    # Another recipe in the same folder is refused, naming the setting.
    r = CliRunner().invoke(main, _args(setup, out, "--lr", "0.5"))
    assert r.exit_code == 1 and "other settings (lr" in r.output, r.output


def test_bad_widths_on_the_command_line_is_a_clear_usage_error(setup):
    r = CliRunner().invoke(main, [*_args(setup, setup / "bad"), "--widths", "1/4,quarter"])
    assert r.exit_code == 2
    assert "Invalid value for '--widths'" in r.output and "'quarter' is not a width" in r.output
    assert not (setup / "bad").exists()
