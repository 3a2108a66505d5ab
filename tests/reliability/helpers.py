"""Shared tools of the reliability suite: run the CLI, check that a refusal is clean, compare stores and runs,
and damage a store the way disks and people do (a flipped byte, a cut file, an edited manifest, a NaN)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner, Result

from mimicdet.cli import main
from mimicdet.store import open_store, open_writer, verify_store

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(REPO / "cli.py")]
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
ARRAYS = ("features", "proposals", "scores", "class_logits", "box_deltas")
SHARD = 4  # images per shard of the session world's stores (conftest.world): train has shards [0,4) [4,8)
STUDENT = ["--width", "1/8", "--batch-size", "2", "--workers", "0", "--rois-per-image", "8", "--anchor-sizes", "16,32"]


def train_args(world: Path, store: Path | str, out: Path, *extra) -> list:
    """`train-student` on the world's train split: a tiny student, 6 iterations of 2 images (every image is
    drawn by iteration 4)."""
    return ["train-student", "--store", store, "--data", world / "voc", "--out", out, "--iters", "6", *STUDENT, *extra]


def cli(*args) -> Result:
    """`mimic ARGS` in this process (fast)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def cli_subprocess(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=SUBPROCESS_ENV,
                          timeout=timeout, cwd=REPO)


def assert_refused(result: Result, code: int, *patterns: str) -> str:
    """A handled refusal: the exit code, no traceback, and every regex pattern found in the message."""
    text = result.output  # what a terminal shows: stdout and stderr interleaved
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{text}\n{result.exception!r}"
    # An exception that escaped the CLI also exits 1 under CliRunner: only SystemExit is a handled refusal.
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}\n{text}"
    assert "Traceback" not in text, text
    for p in patterns:
        assert re.search(p, text), f"{p!r} not in:\n{text}"
    return text


def tree(path: Path) -> dict[str, str] | None:
    """Relative path -> sha256 of every file under ``path`` (None when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_same_store(a_url, b_url) -> None:
    """Both stores hold bit-identical records for the same images (and flips)."""
    a, b = open_store(a_url), open_store(b_url)
    assert a.manifest == b.manifest, a.manifest.diff(b.manifest)
    assert a.is_complete() and b.is_complete()
    for i in range(len(a)):
        for flip in a.manifest.flips:
            x, y = a.read(i, flip=flip), b.read(i, flip=flip)
            for name in ARRAYS:
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"image {i} {name}")


def only_incomplete_shards(url) -> list[str]:
    """Deep-verify a store a killed writer left: every problem must be a shard without its marker (nothing
    half-written counts as written). Returns the problems."""
    report = verify_store(url)
    others = [e for e in report.errors if "incomplete (no completion marker" not in e]
    assert not others, report.format()
    return report.errors


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two model.pt files (weights-only loads)."""
    wa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


# ------------------------------------------------------------------------------------------ damaging a store


def shard_object(store: Path, array: str, shard: int) -> Path:
    """The file of one zarr array's shard (every shard object of a store is one file, ``name/c/S/0/...``)."""
    found = [p for p in (store / array / "c" / str(shard)).rglob("*") if p.is_file()]
    assert len(found) == 1, found
    return found[0]


def chunk_ranges(path: Path, n_chunks: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of each chunk inside a zarr shard object: its index sits at the end, one little-endian
    uint64 pair per chunk, then a crc32c (zarr's sharding codec, index_location 'end')."""
    data = path.read_bytes()
    index = data[-(16 * n_chunks + 4) : -4]
    return [struct.unpack("<QQ", index[16 * j : 16 * j + 16]) for j in range(n_chunks)]


def flip_byte_of_image(store: Path, shard: int, local: int, shard_size: int) -> None:
    """Flip one byte in the middle of image ``local``'s feature chunk of ``shard`` (a bit rot on disk)."""
    path = shard_object(store, "features", shard)
    offset, nbytes = chunk_ranges(path, shard_size)[local]
    data = bytearray(path.read_bytes())
    data[offset + nbytes // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_manifest(store: Path, edit) -> None:
    """Apply ``edit(doc)`` to manifest.json, keeping it valid JSON (what a person with an editor does)."""
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=1))


def plant_nan(store: Path, index: int, *, channel: int = 0) -> None:
    """Rewrite image ``index``'s shard through the store's own writer with one NaN in its feature map: what a
    teacher that overflowed would have written. Checksums are then all valid; only a content check finds it."""
    reader = open_store(store)
    shard = reader.shard_of(index)
    items = reader.read_shard(shard)
    local = index - shard * reader.manifest.shard_size
    items[local].features[channel, 0, 0] = np.nan
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the writer warns that NaN is being stored
        open_writer(store).write_shard(shard, items)
