"""Write a dataset in Pascal VOC layout: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt``.

Boxes come in as x1y1x2y2 in 0-based pixels with exclusive right/bottom edges (the convention of
``data/records.py``); the XML holds VOC's 1-based inclusive pixel indices, so ``xmin = x1 + 1`` and
``xmax = x2``. Output bytes depend only on the arguments (fixed element order, fixed indentation), so equal
inputs give byte-identical files.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2: 0-based pixels, x2/y2 exclusive
    difficult: bool = False
    truncated: bool = False
    occluded: bool = False
    # Extra per-object fields written as child elements, e.g. {"instance": "mnist:123"}; VOC readers skip them.
    extras: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VocExtra:
    """A non-object element, e.g. a distractor that was pasted but is not a target (tag ``distractor``)."""

    tag: str
    fields: Mapping[str, str]
    box: tuple[int, int, int, int] | None = None


def _text(parent: ET.Element, tag: str, value: object) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = str(value)
    return el


def _bndbox(parent: ET.Element, box: Sequence[int], width: int, height: int, what: str) -> None:
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"{what}: box {tuple(box)} must satisfy 0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}")
    bb = ET.SubElement(parent, "bndbox")
    _text(bb, "xmin", x1 + 1)
    _text(bb, "ymin", y1 + 1)
    _text(bb, "xmax", x2)
    _text(bb, "ymax", y2)


def annotation_xml(
    *,
    filename: str,
    width: int,
    height: int,
    objects: Iterable[VocObject],
    source: Mapping[str, str] | None = None,
    extras: Iterable[VocExtra] = (),
    folder: str = "JPEGImages",
    depth: int = 3,
) -> bytes:
    """The XML bytes of one VOC annotation file."""
    root = ET.Element("annotation")
    _text(root, "folder", folder)
    _text(root, "filename", filename)
    src = ET.SubElement(root, "source")
    for k, v in (source or {"database": "Unknown"}).items():
        _text(src, k, v)
    size = ET.SubElement(root, "size")
    _text(size, "width", width)
    _text(size, "height", height)
    _text(size, "depth", depth)
    _text(root, "segmented", 0)
    for obj in objects:
        el = ET.SubElement(root, "object")
        _text(el, "name", obj.name)
        _text(el, "pose", "Unspecified")
        _text(el, "truncated", int(obj.truncated))
        _text(el, "occluded", int(obj.occluded))
        _text(el, "difficult", int(obj.difficult))
        _bndbox(el, obj.box, width, height, f"{filename}: object {obj.name!r}")
        for k, v in obj.extras.items():
            _text(el, k, v)
    for extra in extras:
        el = ET.SubElement(root, extra.tag)
        for k, v in extra.fields.items():
            _text(el, k, v)
        if extra.box is not None:
            _bndbox(el, extra.box, width, height, f"{filename}: {extra.tag}")
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_annotation(root: Path, image_id: str, xml: bytes) -> Path:
    path = Path(root) / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(xml)
    return path


def write_image_set(root: Path, split: str, image_ids: Iterable[str]) -> Path:
    """``ImageSets/Main/<split>.txt``: one image id per line, in order."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in image_ids))
    return path
