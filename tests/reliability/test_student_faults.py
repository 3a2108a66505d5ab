"""train-student under faults: SIGKILL mid-run (twice, at random points) then a rerun of the same command gives
bit-identical weights to an uninterrupted run; a run folder whose checkpoint is damaged or foreign is
refused with a clear error instead of a crash. Deterministic CPU settings: OMP_NUM_THREADS=1, --workers 0."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.reliability.helpers import CLI, SUBPROCESS_ENV, STUDENT, assert_refused, cli, same_weights, train_args


def _args(world: Path, out: Path) -> list[str]:
    return [str(a) for a in ["train-student", "--store", world / "store", "--data", world / "voc", "--out", out,
                             "--iters", "40", "--checkpoint-every", "5", "--lr", "0.01", *STUDENT]]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_weights(world, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run([*CLI, *_args(world, full)], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = killed / "checkpoint.pt"
    stopped_at = []
    for _ in range(2):
        proc = subprocess.Popen([*CLI, *_args(world, killed)], env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Kill after this process's 2nd or 3rd checkpoint (every 5 iterations), a random moment into the next
        # interval: at most 0.8 of the last interval seen, so the kill lands before the one after. A fixed
        # delay instead let a fast machine reach the end (iteration 40) first.
        wanted, seen, stamp = rng.choice([2, 3]), [], ckpt.stat().st_mtime_ns if ckpt.exists() else None
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and len(seen) < wanted:
            now = ckpt.stat().st_mtime_ns if ckpt.exists() else None
            if now != stamp:
                stamp = now
                seen.append(time.monotonic())
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.8 * (seen[-1] - seen[-2]) if len(seen) >= 2 else 0.0))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"the run ended by itself (seed {seed})"
        assert not (killed / "model.pt").exists()
        stopped_at.append(int(torch.load(ckpt, weights_only=True)["iteration"]))
    assert stopped_at[0] < stopped_at[1] < 40, stopped_at
    print(f"killed after checkpoints at iterations {stopped_at} (seed {seed})")
    r = subprocess.run([*CLI, *_args(world, killed)], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "student at iteration 40" in r.stdout
    assert same_weights(full / "model.pt", killed / "model.pt") == []


# ------------------------------------------------------------------------------ a damaged run folder


def _damaged_checkpoint(path: Path, kind: str) -> None:
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    else:  # another architecture's weights under the same keys
        ckpt = torch.load(path, weights_only=True)
        ckpt["model"] = {"conv.weight": torch.zeros(3, 3, 1, 1)}
        torch.save(ckpt, path)


@pytest.mark.parametrize("kind", ["truncated", "text", "foreign-weights"])
def test_a_damaged_checkpoint_in_the_run_folder_is_refused(world, tmp_path, kind):
    out = tmp_path / "run"
    args = train_args(world, world / "store", out)
    args[args.index("--iters") + 1] = "2"
    assert cli(*args).exit_code == 0
    _damaged_checkpoint(out / "checkpoint.pt", kind)  # the rerun of this command resumes from it
    assert_refused(cli(*args), 1, rf"{out / 'checkpoint.pt'}: not a readable training checkpoint", r"--overwrite")
    r = cli(*args, "--overwrite")
    assert r.exit_code == 0 and "at iteration 2" in r.output, r.output
