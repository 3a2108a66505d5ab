"""train-student with several teachers: two tiny teachers of different widths extracted over the same images into
real Zarr stores; the student mimics both, each through its own transform r_k, with L_m = Σ_k w_k·L_m^k."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mimicdet.cli import main
from mimicdet.data import load_dataset
from mimicdet.data.errors import StoreError
from mimicdet.store import open_store
from mimicdet.data.loader import DetectionImages
from mimicdet.data.transforms import Preprocess
from mimicdet.detection.trainer import load_checkpoint
from mimicdet.detection.detector import load_detector
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from mimicdet.student.mimic import MimicTransform
from mimicdet.student.stream import MimicImages, MixedSampler, make_mimic_loader
from mimicdet.student.train import StudentConfig, StudentModel, build_student, run_train_student
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher

WIDTH_A, WIDTH_B = 0.125, 0.25  # teacher maps of 104 and 208 channels
CH_A, CH_B = 104, 208


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("multi")
    make_squares_voc(root / "voc", {"train": 8, "pool": 4, "test": 2})
    make_tiny_teacher(root / "a.pt", width=WIDTH_A, seed=0)
    make_tiny_teacher(root / "b.pt", width=WIDTH_B, seed=1)
    make_tiny_teacher(root / "c.pt", width=WIDTH_A, seed=2, size=48)  # another preprocessing (48 px inputs)
    common = dict(data=root / "voc", split="train", shard_size=4, proposals=24, loader_workers=0, progress=False)
    run_extract(ExtractConfig(teacher=root / "a.pt", out=str(root / "store-a"), flip=True, **common))
    run_extract(ExtractConfig(teacher=root / "b.pt", out=str(root / "store-b"), **common))  # no flipped records
    run_extract(ExtractConfig(teacher=root / "c.pt", out=str(root / "store-c"), **common))
    pool = {**common, "split": "pool"}
    run_extract(ExtractConfig(teacher=root / "a.pt", out=str(root / "pool-a"), **pool))
    run_extract(ExtractConfig(teacher=root / "b.pt", out=str(root / "pool-b"), **pool))
    return root


def _cfg(setup: Path, out: str, stores=("store-a", "store-b"), **kw) -> StudentConfig:
    store = tuple(str(setup / s) for s in stores)
    base = dict(store=store[0] if len(store) == 1 else store, data=setup / "voc", out=setup / out, width=0.125,
                iters=4, batch_size=2, workers=0, rois_per_image=8, anchor_sizes=(16, 32), progress=False,
                checkpoint_every=2, log_every=1)
    base.update(kw)
    return StudentConfig(**base)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_two_teachers_of_different_widths(setup, tmp_path):
    out = tmp_path / "two"
    r = CliRunner().invoke(main, [
        "train-student", "--store", str(setup / "store-a"), "--store", str(setup / "store-b"),
        "--teacher-weight", "1", "--teacher-weight", "0.5", "--mimic-weight", "2", "--data", str(setup / "voc"),
        "--out", str(out), "--width", "1/8", "--iters", "3", "--batch-size", "2", "--workers", "0",
        "--rois-per-image", "8", "--anchor-sizes", "16,32",
    ])
    assert r.exit_code == 0, r.output
    (row,) = _rows(out)  # one row: the mean over the 3 iterations
    # The trainer's total is the ground truth plus λ1·Σ_k w_k·L_m^k, with λ1 = 2, w = (1, 0.5).
    expected = row["loss_objectness"] + row["loss_rpn_box_reg"] + 2 * (1.0 * row["loss_mimic"] + 0.5 * row["loss_mimic_2"])
    assert row["total_loss"] == pytest.approx(expected, rel=1e-5)
    assert row["loss_mimic"] > 0 and row["loss_mimic_2"] > 0
    # Each teacher has its own r_k sized to its width; both were trained (r starts with a zero bias, and only a
    # gradient moves it: weight decay keeps a zero at zero).
    state = load_checkpoint(out / "checkpoint.pt")["model"]
    assert state["transforms.0.weight"].shape == (CH_A, 104, 1, 1)
    assert state["transforms.1.weight"].shape == (CH_B, 104, 1, 1)
    assert state["transforms.0.bias"].abs().sum() > 0 and state["transforms.1.bias"].abs().sum() > 0
    # The checkpoint records the teachers, in --store order; the primary is the teacher of record.
    _, meta = load_detector(out / "model.pt")
    teachers = meta["teachers"]
    assert [t["store"] for t in teachers] == [str(setup / "store-a"), str(setup / "store-b")]
    assert [t["weight"] for t in teachers] == [1.0, 0.5]
    assert [t["loss"] for t in teachers] == ["loss_mimic", "loss_mimic_2"]
    assert [t["channels"] for t in teachers] == [CH_A, CH_B]
    assert [t["teacher_width"] for t in teachers] == [WIDTH_A, WIDTH_B]
    assert teachers[0]["teacher_sha256"] == meta["teacher_sha256"] != teachers[1]["teacher_sha256"]
    assert meta["student_config"]["teacher_weights"] == [1.0, 0.5]


def test_primary_term_is_the_single_teacher_loss_and_one_store_is_unchanged(setup):
    """Before the first update the student and r_1 are the same with or without a second teacher (r_2 is built
    after them), and the regions are the primary's proposals either way: the first step's loss_mimic and ground-
    truth losses must equal the single-teacher run's exactly."""
    one = setup / "one-a"
    run_train_student(_cfg(setup, one.name, stores=("store-a",), iters=1))
    two = setup / "two-ab"
    run_train_student(_cfg(setup, two.name, iters=1))
    (a,), (ab,) = _rows(one), _rows(two)
    for k in ("loss_objectness", "loss_rpn_box_reg", "loss_mimic"):
        assert ab[k] == a[k], k
    assert ab["total_loss"] == pytest.approx(a["total_loss"] + ab["loss_mimic_2"], rel=1e-6)
    # One store: the run reads as it always has: no second term, no extra transform, no teachers record and no
    # new key in the saved configuration.
    assert "loss_mimic_2" not in a
    state = load_checkpoint(one / "checkpoint.pt")["model"]
    assert not any(k.startswith("transforms.1") for k in state)
    _, meta = load_detector(one / "model.pt")
    assert "teachers" not in meta
    old_fields = {f.name for f in dataclasses.fields(StudentConfig)} - {"teacher_weights", "mimic_norm"}
    assert set(meta["student_config"]) == old_fields
    # ... beside the inputs' content digests that identify the run folder.
    assert set(json.loads((one / "student_config.json").read_text())) == old_fields | {"inputs"}
    assert meta["student_config"]["store"] == str(setup / "store-a")


