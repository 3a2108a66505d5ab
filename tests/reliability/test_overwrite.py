"""--overwrite replaces what a command made and nothing else: never an input, never a file the command did not
write. Each case runs the real CLI and compares every file under the folder before and after."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.reliability.helpers import assert_refused, cli, train_args, tree


def _teacher_run_folder(world: Path, at: Path) -> Path:
    """What `mimic train-teacher --out at` leaves: model.pt, checkpoint.pt, run.json."""
    at.mkdir()
    shutil.copy(world / "teacher.pt", at / "model.pt")
    shutil.copy(world / "teacher.pt", at / "checkpoint.pt")
    (at / "run.json").write_text("{}\n")
    return at


def _extract(world: Path, teacher: Path, out: Path, *extra, data: Path | None = None) -> list:
    return ["extract-teacher", "--teacher", teacher, "--data", data or world / "voc", "--out", out, "--shard-size",
            "4", "--proposals", "24", *extra]


@pytest.mark.parametrize("mode", [(), ("--overwrite",), ("--resume",)])
def test_extract_into_the_teachers_own_folder_is_refused_and_keeps_it(world, tmp_path, mode):
    occ = _teacher_run_folder(world, tmp_path / "occ")
    before = tree(occ)
    assert_refused(cli(*_extract(world, occ / "model.pt", occ, *mode)), 1,
                   r"--out .*occ contains the --teacher .*model\.pt", "choose another --out")
    assert tree(occ) == before


def test_extract_over_the_dataset_folder_is_refused(world, tmp_path):
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))
    before = tree(data)
    for out, relation in ((data, "is"), (tmp_path, "contains")):
        assert_refused(cli(*_extract(world, world / "teacher.pt", out, "--overwrite", data=data)), 1,
                       rf"--out .* {relation} the --data")
    assert tree(data) == before


def test_overwrite_refuses_a_folder_that_is_not_a_store(world, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n")
    assert_refused(cli(*_extract(world, world / "teacher.pt", out, "--overwrite")), 1,
                   r"not a feature store \(no manifest\.json; holds results\.csv\)", "nothing was removed")
    assert tree(out) == {"results.csv": tree(out)["results.csv"]}


def test_overwrite_refuses_a_store_with_other_files_beside_it(world, store, tmp_path):
    (store / "model.pt").write_bytes(b"weights")
    before = tree(store)
    assert_refused(cli(*_extract(world, world / "teacher.pt", store, "--overwrite")), 1,
                   r"files that are not part of its feature store \(model\.pt\)", "nothing was removed")
    assert tree(store) == before


def test_overwrite_replaces_a_store(world, store):
    r = cli(*_extract(world, world / "teacher.pt", store, "--overwrite", "--flip"))
    assert r.exit_code == 0, r.output
    assert any(k.startswith("flip/") for k in tree(store))


def test_student_overwrite_removes_the_run_and_keeps_everything_else(world, store, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(world, store, run)).exit_code == 0
    (run / "notes.txt").write_text("mine")
    r = cli(*train_args(world, store, run, "--overwrite", "--seed", "1"))
    assert r.exit_code == 0, r.output
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["store", "data"])
def test_student_out_holding_an_input_is_refused(world, store, tmp_path, where):
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))
    args = train_args(world, store, store if where == "store" else tmp_path, "--overwrite")
    args[args.index("--data") + 1] = data
    before = tree(tmp_path)
    assert_refused(cli(*args), 1, r"--out .* (is|contains) the --(store|data)")
    assert tree(tmp_path) == before


def test_export_over_its_own_checkpoint_is_refused(world, tmp_path):
    ckpt = Path(shutil.copy(world / "teacher.pt", tmp_path / "teacher.pt"))
    before = tree(tmp_path)
    assert_refused(cli("export", ckpt, "--format", "torchscript", "--out", ckpt, "--overwrite"), 1,
                   r"--out .*teacher\.pt is the CHECKPOINT")
    assert tree(tmp_path) == before


def test_train_teacher_out_holding_its_data_is_refused(world, tmp_path):
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))
    before = tree(tmp_path)
    assert_refused(cli("train-teacher", "--data", data, "--out", tmp_path, "--iters", "1", "--overwrite"), 1,
                   r"--out .* contains the --data")
    assert tree(tmp_path) == before


def test_make_data_overwrite_keeps_a_folder_with_files_it_did_not_write(tmp_path):
    out = tmp_path / "synth"
    args = ["make-data", "synthetic", "--out", out, "--train", "2", "--test", "1", "--size", "64", "--workers", "1"]
    assert cli(*args).exit_code == 0
    (out / "teacher").mkdir()
    (out / "teacher" / "model.pt").write_bytes(b"weights")
    before = tree(out)
    assert_refused(cli(*args[:-4], "--seed", "1", "--overwrite"), 1, r"files the generator did not write \(teacher\)")
    assert tree(out) == before
