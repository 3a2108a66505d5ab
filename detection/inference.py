"""Run a trained detector on your own images: :class:`Predictor`.

    >>> p = Predictor.from_checkpoint("runs/raccoon/s2/model.pt", score_thresh=0.5)
    >>> d = p("photo.jpg")          # or a PIL image, or a float tensor [3, H, W] in [0, 1]
    >>> d.boxes, d.labels, d.names, d.scores

Shapes and units. An image goes in as a file path, a ``PIL.Image`` (any mode; converted as image files are, see
:mod:`data.images`), ``uint8[H, W, 3]`` RGB, or ``float[3, H, W]`` RGB in [0, 1] (quantised to 8 bits as
``round(x·255)``, as training images were). It goes through the checkpoint's own preprocessing (``meta``
``preprocess`` and ``input_scale``, :func:`data.transforms.prepare`, padded by :func:`data.loader.collate`),
exactly as ``mimic evaluate`` feeds it, and the boxes come back as evaluate maps them
(``evaluate.to_original_pixels``): :class:`Detections` with ``boxes`` ``float32[D, 4]`` x1y1x2y2 in ORIGINAL image
pixels (continuous edges, clipped to the image), ``scores`` ``float32[D]`` (class probability; objectness for
a stage-1 model), ``labels`` ``int64[D]`` in 1..K where label ``k + 1`` is ``classes[k]``, and ``names`` the
class name of each. A stage-1 model (head ``"none"``) detects its proposals, all label 1; with several classes
the name is ``"object"``.

Backends: ``"torch"`` runs ``Detector.predict``; ``"onnxruntime"`` runs a file from :mod:`detection.export`
(given as ``.onnx`` with its ``.json`` sidecar, or exported from the checkpoint to a temporary file), with
:func:`export.prepare_input` / :func:`export.postprocess` around it, one image at a time. The ONNX graph takes the
whole padded input as the image, so its boxes may differ from torch's near the right and bottom edges (see
:mod:`detection.export`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from mimicdet.data.errors import DataError

BACKENDS = ("torch", "onnxruntime")
# A file path, a PIL image, uint8[H, W, 3] RGB, or float[3, H, W] RGB in [0, 1].
ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Detections:
    """One image's detections, in its original pixels (see the module docstring)."""

    boxes: np.ndarray  # float32[D, 4] x1y1x2y2
    scores: np.ndarray  # float32[D]
    labels: np.ndarray  # int64[D], 1..K: label k+1 is classes[k]
    names: tuple[str, ...]  # class name of each detection
    width: int  # original image size, px
    height: int

    def __len__(self) -> int:
        return len(self.boxes)


def image_rgb(image: ImageInput) -> np.ndarray:
    """Any :data:`ImageInput` -> ``uint8[H, W, 3]`` RGB; a file that cannot be decoded raises DataError naming it."""
    from mimicdet.data.images import load_image, to_rgb  # to_rgb: the conversion image files get

    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(to_rgb(image))
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    got = f"{image.dtype}{list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"image must be a file path, a PIL image, uint8[H,W,3] or float[3,H,W] in [0,1]; got {got}")


def _tensor_to_rgb(t: torch.Tensor) -> np.ndarray:
    if not (t.is_floating_point() and t.dim() == 3 and t.shape[0] == 3):
        raise ValueError(f"image tensor must be float[3,H,W] RGB in [0,1], got {t.dtype}{list(t.shape)}")
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"image tensor values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] (divide uint8 by 255)")
    pixels = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


