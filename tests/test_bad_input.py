"""Bad input, one test each: every case gets its documented repair or a DataError naming the file and field."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from mimicdet.data import load_dataset
from mimicdet.data.caltech import read_caltech
from mimicdet.data.coco import read_coco
from mimicdet.data.errors import DataError
from mimicdet.data.folder import read_image_folder
from mimicdet.data.images import image_size, load_image
from mimicdet.data.validate import DataWarning
from mimicdet.data.voc import read_voc
from tests import caltech_fixtures as cf
from tests.voc_fixtures import annotation_xml, make_voc, obj_xml, write_annotation, write_image, write_split

DOG = obj_xml("dog", (1, 1, 10, 10))


def one_image_voc(root, objects, *, filename="a.jpg", width=40, height=30):
    write_image(root / "JPEGImages" / "a.jpg", 40, 30)
    write_annotation(root, "a", annotation_xml(filename, width, height, objects))
    write_split(root, "train", ["a"])
    return root


def test_missing_image(tmp_path):
    one_image_voc(tmp_path, [DOG])
    (tmp_path / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"a\.xml: <filename> 'a\.jpg': image .*a\.jpg not found"):
        read_voc(tmp_path, "train")
    with pytest.raises(DataError, match=r"a\.jpg: image file not found"):
        load_image(tmp_path / "JPEGImages" / "a.jpg")


def test_unreadable_image(tmp_path):
    one_image_voc(tmp_path, [DOG])
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"a\.jpg: cannot read image header"):
        read_voc(tmp_path, "train")
    with pytest.raises(DataError, match=r"a\.jpg: cannot decode image"):
        load_image(tmp_path / "JPEGImages" / "a.jpg")


def test_truncated_image(tmp_path):
    path = write_image(tmp_path / "a.jpg", 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # the header survived; the pixels did not
    with pytest.raises(DataError, match=r"a\.jpg: cannot decode image \(image file is truncated"):
        load_image(path)


def test_malformed_xml(tmp_path):
    one_image_voc(tmp_path, [DOG])
    write_annotation(tmp_path, "a", "<annotation><filename>a.jpg</filename><object>")
    with pytest.raises(DataError, match=r"a\.xml: malformed XML \(.*line 1"):
        read_voc(tmp_path, "train")


def test_non_numeric_coordinate(tmp_path):
    one_image_voc(tmp_path, [obj_xml("dog", (1, 1, "ten", 10))])
    with pytest.raises(DataError, match=r"a\.xml: object 0 <bndbox>: <xmax> must be a number, got 'ten'"):
        read_voc(tmp_path, "train")


def test_malformed_coco_json(tmp_path):
    (tmp_path / "instances.json").write_text('{"images": [}')
    with pytest.raises(DataError, match=r"instances\.json: malformed JSON at line 1 column 13"):
        read_coco(tmp_path / "instances.json", tmp_path, split="val")


def test_coco_missing_field(tmp_path):
    write_image(tmp_path / "a.jpg", 8, 8)
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"c\.json: annotations\[0\]: missing field 'bbox'"):
        read_coco(tmp_path / "c.json", tmp_path, split="val")


def test_malformed_caltech_json(tmp_path):
    cf.make_converted(tmp_path)
    (tmp_path / "annotations.json").write_text("{")
    with pytest.raises(DataError, match=r"annotations\.json: malformed JSON"):
        read_caltech(tmp_path, split="train", every=3)


def test_damaged_caltech_files(tmp_path):
    cf.make_original(tmp_path)
    (tmp_path / "annotations" / "set00" / "V000.vbb").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"V000\.vbb: cannot read \.vbb annotation"):
        read_caltech(tmp_path, split="train", every=3)
    seq = tmp_path / "set06" / "V000.seq"
    seq.write_bytes(seq.read_bytes()[:-2000])  # cut into the last frames
    with pytest.raises(DataError, match=r"V000\.seq: frame \d of 6 not found at byte \d+ \(truncated"):
        load_image(f"{seq}#5")
    seq.write_bytes(b"\0" * 2000)
    with pytest.raises(DataError, match=r"V000\.seq: not a Norpix \.seq file"):
        load_image(f"{seq}#0")


def test_unknown_class_when_classes_given(tmp_path):
    one_image_voc(tmp_path, [DOG, obj_xml("cat", (2, 2, 5, 5))])
    with pytest.raises(DataError, match=r"a\.xml: object 1: class 'cat' is not one of \['dog'\]"):
        read_voc(tmp_path, "train", classes=["dog"])


def test_boxes_outside_the_image_are_clipped_with_a_warning(tmp_path):
    # 40x30 image; box 1 sticks out right and bottom, box 2 lies entirely outside, box 3 by half a pixel.
    objs = [DOG, obj_xml("dog", (30, 20, 55, 45)), obj_xml("dog", (50, 1, 60, 10)), obj_xml("dog", (1, 1, 40.5, 30))]
    one_image_voc(tmp_path, objs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = read_voc(tmp_path, "train").records[0]
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("a.xml: box 1 extends outside the 40x30 image; clipped" in m for m in messages), messages
    assert any("a.xml: box 2 entirely outside the 40x30 image; dropped" in m for m in messages), messages
    assert len(messages) == 2  # the half-pixel overshoot is clipped silently
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 10, 10], [29, 19, 40, 30], [0, 0, 40, 30]])
    assert len(rec.labels) == len(rec.ignore) == 3


def test_inverted_and_zero_size_boxes_are_dropped_with_a_warning(tmp_path):
    one_image_voc(tmp_path, [obj_xml("dog", (10, 1, 5, 10)), DOG, obj_xml("dog", (3, 4, 9, 3))])
    with pytest.warns(DataWarning, match=r"a\.xml: box 0, 2 inverted or zero-size .*; dropped"):
        rec = read_voc(tmp_path, "train").records[0]
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 10, 10]])
    assert rec.labels.tolist() == [1]


def test_many_repaired_files_are_summed_up(tmp_path):
    ann = {f"i{k}": [obj_xml("dog", (1, 1, 80, 10))] for k in range(13)}
    make_voc(tmp_path, ann, {"train": list(ann)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_voc(tmp_path, "train")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 11 and "3 more files had boxes clipped or dropped" in messages[-1]


def test_duplicate_ids(tmp_path):
    make_voc(tmp_path, {"a": [DOG], "b": []}, {"train": ["a", "b", "a"]})
    with pytest.raises(DataError, match=r"train\.txt: line 3: duplicate image id 'a' \(first on line 1\)"):
        read_voc(tmp_path, "train")
    write_image(tmp_path / "x.jpg", 8, 8)
    doc = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 1, "file_name": "x.jpg"}], "categories": []}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"c\.json: images\[1\]: duplicate image id 1"):
        read_coco(tmp_path / "c.json", tmp_path, split="val")


def test_images_without_objects_are_kept(tmp_path):
    make_voc(tmp_path, {"a": [], "b": [DOG]}, {"train": ["a", "b"]})
    ds = read_voc(tmp_path, "train")
    assert [len(r.boxes) for r in ds.records] == [0, 1]
    assert ds.records[0].labels.dtype == np.int64 and ds.records[0].boxes.shape == (0, 4)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_grayscale_rgba_palette_and_16bit_images_are_converted(tmp_path, mode):
    path = write_image(tmp_path / "a.png", 6, 5, mode=mode)
    img = load_image(path)
    assert img.dtype == np.uint8 and img.shape == (5, 6, 3)
    src = Image.open(path)
    if mode == "RGBA":
        np.testing.assert_array_equal(img, np.asarray(src)[..., :3])  # alpha dropped, colour kept
    if mode == "L":
        np.testing.assert_array_equal(img, np.repeat(np.asarray(src)[..., None], 3, axis=2))


def test_16bit_values_map_to_8bit(tmp_path):
    values = np.array([[0, 257, 257 * 100, 65535, 128]], np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img[0, :, 0].tolist() == [0, 1, 100, 255, 0]


def test_missing_split_file(tmp_path):
    make_voc(tmp_path, {"a": [DOG]}, {"train": ["a"], "val": ["a"]})
    with pytest.raises(DataError, match=r"test\.txt: split file not found \(splits here: train, val\)"):
        read_voc(tmp_path, "test")


@pytest.mark.parametrize("filename", ["../../etc/passwd", "/etc/passwd", "sub/../../a.jpg"])
def test_filename_escaping_the_dataset_root(tmp_path, filename):
    one_image_voc(tmp_path, [DOG], filename=filename)
    with pytest.raises(DataError, match=r"a\.xml: <filename> .* must name a file inside .*JPEGImages"):
        read_voc(tmp_path, "train")
    doc = {"images": [{"id": 1, "file_name": filename}], "categories": []}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"c\.json: image 1: file_name .* must name a file inside"):
        read_coco(tmp_path / "c.json", tmp_path / "JPEGImages", split="val")


def test_unrecognised_root_names_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    layouts = r"cannot recognise the dataset layout; looked for VOC .*COCO .*Caltech .*folder"
    with pytest.raises(DataError, match=layouts):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="dataset root does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match=r"option\(s\) every do not apply to voc"):
        load_dataset(make_voc(tmp_path / "v", {"a": []}, {"train": ["a"]}), every=3)


def test_folder_of_images_with_a_broken_file(tmp_path):
    write_image(tmp_path / "b.png", 8, 6)
    write_image(tmp_path / "sub" / "a.jpg", 4, 4)
    ds = read_image_folder(tmp_path)
    assert [r.image_id for r in ds.records] == ["b.png", "sub/a.jpg"] and not any(r.labelled for r in ds.records)
    assert load_dataset(tmp_path).digest() == ds.digest()
    (tmp_path / "c.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"c\.jpg: cannot read image header"):
        read_image_folder(tmp_path)
