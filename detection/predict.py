"""``mimic predict``: run a trained model over image files and folders; write COCO results, optionally drawn copies.

Inputs are files and folders; a folder is searched recursively for image files (the extensions of
:data:`data.images.IMAGE_EXTENSIONS`, hidden files and folders skipped, sorted by path), a file named on the
command line is read whatever its extension. Files under ``--out/drawn`` are never read (a drawn copy is not an
input).
Each image's ``file_name`` is its path relative to the folder common to all inputs (a lone file: its name), and
``image_id`` numbers the images found 1..N in that order (inputs in the order given), so the ids do not depend on
which files decode. An unreadable file is skipped with a warning naming it.

Writes into ``--out``:

- ``detections.json``: COCO results, ``[{"image_id", "file_name", "category_id", "bbox": [x, y, w, h],
  "score"}]``, boxes in original image pixels (``w = x2 - x1``, continuous coordinates, as pycocotools);
  ``category_id`` ``k + 1`` is ``classes[k]``.
- ``images.json``: a COCO dataset without annotations: ``images`` (``id``, ``file_name``, ``width``,
  ``height``), ``categories`` (``id``, ``name``), ``skipped`` (unreadable files and why), so
  ``COCO("images.json").loadRes("detections.json")`` works.
- ``drawn/<file_name>`` with ``--draw``: a copy of each image with its boxes, class names and scores (JPEG
  inputs stay JPEG; everything else becomes PNG).

Both JSON files are written atomically at the end. Times are milliseconds per image of ``Predictor`` calls
(preprocessing, model, mapping boxes back; decoding and drawing excluded), median over the images after the
first (a warm-up).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mimicdet.data.errors import DataError
from mimicdet.data.paths import atomic_path, write_json
from mimicdet.detection.inference import BACKENDS, Detections, Predictor

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    model: Path  # model.pt, or an exported .onnx (with its .json sidecar)
    inputs: tuple[Path, ...]  # image files and folders
    out: Path
    backend: str = "torch"  # "torch" | "onnxruntime" (an .onnx model implies it)
    score_thresh: float | None = None  # None: the checkpoint's (0.05)
    draw: bool = False
    device: str = "auto"
    progress: bool | None = None  # None: progress bar only on a terminal

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.inputs:
            raise ValueError("predict needs at least one image file or folder")
        if self.score_thresh is not None and not 0.0 <= self.score_thresh < 1.0:
            raise ValueError(f"score_thresh must be in [0, 1), got {self.score_thresh}")
        if is_onnx(self.model) and self.backend != "onnxruntime":
            raise ValueError(f"--model {self.model} is an ONNX file: it runs with --backend onnxruntime")


def is_onnx(path: Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def find_images(inputs: Sequence[Path], *, exclude: Path | None = None) -> list[tuple[Path, str]]:
    """``(path, file_name)`` of every image to predict, in order (see the module docstring); ``exclude`` is a
    folder whose files are left out."""
    from mimicdet.data.folder import image_files

    found: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found += image_files(p)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    absolute = list(dict.fromkeys(os.path.abspath(p) for p in found))  # the same file given twice counts once
    if exclude is not None:
        skip = os.path.abspath(exclude) + os.sep
        absolute = [a for a in absolute if not a.startswith(skip)]
    if not absolute:
        from mimicdet.data.images import IMAGE_EXTENSIONS

        raise DataError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    bases = [os.path.abspath(p) if Path(p).is_dir() else os.path.dirname(os.path.abspath(p)) for p in inputs]
    root = os.path.commonpath(bases)
    return [(Path(a), Path(os.path.relpath(a, root)).as_posix()) for a in absolute]


def coco_results(image_id: int, file_name: str, det: Detections) -> list[dict[str, Any]]:
    """One image's detections as COCO result dicts (``bbox`` ``[x, y, w, h]``)."""
    return [{"image_id": image_id, "file_name": file_name, "category_id": int(k),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
            for b, s, k in zip(det.boxes, det.scores, det.labels)]


def draw_detections(pixels: np.ndarray, det: Detections, path: Path) -> None:
    """Write ``pixels`` (``uint8[H, W, 3]``) with each box outlined and labelled ``name score`` to ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 200))
    font = ImageFont.load_default(size=max(11, round(min(image.size) / 35)))
    for (x1, y1, x2, y2), score, label, name in zip(det.boxes.tolist(), det.scores, det.labels, det.names):
        colour = PALETTE[(int(label) - 1) % len(PALETTE)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        dy = bottom - top + 2 * line
        ty = y1 - dy if y1 - dy >= 0 else y1  # above the box, or inside it at the top edge of the image
        draw.rectangle((x1, ty, x1 + right - left + 2 * line, ty + dy), fill=colour)
        draw.text((x1 + line, ty + line - (top - y1)), text, fill=(255, 255, 255), font=font)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG" if jpeg else "PNG", quality=90)


def drawn_path(out: Path, file_name: str) -> Path:
    """Where the drawn copy of ``file_name`` goes: ``out/drawn/<file_name>``, as PNG unless it is a JPEG."""
    path = out / "drawn" / file_name
    return path if path.suffix.lower() in (".jpg", ".jpeg", ".png") else path.with_name(path.name + ".png")


def load_predictor(config: PredictConfig) -> Predictor:
    if is_onnx(config.model):
        return Predictor.from_onnx(config.model, score_thresh=config.score_thresh)
    return Predictor.from_checkpoint(config.model, device=config.device, score_thresh=config.score_thresh,
                                     backend=config.backend)


def run_predict(config: PredictConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``mimic predict``: detections of every image found (see the module docstring); returns a summary."""
    from mimicdet.data.paths import check_writable
    from mimicdet.data.progress import progress_bar
    from mimicdet.detection.inference import image_rgb

    check_writable("--out", config.out, folder=True)
    images = find_images(config.inputs, exclude=config.out / "drawn")
    predictor = load_predictor(config)
    results: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    times: list[float] = []
    with progress_bar(total=len(images), desc="predict", unit="img", disable=config.progress is False) as bar:
        for image_id, (path, name) in enumerate(images, start=1):
            bar.update(1)
            try:
                pixels = image_rgb(path)
            except DataError as e:  # one bad file must not stop the run
                warnings.warn(f"skipped an unreadable image: {e}", stacklevel=1)
                skipped.append({"file_name": name, "error": str(e)})
                continue
            t0 = time.perf_counter()
            det = predictor(pixels)
            times.append(time.perf_counter() - t0)
            results += coco_results(image_id, name, det)
            listed.append({"id": image_id, "file_name": name, "width": det.width, "height": det.height})
            if config.draw:
                draw_detections(pixels, det, drawn_path(config.out, name))
    if not listed:
        raise DataError(f"none of the {len(images)} images could be read (see the warnings above)")
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(predictor.classes)]
    write_json(config.out / "images.json", {"images": listed, "categories": categories, "annotations": [],
                                            "skipped": skipped, "model": str(config.model),
                                            "score_thresh": config.score_thresh}, indent=1)
    write_json(config.out / "detections.json", results, indent=None)
    timed = times[1:] or times  # the first call warms up (allocations, kernel choice): not a typical image
    summary = {"images": len(listed), "skipped": len(skipped), "detections": len(results),
               "median_ms": 1000 * float(np.median(timed)), "device": predictor.device, "out": str(config.out)}
    echo(f"{summary['images']} images ({summary['skipped']} skipped), {summary['detections']} detections; "
         f"median {summary['median_ms']:.1f} ms per image ({predictor.device}, preprocessing + model, "
         f"{'first image left out as warm-up' if len(times) > 1 else 'one image, warm-up included'}) "
         f"-> {config.out / 'detections.json'}" + (f", {config.out / 'drawn'}/" if config.draw else ""))
    return summary


__all__ = ["PredictConfig", "find_images", "coco_results", "draw_detections", "drawn_path", "run_predict"]