class _TorchBackend:
    """``Detector.predict`` on images prepared and padded as ``mimic evaluate`` does, boxes mapped back as it does."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device) -> None:
        from mimicdet.detection.evaluate import checkpoint_preprocess
        from mimicdet.detection.export import lean_or_same

        self.pre, self.scale = checkpoint_preprocess(meta)
        divisor = self.pre.size_divisor * self.scale
        if not float(divisor).is_integer() or divisor < 1:
            raise DataError(f"checkpoint: size_divisor {self.pre.size_divisor} * input_scale {self.scale} must be "
                            "a whole number of pixels")
        self.divisor, self.device = int(divisor), device
        # The lean inference copy (batch norm folded, batched post-processing): same outputs within float tolerance.
        self.model = lean_or_same(model.eval()).to(device).eval()

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        from mimicdet.data.loader import collate
        from mimicdet.data.transforms import prepare
        from mimicdet.detection.evaluate import to_original_pixels

        items = []
        for k, image in enumerate(images):
            tensor, _, params = prepare(image, np.zeros((0, 4), np.float32), self.pre, flip=False, scale=self.scale)
            items.append(_loader_item(tensor, params, k))
        batch = collate(items, size_divisor=self.divisor)
        with torch.inference_mode():
            outputs = self.model.predict(batch.images.to(self.device), batch.image_sizes)
        dets = []
        for params, out in zip(batch.params, outputs):
            boxes, scores = to_original_pixels(out, params, "boxes", "scores")
            dets.append({"boxes": boxes, "scores": scores, "labels": out["labels"].cpu().numpy().astype(np.int64)})
        return dets


def _loader_item(tensor: torch.Tensor, params: Any, index: int) -> dict[str, Any]:
    """What :func:`data.loader.collate` expects of an item, for an image without boxes."""
    empty = torch.zeros((0, 4), dtype=torch.float32)
    return {"image": tensor, "boxes": empty, "labels": torch.zeros((0,), dtype=torch.int64), "ignore_boxes": empty,
            "index": index, "image_id": str(index), "flip": False, "params": params, "labelled": False}


class _OnnxBackend:
    """An exported ONNX file run by onnxruntime, one image at a time, through the export's own helpers."""

    def __init__(self, path: Path) -> None:
        from mimicdet.detection.export import onnx_runner, read_sidecar

        self.sidecar = read_sidecar(path)
        self.run = onnx_runner(path)
        self.device = "cpu (onnxruntime)"

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        from mimicdet.detection.export import postprocess, prepare_input

        dets = []
        for image in images:
            x, params = prepare_input(image, self.sidecar)
            out = postprocess(self.run(x), params)
            dets.append({"boxes": out["boxes"].astype(np.float32), "scores": out["scores"].astype(np.float32),
                         "labels": np.asarray(out["labels"], np.int64)})
        return dets


