"""The feature store: the on-disk contract between the teacher (writer) and the student (reader).

Per image i (dataset order), stored in shard ``i // S``:
    features      C×Hmax×Wmax  float16, or int8 with ``scale`` R[C] (symmetric: q = round(x / scale),
                  scale = max|x| / 127 per channel of this image, rounded up to R); zero-padded beyond
                  ``feature_hw``
    feature_hw    int32[2]     the map's real h, w (cells of stride ``manifest.stride`` input pixels)
    proposals     R[K,4]       x1y1x2y2 in the preprocessed input's pixels, best first, zero-padded
    scores        R[K]
    num_proposals int32        k <= K valid rows
    class_logits  R[K,Kc], box_deltas R[K,4·Kc]: the teacher head's outputs on those proposals
and the same under ``flip/`` when horizontally flipped copies were extracted. Kc counts background. R is
``manifest.records_dtype``: float32, or float16 in int8 stores (format version 2; version-1 stores, float32
throughout, are still read). Readers always get float32.

A shard is complete iff its marker ``_complete/shard-NNNNN.json`` exists; the marker is written atomically after
every object of the shard, and records each object's size and crc32c (checked by ``verify_store``). Writers
of disjoint shards may run concurrently on different machines; the manifest is written once, at creation.

Locations are local paths or fsspec URLs (``s3://bucket/prefix``); pass ``storage_options`` or set
``$MIMICDET_S3_ENDPOINT`` for an S3-compatible endpoint.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data._store_hdf5 import Hdf5Backend
from data._store_manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_DIR,
    TEMP_SUFFIX,
    Location,
    Manifest,
    ObjectInfo,
    compare,
    marker_json,
    marker_key,
    parse_marker,
)
from data._store_zarr import ZarrBackend
from data.errors import StoreError

__all__ = [
    "FORMAT_VERSION",
    "ImageFeatures",
    "Manifest",
    "StoreReader",
    "StoreWriter",
    "VerifyReport",
    "VerifyStoreConfig",
    "check_dataset",
    "create_store",
    "describe_store",
    "format_inspection",
    "inspect_store",
    "open_store",
    "open_writer",
    "run_verify",
    "verify_store",
]

Mode = Literal["create", "resume", "overwrite"]
_Backend = ZarrBackend | Hdf5Backend
_FLIP = "flip/"


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


def _pack(manifest: Manifest, items: Sequence[ImageFeatures], where: str) -> dict[str, np.ndarray]:
    """Validate a shard's records against the manifest and lay them out as the stored arrays."""
    n = len(items)
    specs = {k: v for k, v in manifest.arrays().items() if not k.startswith(_FLIP)}
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


def _unpack(manifest: Manifest, image_id: str, a: Mapping[str, np.ndarray]) -> ImageFeatures:
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


