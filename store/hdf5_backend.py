"""HDF5 backend of the feature store (h5py): one file per shard, ``shards/shard-00012.h5``.

Each file holds one dataset per stored quantity with shape ``(n, *per_image_shape)`` for the shard's n images
(flipped copies under the group ``flip/``), chunked one image per chunk, gzip-compressed after byte shuffling
and checksummed with HDF5's fletcher32 filter. A shard is written to a temporary file and then renamed into
place (locally) or uploaded with one PUT (object storage), so a shard file is either absent or whole. A remote
store read with a shard cache (``store/cache.py``) opens the cached copy of each shard file.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from typing import Any

import h5py
import numpy as np
from mimicdet.store.cache import ShardCache
from mimicdet.store.manifest import TEMP_SUFFIX, Location, Manifest, ObjectInfo

GZIP_LEVEL = 4
MAX_OPEN_FILES = 8  # shard files kept open by a reader


def shard_key(shard: int) -> str:
    return f"shards/shard-{shard:05d}.h5"


class Hdf5Backend:
    """Shard files of a feature store. Open files are per process: pickling drops them, and a forked child
    reopens on first use (HDF5 handles must not cross a fork)."""

    name = "hdf5"

    def __init__(
        self, location: Location, manifest: Manifest, *, writable: bool, cache: ShardCache | None = None
    ) -> None:
        self.location = location
        self.manifest = manifest
        self.writable = writable
        self.cache = cache  # a remote store's local shard copies (reads only)
        self._lock = threading.Lock()
        self._files: OrderedDict[int, tuple[h5py.File, Any]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location, "manifest": self.manifest, "writable": self.writable, "cache": self.cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], state["manifest"], writable=state["writable"], cache=state.get("cache"))

    def create(self) -> None:
        """Nothing to lay out ahead of time: shard files appear as they are written."""

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for f, raw in self._files.values():
                    f.close()
                    if raw is not None:
                        raw.close()
            self._files.clear()
            self._pid = os.getpid()

    def shard_keys(self, shard: int) -> list[str]:
        return [shard_key(shard)]

    # ------------------------------------------------------------------ writing
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> dict[str, ObjectInfo]:
        key = shard_key(shard)
        loc = self.location
        if loc.is_local:
            # Same directory as the destination, so the final rename cannot cross filesystems.
            final = loc.path(key)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        else:
            fd, tmp = tempfile.mkstemp(suffix=f".h5{TEMP_SUFFIX}")
            os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                for name, data in arrays.items():
                    f.create_dataset(
                        name,
                        data=data,
                        chunks=(1, *data.shape[1:]),
                        compression="gzip",
                        compression_opts=GZIP_LEVEL,
                        shuffle=True,
                        fletcher32=True,
                    )
            with open(tmp, "rb") as fh:
                info = ObjectInfo.of(fh.read())
            self._forget(shard)
            loc.put_file(tmp, key)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return {key: info}

    # ------------------------------------------------------------------ reading
    def _forget(self, shard: int) -> None:
        with self._lock:
            entry = self._files.pop(shard, None)
        if entry is not None and self._pid == os.getpid():
            entry[0].close()
            if entry[1] is not None:
                entry[1].close()

    def _file(self, shard: int) -> h5py.File:
        with self._lock:
            if self._pid != os.getpid():
                self._files.clear()  # inherited across a fork: never touch the parent's handles
                self._pid = os.getpid()
            if shard in self._files:
                self._files.move_to_end(shard)
                return self._files[shard][0]
        loc = self.location
        if loc.is_local or self.cache is not None:
            raw = None
            path = loc.path(shard_key(shard)) if self.cache is None else self.cache.path(shard, shard_key(shard))
            f = h5py.File(path, "r")
        else:
            raw = loc.fs.open(loc.path(shard_key(shard)), "rb")
            f = h5py.File(raw, "r")
        with self._lock:
            self._files[shard] = (f, raw)
            while len(self._files) > MAX_OPEN_FILES:
                _, (old, old_raw) = self._files.popitem(last=False)
                old.close()
                if old_raw is not None:
                    old_raw.close()
        return f

    def _names(self, prefix: str) -> list[str]:
        return [n for n in self.manifest.arrays() if (n.startswith("flip/") if prefix else "/" not in n)]

    def read_image(self, index: int, prefix: str = "") -> dict[str, np.ndarray]:
        shard, local = divmod(index, self.manifest.shard_size)

        def read() -> dict[str, np.ndarray]:
            f = self._file(shard)
            return {n[len(prefix) :]: np.asarray(f[n][local]) for n in self._names(prefix)}

        return read() if self.cache is None else self.cache.retrying(shard, read, lambda: self._forget(shard))

    def read_shard(self, shard: int, prefix: str = "") -> dict[str, np.ndarray]:
        def read() -> dict[str, np.ndarray]:
            f = self._file(shard)
            return {n[len(prefix) :]: np.asarray(f[n][()]) for n in self._names(prefix)}

        return read() if self.cache is None else self.cache.retrying(shard, read, lambda: self._forget(shard))

    def read_shard_array(self, shard: int, name: str) -> np.ndarray:
        return np.asarray(self._file(shard)[name][()])
