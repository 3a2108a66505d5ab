"""Read a COCO-style detection annotation file (``instances_*.json``) and its image folder.

- Categories are sorted by category id and mapped to contiguous labels 1..K (0 is background);
  ``classes`` are their names in that order.
- ``bbox`` ``[x, y, w, h]`` (continuous pixel edges, 0-based) becomes ``[x, y, x + w, y + h]``.
- ``iscrowd: 1`` (or ``ignore: 1``) annotations are kept with ``ignore = True``.
- Images without annotations are kept (empty boxes); a file with no ``annotations`` key at all (COCO test
  image-info files) gives records with ``labelled = False``.
- Images are ordered by image id; ``image_id`` is ``str(id)`` (``int(record.image_id)`` gives COCO's id back).
- Width/height come from the JSON (read from the image header when missing or 0); image headers are not read
  otherwise, to keep large files fast, but every image must exist.
- Boxes go through :class:`data.validate.BoxChecker`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mimicdet.data.errors import DataError
from mimicdet.data.images import image_inside, image_size
from mimicdet.data.records import Dataset, ImageRecord
from mimicdet.data.validate import BoxChecker


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read annotation file ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(doc).__name__}")
    for key in ("images", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{path}: field {key!r} must be a list, got {type(doc.get(key)).__name__}")
    if "annotations" in doc and not isinstance(doc["annotations"], list):
        raise DataError(f"{path}: field 'annotations' must be a list, got {type(doc['annotations']).__name__}")
    return doc


def _field(entry, key: str, types, where: str):
    if not isinstance(entry, dict):
        raise DataError(f"{where}: must be a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{where}: field {key!r} has the wrong type {type(value).__name__}: {value!r}")
    return value


def _categories(doc: dict, src: Path, classes) -> tuple[list[int], tuple[str, ...]]:
    """Category ids and names in id order, checked unique (and equal to ``classes`` when given)."""
    cats = []
    for k, c in enumerate(doc["categories"]):
        where = f"{src}: categories[{k}]"
        cats.append((_field(c, "id", int, where), _field(c, "name", str, where)))
    cats.sort()
    ids = [i for i, _ in cats]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{src}: duplicate category id {dup}")
    names = tuple(n for _, n in cats)
    if len(set(names)) != len(names):
        raise DataError(f"{src}: category names must be unique, got {list(names)}")
    if classes is not None and tuple(classes) != names:
        raise DataError(
            f"{src}: categories (in id order) are {list(names)}, but classes {list(classes)} were asked for"
        )
    return ids, names


def read_coco(
    annotation_json: Path | str, image_root: Path | str, *, split: str, classes=None, name: str | None = None
) -> Dataset:
    """The images and boxes of a COCO annotation file (see the module docstring for the conventions).

    ``classes``, when given, must equal the category names in category-id order (a check, not a selection).
    """
    src = Path(annotation_json)
    image_root = Path(image_root)
    doc = _load(src)
    ids, names = _categories(doc, src, classes)
    label_of = {cid: k + 1 for k, cid in enumerate(ids)}

    images: dict = {}
    id_texts: set[str] = set()  # records carry str(id), so 5 and "5" would collide
    for k, im in enumerate(doc["images"]):
        where = f"{src}: images[{k}]"
        image_id = _field(im, "id", (int, str), where)
        if str(image_id) in id_texts:
            raise DataError(f"{where}: duplicate image id {image_id!r}")
        id_texts.add(str(image_id))
        images[image_id] = im

    labelled = "annotations" in doc
    per_image: dict = {i: [] for i in images}
    for k, a in enumerate(doc.get("annotations", [])):
        where = f"{src}: annotations[{k}]"
        image_id = _field(a, "image_id", (int, str), where)
        cat = _field(a, "category_id", int, where)
        bbox = _field(a, "bbox", list, where)
        if image_id not in per_image:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        if cat not in label_of:
            raise DataError(f"{where}: category_id {cat} is not in 'categories' (ids {ids})")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        crowd = bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0))
        per_image[image_id].append((bbox, label_of[cat], crowd))

    checker = BoxChecker(f"{src} ({split})")
    records = []
    order = sorted(images, key=lambda i: (0, i, "") if isinstance(i, int) else (1, 0, i))
    for image_id in order:
        im = images[image_id]
        where = f"{src}: image {image_id!r}"
        path = image_inside(image_root, _field(im, "file_name", str, where), f"{where}: file_name")
        width, height = (_field(im, k, int, where) if im.get(k) else 0 for k in ("width", "height"))
        if width <= 0 or height <= 0:
            width, height = image_size(path)
        anns = per_image[image_id]
        xywh = np.array([b for b, _, _ in anns], np.float64).reshape(-1, 4)
        raw = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes, keep = checker.check(raw, width, height, source=f"{where} ({path.name})")
        records.append(
            ImageRecord(
                image_id=str(image_id),
                path=path,
                width=width,
                height=height,
                boxes=boxes,
                labels=np.array([lab for _, lab, _ in anns], np.int64)[keep],
                ignore=np.array([c for _, _, c in anns], bool)[keep],
                labelled=labelled,
            )
        )
    checker.finish()
    return Dataset(name=name or src.stem, split=split, classes=names, records=tuple(records), root=image_root)
