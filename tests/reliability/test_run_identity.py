"""A student run is its configuration and its inputs' content, not their paths: a moved store resumes, another
store is refused; stage 2 keeps the stage-1 anchors or refuses a conflict; a finished run says so on rerun."""

from __future__ import annotations

import shutil

from mimicdet.detection.detector import load_detector
from tests.reliability.helpers import STUDENT, assert_refused, cli, train_args


def _without(args: list, option: str) -> list:
    i = args.index(option)
    return args[:i] + args[i + 2:]


def test_a_run_resumes_after_its_store_moved(world, store, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(world, store, run)).exit_code == 0
    moved = shutil.move(store, tmp_path / "elsewhere")
    r = cli(*train_args(world, moved, run))
    assert r.exit_code == 0, r.output
    assert "already trained; nothing to resume" in r.output and "nan" not in r.output


def test_a_run_refuses_a_store_with_other_content(world, store, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(world, store, run)).exit_code == 0
    other = shutil.copytree(world / "store", tmp_path / "other")
    r = cli("extract-teacher", "--teacher", world / "teacher.pt", "--data", world / "voc", "--out", other,
            "--shard-size", "4", "--proposals", "12", "--overwrite")
    assert r.exit_code == 0, r.output
    assert_refused(cli(*train_args(world, other, run)), 1, r"holds a run made with other settings \(inputs\.stores: \[.*\] -> \[.*\]\); pass --overwrite")


def test_stage_2_inherits_the_stage_1_anchors(world, store, tmp_path):
    stage1 = tmp_path / "s1"
    assert cli(*train_args(world, store, stage1)).exit_code == 0  # STUDENT trains with anchors 16,32
    assert "--anchor-sizes" in STUDENT
    args = _without(train_args(world, store, tmp_path / "s2", "--stage", "2", "--init", stage1 / "model.pt"),
                    "--anchor-sizes")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    model, _ = load_detector(tmp_path / "s2" / "model.pt")
    assert tuple(model.config.anchor_sizes) == (16, 32)
    assert_refused(cli(*args, "--anchor-sizes", "16,32,64", "--out", tmp_path / "s2b"), 1,
                   r"--anchor-sizes 16,32,64 differs from the --init .*model\.pt RPN's 16,32")
    assert not (tmp_path / "s2b").exists()
