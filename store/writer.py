"""Creating a store and writing whole shards (atomically: a shard counts once its marker is written)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from mimicdet.data.errors import StoreError
from mimicdet.store.backend import load_manifest, make_backend, shard_problem
from mimicdet.store.format import FLIP_PREFIX, ImageFeatures, pack_shard
from mimicdet.store.manifest import (
    MANIFEST_NAME,
    MARKER_DIR,
    TEMP_SUFFIX,
    Location,
    Manifest,
    ObjectInfo,
    compare,
    marker_json,
    marker_key,
)

Mode = Literal["create", "resume", "overwrite"]


class StoreWriter:
    """Writes whole shards. Safe to pickle to another process or machine (reconnects lazily); writers of
    disjoint shards may run at the same time."""

    def __init__(self, location: Location, manifest: Manifest) -> None:
        self._location = location
        self.manifest = manifest
        self._backend = make_backend(location, manifest, writable=True)

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
            if shard_problem(self._location, self.manifest, self._backend, s, sizes)
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
            groups.append((FLIP_PREFIX, flipped))
        elif flipped is not None:
            raise StoreError(f"{where}: the manifest has flips [false]; got flipped records")
        arrays: dict[str, np.ndarray] = {}
        for prefix, records in groups:
            got = tuple(r.image_id for r in records)
            if got != ids:
                raise StoreError(
                    f"{where}: expected {'flipped ' if prefix else ''}records for images {ids_text(ids)} "
                    f"(dataset order), got {ids_text(got)}"
                )
            arrays |= {prefix + k: v for k, v in pack_shard(m, records, where + (" (flipped)" if prefix else "")).items()}
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


def ids_text(ids: Sequence[str]) -> str:
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
        existing = load_manifest(location)
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
        make_backend(location, manifest, writable=True).create()
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
    return StoreWriter(location, load_manifest(location))
