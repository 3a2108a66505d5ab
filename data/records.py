"""The one image record type every reader produces, and a dataset of them.

Boxes are ``float32[N, 4]`` x1y1x2y2 in pixels of the original image (0-based, x2/y2 exclusive edges as
continuous coordinates). Labels are ``int64[N]`` with 0 = background, so a box of class ``classes[k]`` has
label ``k + 1``. ``ignore`` is ``bool[N]``: difficult (VOC), crowd (COCO) and ignore regions (Caltech) are kept
as boxes but neither count as misses nor as false positives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class ImageRecord:
    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32[N, 4] x1y1x2y2, pixels
    labels: np.ndarray  # int64[N], 0 = background
    ignore: np.ndarray  # bool[N]
    # Per-box extras some protocols need, e.g. Caltech "visibility" float32[N] and "height" float32[N].
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    labelled: bool = True  # False for images that come without annotations (mimic-only)

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.boxes.dtype != np.float32:
            raise ValueError(f"{self.path}: boxes must be float32[N,4], got {self.boxes.dtype}{list(self.boxes.shape)}")
        if self.labels.shape != (n,) or self.labels.dtype != np.int64:
            raise ValueError(f"{self.path}: labels must be int64[{n}], got {self.labels.dtype}{list(self.labels.shape)}")
        if self.ignore.shape != (n,) or self.ignore.dtype != np.bool_:
            raise ValueError(f"{self.path}: ignore must be bool[{n}], got {self.ignore.dtype}{list(self.ignore.shape)}")


def empty_record(image_id: str, path: Path, width: int, height: int, *, labelled: bool = True) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        path=Path(path),
        width=int(width),
        height=int(height),
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros((0,), np.int64),
        ignore=np.zeros((0,), bool),
        labelled=labelled,
    )


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str  # e.g. "raccoon" or the root folder's name
    split: str
    classes: tuple[str, ...]  # foreground class names; label k+1 <-> classes[k]
    records: tuple[ImageRecord, ...]
    root: Path | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for r in self.records:
            if r.image_id in seen:
                raise ValueError(f"dataset {self.name}/{self.split}: duplicate image id {r.image_id!r}")
            seen.add(r.image_id)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes) + 1

    def digest(self) -> str:
        """sha256 over ids and sizes, in order: identifies the image list a feature store was made from."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.image_id}\t{r.width}\t{r.height}\n".encode())
        return h.hexdigest()

    def subset(self, indices) -> "Dataset":
        return Dataset(self.name, self.split, self.classes, tuple(self.records[i] for i in indices), self.root)

    def seeded_subset(self, size: int | None, seed: int) -> "Dataset":
        """``size`` images drawn by ``seed``, kept in split order (``None``: all of them). Students
        (``--subset``) and control teachers draw through this one rule, so the same seed gives both the
        same labelled images."""
        if size is None:
            return self
        if not 1 <= size <= len(self):
            raise ValueError(f"--subset must be in [1, {len(self)}] for {self.name}/{self.split}, got {size}")
        import torch  # torch's generator fixes which images a seed picks; another would change every run

        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size].sort().values
        return self.subset(order.tolist())
