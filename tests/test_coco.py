import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from mimicdet.data import load_dataset
from mimicdet.data.coco import read_coco
from tests.voc_fixtures import write_image


def coco_doc() -> dict:
    return {
        "images": [
            {"id": 7, "file_name": "b.jpg", "width": 40, "height": 30},
            {"id": 3, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 9, "file_name": "sub/c.png", "width": 0, "height": 0},  # size from the image header
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 5, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 18, "bbox": [1.5, 2.0, 10.0, 5.0], "iscrowd": 0, "area": 50},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [0, 0, 20, 30], "iscrowd": 1, "area": 600},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [10, 10, 5, 5], "iscrowd": 0, "area": 25},
        ],
    }


@pytest.fixture
def coco_root(tmp_path):
    write_image(tmp_path / "val2017" / "a.jpg", 40, 30)
    write_image(tmp_path / "val2017" / "b.jpg", 40, 30)
    write_image(tmp_path / "val2017" / "sub" / "c.png", 12, 8)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco_doc()))
    return tmp_path


def test_categories_map_to_contiguous_labels_in_id_order(coco_root):
    ds = read_coco(coco_root / "annotations" / "instances_val2017.json", coco_root / "val2017", split="val")
    assert ds.classes == ("person", "bus", "dog")  # ids 1, 5, 18
    assert [r.image_id for r in ds.records] == ["3", "7", "9"]  # by image id
    a, b, c = ds.records
    np.testing.assert_array_equal(a.boxes, [[1.5, 2.0, 11.5, 7.0], [0, 0, 20, 30]])  # xywh -> x1y1x2y2
    assert a.labels.tolist() == [3, 1] and a.ignore.tolist() == [False, True]  # iscrowd -> ignore
    assert b.labels.tolist() == [2]
    assert len(c.boxes) == 0 and (c.width, c.height) == (12, 8) and c.labelled  # kept, size from the header


def test_agrees_with_pycocotools(coco_root):
    path = coco_root / "annotations" / "instances_val2017.json"
    ds = read_coco(path, coco_root / "val2017", split="val")
    api = COCO(str(path))
    for rec in ds.records:
        anns = api.loadAnns(api.getAnnIds(imgIds=[int(rec.image_id)]))
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(rec.boxes[:, :2], xywh[:, :2])
        np.testing.assert_allclose(rec.boxes[:, 2:] - rec.boxes[:, :2], xywh[:, 2:])
        names = [api.loadCats(a["category_id"])[0]["name"] for a in anns]
        assert [ds.classes[k - 1] for k in rec.labels] == names


def test_load_dataset_finds_annotations_and_image_folder(coco_root):
    ds = load_dataset(coco_root, "val2017")
    assert (ds.name, len(ds)) == (coco_root.name, 3)
    assert ds.records[0].path == coco_root / "val2017" / "a.jpg"
    ds2 = load_dataset(coco_root / "annotations" / "instances_val2017.json", "val")
    assert ds2.digest() == ds.digest()


def test_file_without_annotations_gives_unlabelled_records(tmp_path):
    write_image(tmp_path / "a.jpg", 8, 8)
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "test.json").write_text(json.dumps(doc))
    ds = read_coco(tmp_path / "test.json", tmp_path, split="test")
    assert not ds.records[0].labelled