@pytest.mark.parametrize("mimic", ["roi", "map"])
def test_each_teacher_through_its_own_transform_known_answers(setup, mimic):
    """A hand-built StudentModel on a real batch read from the stores. With the same store as second teacher and
    r_2 = r_1, L_m^2 = L_m^1; with the second teacher's map doubled and r_2 = 2·r_1 the residual doubles, so
    L_m^2 = 4·L_m^1. Both transforms get a gradient."""
    cfg = _cfg(setup, "unused", mimic=mimic)
    a = open_store(str(setup / "store-a"))
    dataset = load_dataset(setup / "voc", "train", classes=list(a.manifest.classes))
    pre = Preprocess.from_dict(dict(a.manifest.preprocess))
    stores = [a, open_store(str(setup / "store-a")), open_store(str(setup / "store-b"))]
    images = MimicImages([(dataset, stores)], [DetectionImages(dataset, pre)])
    sampler = MixedSampler(len(dataset), 0, 2, unlabelled_fraction=0.0, seed=0)
    mb = next(iter(make_mimic_loader(images, sampler, num_workers=0)))
    assert [m.shape[1] for m in mb.teacher_features] == [CH_A, CH_A, CH_B]
    assert torch.equal(mb.teacher_features[1], mb.teacher_features[0])
    assert mb.teacher_hw[1] == mb.teacher_hw[0]

    torch.manual_seed(0)
    student = build_student(cfg, dataset.classes)
    r1 = MimicTransform(student_channels=student.feature_channels, teacher_channels=CH_A)
    r2 = MimicTransform(student_channels=student.feature_channels, teacher_channels=CH_A)
    r3 = MimicTransform(student_channels=student.feature_channels, teacher_channels=CH_B)
    with torch.no_grad():
        r1.bias.normal_()  # a non-zero bias, so it is part of what is checked
        r2.load_state_dict(r1.state_dict())
    model = StudentModel(student, [r1, r2, r3], cfg, a.manifest.stride)
    losses = model(mb)
    assert set(losses) >= {"loss_mimic", "loss_mimic_2", "loss_mimic_3"}
    torch.testing.assert_close(losses["loss_mimic_2"], losses["loss_mimic"], rtol=1e-6, atol=0)
    sum(losses.values()).backward()
    for r in (r1, r2, r3):
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
        assert torch.isfinite(r.weight.grad).all()

    with torch.no_grad():
        r2.weight.copy_(2 * r1.weight)
        r2.bias.copy_(2 * r1.bias)
    first, same, other = mb.teacher_features
    doubled = dataclasses.replace(mb, teacher_features=[first, 2 * same, other])
    losses = model(doubled)
    torch.testing.assert_close(losses["loss_mimic_2"], 4 * losses["loss_mimic"], rtol=1e-5, atol=0)


