"""A local copy of a remote store's shards, so that a store on object storage trains at local-disk speed.

A reader of a remote store (``s3://...``) reads every shard through this cache. The first use of a shard fetches
its objects (one GET each, all at once), checks each against the size and crc32c of the shard's completion
marker, and writes them under the cache folder; from then on the shard reads as a local one, through the same
direct reader (``zarr_backend._DirectReader``; HDF5 opens the cached file). Later epochs, later runs and the other
DataLoader workers reuse it. Each process checks a cached shard once more (crc32c of every object) before its
first use of it, and checks it again, fetching it anew if damaged or gone, when a read of it fails. A shard whose
objects or marker changed on the store (size or ETag in the store's listing, taken once per process) is fetched
anew. With ``prefetch``, a background thread per process fetches every shard not cached yet, when the whole store
fits the size limit, so that fetching overlaps training; DataLoader workers share that work (each walks the
shards in its own order and skips one another process is fetching).

Layout under the cache folder (``--cache-dir``; default ``$XDG_CACHE_HOME/mimicdet/stores``, else
``~/.cache/mimicdet/stores``)::

    <store id>/                  one folder per remote store: sha256 of its URL and endpoint, 16 hex digits
      source.json                the URL and endpoint (for people; never read back)
      features/c/12/0/0/0 ...    shard 12's objects under their store keys (HDF5: shards/shard-00012.h5)
      _cached/shard-00012.json   written last, once every object of the shard is in place and checked: each
                                 object's size and crc32c, and the version (size, ETag) of each object and of
                                 the marker on the store. Its mtime is the shard's last use: over the size limit,
                                 the least recently used shards of any store in the folder are deleted
      _lock/shard-00012          held while the shard is fetched or deleted, so that each is fetched once

Locks are POSIX record locks (``lockf``): a forked DataLoader worker does not inherit its parent's, and the kernel
drops them when a process dies. POSIX locks do not exclude threads of one process (and closing any descriptor of
the file drops the process's lock), so a thread lock per file comes first.

Why not fsspec's ``filecache::`` / ``simplecache::``: neither bounds its size (``filecache`` only expires entries
by age), neither checks content against our markers' crc32c, and ``filecache`` keeps one metadata file for the
whole cache that each process reads, merges and rewrites without a lock, so concurrent DataLoader workers can
drop each other's entries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mimicdet.data.errors import StoreError
from mimicdet.store.manifest import TEMP_SUFFIX, Location, Manifest, ObjectInfo, marker_key, parse_marker
from mimicdet.store.remote import RemoteStoreError, call_remote

T = TypeVar("T")

DEFAULT_CACHE_SIZE = 50 * 10**9  # bytes; --cache-size
RECORD_DIR = "_cached"
LOCK_DIR = "_lock"
TOUCH_INTERVAL_S = 1.0  # a shard read again and again by one process has its last-use time updated this often


@dataclass(frozen=True)
class CacheSettings:
    directory: Path  # the cache folder (every store's copies)
    limit: int  # bytes the folder may hold; least recently used shards go first
    prefetch: bool = False  # fetch the whole store in the background when it fits the limit


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mimicdet" / "stores"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """A size in bytes: ``20GB`` (powers of 1000), ``512MiB`` (powers of 1024), or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"--cache-size: expected a size such as 20GB or 512MiB, got {value!r}")
        number, unit, binary = match.groups()
        power = "kmgt".find(unit.lower()) + 1 if unit else 0
        size = int(float(number) * (1024 if binary else 1000) ** power)
    if size <= 0:
        raise ValueError(f"--cache-size: must be more than 0 bytes, got {value!r}")
    return size


def cache_settings(directory: str | os.PathLike | None = None, size: str | int | None = None, *,
                   prefetch: bool = False) -> CacheSettings:
    """Settings with the defaults filled in: the XDG cache folder and ``DEFAULT_CACHE_SIZE``."""
    folder = Path(directory).expanduser() if directory else default_cache_dir()
    return CacheSettings(folder.absolute(), parse_size(size if size is not None else DEFAULT_CACHE_SIZE), prefetch)


