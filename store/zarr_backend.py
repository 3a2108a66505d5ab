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

Reads of a local store take a direct path (``_DirectReader``): zarr's asynchronous machinery costs about 2 ms of
CPU per array read whatever its size, so one image's 7 arrays cost 10-13 ms, more than the student's loader can
spend per image. The direct path reads a shard's index once (cached, keyed on the object's size and mtime), then
each chunk with one ``pread``, checks its crc32c and decompresses it: about 1 ms per image. It follows the zarr v3
sharding codec spec (index of ``(offset, nbytes)`` little-endian uint64 pairs at the end of the object, crc32c
appended to the index and to every chunk) and is used only when an array's codecs are exactly those this
module writes. A remote store read with a shard cache (``store/cache.py``) takes the same path over the cached
copies of its shard objects; anything else, remote stores without one, and ``verify_store`` go through zarr
itself.

Writes take the mirror path (``_encode_shard``): the same per-chunk cost made zarr's ``setitem`` spend about
6 ms of CPU per image on a shard of 32 (224 chunks through the asynchronous codec pipeline) against 1.6 ms for
the codecs themselves, and on a CPU-bound extraction that time comes straight off the teacher's. Each chunk is
encoded with the array's own codecs (numcodecs zstd or blosc, then crc32c), the index appended, and the object
handed to the store in one ``set``; the bytes equal zarr's (a test compares them), so zarr, ``verify_store``
and any other zarr v3 reader read these shards as their own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from typing import Any

import crc32c
import numcodecs
import numcodecs.blosc
import numcodecs.zstd
import numpy as np
import zarr
import zarr.api.asynchronous as zasync
from mimicdet.store.cache import ShardCache
from mimicdet.store.manifest import Location, Manifest, ObjectInfo
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

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

    def __init__(
        self, location: Location, manifest: Manifest, *, writable: bool, direct_reads: bool = False,
        cache: ShardCache | None = None,
    ) -> None:
        self.location = location
        self.manifest = manifest
        self.writable = writable
        self.direct_reads = direct_reads  # reads bypass zarr where the layout allows (local stores, cached remote)
        self.cache = cache  # a remote store's local shard copies
        self._pid = -1
        self._store: _RecordingStore | None = None
        self._arrays: dict[str, Any] = {}  # name -> zarr AsyncArray
        self._direct: _DirectReader | None | bool = None  # None: not decided yet; False: not possible
        self._encoders: dict[str, _ChunkCodec] | None | bool = None  # likewise, for writes

    def __getstate__(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "manifest": self.manifest,
            "writable": self.writable,
            "direct_reads": self.direct_reads,
            "cache": self.cache,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["location"], state["manifest"], writable=state["writable"],
            direct_reads=state.get("direct_reads", False), cache=state.get("cache"),
        )

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
            self._direct = None
            self._encoders = None
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
        self._encoders = None

    def close(self) -> None:
        self._arrays = {}
        self._store = None
        self._direct = None
        self._encoders = None

    def _direct_reader(self) -> _DirectReader | None:
        if not self.direct_reads or self.writable:
            return None
        self._open_store()  # resets the reader in a forked child
        if self._direct is None:
            self._direct = (
                _DirectReader.for_arrays(self.location, self.manifest, self._array_map(), cache=self.cache) or False
            )
        return self._direct or None

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
        if self._encoders is None:
            self._encoders = chunk_codecs(self.manifest, amap) or False
        encoders = self._encoders

        objects: dict[str, bytes] = {}
        if encoders:  # the objects encoded here, in this thread (module docstring)
            objects = {f"{name}/{encoders[name].key(shard)}": _encode_shard(encoders[name], data, self.manifest.shard_size)
                       for name, data in arrays.items()}

        async def write() -> None:
            # Drop what an earlier, interrupted run left, so zarr does not merge into a stale shard object.
            await asyncio.gather(*(store.delete(k) for k in keys))
            if objects:
                proto = default_buffer_prototype().buffer
                await asyncio.gather(*(store.set(k, proto.from_bytes(b)) for k, b in objects.items()))
            else:
                await asyncio.gather(*(amap[name].setitem(slice(start, stop), data) for name, data in arrays.items()))

        sync(write())
        written = store.pop_written(keys)
        missing = sorted(set(keys) - set(written))
        if missing:
            raise RuntimeError(f"{self.location.url}: shard {shard}: zarr did not write {missing}")
        return written

    def read_image(self, index: int, prefix: str = "") -> dict[str, np.ndarray]:
        direct = self._direct_reader()
        if direct is not None:
            return direct.read_image(index, prefix)
        return self._read(index, prefix)

    def read_shard(self, shard: int, prefix: str = "") -> dict[str, np.ndarray]:
        direct = self._direct_reader()
        if direct is not None:
            return direct.read_shard(shard, prefix)
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


# ---------------------------------------------------------------------------------------------- direct reads

_EMPTY = 2**64 - 1  # the sharding codec's marker of an absent chunk
INDEX_CACHE_SHARDS = 4096  # (array, shard) indexes kept per reader: 16 bytes per image each