def _split_shard(arrays: Mapping[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    return {name: v[j] for name, v in arrays.items()}


# ---------------------------------------------------------------------------------------------- opening


def _make_backend(location: Location, manifest: Manifest, *, writable: bool, direct_reads: bool = False) -> _Backend:
    """``direct_reads``: the reader's fast path (zarr, local stores); verify keeps zarr's own decoder."""
    if manifest.backend == "zarr":
        return ZarrBackend(location, manifest, writable=writable, direct_reads=direct_reads)
    return Hdf5Backend(location, manifest, writable=writable)


def _load_manifest(location: Location) -> Manifest:
    source = f"{location.url}/{MANIFEST_NAME}"
    try:
        data = location.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise StoreError(f"{location.url}: not a feature store (no {MANIFEST_NAME})") from None
    return Manifest.from_json(data, source=source)


def _marker_shards(location: Location) -> set[int]:
    """Shards whose completion marker exists (one listing)."""
    fs = location.fs
    fs.invalidate_cache()
    try:
        names = fs.ls(location.path(MARKER_DIR), detail=False)
    except FileNotFoundError:
        return set()
    out = set()
    for name in names:
        base = str(name).rstrip("/").rsplit("/", 1)[-1]
        number = base[len("shard-") : -len(".json")]
        if base.startswith("shard-") and base.endswith(".json") and number.isdigit():
            out.add(int(number))
    return out


def _shard_problem(
    location: Location, manifest: Manifest, backend: _Backend, shard: int, sizes: Mapping[str, int]
) -> str | None:
    """Why a shard is not complete (None if it is): marker missing/malformed or an object missing/resized."""
    key = marker_key(shard)
    if key not in sizes:
        return f"shard {shard}: incomplete (no completion marker {key})"
    try:
        marker = parse_marker(location.read_bytes(key), source=f"{location.url}/{key}")
    except StoreError as e:
        return f"shard {shard}: {e}"
    start, stop = manifest.shard_range(shard)
    if marker.shard != shard:
        return f"shard {shard}: marker {key} names shard {marker.shard}"
    ids = manifest.image_ids[start:stop]
    if marker.image_ids != ids:
        pairs = enumerate(zip(marker.image_ids, ids))
        j = next((j for j, (a, b) in pairs if a != b), min(len(ids), len(marker.image_ids)))
        got = repr(marker.image_ids[j]) if j < len(marker.image_ids) else "nothing"
        want = repr(ids[j]) if j < len(ids) else "nothing"
        return (
            f"shard {shard} image {start + j} ({want}): marker {key} lists {got} there "
            f"({len(marker.image_ids)} ids for the manifest's {len(ids)})"
        )
    expected = set(backend.shard_keys(shard))
    if set(marker.objects) != expected:
        return f"shard {shard}: marker {key} lists objects {sorted(marker.objects)}, expected {sorted(expected)}"
    for obj, info in sorted(marker.objects.items()):
        if obj not in sizes:
            return f"shard {shard}: object {obj} is missing"
        if sizes[obj] != info.size:
            return (
                f"shard {shard}: object {obj} is {sizes[obj]} bytes, its marker says {info.size} "
                "(truncated or rewritten)"
            )
    return None


# ---------------------------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes whole shards. Safe to pickle to another process or machine (reconnects lazily); writers of
    disjoint shards may run at the same time."""

    def __init__(self, location: Location, manifest: Manifest) -> None:
        self._location = location
        self.manifest = manifest
        self._backend = _make_backend(location, manifest, writable=True)

    @property
    def url(self) -> str:
        return self._location.url

    def __repr__(self) -> str:
        return f"StoreWriter({self.url!r}, {self.manifest.num_shards} shards)"

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Images [start, stop) that shard `shard_index` holds, in dataset order."""
        return self.manifest.shard_range(shard_index)

    def pending_shards(self) -> list[int]:
        """Shards without a valid completion marker or whose objects are missing or resized."""
        sizes = self._location.list_sizes()
        return [
            s
            for s in range(self.manifest.num_shards)
            if _shard_problem(self._location, self.manifest, self._backend, s, sizes)
        ]

    def write_shard(
        self, shard_index: int, items: Sequence[ImageFeatures], flipped: Sequence[ImageFeatures] | None = None
    ) -> None:
        """Write shard `shard_index` (images ``shard_range(shard_index)``, in order) and then its marker.
        `flipped` is required exactly when the manifest's flips are [false, true]."""
        m = self.manifest
        start, stop = m.shard_range(shard_index)
        where = f"{self.url} shard {shard_index}"
        ids = m.image_ids[start:stop]
        groups = [("", items)]
        if m.has_flips:
            if flipped is None:
                raise StoreError(f"{where}: the manifest has flips [false, true]; pass the flipped records too")
            groups.append((_FLIP, flipped))
        elif flipped is not None:
            raise StoreError(f"{where}: the manifest has flips [false]; got flipped records")
        arrays: dict[str, np.ndarray] = {}
        for prefix, records in groups:
            got = tuple(r.image_id for r in records)
            if got != ids:
                raise StoreError(
                    f"{where}: expected {'flipped ' if prefix else ''}records for images {_ids_text(ids)} "
                    f"(dataset order), got {_ids_text(got)}"
                )
            arrays |= {prefix + k: v for k, v in _pack(m, records, where + (" (flipped)" if prefix else "")).items()}
        # Marker first out, last in: a run killed anywhere in between leaves this shard pending.
        try:
            self._location.delete(marker_key(shard_index))
            objects: dict[str, ObjectInfo] = self._backend.write_shard(shard_index, arrays)
            self._location.write_bytes(marker_key(shard_index), marker_json(shard_index, ids, objects))
        except OSError as e:
            raise _write_error(self.url, f"shard {shard_index}", e) from None

    def discard_if_empty(self) -> bool:
        """Remove the whole store when no shard is complete, so a first run that failed leaves the location as
        it found it. Returns whether it did. Coordinator only, with no writer still running."""
        if len(self.pending_shards()) < self.manifest.num_shards:
            return False
        self.close()
        self._location.remove_all()
        return True

    def close(self) -> None:
        self._backend.close()


def _write_error(url: str, what: str, e: OSError) -> StoreError:
    """An OS error while writing (disk full, read-only or permission denied), phrased for the user. Nothing
    half-written counts: shards already complete are kept and a resumed writer redoes the rest."""
    if e.errno is None:
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = os.strerror(e.errno) + (f": {e.filename}" if e.filename else "")
    hint = "free some space; " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return StoreError(f"{url}: {what}: cannot write ({reason}); {hint}shards already complete are kept")


def _ids_text(ids: Sequence[str]) -> str:
    if len(ids) <= 4:
        return repr(list(ids))
    return f"[{ids[0]!r}, {ids[1]!r}, ..., {ids[-1]!r}] ({len(ids)} ids)"


def create_store(
    url: str | Path,
    manifest: Manifest,
    *,
    backend: Literal["zarr", "hdf5"] | None = None,
    mode: Mode = "create",
    storage_options: Mapping[str, Any] | None = None,
) -> StoreWriter:
    """Create a store (coordinator only) and return a writer.

    mode "create" refuses a non-empty location; "resume" reopens an existing store whose manifest equals
    `manifest` (or creates it if absent) and refuses one that differs, naming every changed field;
    "overwrite" deletes what is there first. `backend` overrides ``manifest.backend``.
    """
    if mode not in ("create", "resume", "overwrite"):
        raise ValueError(f"mode must be 'create', 'resume' or 'overwrite', got {mode!r}")
    location = Location(url, storage_options)
    manifest = replace(manifest, backend=backend or manifest.backend, _source=location.url)
    if mode == "overwrite":
        _check_only_a_store(location)
        location.remove_all()
    elif mode == "resume" and location.exists(MANIFEST_NAME):
        existing = _load_manifest(location)
        changed = compare(existing, manifest)
        if changed:
            raise StoreError(
                f"{location.url}: cannot resume, the store was made with other settings: {'; '.join(changed)}. "
                "Use --overwrite to replace it"
            )
        for key in location.list_sizes():
            if key.endswith(TEMP_SUFFIX):  # debris of a killed run; no worker is running yet
                location.delete(key)
        return StoreWriter(location, existing)
    debris = _creation_debris(location)
    if mode == "resume" and debris:  # a creation killed before its manifest: nothing of value, start again
        for key in debris:
            location.delete(key)
    if not location.is_empty():
        if location.exists(MANIFEST_NAME):
            what = "a feature store"
        elif debris:
            what = "a feature store whose creation was interrupted (no manifest.json yet)"
        else:
            what = "files (not a feature store)"
        hint = (
            "use --resume to finish it or --overwrite to replace it"
            if mode == "create"
            else "use --overwrite to replace it"
        )
        raise FileExistsError(f"{location.url}: {what} already exists there; {hint}")
    try:
        _make_backend(location, manifest, writable=True).create()
        location.write_bytes(MANIFEST_NAME, manifest.to_json().encode())  # last: a store with a manifest is whole
    except OSError as e:
        raise _write_error(location.url, "creating the store", e) from None
    return StoreWriter(location, manifest)


# The first path component of every object a store (either backend) writes.
_STORE_TOP_LEVEL = frozenset({MANIFEST_NAME, "zarr.json", MARKER_DIR, "shards", "flip", "features", "scale",
                              "feature_hw", "proposals", "scores", "num_proposals", "class_logits", "box_deltas"})


def _check_only_a_store(location: Location) -> None:
    """--overwrite deletes a feature store and nothing else: refuse a location that holds anything that is not
    one (no manifest and not the debris of an interrupted creation) or that holds other files beside it."""
    sizes = location.list_sizes()
    if not sizes:
        return
    if MANIFEST_NAME not in sizes and not _creation_debris(location):
        shown = ", ".join(sorted(sizes)[:4]) + (" ..." if len(sizes) > 4 else "")
        raise FileExistsError(
            f"{location.url}: not a feature store (no {MANIFEST_NAME}; holds {shown}); --overwrite only replaces a "
            "feature store, so nothing was removed; choose another --out"
        )
    foreign = sorted(k for k in sizes if k.split("/")[0] not in _STORE_TOP_LEVEL and not k.endswith(TEMP_SUFFIX))
    if foreign:
        shown = ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else "")
        raise FileExistsError(
            f"{location.url}: holds files that are not part of its feature store ({shown}); --overwrite only "
            "replaces a feature store, so nothing was removed; move them or choose another --out"
        )


def _creation_debris(location: Location) -> list[str]:
    """What a create_store killed before writing its manifest leaves: our zarr metadata and temp files.
    Empty when the location is empty or holds anything else (a store, or files that are not ours)."""
    sizes = location.list_sizes()
    if not sizes or MANIFEST_NAME in sizes:
        return []
    if not all(k.endswith(TEMP_SUFFIX) or k == "zarr.json" or k.endswith("/zarr.json") for k in sizes):
        return []
    if any(k.endswith("zarr.json") for k in sizes):  # our root group, with its attribute, is written first
        if "zarr.json" not in sizes:
            return []
        try:
            attributes = json.loads(location.read_bytes("zarr.json")).get("attributes", {})
        except (ValueError, AttributeError):
            return []
        if not isinstance(attributes, dict) or "mimicdet" not in attributes:
            return []
    return sorted(sizes)


def open_writer(url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> StoreWriter:
    """A writer on an existing store, for a worker that writes some of its pending shards."""
    location = Location(url, storage_options)
    return StoreWriter(location, _load_manifest(location))


# ---------------------------------------------------------------------------------------------- reader


class StoreReader:
    """Random access to a store's images. Pickles as (location, manifest): DataLoader workers and forked
    children reopen files and connections lazily, never sharing the parent's handles."""

    def __init__(self, location: Location, manifest: Manifest, *, cache_shards: int = 0) -> None:
        self._location = location
        self.manifest = manifest
        self.cache_shards = cache_shards
        self._backend = _make_backend(location, manifest, writable=False, direct_reads=True)
        self._index: dict[str, int] | None = None
        self._complete: set[int] | None = None
        self._cache: OrderedDict[tuple[int, str], dict[str, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self._location, "manifest": self.manifest, "cache_shards": self.cache_shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], state["manifest"], cache_shards=state["cache_shards"])

    def __repr__(self) -> str:
        return f"StoreReader({self.url!r}, {len(self)} images)"

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self._location.url

    @property
    def image_ids(self) -> tuple[str, ...]:
        return self.manifest.image_ids

    def __len__(self) -> int:
        return self.manifest.num_images

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._ids()

    def _ids(self) -> dict[str, int]:
        if self._index is None:
            self._index = {image_id: i for i, image_id in enumerate(self.manifest.image_ids)}
        return self._index

    def index_of(self, image_id: str) -> int:
        try:
            return self._ids()[image_id]
        except KeyError:
            m = self.manifest
            raise StoreError(
                f"{self.url}: image id {image_id!r} is not in the store "
                f"(dataset {m.dataset_name}/{m.dataset_split}, {len(m.image_ids)} images)"
            ) from None

    def shard_of(self, index: int) -> int:
        return index // self.manifest.shard_size

    def completed_shards(self) -> list[int]:
        self._complete = {s for s in _marker_shards(self._location) if s < self.manifest.num_shards}
        return sorted(self._complete)

    def is_complete(self) -> bool:
        return len(self.completed_shards()) == self.manifest.num_shards

    def _require_shard(self, shard: int, what: str) -> None:
        if self._complete is None or shard not in self._complete:
            self.completed_shards()  # the store may still be growing: look again before refusing
            if shard not in self._complete:  # type: ignore[operator]
                raise StoreError(
                    f"{self.url}: {what} is in shard {shard}, which is not complete (finish extraction with --resume)"
                )

    def _prefix(self, flip: bool) -> str:
        if flip and not self.manifest.has_flips:
            raise StoreError(
                f"{self.url}: no flipped features in this store (manifest flips {list(self.manifest.flips)})"
            )
        return _FLIP if flip else ""

    def read(self, index: int, *, flip: bool = False) -> ImageFeatures:
        """Image `index` (dataset order): features dequantised to float32 and cropped to the real map size."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.url}: image index {index} out of range for {n} images")
        index %= n
        image_id = self.manifest.image_ids[index]
        prefix = self._prefix(flip)
        shard = self.shard_of(index)
        self._require_shard(shard, f"image {index} ({image_id!r})")
        try:
            if self.cache_shards:
                arrays = self._cached_shard(shard, prefix)
                local = _split_shard(arrays, index - shard * self.manifest.shard_size)
                return _unpack(self.manifest, image_id, local)
            return _unpack(self.manifest, image_id, self._backend.read_image(index, prefix))
        except Exception as e:  # checksum, codec or file-format errors of whichever backend
            raise self._read_error(f"shard {shard} image {index} ({image_id!r}){' (flipped)' if flip else ''}", e)

    def _read_error(self, what: str, e: Exception) -> StoreError:
        if isinstance(e, StoreError):
            return e
        return StoreError(
            f"{self.url}: {what}: cannot be read ({type(e).__name__}: {e}); "
            f"`mimic verify-store {self.url}` lists every damaged image"
        )

    def _cached_shard(self, shard: int, prefix: str) -> dict[str, np.ndarray]:
        key = (shard, prefix)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self._backend.read_shard(shard, prefix)
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return self._cache[key]

    def read_shard(self, shard: int, *, flip: bool = False) -> list[ImageFeatures]:
        """All images of a shard with one read per array: the fast path for sequential streaming."""
        start, stop = self.manifest.shard_range(shard)
        prefix = self._prefix(flip)
        self._require_shard(shard, f"shard {shard}")
        ids = self.manifest.image_ids
        try:
            arrays = self._backend.read_shard(shard, prefix)
            return [_unpack(self.manifest, ids[i], _split_shard(arrays, i - start)) for i in range(start, stop)]
        except Exception as e:
            raise self._read_error(f"shard {shard} (images {_ids_text(ids[start:stop])})", e) from None

    def check_compatible(
        self,
        *,
        dataset_digest: str | None = None,
        preprocess: Mapping[str, Any] | Any | None = None,
        stride: int | None = None,
        channels: int | None = None,
        teacher_sha: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        """Raise StoreError naming both sides of every mismatch with what the caller is about to train on.
        `preprocess` may be a dict or an object with ``to_dict()`` (data.transforms.Preprocess)."""
        m = self.manifest
        problems: list[str] = []
        if dataset_digest is not None and dataset_digest != m.dataset_digest:
            problems.append(f"store dataset.digest {m.dataset_digest} != requested {dataset_digest}")
        if teacher_sha is not None and teacher_sha != m.teacher_sha256:
            problems.append(f"store teacher.sha256 {m.teacher_sha256} != requested {teacher_sha}")
        if stride is not None and stride != m.stride:
            problems.append(f"store features.stride {m.stride} != requested {stride}")
        if channels is not None and channels != m.channels:
            problems.append(f"store features.channels {m.channels} != requested {channels}")
        if classes is not None and tuple(classes) != m.classes:
            problems.append(f"store teacher.classes {list(m.classes)} != requested {list(classes)}")
        if preprocess is not None:
            asked = preprocess.to_dict() if hasattr(preprocess, "to_dict") else dict(preprocess)
            asked = json.loads(json.dumps(asked, sort_keys=True))
            if asked != m.preprocess:
                probe = replace(m, preprocess=asked)
                problems += [p for p in compare(m, probe)]
        if problems:
            raise StoreError(f"{self.url}: store does not match what was requested: {'; '.join(problems)}")

    def close(self) -> None:
        self._backend.close()


def open_store(
    url: str | Path, *, storage_options: Mapping[str, Any] | None = None, cache_shards: int = 0
) -> StoreReader:
    """A reader. ``cache_shards=n`` keeps the last n decoded shards in memory and makes ``read`` decode a whole
    shard on a miss: several times cheaper per image when reads walk a shard at a time (shuffle shards, then
    images within a shard); leave it at 0 for uniformly random access."""
    if cache_shards < 0:
        raise ValueError(f"cache_shards must be >= 0, got {cache_shards}")
    location = Location(url, storage_options)
    return StoreReader(location, _load_manifest(location), cache_shards=cache_shards)


# ---------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    url: str
    num_shards: int = 0
    complete_shards: int = 0
    images_checked: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational (e.g. a renamed dataset folder); never fail
    # store index -> the first problem found with that image (every image of a shard for shard-wide problems)
    bad_images: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: str, images: Sequence[int] | range = ()) -> None:
        self.errors.append(problem)
        for i in images:
            self.bad_images.setdefault(int(i), problem)

    def format(self) -> str:
        head = "OK" if self.ok else f"FAILED ({len(self.errors)} problems)"
        lines = [
            f"store {self.url}: {head}",
            f"  shards complete: {self.complete_shards}/{self.num_shards}, "
            f"images decoded and checked: {self.images_checked}",
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_store(
    url: str | Path,
    *,
    dataset: Any | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shards: Sequence[int] | None = None,
    deep: bool = True,
) -> VerifyReport:
    """Check the manifest, every completion marker, every shard object's size and crc32c, decode every chunk
    (zarr/HDF5 checksums), compare the stored arrays' shapes with the manifest, look for NaN/Inf, and, given a
    `data.records.Dataset`, that it is the one the store was made from. Never raises for a broken store:
    everything found is in the report, and ``report.bad_images`` names the images affected.

    ``shards`` limits the check to those shards (default: all). ``deep=False`` checks only what needs no data
    read: markers, and that every object is present with the size its marker records (truncation)."""
    location = Location(url, storage_options)
    report = VerifyReport(url=location.url)
    try:
        manifest = _load_manifest(location)
    except (StoreError, FileNotFoundError) as e:
        report.errors.append(str(e))
        return report
    report.num_shards = manifest.num_shards
    selected = range(manifest.num_shards) if shards is None else sorted(set(int(s) for s in shards))
    backend = _make_backend(location, manifest, writable=False)
    sizes = location.list_sizes()
    for shard in selected:
        images = range(*manifest.shard_range(shard))
        corrupted = False
        problem = _shard_problem(location, manifest, backend, shard, sizes)
        if problem is not None:
            report.add(problem, images)
            if "no completion marker" in problem or not deep:
                continue
        else:
            report.complete_shards += 1
            if not deep:
                continue
            marker = parse_marker(location.read_bytes(marker_key(shard)), source=marker_key(shard))
            for obj, info in sorted(marker.objects.items()):
                actual = ObjectInfo.of(location.read_bytes(obj))
                if actual != info:
                    corrupted = True
                    report.errors.append(
                        f"shard {shard}: object {obj} crc32c {actual.crc32c:08x} != {info.crc32c:08x} "
                        "recorded in its marker (corrupted)"
                    )
        found = len(report.bad_images)
        _check_shard_data(manifest, backend, shard, report)
        if corrupted and len(report.bad_images) == found:
            # The chunk checksums did not say which image: count the whole shard as damaged.
            for i in images:
                report.bad_images.setdefault(i, f"shard {shard}: corrupted (crc32c mismatch)")
    backend.close()
    for key in sorted(sizes):
        if key.endswith(TEMP_SUFFIX):
            report.warnings.append(
                f"leftover temporary file {key} from an interrupted write (ignored by readers; --resume removes it)"
            )
    if dataset is not None:
        problems, notes = check_dataset(manifest, dataset)
        report.errors += problems
        report.notes += notes
    return report


def _check_shard_data(manifest: Manifest, backend: _Backend, shard: int, report: VerifyReport) -> None:
    """Decode every chunk of a shard; name the images that fail to decode, whose arrays do not have the shape the
    manifest gives, or that hold non-finite values."""
    start, stop = manifest.shard_range(shard)
    ids = manifest.image_ids
    H, W = manifest.max_hw
    specs = manifest.arrays()
    for prefix in [""] + ([_FLIP] if manifest.has_flips else []):
        label = " (flipped)" if prefix else ""
        rows: list[tuple[int, dict[str, np.ndarray]]] = []
        try:
            arrays = backend.read_shard(shard, prefix)
            rows = [(i, _split_shard(arrays, i - start)) for i in range(start, stop)]
        except Exception as shard_error:  # a checksum or format error: find which images are affected
            failures = []
            for i in range(start, stop):
                try:
                    rows.append((i, backend.read_image(i, prefix)))
                except Exception as e:
                    failures.append((i, e))
            if len(failures) == stop - start:  # e.g. an unreadable file or shard index: one line, not S
                report.add(
                    f"shard {shard}{label} (images {_ids_text(ids[start:stop])}): cannot be decoded "
                    f"({type(shard_error).__name__}: {shard_error})",
                    range(start, stop),
                )
            else:
                for i, e in failures:
                    report.add(
                        f"shard {shard} image {i} ({ids[i]!r}){label}: cannot be decoded ({type(e).__name__}: {e})",
                        [i],
                    )
        if rows:
            wrong = [
                f"{name} {list(rows[0][1][name].shape)} {rows[0][1][name].dtype} (manifest: {list(shape)} {dtype})"
                for name, (shape, dtype) in specs.items()
                if name.startswith(_FLIP) == bool(prefix)
                and (rows[0][1][name[len(prefix):]].shape != shape or rows[0][1][name[len(prefix):]].dtype != dtype)
            ]
            if wrong:
                report.add(
                    f"shard {shard}{label} (images {_ids_text(ids[start:stop])}): stored arrays do not have the "
                    f"per-image shape the manifest gives: {'; '.join(wrong)}",
                    range(start, stop),
                )
                continue
        for i, a in rows:
            where = f"shard {shard} image {i} ({ids[i]!r}){label}"
            h, w = (int(v) for v in a["feature_hw"])
            k = int(a["num_proposals"])
            if not (1 <= h <= H and 1 <= w <= W and 0 <= k <= manifest.num_proposals):
                report.add(f"{where}: feature_hw {[h, w]} / num_proposals {k} out of range", [i])
                continue
            item = _unpack(manifest, ids[i], a)
            for name in ("features", "proposals", "scores", "class_logits", "box_deltas"):
                v = getattr(item, name)
                bad = int(v.size - np.count_nonzero(np.isfinite(v)))
                if bad:
                    report.add(f"{where}: {bad} NaN/Inf values in {name}", [i])
        report.images_checked += len(rows) if not prefix else 0


def check_dataset(manifest: Manifest, dataset: Any) -> tuple[list[str], list[str]]:
    """Whether a store was made from ``dataset`` (a `data.records.Dataset`): the one rule of `mimic verify-store
    --data` and `mimic train-student` (student.stream.open_source). Returns (problems, notes); any problem refuses.

    Every image id of the dataset must be in the store. When the dataset holds exactly the store's images, the
    digest of their ids and sizes (`Dataset.digest`, in the store's order) must be the manifest's dataset.digest;
    a dataset holding only some of the store's images is checked by id alone (the digest covers all of them). The
    dataset's name (its folder's name) and split name do not decide: a renamed or copied folder gets a note."""
    problems: list[str] = []
    notes: list[str] = []
    where = f"{dataset.name}/{dataset.split}"
    index = {image_id: i for i, image_id in enumerate(manifest.image_ids)}
    missing = [r.image_id for r in dataset.records if r.image_id not in index]
    if missing:
        problems.append(
            f"store has no record for {len(missing)} of {len(dataset)} images of {where} (first: {missing[0]!r})"
        )
    if missing or len(dataset) == manifest.num_images:
        records = dataset.records if missing else tuple(sorted(dataset.records, key=lambda r: index[r.image_id]))
        digest = replace(dataset, records=records).digest()
        if digest != manifest.dataset_digest:
            problems.append(f"store dataset.digest {manifest.dataset_digest!r} != dataset {digest!r}")
    else:
        notes.append(
            f"dataset {where} holds {len(dataset)} of the store's {manifest.num_images} images: checked by image id "
            "only (the store's dataset.digest covers all of them)"
        )
    if tuple(dataset.classes) != tuple(manifest.classes):
        problems.append(f"store teacher.classes {list(manifest.classes)!r} != dataset {list(dataset.classes)!r}")
    for name, a, b in (("name", manifest.dataset_name, dataset.name), ("split", manifest.dataset_split, dataset.split)):
        if a != b:
            notes.append(f"store dataset.{name} {a!r} != dataset {b!r} (only a name: the dataset.digest decides)")
    return problems, notes


# ---------------------------------------------------------------------------------------------- inspect


def inspect_store(url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Manifest, bytes on disk, raw float32 size of what is stored, compression ratio, bytes per image, the
    images each shard holds and completion. Raw float32 counts each image's real map (C·h·w) and its k proposals'
    rows. A shard is complete when its marker and every one of its objects exist (one listing: a marker is not
    parsed and no object is checked beyond its presence; `verify_store` checks sizes and checksums);
    ``missing_objects`` names, per shard with a marker, the objects it lacks."""
    location = Location(url, storage_options)
    manifest = _load_manifest(location)
    backend = _make_backend(location, manifest, writable=False)
    sizes = location.list_sizes()
    missing_objects: dict[int, list[str]] = {}
    done = []
    for shard in range(manifest.num_shards):
        if marker_key(shard) not in sizes:
            continue
        lacking = [k for k in backend.shard_keys(shard) if k not in sizes]
        if lacking:
            missing_objects[shard] = lacking
        else:
            done.append(shard)
    C, Kc = manifest.channels, manifest.num_classes
    data_bytes = raw = images = 0
    for shard in done:
        data_bytes += sum(sizes.get(k, 0) for k in backend.shard_keys(shard))
        for prefix in [""] + ([_FLIP] if manifest.has_flips else []):
            hw = backend.read_shard_array(shard, prefix + "feature_hw").astype(np.int64)
            k = backend.read_shard_array(shard, prefix + "num_proposals").astype(np.int64)
            raw += 4 * int((C * hw[:, 0] * hw[:, 1]).sum() + (k * (4 + 1 + Kc + 4 * Kc)).sum())
        start, stop = manifest.shard_range(shard)
        images += stop - start
    backend.close()
    return {
        "url": location.url,
        "manifest": manifest.to_dict(),
        "bytes_on_disk": sum(sizes.values()),
        "shard_bytes": data_bytes,
        "raw_float32_bytes": raw,
        "compression_ratio": raw / data_bytes if data_bytes else None,
        "bytes_per_image": data_bytes / images if images else None,
        "images_done": images,
        "shard_images": [stop - start for start, stop in map(manifest.shard_range, range(manifest.num_shards))],
        "missing_objects": missing_objects,
        "completion": {
            "done": len(done),
            "total": manifest.num_shards,
            "pending": sorted(set(range(manifest.num_shards)) - set(done)),
        },
    }


def format_inspection(info: Mapping[str, Any]) -> str:
    m = info["manifest"]
    t, d, f, p, lay = m["teacher"], m["dataset"], m["features"], m["proposals"], m["layout"]
    c = info["completion"]
    pending = c["pending"]
    ratio = info["compression_ratio"]
    per_image = info["bytes_per_image"]
    damaged = sorted(info["missing_objects"].items())
    lines = [
        f"store       {info['url']}  ({lay['backend']}, format {m['format_version']})",
        f"teacher     {t['arch']} width {t['width']} head {t['head']}  sha256 {t['sha256'][:16]}...  "
        f"{len(t['classes'])} classes: {', '.join(t['classes'][:8])}{' ...' if len(t['classes']) > 8 else ''}",
        f"dataset     {d['name']}/{d['split']}: {d['num_images']} images  digest {d['digest'][:16]}...",
        f"preprocess  {json.dumps(m['preprocess'], sort_keys=True)}  flips {m['flips']}",
        f"features    {f['layer']} stride {f['stride']}  C={f['channels']}  max {f['max_hw'][0]}x{f['max_hw'][1]}  "
        f"{f['dtype']} (quantisation {f['quantisation']})",
        f"proposals   K={p['k']} nms {p['nms_threshold']}  {p['num_classes']} classes incl. background",
        f"shards      {c['done']}/{c['total']} complete ({_shard_images_text(info['shard_images'])})"
        + (f"; pending {pending[:10]}{' ...' if len(pending) > 10 else ''}" if pending else ""),
        *(
            f"damaged     shard {shard}: has its completion marker but lacks {_keys_text(keys)} "
            "(`mimic extract-teacher ... --resume` rewrites it)"
            for shard, keys in damaged[:10]
        ),
        *([f"damaged     ... and {len(damaged) - 10} more shards"] if len(damaged) > 10 else []),
        f"on disk     {_human(info['bytes_on_disk'])} total, "
        f"{_human(info['shard_bytes'])} in shards for {info['images_done']} images",
        f"raw float32 {_human(info['raw_float32_bytes'])}; compression {ratio:.2f}x; {_human(per_image)} per image"
        if ratio
        else "raw float32 (no complete shards yet)",
    ]
    return "\n".join(lines)


def _shard_images_text(counts: Sequence[int]) -> str:
    """Images per shard, as stored: "1 shard of 16 images", "2 shards of 4 images", "2 shards: 64 + 36 images"."""
    n = len(counts)
    images = lambda k: f"{k} image{'' if k == 1 else 's'}"  # noqa: E731
    if n == 0:
        return "no shards"
    if len(set(counts)) == 1:
        return f"{n} shard{'' if n == 1 else 's'} of {images(counts[0])}"
    if n <= 3:
        return f"{n} shards: {' + '.join(map(str, counts))} images"
    return f"{n} shards: {images(counts[0])} each, the last {counts[-1]}"


def _keys_text(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more objects" if len(keys) > 3 else "")


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_store(url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """`mimic inspect-store`: the inspection as readable text."""
    return format_inspection(inspect_store(url, storage_options=storage_options))


# ---------------------------------------------------------------------------------------------- CLI configs


@dataclass(frozen=True)
class VerifyStoreConfig:
    store: str
    data_root: Path | None = None  # with split: also check the store was made from this dataset
    split: str | None = None


def run_verify(config: VerifyStoreConfig) -> VerifyReport:
    """`mimic verify-store`: verify, loading the dataset to compare against when one is given."""
    dataset = None
    if config.data_root is not None:
        from data import load_dataset  # another package's reader; only needed for this check

        dataset = load_dataset(config.data_root, config.split)
    return verify_store(config.store, dataset=dataset)
