"""One image's teacher outputs and how a shard of them is packed into arrays (and back)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mimicdet.data.errors import StoreError
from mimicdet.store.manifest import (
    Manifest,
)

FLIP_PREFIX = "flip/"  # arrays of the horizontally flipped copies


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """One image's teacher outputs, as written and as read (features cropped to the real map size)."""

    image_id: str
    features: np.ndarray  # float32[C, h, w]
    proposals: np.ndarray  # float32[k, 4] x1y1x2y2, preprocessed-input pixels
    scores: np.ndarray  # float32[k]
    class_logits: np.ndarray  # float32[k, Kc]
    box_deltas: np.ndarray  # float32[k, 4*Kc]


# ---------------------------------------------------------------------------------------------- packing


def quantise_int8(features: np.ndarray, scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """float[C,h,w] -> (int8[C,h,w], scale[C] of `scale_dtype`); symmetric per channel, |error| <= scale / 2.
    A float16 scale is max|x| / 127 rounded up to the next float16, so no code is clipped and the bound holds for
    the stored scale. A non-finite channel keeps a non-finite scale, so the reader (and verify) still sees it."""
    x = features.astype(np.float32, copy=False)
    amax = np.abs(x).reshape(len(x), -1).max(axis=1)
    scale = (amax / 127.0).astype(np.float32)
    if scale_dtype == "float16":
        with np.errstate(over="ignore"):
            half = scale.astype(np.float16)
        low = np.isfinite(scale) & (half.astype(np.float32) < scale)
        half[low] = np.nextafter(half[low], np.float16(np.inf))
        scale = half.astype(np.float32)  # exactly representable: the float16 values, as float32
    safe = np.where(np.isfinite(scale) & (scale > 0), scale, np.float32(1.0))
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(x / safe[:, None, None]), -127, 127)
    return np.nan_to_num(q, nan=0.0).astype(np.int8), scale.astype(scale_dtype)