def store_id(location: Location) -> str:
    """The cache folder's name for a store: the same URL on another endpoint is another store."""
    options = location.storage_options
    endpoint = options.get("endpoint_url") or dict(options.get("client_kwargs") or {}).get("endpoint_url") or ""
    return hashlib.sha256(f"{location.url.rstrip('/')}\n{endpoint}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- locks

_TABLE_LOCK = threading.Lock()
_THREAD_LOCKS: dict[str, threading.Lock] = {}


def _reset_locks_after_fork() -> None:
    """A lock held by one of the parent's threads at the fork would stay held forever in the child."""
    global _TABLE_LOCK
    _TABLE_LOCK = threading.Lock()
    _THREAD_LOCKS.clear()


os.register_at_fork(after_in_child=_reset_locks_after_fork)


@contextlib.contextmanager
def _locked(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold ``path`` exclusively across processes and threads. Yields whether it is held: False, without waiting,
    when ``blocking`` is False and another thread or process holds it."""
    with _TABLE_LOCK:
        inner = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
    if not inner.acquire(blocking):
        yield False
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            yield _lockf(fd, blocking)
        finally:
            os.close(fd)  # drops the record lock
    finally:
        inner.release()


def _lockf(fd: int, blocking: bool) -> bool:
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except OSError as e:
            if not blocking and e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            # The kernel sees processes, not threads: two workers whose threads each wait for a shard the other's
            # prefetch thread is fetching look like a deadlock to it, though both fetches will finish.
            if e.errno != errno.EDEADLK:
                raise
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_info(path: Path) -> ObjectInfo | None:
    try:
        with open(path, "rb") as f:
            return ObjectInfo.of(f.read())
    except FileNotFoundError:
        return None


def _record_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


_RECORD_BYTES: dict[tuple[str, int], int] = {}  # (record path, inode) -> the shard's bytes; records never change


def _cached_shards(folder: Path) -> list[tuple[int, int, Path, int]]:
    """(last use in ns, bytes, store folder, shard) of every shard cached in ``folder``, any store."""
    out = []
    for store in (p for p in _listdir(folder) if p.is_dir()):
        for entry in _listdir(store / RECORD_DIR):
            if not (entry.name.startswith("shard-") and entry.name.endswith(".json")):
                continue
            try:
                st = entry.stat()
                key = (str(entry), st.st_ino)
                if key not in _RECORD_BYTES:
                    _RECORD_BYTES[key] = int(json.loads(entry.read_bytes())["bytes"])
            except (OSError, ValueError, KeyError):  # deleted meanwhile, or half-written by an older version
                continue
            out.append((st.st_mtime_ns, _RECORD_BYTES[key], store, int(entry.name[6:-5])))
    return out


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _drop(store: Path, shard: int) -> None:
    """Delete a cached shard: its record first, so nobody trusts the objects while they go."""
    record = store / RECORD_DIR / _record_name(shard)
    try:
        objects = json.loads(record.read_bytes())["objects"]
    except (OSError, ValueError, KeyError):
        objects = {}
    record.unlink(missing_ok=True)
    for key in objects:
        (store / key).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the cache


class ShardCache:
    """The cached shards of one remote store (module docstring). Pickles as (location, manifest, settings). A
    forked child (a DataLoader worker) keeps the parent's listing and the shards it checked, not its thread."""

    def __init__(self, location: Location, manifest: Manifest, settings: CacheSettings) -> None:
        self.location = location
        self.manifest = manifest
        self.settings = settings
        self.root = settings.directory / store_id(location)
        self._root = str(self.root)  # path() builds strings: Path joins cost microseconds on every read
        self._reset()

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location, "manifest": self.manifest, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], state["manifest"], state["settings"])

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._ready: set[int] = set()  # shards checked (or fetched) by this process
        self._versions: dict[str, tuple[int, str]] | None = None  # the store's listing: key -> (size, version)
        self._touched = (-1, 0.0)  # (shard, time) of the last last-use update
        self._prefetching = False

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefetching = False

    def store_bytes(self) -> int:
        """The store's size on the remote, every object included (from the listing)."""
        self._check_process()
        return sum(size for size, _ in self._listing().values())

    # ------------------------------------------------------------------ reading
    def path(self, shard: int, key: str) -> str:
        """The local path of object ``key`` of ``shard``, fetched and checked first if need be."""
        self._check_process()
        if shard not in self._ready:
            self._ensure(shard)
        self._touch(shard)
        return f"{self._root}/{key}"

    def retrying(self, shard: int, read: Callable[[], T], forget: Callable[[], None] | None = None) -> T:
        """``read()``; if it fails, check the cached shard again (fetching it anew when damaged or gone: another
        process may have evicted it) and read once more. A damaged store still fails the second read."""
        try:
            return read()
        except StoreError:
            raise
        except Exception:
            if forget is not None:
                forget()
            self._check_process()
            self._ready.discard(shard)
            self._ensure(shard)
            return read()

    def _ensure(self, shard: int) -> None:
        with _locked(self._lock_path(shard)):
            fetched = self._ensure_locked(shard)
        if fetched:
            self._evict(keep=shard)
        if self.settings.prefetch and not self._prefetching:
            self._start_prefetch()

    def _ensure_locked(self, shard: int) -> bool:
        """Make the cached copy of ``shard`` current and intact, with its lock held; returns whether it fetched."""
        record = self._record(shard)
        fetched = record is None or not self._current(record) or not self._intact(record)
        if fetched:
            self._fetch(shard)
        self._ready.add(shard)
        return fetched

    def _record(self, shard: int) -> dict | None:
        try:
            return json.loads((self.root / RECORD_DIR / _record_name(shard)).read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def _current(self, record: dict) -> bool:
        """Whether every object of the cached shard, and its marker, has the size and ETag it had when fetched."""
        listed = self._listing()
        if any(k not in listed for k in record["versions"]):
            listed = self._listing(refresh=True)  # listed before the shard was written, or gone
        return all(listed.get(k) == tuple(v) for k, v in record["versions"].items())

    def _intact(self, record: dict) -> bool:
        """Whether every cached object has the size and crc32c it was fetched with (read in full)."""
        for key, (size, crc) in record["objects"].items():
            if _file_info(self.root / key) != ObjectInfo(size, crc):
                return False
        return True

    def _lock_path(self, shard: int) -> Path:
        return self.root / LOCK_DIR / f"shard-{shard:05d}"

    def _touch(self, shard: int) -> None:
        now = time.time()
        last, when = self._touched
        if shard == last and now - when < TOUCH_INTERVAL_S:
            return
        self._touched = (shard, now)
        ns = time.time_ns()
        try:
            os.utime(self.root / RECORD_DIR / _record_name(shard), ns=(ns, ns))
        except FileNotFoundError:  # evicted by another process: the read fails and fetches it again
            self._ready.discard(shard)

    # ------------------------------------------------------------------ fetching
    def _listing(self, *, refresh: bool = False) -> dict[str, tuple[int, str]]:
        """Every object of the store: key -> (size, version), the version being the ETag (or a modification
        time where the filesystem gives no ETag). One listing per process, taken again on ``refresh``."""
        if self._versions is None or refresh:
            loc = self.location

            def find() -> dict[str, Any]:
                loc.fs.invalidate_cache(loc.root)
                return loc.fs.find(loc.root, detail=True)

            prefix = loc.root.rstrip("/") + "/"
            found = call_remote(loc.url, "listing the store", find)
            self._versions = {path[len(prefix):]: (int(info.get("size") or 0), _version(info))
                              for path, info in found.items() if path.startswith(prefix)}
        return self._versions

    def _get(self, what: str, keys: list[str]) -> dict[str, bytes]:
        """The objects ``keys``, fetched concurrently (fsspec's ``cat`` of several paths)."""
        loc = self.location
        paths = {loc.path(k): k for k in keys}
        data = call_remote(loc.url, f"fetching {what}", lambda: loc.fs.cat(list(paths), on_error="raise"))
        return {paths[p]: b for p, b in data.items()}

    def _fetch(self, shard: int) -> None:
        """Fetch every object of ``shard``, check it against its marker, write it in place, then the record. Tried
        twice: a shard rewritten on the store while it is fetched fails the check once."""
        key = marker_key(shard)
        for attempt in (1, 2):
            listed = self._listing(refresh=attempt > 1 or key not in (self._versions or {}))
            if key not in listed:
                raise StoreError(f"{self.location.url}: shard {shard}: no completion marker {key} on the store")
            marker = parse_marker(self._get(f"shard {shard}'s marker", [key])[key],
                                  source=f"{self.location.url}/{key}")
            data = self._get(f"shard {shard}", sorted(marker.objects))
            wrong = [(k, ObjectInfo.of(b)) for k, b in data.items() if ObjectInfo.of(b) != marker.objects[k]]
            missing = [k for k in (key, *data) if k not in listed]
            if not wrong and not missing:
                break
            if attempt == 2:
                raise self._fetch_error(shard, key, marker.objects, wrong, missing)
        record = {"shard": shard, "bytes": sum(len(b) for b in data.values()),
                  "objects": {k: [len(b), marker.objects[k].crc32c] for k, b in data.items()},
                  "versions": {k: list(listed[k]) for k in (key, *data)}}
        try:
            _drop(self.root, shard)  # the old copy, if any: its record goes before its objects are replaced
            for k, b in data.items():
                _write_atomic(self.root / k, b)
            self._write_source()
            _write_atomic(self.root / RECORD_DIR / _record_name(shard), json.dumps(record).encode())
        except OSError as e:
            raise RemoteStoreError(
                f"{self.location.url}: shard {shard}: cannot write its cached copy under {self.root} "
                f"({e.strerror or type(e).__name__}); free some space, or choose a smaller --cache-size or another "
                "--cache-dir"
            ) from None

    def _fetch_error(self, shard: int, key: str, expected: dict[str, ObjectInfo],
                     wrong: list[tuple[str, ObjectInfo]], missing: list[str]) -> StoreError:
        url = self.location.url
        if wrong:
            k, got = wrong[0]
            want = expected[k]
            return StoreError(
                f"{url}: shard {shard}: object {k} on the store is {got.size} bytes with crc32c {got.crc32c:08x}, "
                f"its marker {key} says {want.size} bytes, crc32c {want.crc32c:08x} (damaged, or rewritten while "
                f"fetched); `mimic verify-store {url}` checks the whole store"
            )
        return StoreError(f"{url}: shard {shard}: object {missing[0]} named by marker {key} is not on the store")

    def _write_source(self) -> None:
        source = self.root / "source.json"
        if not source.exists():
            options = self.location.storage_options
            endpoint = options.get("endpoint_url") or dict(options.get("client_kwargs") or {}).get("endpoint_url")
            _write_atomic(source, json.dumps({"url": self.location.url, "endpoint": endpoint}).encode())

    # ------------------------------------------------------------------ eviction and prefetch
    def _evict(self, keep: int) -> None:
        """Delete least recently used shards, of any store in the cache folder, until it holds at most the limit;
        never ``keep`` (just fetched), nor a shard being fetched or read-checked."""
        entries = _cached_shards(self.settings.directory)
        total = sum(nbytes for _, nbytes, _, _ in entries)
        for _, nbytes, store, shard in sorted(entries, key=lambda e: e[0]):
            if total <= self.settings.limit:
                break
            if store == self.root and shard == keep:
                continue
            with _locked(store / LOCK_DIR / f"shard-{shard:05d}", blocking=False) as held:
                if held:
                    _drop(store, shard)
                    total -= nbytes
                    if store == self.root:
                        self._ready.discard(shard)

    def _start_prefetch(self) -> None:
        self._prefetching = True
        threading.Thread(target=self._prefetch_all, name=f"prefetch {self.location.url}", daemon=True).start()

    def _prefetch_all(self) -> None:
        """Fetch every shard not cached yet, if the whole store fits the limit, in an order of this process's own;
        skip a shard another thread or process holds (it is fetching it). Errors are left to the read that needs
        the shard, which reports them."""
        try:
            if self.store_bytes() > self.settings.limit:
                return
            order = list(range(self.manifest.num_shards))
            random.Random(os.getpid()).shuffle(order)
            for shard in order:
                if shard in self._ready:
                    continue
                with _locked(self._lock_path(shard), blocking=False) as held:
                    fetched = held and self._ensure_locked(shard)
                if fetched:
                    self._evict(keep=shard)
        except Exception:  # noqa: BLE001 - a background helper: the foreground read reports the same problem
            return


def _version(info: dict[str, Any]) -> str:
    for name in ("ETag", "etag", "md5Hash", "LastModified", "last_modified", "mtime", "updated", "created"):
        if info.get(name) is not None:
            return str(info[name])
    return ""
