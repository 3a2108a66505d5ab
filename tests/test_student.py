"""train-student end to end on a real store: every strategy, both stages, scale mimic, unlabelled images,
refusals, and the promise that the teacher is never loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mimicdet.cli import main
from mimicdet.data.errors import StoreError
from mimicdet.detection.detector import load_detector
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from mimicdet.student.recipe import DEFAULT_LOGITS_WEIGHT
from mimicdet.student.train import StudentConfig, run_train_student
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("student")
    make_squares_voc(root / "voc", {"train": 8, "pool": 6, "test": 3})
    make_tiny_teacher(root / "teacher.pt")
    common = dict(teacher=root / "teacher.pt", data=root / "voc", shard_size=4, proposals=24, loader_workers=0, progress=False)
    run_extract(ExtractConfig(out=str(root / "store"), split="train", flip=True, **common))
    run_extract(ExtractConfig(out=str(root / "pool"), split="pool", **common))
    return root


def _cfg(setup: Path, out: str, **kw) -> StudentConfig:
    base = dict(store=str(setup / "store"), data=setup / "voc", out=setup / out, width=0.125, iters=6, batch_size=2,
                workers=0, rois_per_image=8, anchor_sizes=(16, 32), progress=False, checkpoint_every=3, log_every=1)
    base.update(kw)
    return StudentConfig(**base)


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mimic,sampler", [("roi", "roialign"), ("roi", "native"), ("map", "roialign"), ("none", "roialign")])
def test_stage1_strategies_run_and_log_their_losses(setup, mimic, sampler):
    run = setup / f"s1-{mimic}-{sampler}"
    summary = run_train_student(_cfg(setup, run.name, mimic=mimic, sampler=sampler))
    assert summary["iteration"] == 6
    rows = _losses(run)
    assert ("loss_mimic" in rows[-1]) == (mimic != "none")
    assert "loss_objectness" in rows[-1] and "loss_classifier" not in rows[-1]
    student, meta = load_detector(run / "model.pt")
    assert student.config.width == 0.125 and student.config.head == "none"
    assert meta["input_scale"] == 1.0 and meta["mimic"] == mimic


def test_mimic_loss_falls_over_30_steps(setup):
    run = setup / "falls"
    run_train_student(_cfg(setup, run.name, iters=30, lr=0.01, mimic_weight=1.0))
    mimic = [r["loss_mimic"] for r in _losses(run)]
    assert len(mimic) == 30
    assert sum(mimic[-5:]) / 5 < 0.8 * sum(mimic[:5]) / 5, mimic


def test_stage2_two_stage_mimic_and_logits_only(setup):
    s1 = setup / "s1-for-s2"
    run_train_student(_cfg(setup, s1.name))
    for mimic in ("roi", "logits"):
        run = setup / f"s2-{mimic}"
        run_train_student(_cfg(setup, run.name, stage=2, init=s1 / "model.pt", mimic=mimic))
        last = _losses(run)[-1]
        assert "loss_logits" in last and "loss_classifier" in last
        assert ("loss_mimic" in last) == (mimic == "roi")
        student, _ = load_detector(run / "model.pt")
        assert student.config.head == "fast-rcnn"
    # Stage 2 starts from the stage-1 backbone exactly.
    s1_model, _ = load_detector(s1 / "model.pt")
    fresh = StudentConfig(**{**_cfg(setup, "unused", stage=2, init=s1 / "model.pt").__dict__})
    from mimicdet.student.train import build_student

    s2_model = build_student(fresh, ("blue", "red"))
    for k, v in s1_model.backbone.state_dict().items():
        assert torch.equal(v, s2_model.backbone.state_dict()[k]), k


def test_scale_mimic_records_half_input(setup):
    run = setup / "scale"
    run_train_student(_cfg(setup, run.name, scale_mimic=True))
    student, meta = load_detector(run / "model.pt")
    assert meta["input_scale"] == 0.5 and student.config.upsample and student.feature_stride == 8


def test_unlabelled_images_add_mimic_only(setup):
    run = setup / "unl"
    run_train_student(_cfg(setup, run.name, batch_size=4, unlabeled=str(setup / "pool"), unlabeled_data=setup / "voc",
                           unlabeled_split="pool", unlabeled_fraction=0.5))
    assert "loss_mimic" in _losses(run)[-1]


def test_flip_without_flipped_records_warns_and_turns_flips_off(setup):
    with pytest.warns(UserWarning, match="no flipped teacher records"):
        run_train_student(_cfg(setup, "noflip", store=str(setup / "pool"), split="pool", flip=True))


def test_store_of_another_split_is_refused(setup):
    with pytest.raises(StoreError, match="no record for"):
        run_train_student(_cfg(setup, "wrong", store=str(setup / "pool"), split="train"))


def test_resume_after_a_crash_gives_the_same_weights(setup, monkeypatch):
    from mimicdet.detection.trainer import Trainer

    a, b = setup / "full", setup / "crashed"
    run_train_student(_cfg(setup, a.name, iters=6))
    real_step = Trainer.run_step

    def crash_at_5(self, batch):
        if self.iter == 4:  # the checkpoint of iteration 3 exists; iteration 4 is lost
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "run_step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train_student(_cfg(setup, b.name, iters=6))
    monkeypatch.setattr(Trainer, "run_step", real_step)
    assert not (b / "model.pt").exists()
    run_train_student(_cfg(setup, b.name, iters=6))
    wa, _ = load_detector(a / "model.pt")
    wb, _ = load_detector(b / "model.pt")
    for (k, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k


def test_a_different_config_in_the_same_run_folder_is_refused(setup):
    run_train_student(_cfg(setup, "cfgclash", iters=2))
    with pytest.raises(FileExistsError, match="mimic"):
        run_train_student(_cfg(setup, "cfgclash", iters=2, mimic="map"))


def test_cli_train_student_then_evaluate_without_the_store(setup, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(main, ["train-student", "--store", str(setup / "store"), "--data", str(setup / "voc"),
                             "--out", str(out), "--width", "1/8", "--iters", "3", "--batch-size", "2", "--workers", "0",
                             "--rois-per-image", "8", "--anchor-sizes", "16,32"])
    assert r.exit_code == 0, r.output
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(out / "model.pt", moved)
    r = runner.invoke(main, ["evaluate", "--model", str(moved), "--data", str(setup / "voc"), "--split", "test",
                             "--metrics", "recall", "--out", str(tmp_path / "report.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert "recall" in report
    r = runner.invoke(main, ["train-student", "--store", str(setup / "store"), "--data", str(setup / "voc"),
                             "--out", str(tmp_path / "bad"), "--mimic", "logits"])
    assert r.exit_code != 0 and "stage 2" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_training_process_never_loads_the_teacher(setup, tmp_path):
    """The teacher checkpoint is removed before training; the training process must not import the teacher side."""
    hidden = tmp_path / "teacher-gone"
    data = tmp_path / "voc"
    shutil.copytree(setup / "voc", data)
    store = tmp_path / "store"
    shutil.copytree(setup / "store", store)
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['cli.py', 'train-student', '--store', sys.argv[1], '--data', sys.argv[2], '--out', sys.argv[3],"
        " '--width', '1/8', '--iters', '2', '--batch-size', '2', '--workers', '1', '--anchor-sizes', '16,32']\n"
        "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = sorted(m for m in sys.modules if m.startswith('pipeline'))\n"
        "print('TEACHER_MODULES', bad)\n"
    ) % str(REPO / "cli.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", probe, str(store), str(data), str(hidden)], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TEACHER_MODULES []" in r.stdout, r.stdout
    assert (hidden / "model.pt").exists()


@pytest.mark.slow
def test_torchrun_two_processes_agree_with_one(setup, tmp_path):
    """DDP over 2 gloo processes (each half of every global batch) against 1 process on the whole batch.
    Batch-norm statistics are per process, so the runs are close, not identical: the check is that the DDP
    weights are far closer to the single-process weights than a run with another seed is."""
    args = ["--store", str(setup / "store"), "--data", str(setup / "voc"), "--width", "1/8", "--iters", "4",
            "--batch-size", "4", "--workers", "0", "--rois-per-image", "8", "--anchor-sizes", "16,32", "--lr", "0.01"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    runs = {"ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py")],
            "one": [str(REPO / "cli.py")], "other": [str(REPO / "cli.py")]}
    for name, head in runs.items():
        extra = ["--seed", "1"] if name == "other" else []
        r = subprocess.run([sys.executable, *head, "train-student", *args, *extra, "--out", str(tmp_path / name)],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    ddp, meta = load_detector(tmp_path / "ddp" / "model.pt")
    one, _ = load_detector(tmp_path / "one" / "model.pt")
    other, _ = load_detector(tmp_path / "other" / "model.pt")
    assert meta["world_size"] == 2

    def dist(a, b) -> float:
        return sum(float((x - y).detach().pow(2).sum()) for x, y in zip(a.parameters(), b.parameters())) ** 0.5

    assert dist(ddp, one) < 0.25 * dist(other, one), (dist(ddp, one), dist(other, one))


def test_channel_stats_are_the_mean_and_std_of_the_stored_cells(setup):
    import numpy as np

    from mimicdet.store import open_store
    from mimicdet.student.stream import channel_stats

    store = open_store(str(setup / "store"))
    mean, std = channel_stats(store)
    cells = np.concatenate([store.read(i).features.reshape(store.manifest.channels, -1) for i in range(len(store))], 1)
    np.testing.assert_allclose(mean.numpy(), cells.mean(1), rtol=1e-4, atol=1e-5)
    # A channel that never varies (dead ReLU) gets std 1: centred, not divided by zero.
    want = np.where(cells.std(1) > 1e-6 * cells.std(1).max(), cells.std(1), 1.0)
    assert (want == 1.0).any()
    np.testing.assert_allclose(std.numpy(), want, rtol=1e-4, atol=1e-5)


def test_mimic_norm_channel_targets_unit_variance(setup):
    """Before any update r maps the student to about zero, so the first loss is about half the target's
    variance: 1/2 with standardised channels, the raw map's own (far from 1/2) without."""
    runs = {norm: setup / f"s1-norm-{norm}" for norm in ("none", "channel")}
    for norm, run in runs.items():
        run_train_student(_cfg(setup, run.name, iters=1, lr=1e-6, mimic_norm=norm))
    first = {norm: _losses(run)[0]["loss_mimic"] for norm, run in runs.items()}
    assert first["channel"] == pytest.approx(0.5, rel=0.35)
    assert abs(first["none"] - 0.5) > 0.2
    config = json.loads((runs["channel"] / "student_config.json").read_text())
    assert config["mimic_norm"] == "channel"
    assert "mimic_norm" not in json.loads((runs["none"] / "student_config.json").read_text())