class _ChunkCodec:
    """How one array's chunks are encoded: bytes (little endian) -> zstd or blosc -> crc32c.
    ``encoder``: the numcodecs codec configured as zarr's (level, shuffle, typesize), for writes."""

    def __init__(
        self, name: str, key: Any, shape: tuple[int, ...], dtype: np.dtype, compressor: str, encoder: Any = None
    ) -> None:
        self.name, self.key, self.shape, self.dtype, self.compressor = name, key, shape, dtype, compressor
        self.encoder = encoder

    def encode(self, value: np.ndarray) -> bytes:
        raw = np.asarray(value, dtype=self.dtype)
        if raw.shape != self.shape:
            raise ValueError(f"chunk of {self.name} has shape {list(raw.shape)}, expected {list(self.shape)}")
        payload = self.encoder.encode(raw.tobytes())
        return bytes(payload) + _crc_bytes(payload)

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        payload = _check_crc(data)
        if self.compressor == "zstd":
            raw = numcodecs.zstd.decompress(payload)
        else:
            raw = numcodecs.blosc.decompress(bytes(payload))
        expected = int(np.prod(self.shape)) * self.dtype.itemsize
        if len(raw) != expected:
            raise ValueError(f"chunk of {self.name} decompresses to {len(raw)} bytes, expected {expected}")
        # A writable copy (a memcpy, ~1/20 of the decompression): readers may hand it to torch as it is.
        return np.frombuffer(bytearray(raw), dtype=self.dtype).reshape(self.shape)


def _crc_bytes(data: bytes | memoryview) -> bytes:
    return np.uint32(crc32c.crc32c(data)).astype("<u4").tobytes()


def _encode_shard(codec: _ChunkCodec, rows: np.ndarray, shard_size: int) -> bytes:
    """One shard object as zarr's sharding codec lays it out: the chunks of ``rows`` (images 0..len-1 of the
    shard; a short last shard leaves the rest absent) back to back, then the ``(offset, nbytes)`` index and its
    crc32c."""
    index = np.full((shard_size, 2), _EMPTY, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    for j in range(len(rows)):
        chunk = codec.encode(rows[j])
        index[j] = (offset, len(chunk))
        offset += len(chunk)
        parts.append(chunk)
    tail = index.tobytes()
    parts += [tail, _crc_bytes(tail)]
    return b"".join(parts)


def _check_crc(data: bytes | memoryview) -> memoryview:
    view = memoryview(data)
    if len(view) < 4:
        raise ValueError(f"object of {len(view)} bytes is too short to hold a crc32c")
    stored, inner = bytes(view[-4:]), view[:-4]
    computed = np.uint32(crc32c.crc32c(inner)).astype("<u4").tobytes()
    if computed != stored:
        raise ValueError(f"Stored and computed checksum do not match. Stored: {stored!r}. Computed: {computed!r}.")
    return inner


def chunk_codecs(manifest: Manifest, arrays: dict[str, Any]) -> dict[str, _ChunkCodec] | None:
    """Each array's chunk codec if every array is laid out as this module writes it (one chunk per image,
    shards of ``shard_size`` images, index at the end; bytes -> zstd or blosc -> crc32c), else None."""
    codecs: dict[str, _ChunkCodec] = {}
    for name, array in arrays.items():
        meta = array.metadata
        per_image = tuple(manifest.arrays()[name][0])
        if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
            return None
        sharding = meta.codecs[0]
        inner, index = tuple(sharding.codecs), tuple(sharding.index_codecs)
        if tuple(sharding.chunk_shape) != (1, *per_image) or sharding.index_location.value != "end":
            return None
        if tuple(meta.chunk_grid.chunk_shape) != (manifest.shard_size, *per_image):
            return None
        ok_bytes = lambda c: isinstance(c, BytesCodec) and (c.endian is None or c.endian.value == "little")  # noqa: E731
        if len(index) != 2 or not ok_bytes(index[0]) or not isinstance(index[1], Crc32cCodec):
            return None
        if len(inner) != 3 or not ok_bytes(inner[0]) or not isinstance(inner[2], Crc32cCodec):
            return None
        dtype = np.dtype(meta.data_type.to_native_dtype()).newbyteorder("<")
        compressor, c = None, inner[1]
        if isinstance(c, ZstdCodec):
            compressor, encoder = "zstd", numcodecs.Zstd(level=c.level, checksum=c.checksum)
        elif isinstance(c, BloscCodec):
            shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                       "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[c.shuffle.value]
            compressor = "blosc"
            encoder = numcodecs.Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=shuffle, blocksize=c.blocksize,
                                      typesize=c.typesize)  # as zarr configures it (numcodecs >= 0.16)
        if compressor is None:
            return None
        key = lambda shard, _m=meta, _n=len(per_image): _m.encode_chunk_key((shard, *([0] * _n)))  # noqa: E731
        codecs[name] = _ChunkCodec(name, key, per_image, dtype, compressor, encoder)
    return codecs


