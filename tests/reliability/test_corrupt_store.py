"""A damaged feature store: a flipped byte, a truncated shard file, a NaN the teacher wrote, an edited manifest.

For each: `verify-store` names the shard and image (or the manifest field); `train-student` stops with exit 1
and a one-line message naming store, shard and image; `--skip-corrupt` trains without exactly the damaged
images and says which. The world's train store has 8 images in shards [0,4) and [4,8)."""

from __future__ import annotations

import json
import re

import pytest

from mimicdet.store import Manifest
from mimicdet.detection.detector import load_detector
from mimicdet.student.train import StudentConfig, run_train_student
from tests.reliability.helpers import (
    SHARD,
    assert_refused,
    cli,
    edit_manifest,
    flip_byte_of_image,
    plant_nan,
    shard_object,
    train_args,
    truncate,
)

SHARD1 = ["train-0004", "train-0005", "train-0006", "train-0007"]
pytestmark = pytest.mark.filterwarnings("ignore:--skip-corrupt:UserWarning")  # expected; asserted below

# damage -> (what verify-store must say, the images it spoils)
DAMAGE = {
    "flipped-byte": (
        lambda s: flip_byte_of_image(s, shard=1, local=2, shard_size=SHARD),
        [r"shard 1: object features/c/1/0/0/0 crc32c \w+ != \w+ recorded in its marker \(corrupted\)",
         r"shard 1 image 6 \('train-0006'\): cannot be decoded \(ValueError: Stored and computed checksum"],
        ["train-0006"],
    ),
    "truncated-shard": (
        lambda s: truncate(shard_object(s, "features", 1)),
        [r"shard 1: object features/c/1/0/0/0 is \d+ bytes, its marker says \d+ \(truncated or rewritten\)",
         re.escape(f"shard 1 (images {SHARD1}): cannot be decoded")],
        SHARD1,
    ),
    "nan-in-features": (
        lambda s: plant_nan(s, 5),
        [r"shard 1 image 5 \('train-0005'\): 1 NaN/Inf values in features"],
        ["train-0005"],
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_store_names_shard_and_image(store, damage):
    assert cli("verify-store", store).exit_code == 0
    spoil, patterns, _ = DAMAGE[damage]
    spoil(store)
    text = assert_refused(cli("verify-store", store), 1, r"FAILED", *patterns)
    assert "shard 0" not in text  # the undamaged shard is not blamed


@pytest.mark.parametrize("damage", DAMAGE)
def test_train_student_stops_with_a_clear_error(world, store, tmp_path, damage):
    spoil, _, bad = DAMAGE[damage]
    spoil(store)
    text = assert_refused(cli(*train_args(world, store, tmp_path / "run")), 1, re.escape(str(store)), r"shard 1",
                          re.escape(repr(bad[0])), r"--skip-corrupt")
    assert not (tmp_path / "run" / "model.pt").exists()
    assert "DataLoader" not in text


@pytest.mark.parametrize("damage", DAMAGE)
def test_skip_corrupt_leaves_out_exactly_the_damaged_images(world, store, tmp_path, damage):
    spoil, _, bad = DAMAGE[damage]
    spoil(store)
    r = cli(*train_args(world, store, tmp_path / "run", "--skip-corrupt"))
    assert r.exit_code == 0, r.output
    assert f"skipped {len(bad)} damaged image(s): " in r.output
    assert re.findall(r"'(train-\d+)' \(", r.output) == bad, r.output
    _, meta = load_detector(tmp_path / "run" / "model.pt")
    assert meta["dataset"]["images"] == 8 - len(bad) and meta["iterations"] == 6


def test_skip_corrupt_summary_lists_store_image_and_problem(world, store, tmp_path):
    flip_byte_of_image(store, shard=1, local=2, shard_size=SHARD)
    with pytest.warns(UserWarning, match=r"left out 1 damaged image\(s\): 'train-0006'"):
        summary = run_train_student(StudentConfig(
            store=str(store), data=world / "voc", out=tmp_path / "run", width=0.125, iters=2, batch_size=2,
            workers=0, rois_per_image=8, anchor_sizes=(16, 32), progress=False, skip_corrupt=True))
    [skipped] = summary["skipped_images"]
    assert skipped["store"] == str(store) and skipped["image_id"] == "train-0006"
    assert "shard 1 image 6 ('train-0006')" in skipped["problem"]


def test_damage_found_in_a_dataloader_worker_is_reported_without_its_traceback(world, store, tmp_path):
    flip_byte_of_image(store, shard=1, local=2, shard_size=SHARD)
    args = train_args(world, store, tmp_path / "run")
    args[args.index("--workers") + 1] = "1"
    text = assert_refused(cli(*args), 1, r"shard 1 image 6 \('train-0006'\): cannot be read")
    assert "DataLoader worker" not in text and "Original Traceback" not in text


def test_a_run_stopped_by_damage_finishes_with_skip_corrupt(world, store, tmp_path):
    """Nothing is lost: the stopped run keeps its checkpoint, and the same run folder accepts --skip-corrupt."""
    plant_nan(store, 5)
    args = train_args(world, store, tmp_path / "run", "--checkpoint-every", "1")
    assert_refused(cli(*args), 1, r"'train-0005'")
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    r = cli(*args, "--skip-corrupt")
    assert r.exit_code == 0, r.output
    assert "skipped 1 damaged image(s): 'train-0005'" in r.output and "at iteration 6" in r.output


# ---------------------------------------------------------------------------------------------- the manifest

EDITS = {
    # Valid JSON and valid fields: only the manifest's own checksum can tell.
    "channels": lambda d: d["features"].update(channels=52),
    "image-id": lambda d: d["dataset"]["image_ids"].__setitem__(6, "train-0099"),
    "classes-swapped": lambda d: d["teacher"].update(classes=["red", "blue"]),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_manifest_is_refused_by_verify_and_training(world, store, tmp_path, edit):
    edit_manifest(store, EDITS[edit])
    expected = [re.escape(str(store / "manifest.json")), r"field content_sha256",
                r"was edited after the store was written"]
    assert_refused(cli("verify-store", store), 1, *expected)
    for extra in ((), ("--skip-corrupt",)):  # nothing in such a store can be trusted
        assert_refused(cli(*train_args(world, store, tmp_path / "run", *extra)), 1, *expected)
        assert not (tmp_path / "run").exists()


def test_a_manifest_cut_short_is_refused(world, store, tmp_path):
    truncate(store / "manifest.json", 0.6)
    assert_refused(cli("verify-store", store), 1, r"manifest\.json: manifest is not valid JSON")
    assert_refused(cli(*train_args(world, store, tmp_path / "run")), 1, r"manifest\.json: manifest is not valid JSON")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit", ["preprocess", "channels"])
def test_an_edit_that_also_drops_the_checksum_is_refused(world, store, tmp_path, edit):
    """Every format-2 manifest carries its checksum: one without it was edited, whatever else it says."""
    change = {"preprocess": lambda d: d["preprocess"].update(min_size=48),
              "channels": lambda d: d["features"].update(channels=52)}[edit]
    edit_manifest(store, lambda d: (change(d), d.pop("content_sha256")))
    expected = [re.escape(str(store / "manifest.json")), r"field content_sha256: missing", r"was edited"]
    assert_refused(cli("verify-store", store), 1, *expected)
    assert_refused(cli("inspect-store", store), 1, *expected)
    for extra in ((), ("--skip-corrupt",)):
        assert_refused(cli(*train_args(world, store, tmp_path / "run", *extra)), 1, *expected)
        assert not (tmp_path / "run").exists()


def test_a_format_1_manifest_without_checksum_is_still_read(store):
    """Format 1 predates the rule (its first stores had no checksum): such a manifest still parses."""
    doc = json.loads((store / "manifest.json").read_text())
    doc.update(format_version=1)
    doc["proposals"].pop("dtype")
    doc.pop("content_sha256")
    assert Manifest.from_json(json.dumps(doc), source="old").format_version == 1