class Predictor:
    """A detector ready for images: ``predictor(image) -> Detections``; :meth:`predict_batch`, :meth:`stream`.

    ``score_thresh`` (``None``: the checkpoint's, 0.05) keeps detections scoring above it; for a box head it is set
    where ``mimic evaluate --score-thresh`` sets it (before class-wise NMS), so both give the same boxes."""

    def __init__(self, backend: Any, *, classes: Sequence[str], head: str, score_thresh: float | None = None,
                 source: str = "") -> None:
        if score_thresh is not None and not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"score_thresh must be in [0, 1), got {score_thresh}")
        self.backend = backend
        self.head = head
        # A stage-1 model's detections are class-agnostic proposals, all label 1.
        self.classes = tuple(classes) if head != "none" or len(classes) == 1 else ("object",)
        self.score_thresh = score_thresh
        self.source = source  # the checkpoint or ONNX file, for messages

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto", score_thresh: float | None = None,
                        backend: str = "torch") -> Predictor:
        """Load a ``model.pt`` (teacher or student) with its ``meta`` (``classes``, ``preprocess``,
        ``input_scale``). ``backend="onnxruntime"`` exports it to a temporary ONNX file first (CPU only)."""
        from mimicdet.detection.detector import load_detector
        from mimicdet.detection.device import select_device

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        model, meta = load_detector(path)
        classes = _classes(meta, path)
        if backend == "onnxruntime":
            with tempfile.TemporaryDirectory(prefix="mimicdet-onnx-") as folder:
                onnx = _export_onnx(Path(path), model, meta, score_thresh, Path(folder))
                runner = _OnnxBackend(onnx)  # onnxruntime holds the graph in memory: the file may go
            return cls(runner, classes=classes, head=model.config.head, score_thresh=score_thresh, source=str(path))
        if score_thresh is not None and model.head is not None:
            model.head.score_thresh = float(score_thresh)  # torchvision RoIHeads reads it at postprocess
        try:
            runner = _TorchBackend(model, meta, select_device(device))
        except DataError as e:  # the meta's own message does not say which file it came from
            raise DataError(f"{path}: {e}") from None
        return cls(runner, classes=classes, head=model.config.head, score_thresh=score_thresh, source=str(path))

    @classmethod
    def from_onnx(cls, path: str | Path, *, score_thresh: float | None = None) -> Predictor:
        """An ONNX file written by ``mimic export`` (its ``FILE.json`` sidecar gives classes and preprocessing).
        Its score threshold is inside the graph: ``score_thresh`` may only raise it."""
        runner = _OnnxBackend(Path(path))
        side = runner.sidecar
        baked = float(side.get("detector_config", {}).get("box_score_thresh", 0.0))
        if score_thresh is not None and side["head"] != "none" and score_thresh < baked:
            raise ValueError(f"{path}: the exported graph keeps scores above {baked}; --score-thresh {score_thresh} "
                             "cannot lower it (export again, or predict from the checkpoint)")
        return cls(runner, classes=_classes(side, f"{path}.json"), head=side["head"], score_thresh=score_thresh,
                   source=str(path))

    @property
    def device(self) -> str:
        """Where the model runs, e.g. ``"cpu"``, ``"cuda"`` or ``"cpu (onnxruntime)"``."""
        return str(self.backend.device)

    def __call__(self, image: ImageInput) -> Detections:
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageInput]) -> list[Detections]:
        """Several images in one forward pass (zero-padded to a common size, as ``mimic evaluate`` batches)."""
        if not len(images):
            return []
        pixels = [image_rgb(image) for image in images]
        return [self._detections(d, p) for d, p in zip(self.backend(pixels), pixels)]

    def stream(self, images: Iterable[ImageInput], *, batch_size: int = 1) -> Iterator[Detections]:
        """Detections of each image of an iterable, in order, reading it ``batch_size`` images at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for batch in _batches(images, batch_size):
            yield from self.predict_batch(batch)

    def _detections(self, det: dict[str, np.ndarray], pixels: np.ndarray) -> Detections:
        keep = det["scores"] > self.score_thresh if self.score_thresh is not None else slice(None)
        labels = det["labels"][keep]
        bad = labels[(labels < 1) | (labels > len(self.classes))]
        if len(bad):
            raise DataError(f"{self.source}: label {int(bad[0])} outside 1..{len(self.classes)} ({self.classes})")
        return Detections(boxes=det["boxes"][keep], scores=det["scores"][keep], labels=labels,
                          names=tuple(self.classes[int(k) - 1] for k in labels),
                          width=int(pixels.shape[1]), height=int(pixels.shape[0]))


def _classes(meta: dict, where: str | Path) -> tuple[str, ...]:
    classes = meta.get("classes")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{where}: expected 'classes', a list of class names, got {classes!r}")
    return tuple(classes)


def _export_onnx(path: Path, model: torch.nn.Module, meta: dict, score_thresh: float | None, folder: Path) -> Path:
    """``path`` exported by :func:`export.run_export` (dynamic size, verified) into ``folder``; a ``score_thresh``
    goes into the graph, which fixes it, through a temporary copy of the checkpoint."""
    from mimicdet.detection.detector import Detector, save_detector
    from mimicdet.detection.export import ExportConfig, run_export

    if score_thresh is not None and model.head is not None:
        tuned = Detector(dataclasses.replace(model.config, box_score_thresh=float(score_thresh)))
        tuned.load_state_dict(model.state_dict())
        path = folder / "model.pt"
        save_detector(path, tuned, meta)
    out = folder / "model.onnx"
    run_export(ExportConfig(checkpoint=path, format="onnx", out=out))
    return out


__all__ = ["BACKENDS", "Detections", "ImageInput", "Predictor", "image_rgb"]
