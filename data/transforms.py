"""Deterministic preprocessing shared by teacher and student: resize, horizontal flip, normalise.

Shapes: images come in as ``uint8[H, W, 3]`` RGB and leave as ``float32[3, H', W']`` normalised tensors; boxes
are ``float32[N, 4]`` x1y1x2y2 in pixels (continuous edges), mapped with the image.

Resize rule (:func:`resize_params`): the factor ``s = min(min_size / shorter, max_size / longer)`` gives the
full-size input ``round(W * s) x round(H * s)`` (half up). At ``scale != 1`` (scale mimic: the student sees
the image at half size) the input is ``ceil(full * scale)`` per side, i.e. shorter side ``min_size * scale``,
longer side at most ``max_size * scale``; taking it from the full-size input keeps the padded student input
exactly ``scale`` times the padded teacher input (:mod:`data.loader` pads to ``size_divisor * scale``).
Boxes are scaled by the actual per-axis factors ``out / original`` so they stay on the resized pixel grid, then
flipped as ``x1' = W' - x2``, ``x2' = W' - x1``.

Resampling is PIL bilinear on uint8 and normalisation is float32 torch arithmetic, both deterministic: the
same image and :class:`PrepParams` give bit-identical tensors, so a student reproduces the teacher's input
exactly from the parameters the teacher recorded (:func:`apply_params`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

from mimicdet.data.errors import DataError


@dataclass(frozen=True)
class Preprocess:
    min_size: int = 256  # shorter side, px
    max_size: int = 512  # cap on the longer side, px
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB, of pixels scaled to [0, 1]
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisor: int = 32  # batches are padded to a multiple of this

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not (isinstance(self.min_size, int) and 0 < self.min_size <= self.max_size):
            raise ValueError(f"Preprocess: need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocess: mean and std need 3 values, std > 0; got {self.mean}, {self.std}")
        if not (isinstance(self.size_divisor, int) and self.size_divisor >= 1):
            raise ValueError(f"Preprocess: size_divisor must be a positive int, got {self.size_divisor!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"preprocessing: unknown field(s) {unknown} (expected {sorted(names)})")
        return cls(**d)


@dataclass(frozen=True)
class ResizeParams:
    scale: float  # nominal factor from original to input pixels (s * scale)
    out_width: int
    out_height: int


@dataclass(frozen=True)
class PrepParams:
    """Everything that maps one original image to one network input, so it can be reproduced exactly."""

    orig_width: int
    orig_height: int
    out_width: int
    out_height: int
    flip: bool
    scale: float = 1.0  # input scale asked for: 1.0 teacher / plain student, 0.5 scale-mimic student

    @property
    def scale_x(self) -> float:
        return self.out_width / self.orig_width

    @property
    def scale_y(self) -> float:
        return self.out_height / self.orig_height

    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Original-image boxes -> input boxes, ``float32[N, 4]``."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4) * (self.scale_x, self.scale_y, self.scale_x, self.scale_y)
        if self.flip:
            b = np.stack([self.out_width - b[:, 2], b[:, 1], self.out_width - b[:, 0], b[:, 3]], axis=1)
        return b.astype(np.float32)

    def unmap_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Input boxes (e.g. detections) -> original-image boxes, ``float32[N, 4]``."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        if self.flip:
            b = np.stack([self.out_width - b[:, 2], b[:, 1], self.out_width - b[:, 0], b[:, 3]], axis=1)
        return (b / (self.scale_x, self.scale_y, self.scale_x, self.scale_y)).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PrepParams":
        return cls(**d)


def resize_params(width: int, height: int, pre: Preprocess, *, scale: float = 1.0) -> ResizeParams:
    """Input size for an image of ``width x height`` (see the module docstring for the rule)."""
    if width < 1 or height < 1:
        raise ValueError(f"resize_params: image size must be positive, got {width}x{height}")
    if not scale > 0:
        raise ValueError(f"resize_params: scale must be > 0, got {scale}")
    s = min(pre.min_size / min(width, height), pre.max_size / max(width, height))
    full_w, full_h = (max(1, math.floor(v * s + 0.5)) for v in (width, height))
    if scale == 1.0:
        return ResizeParams(scale=s, out_width=full_w, out_height=full_h)
    # The small epsilon keeps ceil from rounding up float noise (e.g. 300 * (1/3) = 100.00000000000001).
    out_w, out_h = (max(1, math.ceil(v * scale - 1e-9)) for v in (full_w, full_h))
    return ResizeParams(scale=s * scale, out_width=out_w, out_height=out_h)


def resize(image: np.ndarray, params: ResizeParams | PrepParams) -> np.ndarray:
    """``uint8[H, W, 3]`` -> ``uint8[out_height, out_width, 3]``, PIL bilinear (antialiased when shrinking)."""
    size = (params.out_width, params.out_height)
    if (image.shape[1], image.shape[0]) == size:
        return image.copy()
    return np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an ``uint8[H, W, 3]`` image and its ``float32[N, 4]`` boxes left-right."""
    w = image.shape[1]
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    flipped = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
    return np.ascontiguousarray(image[:, ::-1]), flipped


def normalize(image: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """``uint8[H, W, 3]`` -> ``float32[3, H, W]``: ``(pixel / 255 - mean) / std`` per channel."""
    image = np.ascontiguousarray(image)  # torch.from_numpy refuses negative strides (flipped views)
    if not image.flags.writeable:
        image = image.copy()  # and wants a writable buffer
    # Make CHW contiguous while still uint8: the float passes then run on contiguous memory (3x faster).
    t = torch.from_numpy(image).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype}{list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be uint8[H, W, 3] RGB, got {got}")


def apply_params(
    image: np.ndarray, boxes: np.ndarray, params: PrepParams, pre: Preprocess
) -> tuple[torch.Tensor, np.ndarray]:
    """Reproduce a recorded preprocessing: ``(float32[3, H', W'], float32[N, 4] boxes)``."""
    _check_image(image)
    if (image.shape[1], image.shape[0]) != (params.orig_width, params.orig_height):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} but the parameters were made for "
            f"{params.orig_width}x{params.orig_height}"
        )
    pixels = resize(image, params)
    if params.flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    return normalize(pixels, pre), params.map_boxes(boxes)


def prepare(
    image: np.ndarray, boxes: np.ndarray, pre: Preprocess, *, flip: bool, scale: float = 1.0
) -> tuple[torch.Tensor, np.ndarray, PrepParams]:
    """Resize (then flip) and normalise an image and its boxes: ``(tensor, boxes, params)``."""
    _check_image(image)
    h, w = image.shape[:2]
    rp = resize_params(w, h, pre, scale=scale)
    params = PrepParams(
        orig_width=w,
        orig_height=h,
        out_width=rp.out_width,
        out_height=rp.out_height,
        flip=bool(flip),
        scale=float(scale),
    )
    tensor, out_boxes = apply_params(image, boxes, params, pre)
    return tensor, out_boxes, params
