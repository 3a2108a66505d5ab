"""A writer of tiny Caltech Pedestrian datasets for tests: Norpix ``.seq`` videos of JPEG frames, ``.vbb``
annotations (scipy.io.savemat with the real vbb struct) and the converted layout (annotations.json + images/).

Norpix header (1024 bytes, little-endian): magic 0xFEED at 0, "Norpix seq" in UTF-16 at 4, version at 28,
header size at 32, description at 36, then at 548 width, height, bit depth, real bit depth, image size,
image format (102 = JPEG), allocated frames, origin, true image size (uint32 each) and the frame rate (double).
Each frame: uint32 byte count (including those 4 bytes), the JPEG, then a timestamp (``gap`` bytes).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

WIDTH, HEIGHT, FRAMES = 64, 48, 6

# set -> video -> frame -> objects; pos/posv are [x, y, w, h]
SPEC = {
    "set00": {
        "V000": {
            2: [
                {"lbl": "person", "pos": [10.0, 5.0, 20.0, 40.0], "posv": [10.0, 5.0, 20.0, 20.0], "occl": 1},
                {"lbl": "people", "pos": [30.0, 10.0, 10.0, 10.0], "posv": [0.0, 0.0, 0.0, 0.0], "occl": 0},
            ],
            4: [{"lbl": "person", "pos": [1.0, 1.0, 5.0, 5.0], "posv": [0.0, 0.0, 0.0, 0.0], "occl": 0}],
            5: [
                {"lbl": "person?", "pos": [50.0, 20.0, 20.0, 30.0], "posv": [0.0, 0.0, 0.0, 0.0], "occl": 0},
                {"lbl": "person-fa", "pos": [2.0, 2.0, 6.0, 6.0], "posv": [0.0, 0.0, 0.0, 0.0], "occl": 0},
            ],
        }
    },
    "set06": {
        "V000": {
            2: [{"lbl": "person", "pos": [1.5, 0.5, 8.0, 30.0], "posv": [1.5, 0.5, 8.0, 30.0], "occl": 1}],
        }
    },
}


def frame_pixels(set_name: str, index: int) -> np.ndarray:
    """A frame whose colour tells set and frame apart."""
    img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    img[..., 0] = 40 * index
    img[..., 1] = 200 if set_name == "set00" else 60
    img[: HEIGHT // 2, : WIDTH // 2, 2] = 255  # not flat, so a mirrored frame would differ
    return img


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def seq_header(width: int, height: int, n_frames: int, *, image_format: int = 102) -> bytes:
    head = bytearray(1024)
    struct.pack_into("<I", head, 0, 0xFEED)
    head[4:28] = "Norpix seq".encode("utf-16-le").ljust(24, b"\0")
    struct.pack_into("<ii", head, 28, 3, 1024)
    size = width * height * 3
    # width, height, bit depth, real bit depth, image size, format, frames, origin, true size, frame rate
    struct.pack_into("<9Id", head, 548, width, height, 24, 8, size, image_format, n_frames, 0, size + 8, 30.0)
    return bytes(head)


def seq_bytes(jpegs: list[bytes], width: int, height: int, *, gaps: list[int] | None = None) -> bytes:
    """A whole .seq file; ``gaps[i]`` is the timestamp length after frame ``i`` (8 by default)."""
    gaps = gaps or [8] * len(jpegs)
    out = bytearray(seq_header(width, height, len(jpegs)))
    for i, (jpg, gap) in enumerate(zip(jpegs, gaps)):
        out += struct.pack("<I", len(jpg) + 4) + jpg
        out += struct.pack("<IH", 1_300_000_000 + i, 33 * i)[:gap].ljust(gap, b"\0")
    return bytes(out)


def write_vbb(path: Path, n_frame: int, frames: dict[int, list[dict]]) -> Path:
    """A .vbb file: each object gets its own track id; objLbl lists the track labels."""
    labels: list[str] = []
    obj_lists = np.empty((1, n_frame), dtype=object)
    fields = [("id", "O"), ("pos", "O"), ("occl", "O"), ("lock", "O"), ("posv", "O")]
    for f in range(n_frame):
        objs = frames.get(f, [])
        if not objs:
            obj_lists[0, f] = np.zeros((0, 0))
            continue
        arr = np.empty((1, len(objs)), dtype=fields)
        for k, o in enumerate(objs):
            labels.append(o["lbl"])
            posv = np.array([o["posv"]], float) if o["posv"] else np.zeros((0, 0))
            arr[0, k] = (float(len(labels)), np.array([o["pos"]], float), float(o["occl"]), 0.0, posv)
        obj_lists[0, f] = arr
    lbl = np.empty((1, len(labels)), dtype=object)
    for k, name in enumerate(labels):
        lbl[0, k] = name
    m = len(labels)
    a = {
        "nFrame": float(n_frame),
        "objLists": obj_lists,
        "maxObj": float(m),
        "objInit": np.ones((1, m)),
        "objLbl": lbl,
        "objStr": np.ones((1, m)),
        "objEnd": np.full((1, m), float(n_frame)),
        "objHide": np.zeros((1, m)),
        "altered": 0.0,
        "log": np.zeros((1, 0)),
        "logLen": 0.0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        scipy.io.savemat(f, {"A": a})
    return path


def make_original(root: Path, *, gaps: list[int] | None = None) -> Path:
    """``setXX/V000.seq`` + ``annotations/setXX/V000.vbb`` for every set in SPEC."""
    for set_name, videos in SPEC.items():
        for video, frames in videos.items():
            jpegs = [jpeg_bytes(frame_pixels(set_name, i)) for i in range(FRAMES)]
            seq = root / set_name / f"{video}.seq"
            seq.parent.mkdir(parents=True, exist_ok=True)
            seq.write_bytes(seq_bytes(jpegs, WIDTH, HEIGHT, gaps=gaps))
            write_vbb(root / "annotations" / set_name / f"{video}.vbb", FRAMES, frames)
    return root


def make_converted(root: Path) -> Path:
    """``images/setXX_V000_<frame>.png`` (the converter's naming) + ``annotations.json``."""
    doc: dict = {}
    for set_name, videos in SPEC.items():
        for video, frames in videos.items():
            doc.setdefault(set_name, {})[video] = {
                "nFrame": FRAMES,
                "frames": {str(f): [{**o, "id": k} for k, o in enumerate(objs)] for f, objs in frames.items()},
            }
            for i in range(FRAMES):
                # The frame as decoded from its JPEG, stored losslessly: both layouts then hold the same pixels.
                pixels = np.asarray(Image.open(io.BytesIO(jpeg_bytes(frame_pixels(set_name, i)))).convert("RGB"))
                path = root / "images" / f"{set_name}_{video}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    (root / "annotations.json").write_text(json.dumps(doc))
    return root
