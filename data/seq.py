"""Read frames out of Norpix StreamPix ``.seq`` files, the video format of the Caltech Pedestrian dataset.

Layout (little-endian): a header of ``header_size`` bytes (1024 for the versions Caltech uses) holding the magic
``0xFEED`` at offset 0, then at offset 548 the image fields (width, height, bit depth, real bit depth, image size
in bytes, image format, allocated frames, origin, true image size, frame rate). Compressed sequences (JPEG: image
format 102 or 201; PNG: 1 or 2) then store, per frame, a ``uint32`` byte count that includes its own 4 bytes, the
encoded image, and a timestamp whose length differs between StreamPix versions (usually 8 bytes, sometimes 4 or
16). Instead of trusting one timestamp length, the next frame is found by checking each candidate gap for a
plausible byte count followed by the image's magic bytes, so every offset is verified before it is used.

Frames are addressed by 0-based index. The offset table of a file is built once per process and cached (keyed by
path, size and modification time).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mimicdet.data.errors import DataError

SEQ_MAGIC = 0xFEED
_IMAGE_FIELDS = struct.Struct("<9Id")  # width .. true_image_size, then suggested frame rate
_IMAGE_FIELDS_OFFSET = 548
_FORMATS = {102: "jpg", 201: "jpg", 1: "png", 2: "png"}
_SIGNATURES = {"jpg": b"\xff\xd8", "png": b"\x89PNG"}
# Timestamp lengths seen in the wild, most common first (see module docstring).
_GAPS = (8, 4, 16, 12, 0)


@dataclass(frozen=True)
class SeqHeader:
    width: int
    height: int
    image_format: int
    num_frames: int
    header_size: int
    fps: float

    @property
    def ext(self) -> str:
        return _FORMATS[self.image_format]


def read_seq_header(path: Path) -> SeqHeader:
    """The header of a ``.seq`` file; DataError if it is not a compressed Norpix sequence."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise DataError(f"{path}: cannot read Norpix sequence ({e.strerror or e})") from None
    if len(head) < 1024:
        raise DataError(f"{path}: Norpix header must be 1024 bytes, file has {len(head)}")
    magic, = struct.unpack_from("<I", head, 0)
    if magic != SEQ_MAGIC:
        raise DataError(f"{path}: not a Norpix .seq file (magic {magic:#x}, expected {SEQ_MAGIC:#x})")
    header_size, = struct.unpack_from("<i", head, 32)
    w, h, _depth, _depth_real, _size, fmt, n, _origin, _true_size, fps = _IMAGE_FIELDS.unpack_from(
        head, _IMAGE_FIELDS_OFFSET
    )
    if fmt not in _FORMATS:
        raise DataError(
            f"{path}: Norpix image format {fmt} is not supported (expected compressed JPEG 102/201 or PNG 1/2)"
        )
    if header_size < 1024:
        header_size = 1024  # old writers leave the field 0; frames then start right after the 1024-byte header
    return SeqHeader(width=w, height=h, image_format=fmt, num_frames=n, header_size=header_size, fps=fps)


def _frame_at(data: mmap.mmap, pos: int, signature: bytes) -> int | None:
    """Byte count of a frame starting at ``pos`` if one plausibly starts there, else None."""
    if pos + 4 + len(signature) > len(data):
        return None
    n, = struct.unpack_from("<I", data, pos)
    if n <= 4 + len(signature) or pos + n > len(data):
        return None
    if data[pos + 4 : pos + 4 + len(signature)] != signature:
        return None
    return n


@functools.lru_cache(maxsize=64)
def _offsets(path: str, _size: int, _mtime_ns: int) -> np.ndarray:
    header = read_seq_header(Path(path))
    table = np.zeros((header.num_frames, 2), np.int64)  # (offset of the encoded image, its length)
    # A memory map touches only the pages holding frame headers, not the whole video.
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk(path, header, data, table)
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def _walk(path: str, header: SeqHeader, data: mmap.mmap, table: np.ndarray) -> None:
    signature = _SIGNATURES[header.ext]
    pos, gap = header.header_size, _GAPS[0]
    for i in range(header.num_frames):
        n = _frame_at(data, pos, signature)
        if n is None:
            raise DataError(
                f"{path}: frame {i} of {header.num_frames} not found at byte {pos} (truncated or corrupt sequence)"
            )
        table[i] = (pos + 4, n - 4)
        if i + 1 == header.num_frames:
            break
        end = pos + n
        # Keep the gap that worked for the previous frame; look for another only when it stops working.
        for g in (gap, *(g for g in _GAPS if g != gap)):
            if _frame_at(data, end + g, signature) is not None:
                gap = g
                break
        pos = end + gap


def seq_frame_table(path: Path) -> np.ndarray:
    """``int64[F, 2]``: byte offset and length of each frame's encoded image."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read Norpix sequence ({e.strerror or e})") from None
    return _offsets(str(path), st.st_size, st.st_mtime_ns)


def read_seq_frame(path: Path, index: int) -> bytes:
    """The encoded bytes (JPEG or PNG) of frame ``index`` (0-based)."""
    table = seq_frame_table(path)
    if not 0 <= index < len(table):
        raise DataError(f"{path}: frame {index} out of range (the sequence has {len(table)} frames)")
    offset, length = (int(v) for v in table[index])
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