def test_most_boxes_under_two_cells_get_a_one_line_warning(setup, tmp_path):
    args = ["train-student", "--store", str(setup / "store"), "--data", str(setup / "voc"), "--out",
            str(tmp_path / "run"), "--iters", "1", "--width", "1/8", "--batch-size", "2", "--workers", "0",
            "--anchor-sizes", "16,32"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "of the 12 labelled boxes of voc/train are under 32 px" in lines[0]


@pytest.mark.parametrize("mimic, logits", [("roi", DEFAULT_LOGITS_WEIGHT), ("none", 0.0)])
def test_stage2_follows_stage1_with_the_recipe(tmp_path, mimic, logits):
    first = StudentConfig(store="s", data=tmp_path, out=tmp_path / "stage1", mimic=mimic, iters=301, eval_every=50,
                          eval_split="val", lr=0.05)
    second = first.stage2(tmp_path / "stage2")
    assert (second.stage, second.init, second.out) == (2, tmp_path / "stage1" / "model.pt", tmp_path / "stage2")
    assert (second.iters, second.logits_weight, second.eval_every, second.lr) == (150, logits, 0, 0.05)
    assert first.stage2(tmp_path / "b", iters=7, logits_weight=0.5).logits_weight == 0.5
    with pytest.raises(ValueError, match="follows a stage-1 run"):
        second.stage2(tmp_path / "c")
