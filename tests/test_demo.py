"""`mimic demo --quick`: every stage of the real pipeline on tiny budgets, then resuming does no work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mimicdet.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--extras", "--control-teacher", "--strategies", "none,roi,map,scale,assistant", "--out", str(out),
            "--workers", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    env = report["environment"]
    assert env["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    # What else decides the numbers: the CPU model, its kernels and the thread count
    assert env["torch_cpu_capability"] == __import__("torch").backends.cpu.get_cpu_capability()
    assert int(env["torch_threads"]) == __import__("torch").get_num_threads() and env["cpu"]
    rows = {(row["strategy"], row["stage"]) for row in report["rows"]}
    assert rows == {("teacher", 2), ("none", 1), ("scratch", 2), ("roi", 1), ("roi + two-stage", 2),
                    ("map", 1), ("map + two-stage", 2), ("scale", 1), ("scale + two-stage", 2),
                    ("roi, 2 teachers", 1), ("roi, int8 store", 1), ("control teacher", 2),
                    ("roi (control teacher)", 1), ("roi + two-stage (control teacher)", 2),
                    ("assistant teacher", 2), ("assistant", 1), ("assistant + two-stage", 2)}
    assert_control_teacher(out, report)
    assert "teacher's mimic vs control's" in r.output
    # Scale mimic: the student sees the half-size image; every mimic row is paired with scratch (McNemar).
    assert all(row["input_scale"] == 0.5 for row in report["rows"] if row["strategy"].startswith("scale"))
    assert all("vs_scratch" in row for row in report["rows"] if row["strategy"] in ("roi", "map", "scale", "assistant"))
    # The teacher assistant is the narrower teacher the extras train; its students mimic its stores, not the teacher's.
    teachers = {row["strategy"]: row for row in report["rows"] if row["stage"] == 2}
    assistant = teachers["assistant teacher"]
    assert assistant["width"] == 0.125 and assistant["params"] < teachers["teacher"]["params"]
    run = next((out / "students").glob("*-roi-teacher2-stage1"))
    assistant_run = json.loads((run / "student_config.json").read_text())
    assert assistant_run["store"].endswith("train-teacher2") and assistant_run["unlabeled"].endswith("pool-teacher2")
    # Every two-stage row carries the paired image bootstrap of its mAP against the scratch detector.
    for row in report["rows"]:
        if row["stage"] == 2 and row["strategy"].endswith("two-stage"):
            vm = row["vs_scratch_map"]
            assert vm["ci_low"] <= vm["mean_diff"] <= vm["ci_high"] and 0 < vm["p_value"] <= 1
            assert vm["mean_diff"] == pytest.approx(row_map_diff(report, row["strategy"]))
    by_strategy = {row["strategy"]: row for row in report["rows"] if row["stage"] == 1}
    # The storage ablation: the int8 store of the same teacher is smaller than the float16 one.
    assert 0 < by_strategy["roi, int8 store"]["store_mb"] < by_strategy["roi"]["store_mb"]
    assert by_strategy["roi, 2 teachers"]["store_mb"] > by_strategy["roi"]["store_mb"]
    assert "vs_scratch" in by_strategy["roi, 2 teachers"] and "store MB" in r.output
    for row in report["rows"]:
        assert 0.0 <= row["recall@300_iou0.5"] <= 1.0 and row["params"] > 0 and row["ms_per_image"] > 0
    assert "| teacher |" in r.output and "McNemar" in r.output and "bootstrap p" in r.output
    assert "| limited+pool | 0 | 1/8 | 1 |" in r.output  # widths print as fractions (folders say 1-8)
    for plot in ("recall_iou.png", "recall_vs_iterations.png", "speed_accuracy.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    # Run again: every stage is found done, nothing is retrained, and the report keeps the first run's timings.
    timings = report["timings_s"]
    assert timings["teacher"] > 0 and any(k.startswith("student ") for k in timings)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["timings_s"] == timings
    demo_lines = [line for line in r.output.splitlines() if line.startswith("[demo]")]
    assert len(demo_lines) >= 10 and all("done earlier" in line for line in demo_lines), demo_lines
    # Another budget against this folder is refused before anything runs: its finished stages would be skipped as
    # done and reported under the new budget.
    budget_file = (out / "budget.json").read_text()
    r = CliRunner().invoke(main, [*args, "--teacher-iters", "21"])
    assert r.exit_code == 1 and "teacher_iters: 20 -> 21" in r.output and str(out) in r.output, r.output
    assert "[demo]" not in r.output and (out / "budget.json").read_text() == budget_file


def assert_control_teacher(out, report: dict) -> None:
    """The quick budget gives students 16 of the 24 labelled images, so the control teacher is seed 0's: it trained
    on exactly those 16, and its students' rows carry the paired comparison with the real teacher's students."""
    from mimicdet.data import load_dataset

    recorded = json.loads((out / "teacher-control-s0" / "run.json").read_text())["dataset"]
    labelled = load_dataset(out / "data", "train").seeded_subset(16, 0)
    assert recorded["num_images"] == 16 and recorded["digest"] == labelled.digest()
    rows = {row["strategy"]: row for row in report["rows"]}
    assert [row["strategy"] for row in report["rows"][:3]] == ["teacher", "assistant teacher", "control teacher"]
    two_stage = rows["roi + two-stage (control teacher)"]
    assert "vs_scratch" in rows["roi (control teacher)"] and "vs_scratch_map" in two_stage
    # b: test boxes (IoU 0.7, top 300) only the real teacher's student recalls; c: only the control teacher's.
    for stage, twin, control in ((1, "roi", "roi (control teacher)"),
                                 (2, "roi + two-stage", "roi + two-stage (control teacher)")):
        hits = {name: np.array(json.loads((out / "eval" / f"{rows[name]['eval_name']}.json").read_text())
                               ["recall"]["hits"]["top300_iou0.7"], bool) for name in (twin, control)}
        transfer = rows[control]["transfer"]
        assert (transfer["b"], transfer["c"]) == (int((hits[twin] & ~hits[control]).sum()),
                                                  int((hits[control] & ~hits[twin]).sum()))
    assert two_stage["transfer_map"]["mean_diff"] == pytest.approx(rows["roi + two-stage"]["mAP"] - two_stage["mAP"])


def row_map_diff(report: dict, strategy: str) -> float:
    rows = report["rows"]
    mimic = next(r["mAP"] for r in rows if r["strategy"] == strategy)
    return mimic - next(r["mAP"] for r in rows if r["strategy"] == "scratch" and r["stage"] == 2)


@pytest.mark.parametrize("option, value", [("--settings", "limited,everything"), ("--strategies", "roi,fancy"),
                                           ("--widths", "1/4,2")])
def test_demo_rejects_unknown_plan_names(tmp_path, option, value):
    r = CliRunner().invoke(main, ["demo", "--quick", option, value, "--out", str(tmp_path / "demo")])
    assert r.exit_code == 2 and option in r.output, r.output
    assert not (tmp_path / "demo").exists()


def test_demo_pool_is_refused_with_a_user_dataset(tmp_path):
    data = tmp_path / "voc"
    data.mkdir()
    r = CliRunner().invoke(main, ["demo", "--data", str(data), "--pool", "500", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 2 and "--pool" in r.output, r.output
    assert not (tmp_path / "demo").exists()


def test_demo_control_teacher_is_refused_without_a_limited_setting(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--quick", "--control-teacher", "--settings", "same-data",
                                  "--out", str(tmp_path / "demo")])
    assert r.exit_code == 2 and "--control-teacher" in r.output and "same-data" in r.output, r.output
    assert not (tmp_path / "demo").exists()
