"""The one box check every reader runs, so all formats treat bad boxes alike.

Boxes are ``float[N, 4]`` x1y1x2y2 in pixels of an image of ``width x height``. Rules:

- a non-finite coordinate -> :class:`DataError` naming the file and the box index;
- inverted or zero-size (``x2 <= x1`` or ``y2 <= y1``) -> dropped, with a warning naming file and box index;
- outside the image -> clipped to ``[0, width] x [0, height]``; a warning names file and box index when a box
  sticks out by more than :data:`CLIP_TOLERANCE` px (less is rounding in annotation tools and is clipped
  silently); a box left with no area after clipping (entirely outside) is dropped, with a warning.

Warnings are :class:`DataWarning`. A large dataset can have thousands of such boxes (Caltech pedestrians
walking out of the frame), so a :class:`BoxChecker` gathers them while a dataset is read and :meth:`finish`
warns about the first few files one by one and sums up the rest in one more warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from mimicdet.data.errors import DataError

CLIP_TOLERANCE = 1.0  # px


class DataWarning(UserWarning):
    """Input data that was repaired on the way in (clipped or dropped boxes, size mismatches)."""


def _indices(mask: np.ndarray) -> str:
    return ", ".join(str(i) for i in np.flatnonzero(mask))


@dataclass
class BoxChecker:
    """Checks boxes record by record and reports what it repaired (see the module docstring)."""

    dataset: str
    max_warnings: int = 10
    notes: list[str] = field(default_factory=list)

    def check(self, boxes: np.ndarray, width: int, height: int, *, source: str) -> tuple[np.ndarray, np.ndarray]:
        """``(float32[M, 4] valid boxes, bool[N] keep)``: ``keep`` selects the kept boxes from the input."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        bad = ~np.isfinite(boxes).all(axis=1)
        if bad.any():
            raise DataError(f"{source}: box {_indices(bad)} has a non-finite coordinate: {boxes[bad][0].tolist()}")
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if empty.any():
            self.notes.append(f"{source}: box {_indices(empty)} inverted or zero-size (x2 <= x1 or y2 <= y1); dropped")
        limits = np.array([width, height, width, height], np.float64)
        clipped = np.clip(boxes, 0.0, limits)
        moved = (np.abs(clipped - boxes).max(axis=1) > CLIP_TOLERANCE) & ~empty
        outside = ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])) & ~empty
        if outside.any():
            self.notes.append(f"{source}: box {_indices(outside)} entirely outside the {width}x{height} image; dropped")
        if (moved & ~outside).any():
            self.notes.append(
                f"{source}: box {_indices(moved & ~outside)} extends outside the {width}x{height} image; clipped"
            )
        keep = ~(empty | outside)
        return clipped[keep].astype(np.float32), keep

    def finish(self) -> None:
        """Emit the gathered notes as warnings and forget them."""
        for note in self.notes[: self.max_warnings]:
            warnings.warn(note, DataWarning, stacklevel=3)
        rest = len(self.notes) - self.max_warnings
        if rest > 0:
            warnings.warn(
                f"{self.dataset}: {rest} more files had boxes clipped or dropped (first ones above)",
                DataWarning,
                stacklevel=3,
            )
        self.notes.clear()
