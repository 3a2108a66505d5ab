"""Read a dataset in Pascal VOC layout: ``JPEGImages/``, ``Annotations/<id>.xml``, ``ImageSets/Main/<split>.txt``.

Coordinates: VOC stores 1-based inclusive pixel indices; pixel ``i`` (1-based) covers the continuous interval
``[i - 1, i)``, so a box from pixel ``xmin`` to pixel ``xmax`` becomes ``x1 = xmin - 1, x2 = xmax`` (likewise for
y), the 0-based continuous-edge convention of ``data/records.py`` (and the inverse of ``data/voc_writer.py``).

- The image is ``JPEGImages/<filename>`` (``<path>`` is ignored: annotation tools write foreign absolute paths
  there). A ``<filename>`` that leaves ``JPEGImages/`` (absolute, or with ``..``) is a DataError; a missing
  ``<filename>`` means ``<id>.jpg``.
- Width and height come from ``<size>``, read from the image header when missing or 0. Every image header is
  read; when ``<size>`` disagrees with the image, the image wins and a :class:`DataWarning` says so.
- ``difficult`` objects are kept with ``ignore = True``.
- Classes: the ones given (an object of another class is a DataError), or the sorted set of names found in the
  annotations of every split listed in ``ImageSets/Main/*.txt``, so that train and test get the same labels.
- Boxes go through :class:`data.validate.BoxChecker` (clip with a warning, drop empty ones with a warning).
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mimicdet.data.errors import DataError
from mimicdet.data.images import image_inside, image_size
from mimicdet.data.records import Dataset, ImageRecord
from mimicdet.data.validate import BoxChecker, DataWarning


@dataclass(frozen=True)
class _Object:
    name: str
    box: tuple[float, float, float, float]  # x1y1x2y2, 0-based continuous
    difficult: bool


@dataclass(frozen=True)
class _Annotation:
    xml: Path
    filename: str
    width: int  # 0 when <size> is missing
    height: int
    objects: tuple[_Object, ...]


def _number(parent: ET.Element, tag: str, where: str) -> float:
    text = parent.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{where}: missing <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> must be a number, got {text.strip()!r}") from None


def _parse(xml: Path, image_id: str) -> _Annotation:
    try:
        tree = ET.parse(xml)
    except FileNotFoundError:
        raise DataError(f"{xml}: annotation file not found") from None
    except ET.ParseError as e:
        raise DataError(f"{xml}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{xml}: cannot read annotation ({e.strerror or e})") from None
    root = tree.getroot()
    if root.tag != "annotation":
        raise DataError(f"{xml}: root element must be <annotation>, got <{root.tag}>")
    filename = (root.findtext("filename") or "").strip() or f"{image_id}.jpg"
    width = height = 0
    size = root.find("size")
    if size is not None and size.findtext("width") is not None:
        width = int(_number(size, "width", f"{xml}: <size>"))
        height = int(_number(size, "height", f"{xml}: <size>"))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"{xml}: object {k}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{where}: missing <name>")
        difficult_text = (obj.findtext("difficult") or "0").strip()
        if difficult_text not in ("0", "1"):
            raise DataError(f"{where}: <difficult> must be 0 or 1, got {difficult_text!r}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bndbox, t, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(_Object(name, (xmin - 1.0, ymin - 1.0, xmax, ymax), difficult_text == "1"))
    return _Annotation(xml, filename, width, height, tuple(objects))


def _split_ids(path: Path) -> list[str]:
    """Image ids of a split file, in order; the first token of each non-empty line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split file ({e})") from None
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        image_id = tokens[0]
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            raise DataError(f"{path}: line {n}: image id {image_id!r} must be a plain file stem")
        if image_id in first_line:
            raise DataError(f"{path}: line {n}: duplicate image id {image_id!r} (first on line {first_line[image_id]})")
        first_line[image_id] = n
        ids.append(image_id)
    return ids


def _image_path(root: Path, ann: _Annotation) -> Path:
    return image_inside(root / "JPEGImages", ann.filename, f"{ann.xml}: <filename>")


def check_voc_layout(root: Path) -> None:
    """DataError naming what is missing when ``root`` is not a VOC dataset."""
    missing = [d for d in ("JPEGImages", "Annotations", "ImageSets/Main") if not (root / d).is_dir()]
    if missing:
        raise DataError(f"{root}: not a VOC dataset, missing folder(s) {', '.join(d + '/' for d in missing)}")


def voc_splits(root: Path) -> list[str]:
    """Names of the split files under ``ImageSets/Main``, sorted."""
    return sorted(p.stem for p in (Path(root) / "ImageSets" / "Main").glob("*.txt"))


def _discover_classes(root: Path, parsed: dict[str, _Annotation]) -> tuple[str, ...]:
    names: set[str] = set()
    seen: set[str] = set()
    for split in voc_splits(root):
        for image_id in _split_ids(root / "ImageSets" / "Main" / f"{split}.txt"):
            if image_id in seen:
                continue
            seen.add(image_id)
            ann = parsed.get(image_id) or _parse(root / "Annotations" / f"{image_id}.xml", image_id)
            names.update(o.name for o in ann.objects)
    return tuple(sorted(names))


def _class_tuple(classes, source: str) -> tuple[str, ...]:
    out = tuple(str(c) for c in classes)
    if not out or len(set(out)) != len(out) or any(not c for c in out):
        raise DataError(f"{source}: classes must be non-empty, unique names, got {list(out)}")
    return out


def read_voc(root: Path | str, split: str, *, classes=None) -> Dataset:
    """The ``split`` of the VOC dataset at ``root`` (see the module docstring for the conventions)."""
    root = Path(root)
    check_voc_layout(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"{split_file}: split file not found (splits here: {', '.join(voc_splits(root)) or 'none'})")
    ids = _split_ids(split_file)
    if not ids:
        raise DataError(f"{split_file}: split file lists no image ids")
    parsed = {i: _parse(root / "Annotations" / f"{i}.xml", i) for i in ids}
    classes = _discover_classes(root, parsed) if classes is None else _class_tuple(classes, str(root))
    label_of = {c: k + 1 for k, c in enumerate(classes)}
    checker = BoxChecker(f"{root} ({split})")
    records = []
    for image_id in ids:
        ann = parsed[image_id]
        path = _image_path(root, ann)
        width, height = image_size(path)
        if ann.width and (ann.width, ann.height) != (width, height):
            warnings.warn(
                f"{ann.xml}: <size> says {ann.width}x{ann.height} but {path.name} is {width}x{height}; using the image",
                DataWarning,
                stacklevel=2,
            )
        for k, o in enumerate(ann.objects):
            if o.name not in label_of:
                raise DataError(f"{ann.xml}: object {k}: class {o.name!r} is not one of {list(classes)}")
        raw = np.array([o.box for o in ann.objects], np.float64).reshape(-1, 4)
        boxes, keep = checker.check(raw, width, height, source=str(ann.xml))
        objects = [o for o, kept in zip(ann.objects, keep) if kept]
        records.append(
            ImageRecord(
                image_id=image_id,
                path=path,
                width=width,
                height=height,
                boxes=boxes,
                labels=np.array([label_of[o.name] for o in objects], np.int64),
                ignore=np.array([o.difficult for o in objects], bool),
            )
        )
    checker.finish()
    return Dataset(name=root.resolve().name, split=split, classes=classes, records=tuple(records), root=root)
