"""Every decision before a student trains on stores, one table: open_for_training over real Zarr stores of tiny
teachers, each row a way the stores can disagree with the data or with each other, and the first mismatch named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mimicdet.data import load_dataset
from mimicdet.data.errors import StoreError
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from mimicdet.store import open_for_training
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("open")
    make_squares_voc(root / "voc", {"train": 8, "pool": 4, "test": 2})
    make_tiny_teacher(root / "a.pt", width=0.125, seed=0)
    make_tiny_teacher(root / "b.pt", width=0.25, seed=1)
    make_tiny_teacher(root / "c.pt", width=0.125, seed=2, size=48)  # another preprocessing
    common = dict(data=root / "voc", shard_size=4, proposals=24, loader_workers=0, progress=False)
    for name, teacher, split, flip in [("a-train", "a", "train", True), ("a-pool", "a", "pool", True),
                                       ("a-pool-noflip", "a", "pool", False), ("b-train", "b", "train", False),
                                       ("b-pool", "b", "pool", False), ("c-train", "c", "train", False),
                                       ("a-test", "a", "test", False)]:
        run_extract(ExtractConfig(teacher=root / f"{teacher}.pt", out=str(root / name), split=split, flip=flip,
                                  **common))
    shutil.copytree(root / "a-train", root / "a-train-incomplete")
    (root / "a-train-incomplete" / "_complete" / "shard-00001.json").unlink()
    shutil.copytree(root / "a-train", root / "a-train-damaged")
    chunk = next(p for p in sorted((root / "a-train-damaged" / "features").rglob("*")) if p.is_file()
                 and p.parent.name != "features" and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    return root


def _open(world: Path, stores, unlabelled=(), **kw):
    train = load_dataset(world / "voc", "train")
    pool = load_dataset(world / "voc", "pool") if unlabelled else None
    return open_for_training([str(world / s) for s in stores], train, unlabelled_stores=[str(world / u) for u in
                             unlabelled], unlabelled=pool, **kw)


REFUSED = {
    "store of another split": (dict(stores=["a-test"]), r"a-test: store was made from another dataset"),
    "incomplete store": (dict(stores=["a-train-incomplete"]), r"store is incomplete \(1/2 shards\)"),
    "damaged shard": (dict(stores=["a-train-damaged"]), r"a-train-damaged: .*shard 0"),
    "teachers over other preprocessing": (dict(stores=["a-train", "c-train"]),
                                          r"stores of several teachers must describe the same dataset and "
                                          r"preprocessing; .*c-train differs .* in preprocess"),
    "unlabelled store of another teacher": (dict(stores=["a-train"], unlabelled=["b-pool"]),
                                            r"b-pool: made by teacher \w+, but .*a-train by \w+; both stores must "
                                            r"come from the same teacher"),
    "unlabelled store without the labelled one's flips": (
        dict(stores=["a-train"], unlabelled=["a-pool-noflip"], flip=True),
        r"a-pool-noflip: has no flipped records but .*a-train does"),
    "student map off the teacher's grid": (dict(stores=["a-train"], student_stride=8),
                                           r"store features\.stride 16 != student stride 8 at input scale 1\.0 "
                                           r"\(scale mimic needs --scale-mimic\)"),
    "scale mimic on a full-size store": (dict(stores=["a-train"], student_stride=16, input_scale=0.5,
                                              scale_mimic=True),
                                         r"store features\.stride 16 != student stride 16 at input scale 0\.5$"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_naming_the_first_mismatch(world, case):
    kw, pattern = REFUSED[case]
    with pytest.raises(StoreError, match=pattern):
        _open(world, **kw)


def test_accepted_stores_give_what_training_reads(world):
    opened = _open(world, ["a-train", "b-train"], unlabelled=["a-pool", "b-pool"], subset=5, subset_seed=3,
                   student_stride=16)
    assert [r.url.rsplit("/", 1)[-1] for r in opened.readers] == ["a-train", "b-train"]
    assert [r.url.rsplit("/", 1)[-1] for r in opened.unlabelled_readers] == ["a-pool", "b-pool"]
    chosen = load_dataset(world / "voc", "train").seeded_subset(5, 3)
    assert [r.image_id for r in opened.labelled.records] == [r.image_id for r in chosen.records]
    assert len(opened.unlabelled) == 4 and not any(r.labelled for r in opened.unlabelled.records)
    assert opened.manifest.teacher_sha256 == opened.readers[0].manifest.teacher_sha256
    assert opened.preprocess.min_size == opened.manifest.preprocess["min_size"]
    assert opened.skipped == () and opened.flip is False


def test_flips_turned_off_with_a_warning_when_a_labelled_store_lacks_them(world):
    assert _open(world, ["a-train"], flip=True).flip is True
    with pytest.warns(UserWarning, match="b-train: store has no flipped teacher records; flips are turned off"):
        assert _open(world, ["a-train", "b-train"], flip=True).flip is False


def test_skip_corrupt_leaves_the_damaged_images_out(world):
    opened = _open(world, ["a-train-damaged"], skip_corrupt=True)
    assert opened.skipped and all(s.store.endswith("a-train-damaged") for s in opened.skipped)
    assert len(opened.labelled) == 8 - len(opened.skipped)
