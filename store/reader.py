"""Reading a store: per image or per shard, float32 out, checked against the manifest. A remote store is read
through a local cache of its shards (store/cache.py)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from mimicdet.data.errors import StoreError
from mimicdet.store.backend import load_manifest, make_backend, marker_shards
from mimicdet.store.cache import CacheSettings, ShardCache, cache_settings
from mimicdet.store.format import FLIP_PREFIX, ImageFeatures, image_arrays, unpack_image
from mimicdet.store.manifest import (
    Location,
    Manifest,
    compare,
)
from mimicdet.store.writer import ids_text


class StoreReader:
    """Random access to a store's images. Pickles as (location, manifest, settings): DataLoader workers and forked
    children reopen files and connections lazily, never sharing the parent's handles. ``shard_cache``: where and
    how much of a remote store to keep on local disk (ignored for a local store)."""

    def __init__(
        self, location: Location, manifest: Manifest, *, cache_shards: int = 0,
        shard_cache: CacheSettings | None = None,
    ) -> None:
        self._location = location
        self.manifest = manifest
        self.cache_shards = cache_shards
        self.shard_cache = None if location.is_local else shard_cache
        disk = ShardCache(location, manifest, self.shard_cache) if self.shard_cache is not None else None
        self._backend = make_backend(location, manifest, writable=False, direct_reads=True, cache=disk)
        self._index: dict[str, int] | None = None
        self._complete: set[int] | None = None
        self._cache: OrderedDict[tuple[int, str], dict[str, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self._location, "manifest": self.manifest, "cache_shards": self.cache_shards,
                "shard_cache": self.shard_cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], state["manifest"], cache_shards=state["cache_shards"],
                      shard_cache=state.get("shard_cache"))

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
        self._complete = {s for s in marker_shards(self._location) if s < self.manifest.num_shards}
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
        return FLIP_PREFIX if flip else ""

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
                local = image_arrays(arrays, index - shard * self.manifest.shard_size)
                return unpack_image(self.manifest, image_id, local)
            return unpack_image(self.manifest, image_id, self._backend.read_image(index, prefix))
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
            return [unpack_image(self.manifest, ids[i], image_arrays(arrays, i - start)) for i in range(start, stop)]
        except Exception as e:
            raise self._read_error(f"shard {shard} (images {ids_text(ids[start:stop])})", e) from None

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

    def cache_note(self) -> str | None:
        """Why the local shard cache of this remote store will not serve it well (None if it will): the whole
        store must fit for each shard to be fetched once, since training reads images in random order."""
        disk = getattr(self._backend, "cache", None)
        if disk is None:
            return None
        size, limit = disk.store_bytes(), disk.settings.limit
        if size <= limit:
            return None
        return (f"{self.url}: the store is {size / 1e9:.2f} GB but its local shard cache may hold {limit / 1e9:.2f} GB "
                f"(--cache-size): shards evicted during an epoch are fetched again in the next; give --cache-size "
                f"{math.ceil(size / 1e9)}GB or more")

    def close(self) -> None:
        self._backend.close()


def open_store(
    url: str | Path,
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_shards: int = 0,
    cache_dir: str | Path | None = None,
    cache_size: str | int | None = None,
    prefetch: bool = False,
) -> StoreReader:
    """A reader. ``cache_shards=n`` keeps the last n decoded shards in memory and makes ``read`` decode a whole
    shard on a miss: several times cheaper per image when reads walk a shard at a time (shuffle shards, then
    images within a shard); leave it at 0 for uniformly random access.

    A remote store's shards are read from local copies under ``cache_dir`` (default: the user's cache folder,
    ``store.cache.default_cache_dir()``), fetched and checked on first use, at most ``cache_size`` bytes in all
    (``"20GB"``; default ``store.cache.DEFAULT_CACHE_SIZE``), least recently used shards deleted first.
    ``prefetch``: fetch the whole store in the background from the first read on, when it fits (training)."""
    if cache_shards < 0:
        raise ValueError(f"cache_shards must be >= 0, got {cache_shards}")
    location = Location(url, storage_options)
    settings = None if location.is_local else cache_settings(cache_dir, cache_size, prefetch=prefetch)
    return StoreReader(location, load_manifest(location), cache_shards=cache_shards, shard_cache=settings)
