"""Read a plain folder of images without annotations, e.g. extra unlabelled images for a student to mimic on.

Every file with an image extension under ``root`` (recursively, skipping hidden files and folders) becomes a
record with no boxes and ``labelled = False``, ordered by relative path. ``image_id`` is the relative POSIX path
(with extension, so ``a.jpg`` and ``a.png`` stay distinct). Sizes come from the image headers, so an unreadable
file is a DataError naming it here rather than in the middle of a run.
"""

from __future__ import annotations

from pathlib import Path

from mimicdet.data.errors import DataError
from mimicdet.data.images import IMAGE_EXTENSIONS, image_size
from mimicdet.data.records import Dataset, empty_record


def image_files(root: Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` by relative path, hidden files and folders skipped."""
    root = Path(root)
    found = root.rglob("*") if recursive else root.glob("*")
    return sorted(
        (
            p
            for p in found
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def read_image_folder(root: Path | str, *, split: str = "unlabelled", classes=()) -> Dataset:
    """All images under ``root`` as unlabelled records (``classes`` is only carried along)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files = image_files(root)
    if not files:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    records = tuple(
        empty_record(p.relative_to(root).as_posix(), p, *image_size(p), labelled=False) for p in files
    )
    return Dataset(name=root.resolve().name, split=split, classes=tuple(classes), records=records, root=root)
