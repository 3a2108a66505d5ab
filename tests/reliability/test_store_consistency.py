"""What `inspect-store` reports is what the store holds (a shard counts as complete only with its marker and every
object; the images each shard really holds), and `verify-store --data` and `train-student` judge a dataset by the
one rule of mimicdet.store.check_dataset: the digest of image ids and sizes decides, not the folder's name."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mimicdet.data import load_dataset
from mimicdet.store import check_dataset, inspect_store, open_store
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from tests.reliability.helpers import STUDENT, assert_refused, cli, shard_object


def _extract(world: Path, out: Path, **options) -> Path:
    run_extract(ExtractConfig(teacher=world / "teacher.pt", data=world / "voc", split="train", out=str(out),
                              proposals=24, loader_workers=0, progress=False, **options))
    return out


def _train(world: Path, data: Path, out: Path):
    return cli("train-student", "--store", world / "store", "--data", data, "--out", out, "--iters", "1", *STUDENT)


# ---------------------------------------------------------------------------------------------- inspect-store


def test_inspect_counts_a_shard_without_its_object_as_incomplete(store):
    shard_object(store, "features", 1).unlink()  # the marker stays: only a listing shows the shard is gone
    info = inspect_store(store)
    assert info["completion"] == {"done": 1, "total": 2, "pending": [1]}
    assert info["missing_objects"] == {1: ["features/c/1/0/0/0"]}
    assert info["images_done"] == 4
    r = cli("inspect-store", store)
    assert r.exit_code == 0, r.output
    assert "1/2 complete" in r.output and "pending [1]" in r.output, r.output
    assert "shard 1: has its completion marker but lacks features/c/1/0/0/0" in r.output, r.output
    assert "4/4" not in r.output and "2/2" not in r.output


def test_inspect_reports_the_images_each_shard_holds(world, tmp_path):
    r = cli("inspect-store", world / "store")  # 8 images in shards of 4
    assert r.exit_code == 0, r.output
    assert "2/2 complete (2 shards of 4 images)" in r.output, r.output
    assert inspect_store(world / "store")["shard_images"] == [4, 4]
    big = _extract(world, tmp_path / "big", shard_size=64)  # the shard size exceeds the image count
    r = cli("inspect-store", big)
    assert r.exit_code == 0, r.output
    assert "1/1 complete (1 shard of 8 images)" in r.output and "64 images" not in r.output, r.output


def test_inspect_hdf5_uneven_shards_and_a_missing_shard_file(world, tmp_path):
    store = _extract(world, tmp_path / "h5", shard_size=3, backend="hdf5")  # 3 + 3 + 2 images
    r = cli("inspect-store", store)
    assert r.exit_code == 0, r.output
    assert "3/3 complete (3 shards: 3 + 3 + 2 images)" in r.output, r.output
    (store / "shards" / "shard-00002.h5").unlink()
    info = inspect_store(store)
    assert info["completion"] == {"done": 2, "total": 3, "pending": [2]}
    assert info["missing_objects"] == {2: ["shards/shard-00002.h5"]}
    r = cli("inspect-store", store)
    assert "2/3 complete" in r.output, r.output
    assert "shard 2: has its completion marker but lacks shards/shard-00002.h5" in r.output, r.output


# ---------------------------------------------------------------------------------------------- the dataset rule


def test_a_renamed_dataset_folder_is_accepted_by_verify_and_train(world, tmp_path):
    renamed = Path(shutil.copytree(world / "voc", tmp_path / "voc-renamed"))
    r = cli("verify-store", world / "store", "--data", renamed, "--split", "train")
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "note: store dataset.name 'voc' != dataset 'voc-renamed'" in r.output, r.output
    r = _train(world, renamed, tmp_path / "run")
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    assert (tmp_path / "run" / "model.pt").is_file()


def test_an_image_of_another_size_is_refused_by_verify_and_train_alike(world, tmp_path):
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))  # the same folder name: only a size differs
    image = data / "JPEGImages" / "train-0003.png"
    pixels = np.asarray(Image.open(image))
    Image.fromarray(np.concatenate([pixels, pixels[:, :8]], axis=1)).save(image)  # 64x64 -> 72x64, boxes still fit
    xml = data / "Annotations" / "train-0003.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>72</width>"))
    want = load_dataset(data, "train").digest()
    problem = f"store dataset.digest {open_store(world / 'store').manifest.dataset_digest!r} != dataset {want!r}"
    verify = assert_refused(cli("verify-store", world / "store", "--data", data, "--split", "train"), 1, "FAILED")
    assert f"error: {problem}" in verify and "note:" not in verify
    train = assert_refused(_train(world, data, tmp_path / "run"), 1, re.escape(f"{world / 'store'}: "))
    assert problem in train
    assert not (tmp_path / "run").exists()


def test_check_dataset_accepts_part_of_the_store_by_id(world):
    manifest = open_store(world / "store").manifest
    dataset = load_dataset(world / "voc", "train")
    assert check_dataset(manifest, dataset) == ([], [])
    problems, notes = check_dataset(manifest, dataset.subset(range(6)))
    assert problems == [] and notes == [
        "dataset voc/train holds 6 of the store's 8 images: checked by image id only (the store's dataset.digest "
        "covers all of them)"
    ]
    reordered = dataset.subset(list(range(8))[::-1])  # another order of the same images: the same digest in store order
    assert check_dataset(manifest, reordered) == ([], [])


def test_a_store_of_other_images_names_what_is_missing(world):
    problems, _ = check_dataset(open_store(world / "store").manifest, load_dataset(world / "voc", "pool"))
    assert problems[0] == "store has no record for 6 of 6 images of voc/pool (first: 'pool-0000')"
