"""Decode an image file to ``uint8[H, W, 3]`` RGB, whatever mode it was stored in.

Conversions: grayscale (``L``, ``1``) is repeated over the three channels; alpha (``RGBA``, ``LA``, palette with
transparency) is dropped, keeping the stored colour under transparent pixels; 16-bit grayscale (``I;16*``, and
``I`` as PIL opens 16-bit PNGs) is mapped to 8 bits by ``round(v / 257)``, so 0 -> 0 and 65535 -> 255; float
images (``F``) are taken as 0..255 and clipped. EXIF orientation is not applied: annotations refer to the stored
pixel grid.

Frames inside Norpix ``.seq`` videos (Caltech) have no file of their own; they are addressed by the path
``<video>.seq#<frame index>`` (0-based, see :func:`frame_path`), which both functions here understand.

Every failure (missing, unreadable, truncated or undecodable file) raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from mimicdet.data.errors import DataError
from mimicdet.data.seq import read_seq_frame, read_seq_header

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_FRAME = re.compile(r"(?P<seq>.+\.seq)#(?P<index>\d+)", re.IGNORECASE)


def frame_path(seq_path: Path, index: int) -> Path:
    """The path that addresses frame ``index`` (0-based) of a ``.seq`` video."""
    return Path(f"{seq_path}#{int(index)}")


def split_frame_path(path: Path | str) -> tuple[Path, int | None]:
    """``(video, index)`` for a frame path, ``(path, None)`` for an ordinary file."""
    m = _FRAME.fullmatch(str(path))
    if m is None:
        return Path(path), None
    return Path(m["seq"]), int(m["index"])


def to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        im = im.convert("RGBA")  # a palette may carry transparency; resolve it before dropping alpha
    return np.array(im.convert("RGB"))


def load_image(path: Path | str) -> np.ndarray:
    """``uint8[H, W, 3]`` RGB pixels of an image file or of a ``.seq`` frame path."""
    seq, index = split_frame_path(path)
    source: Path | io.BytesIO = Path(path)
    if index is not None and not Path(path).is_file():
        source = io.BytesIO(read_seq_frame(seq, index))
    try:
        with Image.open(source) as im:
            im.load()
            rgb = to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors.
        raise DataError(f"{path}: cannot decode image ({e})") from None
    return np.ascontiguousarray(rgb)


def image_size(path: Path | str) -> tuple[int, int]:
    """``(width, height)`` from the file header only (no pixel decoding)."""
    seq, index = split_frame_path(path)
    if index is not None and not Path(path).is_file():
        header = read_seq_header(seq)
        return header.width, header.height
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image header ({e})") from None


def image_inside(image_root: Path, name: str, where: str) -> Path:
    """The image an annotation names (``where``: the file and field, for errors), which must be a relative path
    inside ``image_root`` and exist. The name itself is checked, not the resolved path: a dataset may hold
    symlinked images."""
    rel = PurePath(name)
    inside = os.path.normpath(image_root / rel)
    if rel.is_absolute() or ".." in rel.parts or not inside.startswith(os.path.normpath(image_root) + os.sep):
        raise DataError(f"{where} {name!r} must name a file inside {image_root}")
    path = image_root / rel
    if not path.is_file():
        raise DataError(f"{where} {name!r}: image {path} not found")
    return path
