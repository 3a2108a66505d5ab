"""Read the Caltech Pedestrian dataset, in its original layout or the common converted one.

Layouts (``layout='auto'`` takes the original one when ``set*/*.seq`` files exist, else the converted one):

- ``original``: ``<root>/setXX/VYYY.seq`` (Norpix videos of JPEG frames, read by :mod:`data.seq`) and
  ``<root>/annotations/setXX/VYYY.vbb`` (MATLAB files read with ``scipy.io.loadmat``: struct ``A`` with
  ``nFrame``, ``objLists`` (one struct array per frame: ``id``, ``pos``, ``occl``, ``lock``, ``posv``) and
  ``objLbl``). Frames stay inside the videos: a record's ``path`` is ``.../VYYY.seq#<frame>`` (0-based), which
  :func:`data.images.load_image` decodes straight from the video, so nothing is extracted or cached on disk.
- ``converted``: ``<root>/annotations.json`` as written by caltech-pedestrian-dataset-converter,
  ``{"set00": {"V000": {"frames": {"<frame>": [{"pos": [x, y, w, h], "posv": [...], "lbl": "person",
  "occl": 0}, ...]}}}}`` with 0-based frame keys, and frames as images under ``<root>/images/`` named
  ``set00_V000_29.png`` (the converter's name), ``set00_V000_I00029.jpg`` or ``set00/V000/I00029.jpg``.

Protocol: train sets 00-05, test sets 06-10 (``sets=`` overrides), every ``every``-th frame (default 30),
taking 0-based frames ``every-1, 2*every-1, ...`` (the toolbox's ``I00029, I00059, ...``). Image ids are
``setXX_VYYY_IZZZZZ`` in both layouts.

Labels: ``person`` is class "person"; ``people``, ``person?`` and ``person-fa`` are ignore boxes (label 1,
``ignore = True``); any other label is a DataError. ``pos`` is taken as 0-based continuous ``[x, y, w, h]``, as
the common converters do. Per-box extras: ``visibility`` (``posv`` area / ``pos`` area in [0, 1]; 1.0 when the
object is not occluded or ``posv`` is empty or has no area) and ``height`` (``pos`` height in px, before
clipping), for the "reasonable" subset (height >= 50, visibility >= 0.65). Boxes go through
:class:`data.validate.BoxChecker` (partly outside: clipped; empty: dropped).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from mimicdet.data.errors import DataError
from mimicdet.data.images import IMAGE_EXTENSIONS, frame_path, image_size
from mimicdet.data.records import Dataset, ImageRecord
from mimicdet.data.seq import read_seq_header
from mimicdet.data.validate import BoxChecker, DataWarning

CLASSES = ("person",)
TRAIN_SETS = tuple(f"set{i:02d}" for i in range(0, 6))
TEST_SETS = tuple(f"set{i:02d}" for i in range(6, 11))
IGNORE_LABELS = frozenset({"people", "person?", "person-fa"})
DEFAULT_EVERY = 30
_CONVERTED_NAME = re.compile(r"(set\d+)[_/](V\d+)[_/]I?(\d+)\.\w+$")


@dataclass(frozen=True)
class _Object:
    label: str
    pos: tuple[float, float, float, float]  # x, y, w, h
    posv: tuple[float, ...]  # x, y, w, h, or () when absent
    occluded: bool


def _visibility(o: _Object) -> float:
    w, h = o.pos[2], o.pos[3]
    if not o.occluded or len(o.posv) != 4 or o.posv[2] <= 0 or o.posv[3] <= 0 or w <= 0 or h <= 0:
        return 1.0
    return float(min(1.0, max(0.0, (o.posv[2] * o.posv[3]) / (w * h))))


def _numbers(value, where: str, field: str, allow_empty: bool = False) -> tuple[float, ...]:
    flat = np.asarray(value, dtype=object).ravel().tolist() if not isinstance(value, list) else value
    if allow_empty and len(flat) == 0:
        return ()
    if len(flat) != 4 or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in flat):
        raise DataError(f"{where}: field {field!r} must be 4 numbers [x, y, w, h], got {value!r}")
    return tuple(float(v) for v in flat)


# --- original layout -------------------------------------------------------------------------------------


def _scalar(value, where: str, field: str) -> float:
    flat = np.asarray(value).ravel()
    if flat.size != 1:
        raise DataError(f"{where}: field {field!r} must be a scalar, got shape {np.asarray(value).shape}")
    return float(flat[0])


def read_vbb(path: Path) -> tuple[int, list[list[_Object]]]:
    """``(nFrame, objects per frame)`` of a ``.vbb`` annotation file."""
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError ... for damaged files
        raise DataError(f"{path}: cannot read .vbb annotation ({type(e).__name__}: {e})") from None
    a = mat.get("A")
    if not isinstance(a, np.ndarray) or a.dtype.names is None or a.size != 1:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: expected a MATLAB struct 'A' (vbb annotation), found variables {found}")
    a = a.ravel()[0]
    missing = [f for f in ("nFrame", "objLists", "objLbl") if f not in a.dtype.names]
    if missing:
        raise DataError(f"{path}: struct A lacks field(s) {missing}")
    n_frame = int(_scalar(a["nFrame"], str(path), "A.nFrame"))
    labels = [str(np.asarray(v).ravel()[0]) if np.asarray(v).size else "" for v in np.asarray(a["objLbl"]).ravel()]
    frames: list[list[_Object]] = []
    for f, objs in enumerate(np.asarray(a["objLists"]).ravel()):
        objs = np.asarray(objs)
        out: list[_Object] = []
        if objs.size and objs.dtype.names is not None:
            for k, o in enumerate(objs.ravel()):
                where = f"{path}: A.objLists frame {f} object {k}"
                obj_id = int(_scalar(o["id"], where, "id"))
                if not 1 <= obj_id <= len(labels):
                    raise DataError(f"{where}: id {obj_id} has no entry in A.objLbl ({len(labels)} labels)")
                names = o.dtype.names
                out.append(
                    _Object(
                        label=labels[obj_id - 1],  # MATLAB ids are 1-based
                        pos=_numbers(o["pos"], where, "pos"),
                        posv=_numbers(o["posv"], where, "posv", allow_empty=True) if "posv" in names else (),
                        occluded=bool(_scalar(o["occl"], where, "occl")) if "occl" in names else True,
                    )
                )
        frames.append(out)
    return n_frame, frames


def _original_frames(root: Path, sets: tuple[str, ...], every: int):
    """Yields ``(image_id, path, width, height, objects, source)`` for the selected frames."""
    for set_name in sets:
        for seq in sorted((root / set_name).glob("*.seq")):
            vbb = root / "annotations" / set_name / f"{seq.stem}.vbb"
            if not vbb.is_file():
                raise DataError(f"{seq}: annotation file {vbb} not found")
            header = read_seq_header(seq)
            n_ann, per_frame = read_vbb(vbb)
            n = header.num_frames
            if n_ann != n or len(per_frame) != n_ann:
                warnings.warn(
                    f"{vbb}: annotates {n_ann} frames ({len(per_frame)} object lists) but {seq.name} has {n}; "
                    "using the frames both have",
                    DataWarning,
                    stacklevel=3,
                )
                n = min(n, n_ann, len(per_frame))
            for i in range(every - 1, n, every):
                yield (
                    f"{set_name}_{seq.stem}_I{i:05d}",
                    frame_path(seq, i),
                    header.width,
                    header.height,
                    per_frame[i],
                    f"{vbb} frame {i}",
                )


# --- converted layout ------------------------------------------------------------------------------------


def _converted_objects(items, where: str) -> list[_Object]:
    if not isinstance(items, list):
        raise DataError(f"{where}: must be a list of objects, got {type(items).__name__}")
    out = []
    for k, o in enumerate(items):
        w = f"{where} object {k}"
        if not isinstance(o, dict):
            raise DataError(f"{w}: must be a JSON object, got {type(o).__name__}")
        for key in ("pos", "lbl"):
            if key not in o:
                raise DataError(f"{w}: missing field {key!r}")
        if not isinstance(o["lbl"], str):
            raise DataError(f"{w}: field 'lbl' must be a string, got {o['lbl']!r}")
        posv = o.get("posv", [])
        out.append(
            _Object(
                label=o["lbl"],
                pos=_numbers(o["pos"], w, "pos"),
                posv=_numbers(posv if isinstance(posv, list) else [posv], w, "posv", allow_empty=True),
                occluded=bool(o.get("occl", 1)),
            )
        )
    return out


def _converted_frames(root: Path, sets: tuple[str, ...], every: int):
    ann_path = root / "annotations.json"
    try:
        doc = json.loads(ann_path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{ann_path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{ann_path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{ann_path}: top level must be an object keyed by set name, got {type(doc).__name__}")
    images_dir = root / "images"
    found: dict[tuple[str, str, int], Path] = {}
    for p in sorted(images_dir.rglob("*")):
        m = _CONVERTED_NAME.search(p.relative_to(images_dir).as_posix())
        if m is None or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        key = (m[1], m[2], int(m[3]))
        if key in found:
            raise DataError(f"{p}: frame {key[2]} of {key[0]}/{key[1]} also stored as {found[key]}")
        found[key] = p
    selected = sorted(k for k in found if k[0] in sets and k[2] % every == every - 1)
    in_sets = sum(k[0] in sets for k in found)
    if not selected:
        raise DataError(
            f"{images_dir}: no frames selected ({in_sets} images of sets {', '.join(sets)}; every={every} takes "
            f"0-based frames {every - 1}, {2 * every - 1}, ...)"
        )
    for set_name, video, i in selected:
        where = f"{ann_path}: {set_name}/{video}"
        entry = doc.get(set_name, {}).get(video) if isinstance(doc.get(set_name), dict) else None
        if not isinstance(entry, dict):
            raise DataError(f"{where}: no annotations for this video (images exist under {images_dir})")
        frames = entry.get("frames", {})
        if not isinstance(frames, dict):
            raise DataError(f"{where}: field 'frames' must be an object keyed by frame number")
        path = found[(set_name, video, i)]
        width, height = image_size(path)
        objects = _converted_objects(frames.get(str(i), []), f"{where} frame {i}")
        yield f"{set_name}_{video}_I{i:05d}", path, width, height, objects, f"{where} frame {i}"


# --- both ------------------------------------------------------------------------------------------------


def detect_caltech_layout(root: Path) -> str | None:
    """``'original'``, ``'converted'`` or None."""
    root = Path(root)
    if (root / "annotations").is_dir() and any(root.glob("set*/*.seq")):
        return "original"
    if (root / "annotations.json").is_file() and (root / "images").is_dir():
        return "converted"
    return None


def read_caltech(
    root: Path | str,
    *,
    split: str = "train",
    every: int | None = None,
    layout: str = "auto",
    sets: tuple[str, ...] | None = None,
) -> Dataset:
    """The Caltech Pedestrian ``split`` at ``root`` (see the module docstring for layouts and protocol)."""
    root = Path(root)
    every = DEFAULT_EVERY if every is None else every
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise DataError(f"{root}: every must be a positive integer, got {every!r}")
    if sets is None:
        if split not in ("train", "test"):
            raise DataError(f"{root}: Caltech split must be 'train' or 'test' (or pass sets=), got {split!r}")
        sets = TRAIN_SETS if split == "train" else TEST_SETS
    sets = tuple(sets)
    if layout == "auto":
        found = detect_caltech_layout(root)
        if found is None:
            raise DataError(
                f"{root}: not a Caltech dataset: expected setXX/VYYY.seq + annotations/setXX/VYYY.vbb (original) "
                "or annotations.json + images/ (converted)"
            )
        layout = found
    if layout == "original":
        frames = _original_frames(root, sets, every)
    elif layout == "converted":
        frames = _converted_frames(root, sets, every)
    else:
        raise DataError(f"{root}: layout must be 'auto', 'original' or 'converted', got {layout!r}")

    checker = BoxChecker(f"{root} ({split})")
    records = []
    for image_id, path, width, height, objects, source in frames:
        for k, o in enumerate(objects):
            if o.label != "person" and o.label not in IGNORE_LABELS:
                raise DataError(
                    f"{source} object {k}: label {o.label!r} is not one of person, {', '.join(sorted(IGNORE_LABELS))}"
                )
        pos = np.array([o.pos for o in objects], np.float64).reshape(-1, 4)
        raw = np.concatenate([pos[:, :2], pos[:, :2] + pos[:, 2:]], axis=1)
        boxes, keep = checker.check(raw, width, height, source=source)
        kept = [o for o, k in zip(objects, keep) if k]
        records.append(
            ImageRecord(
                image_id=image_id,
                path=path,
                width=int(width),
                height=int(height),
                boxes=boxes,
                labels=np.ones(len(kept), np.int64),
                ignore=np.array([o.label != "person" for o in kept], bool),
                extras={
                    "visibility": np.array([_visibility(o) for o in kept], np.float32),
                    "height": np.array([o.pos[3] for o in kept], np.float32),
                },
            )
        )
    checker.finish()
    if not records:
        raise DataError(f"{root}: no frames found for sets {', '.join(sets)} ({layout} layout)")
    return Dataset(name="caltech", split=split, classes=CLASSES, records=tuple(records), root=root)