def test_resume_with_two_teachers_gives_the_same_weights(setup, monkeypatch):
    from mimicdet.detection.trainer import Trainer

    full, crashed = setup / "two-full", setup / "two-crashed"
    run_train_student(_cfg(setup, full.name, teacher_weights=(1.0, 0.5)))
    real_step = Trainer.run_step

    def crash(self, batch):
        if self.iter == 3:  # the checkpoint of iteration 2 exists; iteration 3 is lost
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "run_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train_student(_cfg(setup, crashed.name, teacher_weights=(1.0, 0.5)))
    monkeypatch.setattr(Trainer, "run_step", real_step)
    summary = run_train_student(_cfg(setup, crashed.name, teacher_weights=(1.0, 0.5)))
    assert summary["start_iteration"] == 2 and summary["iteration"] == 4
    wa = load_checkpoint(full / "checkpoint.pt")["model"]
    wb = load_checkpoint(crashed / "checkpoint.pt")["model"]
    assert set(wa) == set(wb) and any(k.startswith("transforms.1.") for k in wa)
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
    # Another weight is another run: the folder refuses it.
    with pytest.raises(FileExistsError, match="teacher_weights"):
        run_train_student(_cfg(setup, crashed.name, teacher_weights=(1.0, 2.0)))


def test_stores_of_another_preprocessing_are_refused_naming_both(setup, tmp_path):
    a, c = str(setup / "store-a"), str(setup / "store-c")
    with pytest.raises(StoreError) as e:
        run_train_student(_cfg(setup, "refused", stores=("store-a", "store-c")))
    msg = str(e.value)
    assert a in msg and c in msg and "preprocess.min_size 48 != 64" in msg
    assert not (setup / "refused").exists()  # refused before the run folder is touched
    r = CliRunner().invoke(main, ["train-student", "--store", a, "--store", c, "--data", str(setup / "voc"),
                                  "--out", str(tmp_path / "cli")])
    assert r.exit_code == 1 and "same dataset and preprocessing" in r.output and "Traceback" not in r.output


