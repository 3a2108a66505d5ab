"""The shipped teacher: installed with its sha256, refused when damaged, used by the demo only for the data and
budget it was made with, and made by commands the CLI accepts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mimicdet.cli import main
from mimicdet.data import load_dataset
from mimicdet.data.errors import DataError
from mimicdet.detection.checkpoints import file_sha256
from mimicdet.pipeline.builtin_teacher import ASSET, RECIPE, BuiltinTeacher, install, shipped_teacher
from mimicdet.pipeline.demo import BUDGETS, Demo, DemoConfig
from tests.pipeline_fixtures import make_tiny_teacher


def _teacher_run(run: Path, digest: str) -> Path:
    run.mkdir(parents=True)
    make_tiny_teacher(run / "model.pt")
    (run / "run.json").write_text(json.dumps({"dataset": {"name": "data", "split": "pool", "digest": digest}}))
    return run


def test_install_records_the_sha256_and_a_damaged_teacher_is_refused(tmp_path):
    asset = tmp_path / "asset"
    assert shipped_teacher(asset) is None  # a checkout without one
    digest = install(_teacher_run(tmp_path / "run", "abc"), asset)
    assert (asset / "model.pt.sha256").read_text().split()[0] == digest == file_sha256(tmp_path / "run" / "model.pt")
    model, run_json = shipped_teacher(asset)
    assert model == asset / "model.pt" and run_json["dataset"]["digest"] == "abc"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"model\.pt: sha256 .* does not match .*model\.pt\.sha256"):
        shipped_teacher(asset)
    (asset / "model.pt.sha256").unlink()
    with pytest.raises(DataError, match="missing beside"):
        shipped_teacher(asset)


def test_the_repository_ships_a_teacher_that_matches_its_recorded_command():
    model, run_json = shipped_teacher(ASSET)
    assert model.stat().st_size <= 20 * 2**20
    train = run_json["train"]
    assert (run_json["dataset"]["split"], run_json["detector"]["width"], train["iters"], train["batch_size"],
            train["optim"]["lr"], train["seed"]) == (RECIPE.split, RECIPE.width, RECIPE.iters, RECIPE.batch_size,
                                                     RECIPE.lr, RECIPE.seed)
    assert tuple(run_json["detector"]["anchor_sizes"]) == RECIPE.anchor_sizes
    assert (run_json["preprocess"]["min_size"], run_json["preprocess"]["max_size"]) == (RECIPE.min_size,
                                                                                       RECIPE.max_size)
    # the demo's default budget is the recipe's, so `make demo` uses this teacher
    b = BUDGETS["default"]
    assert (b.teacher_width, b.teacher_iters, b.teacher_lr, b.pool, b.min_object) == (
        RECIPE.width, RECIPE.iters, RECIPE.lr, RECIPE.pool, RECIPE.min_object)


def test_the_recorded_commands_parse(tmp_path):
    (tmp_path / "data").mkdir()  # train-teacher's --data must exist when parsed; make-data writes it
    for cmd in RECIPE.commands(tmp_path):
        assert cmd[0] == "mimic"
        name, *args = cmd[1:]
        if name == "make-data":
            group = main.commands[name]
            sub, *args = args
            group.commands[sub].make_context(sub, list(args))
        else:
            main.commands[name].make_context(name, list(args))


@pytest.mark.slow
def test_demo_uses_the_recorded_teacher_only_for_its_data_and_budget(tmp_path):
    b = BUDGETS["quick"]
    demo = Demo(DemoConfig(out=tmp_path / "demo", mode="quick", progress=False), echo=lambda _: None)
    root = demo.data_root()
    digest = load_dataset(root, "pool").digest()
    asset = tmp_path / "asset"
    install(_teacher_run(tmp_path / "run", digest), asset)
    recipe = BuiltinTeacher(size=b.size, train=b.train, test=b.test, pool=b.pool, val=b.val, min_object=b.min_object,
                            width=b.teacher_width, iters=b.teacher_iters, batch_size=b.batch_size, lr=b.teacher_lr,
                            min_size=b.min_size, max_size=b.max_size, anchor_sizes=b.anchor_sizes)
    run = tmp_path / "demo" / "teacher"
    assert demo._shipped_teacher(root, "pool", run, recipe, asset)
    assert (run / "model.pt").read_bytes() == (asset / "model.pt").read_bytes()
    assert json.loads((run / "run.json").read_text())["dataset"]["digest"] == digest
    # another budget, another split or a user's dataset: the teacher is trained, not taken
    assert not demo._shipped_teacher(root, "pool", tmp_path / "t2", replace(recipe, iters=b.teacher_iters + 1), asset)
    assert not demo._shipped_teacher(root, "train", tmp_path / "t3", recipe, asset)
    # the same budget over other images (the generator changed): refused, naming what to do
    install(_teacher_run(tmp_path / "run-other", "0" * 64), asset)
    with pytest.raises(ValueError, match="make teacher"):
        demo._shipped_teacher(root, "pool", tmp_path / "t4", recipe, asset)


def test_a_users_dataset_keeps_a_teacher_trained_in_the_run_and_a_short_student_budget():
    from mimicdet.pipeline.demo import budget_for

    user = budget_for("default", real_data=True)
    assert (user.teacher_width, user.teacher_iters, user.student_iters, user.stage2_iters) == (1.0, 400, 250, 125)
    assert user.strategies == ("none", "roi", "roi-norm") and user.anchor_sizes == (32, 64, 128, 256)
    assert user.labelled == 40
    builtin = budget_for("default", real_data=False)
    assert (builtin.teacher_width, builtin.teacher_iters) == (RECIPE.width, RECIPE.iters)
    assert builtin.stage2_iters * 2 == builtin.student_iters
