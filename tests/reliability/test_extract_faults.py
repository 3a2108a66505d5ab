"""extract-teacher under faults: SIGKILL at five random points with --resume after each, a full disk at three
points of the write path, a damaged image found mid-run, a Dask worker killed mid-task. Every time the finished
store equals an uninterrupted run's, bit for bit, and verifies: nothing written is lost or half-kept."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mimicdet.store import open_store, verify_store
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from tests.pipeline_fixtures import completed_markers, make_squares_voc, wait_until
from tests.reliability.helpers import (
    CLI,
    SUBPROCESS_ENV,
    assert_refused,
    assert_same_store,
    cli,
    only_incomplete_shards,
    tree,
)


def _extract_args(world: Path, out: Path, *extra) -> list:
    return ["extract-teacher", "--teacher", world / "teacher.pt", "--data", world / "voc", "--out", out,
            "--proposals", "24", "--shard-size", "4", *extra]


# ------------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
def test_sigkill_at_five_random_points_then_resume_equals_uninterrupted(world, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    make_squares_voc(tmp_path / "voc", {"train": 64}, seed=1)
    common = ["--teacher", world / "teacher.pt", "--data", tmp_path / "voc", "--proposals", "20",
              "--shard-size", "2", "--batch-size", "2", "--flip"]
    run_extract(ExtractConfig(teacher=world / "teacher.pt", data=tmp_path / "voc", out=str(tmp_path / "full"),
                              proposals=20, shard_size=2, batch_size=2, flip=True, loader_workers=0, progress=False))
    store = tmp_path / "killed"
    points = []
    for round_ in range(5):
        args = [*CLI, "extract-teacher", *map(str, common), "--out", str(store)] + (["--resume"] if round_ else [])
        proc = subprocess.Popen(args, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = completed_markers(store)
        # A random point: as soon as the store exists, or after 1-3 more shards plus up to 20 ms (about one
        # shard of this tiny teacher on a fast machine: five rounds must leave shards to resume).
        new = rng.choice([0, 1, 2, 3])
        if new == 0:
            wait_until(lambda: (store / "manifest.json").exists() and completed_markers(store) == before, proc)
        else:
            wait_until(lambda: completed_markers(store) >= before + new, proc)
            time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        points.append((new, before, completed_markers(store)))
        assert code == -signal.SIGKILL, f"round {round_} ended by itself (seed {seed}, points {points})"
        only_incomplete_shards(store)  # every shard with a marker verifies; the others are simply pending
    assert completed_markers(store) < 32, f"nothing left to resume (seed {seed}, points {points})"
    print(f"kill points (seed {seed}): (shards waited for, markers before, markers after) {points}")
    r = subprocess.run([*CLI, "extract-teacher", *map(str, common), "--out", str(store), "--resume"],
                       env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(tmp_path / "full", store)
    report = verify_store(store)
    assert report.ok and not report.warnings, report.format()
    r = cli("verify-store", store, "--data", tmp_path / "voc", "--split", "train")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------- disk full


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(where)`` makes the disk fill up at one point of the store's write path, the way a real full
    disk does: part of the file is written, then write() fails. ``where``: "metadata" (the third zarr.json of
    store creation), "shard" (shard 1's feature object) or "marker" (shard 1's completion marker)."""
    from zarr.storage import _local

    import mimicdet.store.manifest as manifest_module

    real_put, real_write_bytes = _local._put, manifest_module.Location.write_bytes
    seen = {"zarr.json": 0}

    def put(path, value, exclusive=False):
        name = Path(path).as_posix()
        if name.endswith("zarr.json"):
            seen["zarr.json"] += 1
        if (where == "metadata" and name.endswith("zarr.json") and seen["zarr.json"] == 3) or (
            where == "shard" and "/features/c/1/" in name
        ):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with _local._atomic_write(Path(path), "wb") as f:  # zarr's own temp-then-rename, failing midway
                f.write(bytes(value.as_buffer_like())[: len(value) // 2])
                raise _enospc(path)
        return real_put(path, value, exclusive=exclusive)

    def write_bytes(self, key, data):
        if where == "marker" and key == "_complete/shard-00001.json":
            raise _enospc(self.path(key))
        return real_write_bytes(self, key, data)

    def arm(at: str) -> None:
        nonlocal where
        where = at
        monkeypatch.setattr(_local, "_put", put)
        monkeypatch.setattr(manifest_module.Location, "write_bytes", write_bytes)

    where = ""
    yield arm
    monkeypatch.undo()


@pytest.mark.parametrize("where", ["metadata", "shard", "marker"])
def test_disk_full_is_a_clear_error_and_the_store_resumes(world, tmp_path, full_disk, where):
    out = tmp_path / "s"
    full_disk(where)
    text = assert_refused(cli(*_extract_args(world, out)), 1, r"cannot write \(No space left on device",
                          r"free some space", re.escape(str(out)))
    if where == "metadata":
        assert "creating the store" in text
    else:
        assert f"{out}: shard 1: cannot write" in text and "1 of 2 shards" in text and "--resume" in text
        assert only_incomplete_shards(out) == ["shard 1: incomplete (no completion marker _complete/shard-00001.json)"]
    full_disk("")  # space freed
    if where == "metadata":  # the creation's debris: refused as a new store, finished by --resume
        assert tree(out) and "manifest.json" not in tree(out)
        assert_refused(cli(*_extract_args(world, out)), 1, r"whose creation was interrupted", r"--resume")
    r = cli(*_extract_args(world, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert_same_store(world / "store", out)
    report = verify_store(out)
    assert report.ok and not report.warnings, report.format()


# --------------------------------------------------------------------------------------- bad image mid-run


def test_an_unreadable_image_mid_run_keeps_the_shards_before_it(world, tmp_path):
    """A truncated PNG (its header intact, so the dataset reads) found while extracting: a clean error naming it,
    the complete shards kept; with the image repaired, --resume finishes to the uninterrupted result."""
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))
    image = data / "JPEGImages" / "train-0005.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    out = tmp_path / "s"
    args = ["extract-teacher", "--teacher", world / "teacher.pt", "--data", data, "--out", out, "--proposals", "24",
            "--shard-size", "2", "--batch-size", "1"]
    text = assert_refused(cli(*args), 1, re.escape(f"{image}: cannot decode image (image file is truncated)"),
                          r"\d of 4 shards of .* are complete; once fixed, rerun with --resume")
    assert "DataLoader worker" not in text
    done = open_store(out).completed_shards()
    assert {0, 1} <= set(done) and 2 not in done  # shards before the damaged image are whole; its own is not
    only_incomplete_shards(out)
    image.write_bytes(good)
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    run_extract(ExtractConfig(teacher=world / "teacher.pt", data=data, out=str(tmp_path / "ref"), proposals=24,
                              shard_size=2, batch_size=1, loader_workers=0, progress=False))
    assert_same_store(tmp_path / "ref", out)


def test_a_first_run_that_completes_nothing_leaves_no_store(world, tmp_path):
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))
    image = data / "JPEGImages" / "train-0001.png"
    image.write_bytes(image.read_bytes()[:200])
    out = tmp_path / "s"
    assert_refused(cli("extract-teacher", "--teacher", world / "teacher.pt", "--data", data, "--out", out,
                       "--shard-size", "8"), 1, r"train-0001\.png: cannot decode image", r"nothing was kept at")
    assert tree(out) is None


