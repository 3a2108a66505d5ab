"""Zarr v3 backend of the feature store: one array per stored quantity, sharded along the image axis.

Array ``name`` has shape ``(N, *per_image_shape)``; a chunk is one image and a shard object holds S images
(zarr's sharding codec), so shard s of the store is shard s of every array (object key ``name/c/s/0/...``).
Inside a shard every chunk is zstd-compressed and crc32c-checksummed, and so is the shard index. Feature maps
go straight to zstd; the float32/int32 records (proposals, scores, logits, deltas, scales) are byte-shuffled
first (blosc, zstd inside), which groups their sign/exponent bytes: 4-30% smaller for those arrays. Shuffling
does not pay for the maps: float16 maps come out 3% larger with byte shuffle, 20% with bit shuffle, and
8-bit codes have nothing to shuffle (benchmarks/extract.py, codec study).

A shard is written with one ``setitem`` per array covering the whole shard, so zarr writes each shard object in
a single store ``set``: LocalStore (zarr >= 3.1) writes it to a temp file and renames it, S3 stores it with one
PUT. Completeness does not rest on that: a shard counts only once its marker exists, and the marker is deleted
before and written after the shard's objects. The store is wrapped to record the size and crc32c of every
object it writes; the caller puts those in the marker.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as zasync
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from data._store_manifest import Location, Manifest, ObjectInfo

_ARRAY_CONFIG = {"write_empty_chunks": True}  # every written shard has one object per array
# Maps: zstd level 1 compresses inception maps as well as level 3 (float16: 3.85x vs 3.83x; int8 codes: 7.5x vs
# 7.4x) at half the encode time; level 9 gains < 2% for 3-5x the time.
ZSTD_LEVEL = 1
RECORD_ZSTD_LEVEL = 3  # the shuffled float32 records: level 3 is 2-3% smaller than level 1, and they are small
FEATURE_ARRAYS = ("features", "flip/features")


def _compressors(name: str) -> list[Any]:
    if name in FEATURE_ARRAYS:
        return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]
    return [BloscCodec(cname="zstd", clevel=RECORD_ZSTD_LEVEL, shuffle="shuffle"), Crc32cCodec()]


class _RecordingStore(WrapperStore[Store]):
    """Remembers the size and crc32c of each object it writes, so completion markers need no read-back."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._lock = threading.Lock()
        self._written: dict[str, ObjectInfo] = {}

    def _with_store(self, store: Store) -> _RecordingStore:
        return type(self)(store)

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        info = ObjectInfo.of(value.as_numpy_array())
        with self._lock:
            self._written[key] = info

    def pop_written(self, keys: list[str]) -> dict[str, ObjectInfo]:
        with self._lock:
            return {k: self._written.pop(k) for k in keys if k in self._written}


class ZarrBackend:
    """Arrays of a feature store in a zarr v3 group at the location's root. Not shared across processes:
    pickling keeps only the location and manifest, and a forked child reopens on first use."""

    name = "zarr"

    def __init__(self, location: Location, manifest: Manifest, *, writable: bool) -> None:
        self.location = location
        self.manifest = manifest
        self.writable = writable
        self._pid = -1
        self._store: _RecordingStore | None = None
        self._arrays: dict[str, Any] = {}  # name -> zarr AsyncArray

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location, "manifest": self.manifest, "writable": self.writable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], state["manifest"], writable=state["writable"])

    # ------------------------------------------------------------------ opening
    def _open_store(self) -> _RecordingStore:
        if self._store is None or self._pid != os.getpid():
            loc = self.location
            if loc.is_local:
                inner: Store = LocalStore(loc.root, read_only=not self.writable)
            else:
                inner = FsspecStore.from_url(loc.url, storage_options=loc.storage_options, read_only=not self.writable)
            self._store = _RecordingStore(inner)
            self._arrays = {}
            self._pid = os.getpid()
        return self._store

    def _array_map(self) -> dict[str, Any]:
        store = self._open_store()
        if not self._arrays:
            names = list(self.manifest.arrays())

            async def open_all() -> list[Any]:
                return await asyncio.gather(
                    *(
                        zasync.open_array(store=store, path=n, mode="r+" if self.writable else "r", zarr_format=3)
                        for n in names
                    )
                )

            # Runtime config is not stored in zarr.json, so it is set on every open: a shard that equals the
            # fill value everywhere must still be written, or it could not be told from a missing one.
            self._arrays = {n: a.with_config(_ARRAY_CONFIG) for n, a in zip(names, sync(open_all()))}
        return self._arrays

    def create(self) -> None:
        """Create the group and every array (metadata only). Called once, by the coordinator."""
        store = self._open_store()
        m = self.manifest
        root = zarr.open_group(store=store, mode="w-", attributes={"mimicdet": {"manifest": "manifest.json"}})
        if m.has_flips:
            root.create_group("flip")
        for name, (shape, dtype) in m.arrays().items():
            shard_images = m.shard_size
            zarr.create_array(
                store=store,
                name=name,
                shape=(m.num_images, *shape),
                dtype=dtype,
                chunks=(1, *shape),
                shards=(shard_images, *shape),
                compressors=_compressors(name),
                fill_value=0,
                config=_ARRAY_CONFIG,
            )
        self._arrays = {}

    def close(self) -> None:
        self._arrays = {}
        self._store = None

    # ------------------------------------------------------------------ layout
    def shard_keys(self, shard: int) -> list[str]:
        """Store keys of the objects that make up a shard, one per array."""
        out = []
        for name, (shape, _) in self.manifest.arrays().items():
            chunk_key = self._array_map()[name].metadata.encode_chunk_key((shard, *([0] * len(shape))))
            out.append(f"{name}/{chunk_key}")
        return out

    # ------------------------------------------------------------------ io
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> dict[str, ObjectInfo]:
        start, stop = self.manifest.shard_range(shard)
        store = self._open_store()
        amap = self._array_map()
        keys = self.shard_keys(shard)

        async def write() -> None:
            # Drop what an earlier, interrupted run left, so zarr does not merge into a stale shard object.
            await asyncio.gather(*(store.delete(k) for k in keys))
            await asyncio.gather(*(amap[name].setitem(slice(start, stop), data) for name, data in arrays.items()))

        sync(write())
        written = store.pop_written(keys)
        missing = sorted(set(keys) - set(written))
        if missing:
            raise RuntimeError(f"{self.location.url}: shard {shard}: zarr did not write {missing}")
        return written

    def read_image(self, index: int, prefix: str = "") -> dict[str, np.ndarray]:
        return self._read(index, prefix)

    def read_shard(self, shard: int, prefix: str = "") -> dict[str, np.ndarray]:
        start, stop = self.manifest.shard_range(shard)
        return self._read(slice(start, stop), prefix)

    def read_shard_array(self, shard: int, name: str) -> np.ndarray:
        start, stop = self.manifest.shard_range(shard)
        return np.asarray(sync(self._array_map()[name].getitem(slice(start, stop))))

    def _read(self, selection: int | slice, prefix: str) -> dict[str, np.ndarray]:
        amap = self._array_map()
        names = [n for n in amap if (n.startswith("flip/") if prefix else "/" not in n)]

        async def read() -> list[Any]:
            return await asyncio.gather(*(amap[n].getitem(selection) for n in names))

        values = sync(read())
        return {n[len(prefix) :]: np.asarray(v) for n, v in zip(names, values)}
