import warnings

import numpy as np
import pytest

from mimicdet.data import load_dataset
from mimicdet.data.images import load_image
from mimicdet.data.validate import DataWarning
from mimicdet.data.voc import read_voc
from tests.voc_fixtures import RACCOON, annotation_xml, make_voc, obj_xml, write_annotation, write_image


@pytest.fixture(scope="module")
def raccoon():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real dataset is clean: any repair warning would be a bug
        return {s: read_voc(RACCOON, s) for s in ("train", "test")}


def test_raccoon_counts(raccoon):
    train, test = raccoon["train"], raccoon["test"]
    assert (len(train), len(test)) == (160, 40)
    assert sum(len(r.boxes) for r in train.records) == 173
    assert sum(len(r.boxes) for r in test.records) == 44
    assert train.classes == test.classes == ("raccoon",)
    assert train.num_classes == 2
    assert not any(r.ignore.any() for r in train.records + test.records)
    assert {r.image_id for r in train.records}.isdisjoint(r.image_id for r in test.records)


def test_raccoon_ids_follow_split_file_order(raccoon):
    ids = (RACCOON / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert [r.image_id for r in raccoon["train"].records] == ids


def test_raccoon_coordinates_are_zero_based_edges(raccoon):
    rec = next(r for r in raccoon["train"].records + raccoon["test"].records if r.image_id == "raccoon-1")
    # raccoon-1.xml: xmin 81, ymin 88, xmax 522, ymax 408 (1-based inclusive pixels), image 650x417
    np.testing.assert_array_equal(rec.boxes, np.array([[80, 87, 522, 408]], np.float32))
    assert (rec.width, rec.height) == (650, 417)
    assert rec.path.name == "raccoon-1.jpg" and rec.path.parent.name == "JPEGImages"  # <path> is ignored
    assert rec.labels.tolist() == [1]


def test_raccoon_grayscale_images_load_as_rgb(raccoon):
    recs = {r.image_id: r for r in raccoon["train"].records + raccoon["test"].records}
    for image_id in ("raccoon-150", "raccoon-152", "raccoon-161"):
        img = load_image(recs[image_id].path)
        assert img.dtype == np.uint8 and img.shape == (recs[image_id].height, recs[image_id].width, 3)
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_load_dataset_detects_voc():
    ds = load_dataset(RACCOON, "test")
    assert (ds.name, ds.split, len(ds)) == ("raccoon", "test", 40)


def test_classes_come_from_all_splits_sorted(tmp_path):
    make_voc(
        tmp_path,
        {"a": [obj_xml("dog", (1, 1, 10, 10))], "b": [obj_xml("cat", (2, 2, 20, 20)), obj_xml("ant", (1, 1, 5, 5))]},
        {"train": ["a"], "test": ["b"]},
    )
    train, test = read_voc(tmp_path, "train"), read_voc(tmp_path, "test")
    assert train.classes == test.classes == ("ant", "cat", "dog")
    assert train.records[0].labels.tolist() == [3]
    assert test.records[0].labels.tolist() == [2, 1]


def test_given_classes_fix_the_labels(tmp_path):
    make_voc(tmp_path, {"a": [obj_xml("dog", (1, 1, 10, 10))]}, {"train": ["a"]})
    ds = read_voc(tmp_path, "train", classes=["cat", "dog"])
    assert ds.classes == ("cat", "dog") and ds.records[0].labels.tolist() == [2]


def test_difficult_objects_are_ignore_boxes(tmp_path):
    make_voc(tmp_path, {"a": [obj_xml("dog", (1, 1, 10, 10)), obj_xml("dog", (3, 3, 9, 9), 1)]}, {"train": ["a"]})
    rec = read_voc(tmp_path, "train").records[0]
    assert rec.ignore.tolist() == [False, True]
    np.testing.assert_array_equal(rec.boxes[1], [2, 2, 9, 9])


def test_missing_size_is_read_from_the_image(tmp_path):
    write_image(tmp_path / "JPEGImages" / "a.jpg", 40, 30)
    write_annotation(tmp_path, "a", annotation_xml("a.jpg", None, None, [obj_xml("dog", (1, 1, 10, 10))]))
    write_image(tmp_path / "JPEGImages" / "b.jpg", 20, 10)
    write_annotation(tmp_path, "b", annotation_xml("b.jpg", 0, 0, []))
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = read_voc(tmp_path, "train")
    assert [(r.width, r.height) for r in ds.records] == [(40, 30), (20, 10)]


def test_size_disagreeing_with_the_image_trusts_the_image(tmp_path):
    write_image(tmp_path / "JPEGImages" / "a.jpg", 40, 30)
    write_annotation(tmp_path, "a", annotation_xml("a.jpg", 400, 300, [obj_xml("dog", (1, 1, 10, 10))]))
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    with pytest.warns(DataWarning, match=r"a\.xml: <size> says 400x300 but a\.jpg is 40x30"):
        ds = read_voc(tmp_path, "train")
    assert (ds.records[0].width, ds.records[0].height) == (40, 30)