def test_a_store_of_another_dataset_is_refused(setup, tmp_path):
    make_squares_voc(tmp_path / "other", {"train": 8}, size=48)  # the same image ids, other image sizes
    run_extract(ExtractConfig(teacher=setup / "b.pt", data=tmp_path / "other", split="train",
                              out=str(tmp_path / "store-other"), shard_size=4, proposals=24, loader_workers=0,
                              progress=False))
    cfg = dataclasses.replace(_cfg(setup, "other"), store=(str(setup / "store-a"), str(tmp_path / "store-other")))
    with pytest.raises(StoreError, match="store-other: store was made from another dataset"):
        run_train_student(cfg)


def test_unlabelled_images_with_two_teachers(setup, tmp_path):
    """Each teacher brings its store of the unlabelled images (--unlabeled in --store order); they add mimic
    terms for both teachers."""
    out = tmp_path / "unl"
    args = ["train-student", "--store", str(setup / "store-a"), "--store", str(setup / "store-b"),
            "--data", str(setup / "voc"), "--out", str(out), "--width", "1/8", "--iters", "2", "--batch-size", "4",
            "--workers", "0", "--rois-per-image", "8", "--anchor-sizes", "16,32", "--unlabeled-data", str(setup / "voc"),
            "--unlabeled-split", "pool"]
    r = CliRunner().invoke(main, [*args, "--unlabeled", str(setup / "pool-a"), "--unlabeled", str(setup / "pool-b")])
    assert r.exit_code == 0, r.output
    (row,) = _rows(out)
    assert row["loss_mimic"] > 0 and row["loss_mimic_2"] > 0
    # In the wrong order, teacher 2's unlabelled store is teacher 1's: refused, naming both.
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "swapped"), "--unlabeled", str(setup / "pool-b"),
                                  "--unlabeled", str(setup / "pool-a")])
    assert r.exit_code == 1 and "both stores must come from the same teacher" in r.output, r.output
    assert str(setup / "pool-b") in r.output and str(setup / "store-a") in r.output
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one"), "--unlabeled", str(setup / "pool-a")])
    assert r.exit_code == 1 and "1 store(s) for 2 --store teacher(s)" in r.output, r.output


@pytest.mark.parametrize("args,message", [
    (["--teacher-weight", "1"], "1 weight(s) for 2 --store(s)"),
    (["--mimic", "none"], "need a feature mimic"),
])
def test_cli_refuses_what_several_teachers_cannot_do(setup, tmp_path, args, message):
    r = CliRunner().invoke(main, ["train-student", "--store", str(setup / "store-a"), "--store", str(setup / "store-b"),
                                  "--data", str(setup / "voc"), "--out", str(tmp_path / "x"), *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="more than once"):
        StudentConfig(store=("s", "s"), data=Path("."), out=Path("o"))
    with pytest.raises(ValueError, match=">= 0"):
        StudentConfig(store=("s", "t"), data=Path("."), out=Path("o"), teacher_weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="logits are matched to the first"):
        StudentConfig(store=("s", "t"), data=Path("."), out=Path("o"), stage=2, mimic="logits")
    # All ones is the default, one store in a sequence is that store: the configs read alike.
    plain = StudentConfig(store="s", data=Path("."), out=Path("o"))
    assert StudentConfig(store=("s",), teacher_weights=(1.0,), data=Path("."), out=Path("o")).to_dict() == plain.to_dict()
    two = StudentConfig(store=["s", "t"], teacher_weights=[1, 1], data=Path("."), out=Path("o"))
    assert two.stores == ("s", "t") and two.weights == (1.0, 1.0) and two.primary_store == "s"
    assert "teacher_weights" not in two.to_dict() and two.to_dict()["store"] == ["s", "t"]


def test_flips_need_flipped_records_in_every_store(setup):
    with pytest.warns(UserWarning, match="store-b: store has no flipped teacher records"):
        run_train_student(_cfg(setup, "flip-two", flip=True, iters=1))
