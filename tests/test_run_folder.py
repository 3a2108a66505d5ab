"""One run folder, one run: the claim every command makes before it writes (train-teacher, train-student,
train-family, demo)."""

import json

import pytest

from mimicdet.detection.run_folder import CHECKPOINT_NAME, MODEL_NAME, claim_run_folder, differences

IDENTITY = {"lr": 0.02, "iters": 100, "detector": {"width": 0.25, "head": "fast-rcnn"}, "device": "cpu"}


@pytest.mark.parametrize("change, refused", [
    ({}, None),
    ({"iters": 200}, None),  # ignored below: a longer schedule resumes
    ({"device": "cuda"}, None),
    ({"lr": 0.01}, "lr: 0.02 -> 0.01"),
    ({"detector": {"width": 0.5, "head": "fast-rcnn"}}, "detector.width: 0.25 -> 0.5"),
    ({"seed": 1}, "seed: None -> 1"),
])
def test_a_rerun_resumes_and_another_run_is_refused(tmp_path, change, refused):
    claim_run_folder(tmp_path, "run.json", IDENTITY, ignore=("iters", "device"))
    again = IDENTITY | change
    if refused is None:
        claim_run_folder(tmp_path, "run.json", again, ignore=("iters", "device"))
        assert json.loads((tmp_path / "run.json").read_text()) == again  # the latest call is recorded
        return
    with pytest.raises(FileExistsError, match="other settings") as e:
        claim_run_folder(tmp_path, "run.json", again, ignore=("iters", "device"))
    assert refused in str(e.value) and str(tmp_path) in str(e.value) and "--overwrite" in str(e.value)
    assert json.loads((tmp_path / "run.json").read_text()) == IDENTITY


def test_overwrite_replaces_the_run_and_keeps_everything_else(tmp_path):
    claim_run_folder(tmp_path, "run.json", IDENTITY)
    for name in (CHECKPOINT_NAME, MODEL_NAME, "metrics.jsonl", "notes.txt"):
        (tmp_path / name).write_text("x")
    claim_run_folder(tmp_path, "run.json", IDENTITY | {"lr": 0.1}, overwrite=True)
    assert json.loads((tmp_path / "run.json").read_text())["lr"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.json"]


def test_a_checkpoint_without_an_identity_is_refused(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_text("x")
    with pytest.raises(FileExistsError, match="holds a checkpoint but no run.json"):
        claim_run_folder(tmp_path, "run.json", IDENTITY)
    assert not (tmp_path / "run.json").exists()


def test_differences_name_every_leaf():
    assert differences({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"b": 2, "c": [1]}, "e": 3}) == [
        "a.b: 1 -> 2", "d: 2 -> None", "e: None -> 3"]
    assert differences({"a": 1, "b": 2}, {"a": 5, "b": 2}, ignore=("a",)) == []
