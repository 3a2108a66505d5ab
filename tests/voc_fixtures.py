"""Tiny VOC-layout datasets written in a test's tmp_path (raw XML text, so tests can also write broken files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def _find_raccoon() -> Path:
    """The shared raccoon photos: $MIMICDET_RACCOON, else ../shared/data/raccoon beside the checkout, else
    /work/shared/data/raccoon (a clone made elsewhere on the same machine). Tests that need it fail when it is
    missing; they are never skipped."""
    candidates = [Path(os.environ["MIMICDET_RACCOON"])] if os.environ.get("MIMICDET_RACCOON") else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon",
                   Path("/work/shared/data/raccoon")]
    return next((c for c in candidates if (c / "Annotations").is_dir()), candidates[0])


RACCOON = _find_raccoon()


def write_image(path: Path, width: int, height: int, *, mode: str = "RGB", seed: int = 0) -> Path:
    """A small noise image of the given PIL mode (RGB, L, RGBA, P or I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).save(path)
        return path
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    img = rgb.convert("P") if mode == "P" else rgb.convert(mode)
    img.save(path)
    return path


def obj_xml(name: str, box, difficult: int | str = 0) -> str:
    """A VOC ``<object>``; ``box`` holds the 1-based xmin, ymin, xmax, ymax as written."""
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
        f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def annotation_xml(filename: str, width: int | None, height: int | None, objects: list[str]) -> str:
    size = "" if width is None else f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return (
        f"<annotation><folder>x</folder><filename>{filename}</filename>"
        f"<path>/elsewhere/{filename}</path>{size}{''.join(objects)}</annotation>"
    )


def make_voc(
    root: Path,
    annotations: dict[str, list[str]],
    splits: dict[str, list[str]],
    *,
    width: int = 40,
    height: int = 30,
) -> Path:
    """Images ``<id>.jpg`` of ``width x height`` with ``<size>`` set, one annotation per id, split files."""
    for image_id, objects in annotations.items():
        write_image(root / "JPEGImages" / f"{image_id}.jpg", width, height, seed=len(image_id))
        write_annotation(root, image_id, annotation_xml(f"{image_id}.jpg", width, height, objects))
    for split, ids in splits.items():
        write_split(root, split, ids)
    return root


def write_annotation(root: Path, image_id: str, text: str) -> Path:
    path = root / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_split(root: Path, split: str, ids: list[str]) -> Path:
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))
    return path
