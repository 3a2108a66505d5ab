"""Opening a store location: its manifest, its backend (zarr or HDF5), its completion markers."""

from __future__ import annotations

from collections.abc import Mapping

from mimicdet.data.errors import StoreError
from mimicdet.store.cache import ShardCache
from mimicdet.store.hdf5_backend import Hdf5Backend
from mimicdet.store.manifest import (
    MANIFEST_NAME,
    MARKER_DIR,
    Location,
    Manifest,
    marker_key,
    parse_marker,
)
from mimicdet.store.remote import call_remote
from mimicdet.store.zarr_backend import ZarrBackend

Backend = ZarrBackend | Hdf5Backend


def make_backend(
    location: Location, manifest: Manifest, *, writable: bool, direct_reads: bool = False,
    cache: ShardCache | None = None,
) -> Backend:
    """``direct_reads``: the reader's fast path (zarr: local stores, or remote ones with a ``cache`` of their
    shards); verify keeps zarr's own decoder and reads a remote store directly."""
    if manifest.backend == "zarr":
        return ZarrBackend(location, manifest, writable=writable, direct_reads=direct_reads, cache=cache)
    return Hdf5Backend(location, manifest, writable=writable, cache=cache)


def load_manifest(location: Location) -> Manifest:
    source = f"{location.url}/{MANIFEST_NAME}"
    try:
        data = location.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise StoreError(f"{location.url}: not a feature store (no {MANIFEST_NAME})") from None
    return Manifest.from_json(data, source=source)


def marker_shards(location: Location) -> set[int]:
    """Shards whose completion marker exists (one listing)."""
    fs = location.fs

    def listing() -> list:
        fs.invalidate_cache()
        return fs.ls(location.path(MARKER_DIR), detail=False)

    try:
        names = listing() if location.is_local else call_remote(location.url, "listing completion markers", listing)
    except FileNotFoundError:
        return set()
    out = set()
    for name in names:
        base = str(name).rstrip("/").rsplit("/", 1)[-1]
        number = base[len("shard-") : -len(".json")]
        if base.startswith("shard-") and base.endswith(".json") and number.isdigit():
            out.add(int(number))
    return out


def shard_problem(
    location: Location, manifest: Manifest, backend: Backend, shard: int, sizes: Mapping[str, int]
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