class _DirectReader:
    """Single images and whole shards read straight from the shard objects of a local zarr v3 store, or from the
    cached copies of a remote store's (see the module docstring). One per process; the index cache is keyed on
    (array, shard) and checked against the object's size and mtime, so a shard rewritten by ``--overwrite`` or
    ``--resume``, or fetched again into the cache, is read afresh."""

    def __init__(
        self, location: Location, manifest: Manifest, codecs: dict[str, _ChunkCodec], cache: ShardCache | None = None
    ) -> None:
        self.location = location
        self.manifest = manifest
        self.codecs = codecs
        self.cache = cache
        self._lock = threading.Lock()
        self._index: OrderedDict[tuple[str, int], tuple[tuple[int, int], np.ndarray]] = OrderedDict()

    @classmethod
    def for_arrays(
        cls, location: Location, manifest: Manifest, arrays: dict[str, Any], *, cache: ShardCache | None = None
    ) -> _DirectReader | None:
        """A reader if every array is laid out as this module writes it and the store is local or cached, else
        None."""
        if not location.is_local and cache is None:
            return None
        codecs = chunk_codecs(manifest, arrays)
        return cls(location, manifest, codecs, cache) if codecs is not None else None

    def _path(self, name: str, shard: int) -> str:
        key = f"{name}/{self.codecs[name].key(shard)}"
        return self.cache.path(shard, key) if self.cache is not None else self.location.path(key)

    def _shard_index(self, name: str, shard: int, fd: int) -> np.ndarray:
        st = os.fstat(fd)
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._index.get((name, shard))
            if hit is not None and hit[0] == stamp:
                self._index.move_to_end((name, shard))
                return hit[1]
        n = 16 * self.manifest.shard_size + 4
        if st.st_size < n:
            raise ValueError(f"shard object of {st.st_size} bytes is shorter than its index ({n} bytes)")
        index = self._parse_index(os.pread(fd, n, st.st_size - n), st.st_size)
        with self._lock:
            self._index[(name, shard)] = (stamp, index)
            while len(self._index) > INDEX_CACHE_SHARDS:
                self._index.popitem(last=False)
        return index

    def _parse_index(self, tail: bytes, size: int) -> np.ndarray:
        index = np.frombuffer(_check_crc(tail), dtype="<u8").reshape(self.manifest.shard_size, 2)
        present = index[:, 0] != _EMPTY
        if (index[present, 0] + index[present, 1] > size).any():
            raise ValueError("shard index points beyond the end of the object")
        return index

    def _names(self, prefix: str) -> list[str]:
        return [n for n in self.codecs if (n.startswith("flip/") if prefix else "/" not in n)]

    def read_image(self, index: int, prefix: str = "") -> dict[str, np.ndarray]:
        if self.cache is None:
            return self._read_image(index, prefix)
        return self.cache.retrying(index // self.manifest.shard_size, lambda: self._read_image(index, prefix))

    def read_shard(self, shard: int, prefix: str = "") -> dict[str, np.ndarray]:
        if self.cache is None:
            return self._read_shard(shard, prefix)
        return self.cache.retrying(shard, lambda: self._read_shard(shard, prefix))

    def _read_image(self, index: int, prefix: str) -> dict[str, np.ndarray]:
        shard, local = divmod(index, self.manifest.shard_size)
        out: dict[str, np.ndarray] = {}
        for name in self._names(prefix):
            codec = self.codecs[name]
            fd = os.open(self._path(name, shard), os.O_RDONLY)
            try:
                offset, nbytes = (int(v) for v in self._shard_index(name, shard, fd)[local])
                if offset == _EMPTY:
                    value = np.zeros(codec.shape, codec.dtype)  # never written (the fill value)
                else:
                    data = os.pread(fd, nbytes, offset)
                    if len(data) != nbytes:
                        raise ValueError(f"chunk of {name} cut short: {len(data)} of {nbytes} bytes")
                    value = codec.decode(data)
            finally:
                os.close(fd)
            out[name[len(prefix) :]] = value
        return out

    def _read_shard(self, shard: int, prefix: str) -> dict[str, np.ndarray]:
        start, stop = self.manifest.shard_range(shard)
        out: dict[str, np.ndarray] = {}
        for name in self._names(prefix):
            codec = self.codecs[name]
            with open(self._path(name, shard), "rb") as f:
                data = memoryview(f.read())
            n = 16 * self.manifest.shard_size + 4
            if len(data) < n:
                raise ValueError(f"shard object of {len(data)} bytes is shorter than its index ({n} bytes)")
            index = self._parse_index(bytes(data[-n:]), len(data))
            rows = np.zeros((stop - start, *codec.shape), codec.dtype)
            for j in range(stop - start):
                offset, nbytes = (int(v) for v in index[j])
                if offset != _EMPTY:
                    rows[j] = codec.decode(data[offset : offset + nbytes])
            out[name[len(prefix) :]] = rows
        return out