# ------------------------------------------------------------------------------------------------ Dask


@pytest.mark.slow
def test_a_dask_worker_killed_mid_task_has_its_shards_redone(world, tmp_path):
    from distributed import Client, LocalCluster

    from tests.reliability.dask_faults import KillWorkerOnce

    flag, log = tmp_path / "killed", tmp_path / "tasks.log"
    cfg = dict(teacher=world / "teacher.pt", data=world / "voc", split="train", proposals=24, shard_size=1,
               batch_size=1, progress=False)
    env = {"OMP_NUM_THREADS": "1", "MIMICDET_WORKER_THREADS": "1"}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=env) as cluster, \
            Client(cluster) as client:
        client.register_plugin(KillWorkerOnce(flag=str(flag), log=str(log), delay_s=random.uniform(0.0, 0.3)))
        summary = run_extract(ExtractConfig(**cfg, out=str(tmp_path / "s"), scheduler=cluster.scheduler_address))
    assert summary["shards_written"] == 8
    killed_pid, killed_key = flag.read_text().split()
    with pytest.raises(ProcessLookupError):
        os.kill(int(killed_pid), 0)  # that worker process is gone
    runs = [line.split() for line in log.read_text().splitlines()]
    assert ["end", killed_pid, killed_key] not in runs  # it died inside the task...
    assert any(e == "end" and k == killed_key and p != killed_pid for e, p, k in runs), runs  # ...which ran again
    ref = tmp_path / "ref"
    run_extract(ExtractConfig(**cfg, out=str(ref), loader_workers=0))
    assert_same_store(ref, tmp_path / "s")
    assert verify_store(tmp_path / "s").ok