def pack_shard(manifest: Manifest, items: Sequence[ImageFeatures], where: str) -> dict[str, np.ndarray]:
    """Validate a shard's records against the manifest and lay them out as the stored arrays."""
    n = len(items)
    specs = {k: v for k, v in manifest.arrays().items() if not k.startswith(FLIP_PREFIX)}
    out = {name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in specs.items()}
    C, (H, W), K, Kc = manifest.channels, manifest.max_hw, manifest.num_proposals, manifest.num_classes
    for j, item in enumerate(items):
        tag = f"{where} image {item.image_id!r}"
        f = _as_float(item.features, f"{tag}: features")
        if f.ndim != 3 or f.shape[0] != C or not (1 <= f.shape[1] <= H and 1 <= f.shape[2] <= W):
            raise StoreError(
                f"{tag}: features must be float[{C}, h<={H}, w<={W}] (h, w >= 1), got shape {list(f.shape)}"
            )
        proposals = _as_float(item.proposals, f"{tag}: proposals")
        k = proposals.shape[0] if proposals.ndim == 2 else -1
        if proposals.ndim != 2 or proposals.shape[1] != 4 or k > K:
            raise StoreError(f"{tag}: proposals must be float32[k<={K}, 4], got shape {list(proposals.shape)}")
        rows = {"proposals": proposals}
        for name, shape in {"scores": (k,), "class_logits": (k, Kc), "box_deltas": (k, 4 * Kc)}.items():
            a = _as_float(getattr(item, name), f"{tag}: {name}")
            if a.shape != shape:
                raise StoreError(
                    f"{tag}: {name} must be float32{list(shape)} for its {k} proposals, got shape {list(a.shape)}"
                )
            rows[name] = a
        bad = sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in (f, *rows.values()))
        if bad:
            warnings.warn(
                f"{tag}: {bad} non-finite values stored (verify-store will report them)", RuntimeWarning, stacklevel=3
            )
        h, w = f.shape[1:]
        if manifest.dtype == "int8":
            out["features"][j, :, :h, :w], out["scale"][j] = quantise_int8(f, manifest.records_dtype)
        else:
            _float32_to_float16(f, out=out["features"][j, :, :h, :w])
            if not bad and _has_inf16(out["features"][j]):
                warnings.warn(
                    f"{tag}: features beyond the float16 range (|x| > 65504) stored as Inf; consider dtype int8",
                    RuntimeWarning,
                    stacklevel=3,
                )
        out["feature_hw"][j] = (h, w)
        out["num_proposals"][j] = k
        for name, a in rows.items():
            with np.errstate(over="ignore"):
                out[name][j, :k] = a
        if manifest.records_dtype == "float16" and not bad:
            over = [n for n in (*rows, "scale") if n in out and _has_inf16(out[n][j])]
            if over:
                warnings.warn(
                    f"{tag}: {', '.join(over)} beyond the float16 range (|x| > 65504) stored as Inf",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return out


def _as_float(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise StoreError(f"{what}: expected a float array, got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def unpack_image(manifest: Manifest, image_id: str, a: Mapping[str, np.ndarray]) -> ImageFeatures:
    """Stored arrays of one image -> ImageFeatures (cropped, dequantised, float32)."""
    h, w = (int(v) for v in a["feature_hw"])
    k = int(a["num_proposals"])
    f = a["features"][:, :h, :w]
    if manifest.dtype == "int8":
        features = np.multiply(f, a["scale"].astype(np.float32)[:, None, None], dtype=np.float32)
    else:
        features = _float16_to_float32(f)
    return ImageFeatures(
        image_id=image_id,
        features=features,
        proposals=np.array(a["proposals"][:k], np.float32),
        scores=np.array(a["scores"][:k], np.float32),
        class_logits=np.array(a["class_logits"][:k], np.float32),
        box_deltas=np.array(a["box_deltas"][:k], np.float32),
    )


def _float16_to_float32(f: np.ndarray) -> np.ndarray:
    """numpy converts float16 one value at a time (0.65 ms for an 832x16x16 map, converted on every read); torch's
    vectorised conversion takes 0.1 ms. In slices below torch's parallel grain size, because the parallel
    version stalls whenever another process holds a core (8 ms per map on a loaded 2-core machine)."""
    import torch  # the student's side always has it; imported here so the store's tools do not pay for it

    src = torch.from_numpy(np.ascontiguousarray(f)).reshape(-1)
    return _copy_in_slices(torch.empty(src.numel(), dtype=torch.float32), src).numpy().reshape(f.shape)


def _copy_in_slices(dst, src):
    """``dst.copy_(src)`` for flat tensors, in slices each run on the calling thread (see above)."""
    for i in range(0, src.numel(), _CONVERT_SLICE):
        dst[i : i + _CONVERT_SLICE].copy_(src[i : i + _CONVERT_SLICE])
    return dst


_CONVERT_SLICE = 16384  # < at::internal::GRAIN_SIZE (32768): each copy runs on the calling thread


def _float32_to_float16(f: np.ndarray, *, out: np.ndarray) -> None:
    """``out[...] = f`` as float16 (round to nearest even, Inf beyond the range, as numpy), through torch: numpy's
    cast took 0.8-1.2 ms per 832x16x16 map, most of what packing a shard cost; torch's takes 0.03 ms."""
    import torch

    src = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)).reshape(-1)
    if out.flags.c_contiguous:
        _copy_in_slices(torch.from_numpy(out).reshape(-1), src)
    else:  # a crop of a larger map: convert, then numpy's strided copy (float16 to float16, no conversion)
        out[...] = _copy_in_slices(torch.empty(src.numel(), dtype=torch.float16), src).numpy().reshape(f.shape)


def _has_inf16(a: np.ndarray) -> bool:
    """Whether a float16 array holds an Inf or NaN (exponent bits all set), without numpy's slow float16 ops."""
    bits = np.ascontiguousarray(a).view(np.uint16)
    return bool(((bits & 0x7C00) == 0x7C00).any())


def image_arrays(arrays: Mapping[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    return {name: v[j] for name, v in arrays.items()}
