"""Exact resume of train-student across the settings that change what a step draws: a run SIGKILLed between
checkpoints and rerun ends bit-identical to an uninterrupted one, with DataLoader workers 0 and 2, flips on and
off, stage 1 and 2, and unlabelled images mixed in. The images are 160 px, so each image has more anchors than
the RPN samples per image and the sampler's draws from the global RNG decide the loss (at 64 px every anchor
is kept and a shifted RNG stream goes unseen)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mimicdet.pipeline.extract import ExtractConfig, run_extract
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher
from tests.reliability.helpers import CLI, SUBPROCESS_ENV, same_weights

SIZE = 160
ITERS, EVERY = 30, 4  # the kill lands between checkpoints, so the rerun redoes the steps after the last one


@pytest.fixture(scope="module")
def big_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big-world")
    make_squares_voc(root / "voc", {"train": 8, "pool": 6}, size=SIZE)
    make_tiny_teacher(root / "teacher.pt", size=SIZE)
    common = dict(teacher=root / "teacher.pt", data=root / "voc", shard_size=4, proposals=32, loader_workers=0,
                  progress=False, flip=True)
    run_extract(ExtractConfig(out=str(root / "store"), split="train", **common))
    run_extract(ExtractConfig(out=str(root / "pool"), split="pool", **common))
    return root


def _args(world: Path, out: Path, extra: list[str]) -> list[str]:
    return [*CLI, "train-student", "--store", str(world / "store"), "--data", str(world / "voc"), "--out", str(out),
            "--iters", str(ITERS), "--checkpoint-every", str(EVERY), "--lr", "0.01", "--width", "1/8",
            "--batch-size", "2", "--rois-per-image", "8", "--anchor-sizes", "16,32,64", *extra]


def _run(args: list[str]) -> None:
    r = subprocess.run(args, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _kill_between_checkpoints(args: list[str], ckpt: Path, rng: random.Random) -> int:
    """Start the run, SIGKILL it a random moment after its first checkpoint; returns the checkpoint's iteration."""
    proc = subprocess.Popen(args, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not ckpt.exists():
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended by itself"
    return int(torch.load(ckpt, weights_only=True)["iteration"])


COMBINATIONS = {
    "stage1-workers0-flip": ["--workers", "0", "--flip"],
    "stage1-workers2-noflip": ["--workers", "2"],
    "stage1-workers0-flip-unlabelled": ["--workers", "0", "--flip", "--unlabeled", "{pool}", "--unlabeled-data",
                                        "{voc}", "--unlabeled-split", "pool"],
    "stage2-workers2-flip": ["--workers", "2", "--flip", "--stage", "2", "--init", "{init}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", COMBINATIONS)
def test_a_killed_run_resumes_to_the_same_weights(big_world, tmp_path, name):
    if "{init}" in COMBINATIONS[name]:
        _run(_args(big_world, tmp_path / "stage1", ["--workers", "0", "--iters", "4"]))
    fill = {"pool": big_world / "pool", "voc": big_world / "voc", "init": tmp_path / "stage1" / "model.pt"}
    extra = [a.format(**fill) for a in COMBINATIONS[name]]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_args(big_world, full, extra))
    seed = int(time.time())
    stopped = _kill_between_checkpoints(_args(big_world, killed, extra), killed / "checkpoint.pt", random.Random(seed))
    assert 0 < stopped < ITERS and not (killed / "model.pt").exists(), (stopped, seed)
    _run(_args(big_world, killed, extra))
    assert same_weights(full / "model.pt", killed / "model.pt") == [], f"resumed from {stopped} (seed {seed})"
    assert (full / "metrics.jsonl").read_text().count("\n") == (killed / "metrics.jsonl").read_text().count("\n")
