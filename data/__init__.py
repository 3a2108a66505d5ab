"""Everything that is data on disk: records, readers, image decoding, transforms and the training data pipeline.

``load_dataset(root, split)`` recognises the layout; the readers can also be called directly. Names are
imported on first use (PEP 562), so ``import data.errors`` (the CLI does it at start-up) stays cheap and
does not pull in torch or scipy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mimicdet.data.errors import DataError, StoreError

FORMATS = ("voc", "coco", "caltech", "folder")
# Protocol options each reader accepts through load_dataset(**protocol).
_OPTIONS = {"voc": (), "coco": ("image_root", "name"), "caltech": ("every", "layout", "sets"), "folder": ()}
_LAYOUTS = (
    "VOC (Annotations/ + ImageSets/Main/<split>.txt + JPEGImages/), "
    "COCO (a .json file, or annotations/*<split>*.json), "
    "Caltech (setXX/VYYY.seq + annotations/setXX/VYYY.vbb, or annotations.json + images/), "
    "a folder of images (*.jpg, *.png, ... directly inside)"
)

_LAZY = {
    "ImageRecord": "mimicdet.data.records",
    "Dataset": "mimicdet.data.records",
    "empty_record": "mimicdet.data.records",
    "load_image": "mimicdet.data.images",
    "image_size": "mimicdet.data.images",
    "frame_path": "mimicdet.data.images",
    "IMAGE_EXTENSIONS": "mimicdet.data.images",
    "DataWarning": "mimicdet.data.validate",
    "BoxChecker": "mimicdet.data.validate",
    "read_voc": "mimicdet.data.voc",
    "read_coco": "mimicdet.data.coco",
    "read_caltech": "mimicdet.data.caltech",
    "read_image_folder": "mimicdet.data.folder",
    "Preprocess": "mimicdet.data.transforms",
    "ResizeParams": "mimicdet.data.transforms",
    "PrepParams": "mimicdet.data.transforms",
    "resize_params": "mimicdet.data.transforms",
    "prepare": "mimicdet.data.transforms",
    "DetectionImages": "mimicdet.data.loader",
    "IterationSampler": "mimicdet.data.loader",
    "EvalSampler": "mimicdet.data.loader",
    "Batch": "mimicdet.data.loader",
    "collate": "mimicdet.data.loader",
    "make_loader": "mimicdet.data.loader",
}

__all__ = ["DataError", "StoreError", "FORMATS", "load_dataset", "detect_format", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mimicdet.data' has no attribute {name!r}")


def _coco_json(root: Path, split: str) -> Path | None:
    found = sorted((root / "annotations").glob(f"*{split}*.json")) if (root / "annotations").is_dir() else []
    if len(found) > 1:
        instances = [p for p in found if p.name.startswith("instances_")]
        if len(instances) != 1:
            raise DataError(
                f"{root}: several COCO files match split {split!r}: {', '.join(p.name for p in found)}; "
                "pass the .json file itself"
            )
        found = instances
    return found[0] if found else None


def _coco_image_root(json_path: Path, split: str) -> Path:
    """Where COCO images usually sit relative to the annotation file (``annotations/instances_val2017.json``
    -> ``val2017/``); the first folder that exists, else the folder above ``annotations/``."""
    base = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    token = json_path.stem.split("_")[-1]
    for cand in (base / token, base / "images" / token, base / split, base / "images" / split, base / "images"):
        if cand.is_dir():
            return cand
    return base


def detect_format(root: Path | str, split: str = "train") -> str:
    """The layout of ``root``: one of :data:`FORMATS`; DataError naming the layouts looked for otherwise."""
    from mimicdet.data.caltech import detect_caltech_layout
    from mimicdet.data.folder import image_files

    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset root does not exist")
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "coco"
        raise DataError(f"{root}: a dataset file must be a COCO .json; otherwise pass a folder ({_LAYOUTS})")
    if (root / "Annotations").is_dir() and (root / "ImageSets").is_dir():
        return "voc"
    if detect_caltech_layout(root) is not None:
        return "caltech"
    if _coco_json(root, split) is not None:
        return "coco"
    if image_files(root, recursive=False):
        return "folder"
    raise DataError(f"{root}: cannot recognise the dataset layout; looked for {_LAYOUTS}")


def load_dataset(root: Path | str, split: str = "train", *, format: str = "auto", classes=None, **protocol):
    """Read the ``split`` of the dataset at ``root`` (a folder, or a COCO .json file) as a ``Dataset``.

    ``format`` is ``auto`` or one of :data:`FORMATS`. ``protocol`` passes reader options: Caltech ``every``,
    ``layout``, ``sets``; COCO ``image_root``, ``name``. ``classes`` fixes the class list (VOC), or is
    checked against the dataset's own (COCO, Caltech).
    """
    root = Path(root)
    fmt = detect_format(root, split) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    unknown = sorted(set(protocol) - set(_OPTIONS[fmt]))
    if unknown:
        raise DataError(
            f"{root}: option(s) {', '.join(unknown)} do not apply to {fmt} datasets "
            f"(accepted: {', '.join(_OPTIONS[fmt]) or 'none'})"
        )
    if fmt == "voc":
        from mimicdet.data.voc import read_voc

        return read_voc(root, split, classes=classes)
    if fmt == "coco":
        from mimicdet.data.coco import read_coco

        json_path = root if root.is_file() else _coco_json(root, split)
        if json_path is None:
            raise DataError(f"{root}: no COCO annotation file annotations/*{split}*.json")
        image_root = Path(protocol.get("image_root") or _coco_image_root(json_path, split))
        name = protocol.get("name") or (json_path.stem if root.is_file() else root.resolve().name)
        return read_coco(json_path, image_root, split=split, classes=classes, name=name)
    if fmt == "caltech":
        from mimicdet.data.caltech import CLASSES, read_caltech

        if classes is not None and tuple(classes) != CLASSES:
            raise DataError(f"{root}: Caltech has classes {list(CLASSES)}, but {list(classes)} were asked for")
        return read_caltech(root, split=split, **protocol)
    from mimicdet.data.folder import read_image_folder

    return read_image_folder(root, split=split, classes=() if classes is None else classes)
