"""The local shard cache of remote stores (store/cache.py) against a real S3-compatible server (moto) on loopback:
each shard fetched once and reused across readers and processes, LRU eviction at the size limit, a changed remote
shard fetched again, a damaged cached copy detected and fetched again, records equal to zarr's decoder; and the
remote errors (store/remote.py): bounded retries, one line naming the store. GETs are counted from the server's
request log."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import pickle
import re
import threading
import time

import numpy as np
import pytest
from mimicdet.data.errors import StoreError
from mimicdet.store import create_store, open_store, open_writer
from mimicdet.store.cache import RECORD_DIR, parse_size, store_id
from mimicdet.store.format import FLIP_PREFIX, image_arrays, unpack_image
from mimicdet.store.hdf5_backend import Hdf5Backend
from mimicdet.store.remote import RemoteStoreError, call_remote
from mimicdet.store.zarr_backend import ZarrBackend

from tests.test_featurestore import N_IMAGES, make_item, make_manifest

BUCKET = "mimicdet-cache"
RECORD_FIELDS = ("features", "proposals", "scores", "class_logits", "box_deltas")


class Requests(logging.Handler):
    """The moto server's request lines ("GET /bucket/key HTTP/1.1"), as werkzeug logs them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r'"(\w+) (\S+) HTTP', record.getMessage())
        if match:
            with self._guard:
                self.lines.append((match.group(1), match.group(2)))

    def object_gets(self, prefix: str) -> list[str]:
        """Keys (relative to ``prefix``) of the objects fetched with GET: listings (``?list-type``) left out."""
        with self._guard:
            paths = [p for m, p in self.lines if m == "GET" and "list-type" not in p]
        head = f"/{BUCKET}/{prefix}/"
        return [p.split("?")[0][len(head):] for p in paths if p.startswith(head)]

    def clear(self) -> None:
        with self._guard:
            self.lines.clear()


@pytest.fixture(scope="module")
def s3():
    """(storage_options, request log) of a moto S3 server on a free loopback port, with one bucket."""
    import s3fs
    from moto.server import ThreadedMotoServer

    log = logging.getLogger("werkzeug")
    requests = Requests()
    saved = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(requests)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}.items():
            env.setenv(key, value)
        options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield options, requests
    server.stop()
    log.removeHandler(requests)
    log.setLevel(saved[0])
    log.propagate = saved[1]


def _store(options, name: str, *, backend: str = "zarr", seed: int = 0, **manifest) -> str:
    """A complete remote store of N_IMAGES tiny records: shards [0,4) [4,8) [8,10)."""
    url = f"s3://{BUCKET}/{name}"
    writer = create_store(url, make_manifest(**manifest), backend=backend, storage_options=options)
    _write(writer, range(writer.manifest.num_shards), seed)
    return url


def _write(writer, shards, seed: int) -> None:
    m = writer.manifest
    for s in shards:
        a, b = writer.shard_range(s)
        flipped = [make_item(m, i, seed, flip=True) for i in range(a, b)] if m.has_flips else None
        writer.write_shard(s, [make_item(m, i, seed) for i in range(a, b)], flipped)


def _same(a, b) -> bool:
    return all(getattr(a, f).tobytes() == getattr(b, f).tobytes() and getattr(a, f).shape == getattr(b, f).shape
               for f in RECORD_FIELDS)


def _cached(tmp_path, reader) -> list[int]:
    folder = tmp_path / "cache" / store_id(reader._location) / RECORD_DIR
    return sorted(int(p.name[6:11]) for p in folder.glob("shard-*.json"))


def _open(url, options, tmp_path, **kw):
    return open_store(url, storage_options=options, cache_dir=tmp_path / "cache", **kw)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_remote_direct_reads_equal_zarrs_decoder(s3, tmp_path, dtype):
    """Every record, flipped too, and every whole shard: byte for byte what zarr itself decodes from the store."""
    options, _ = s3
    url = _store(options, f"equal-{dtype}", flips=(False, True), dtype=dtype)
    reader = _open(url, options, tmp_path)
    zarr_itself = ZarrBackend(reader._location, reader.manifest, writable=False)
    m = reader.manifest
    for s in range(m.num_shards):
        start, stop = m.shard_range(s)
        for prefix in ("", FLIP_PREFIX):
            arrays = zarr_itself.read_shard(s, prefix)
            want = [unpack_image(m, m.image_ids[i], image_arrays(arrays, i - start)) for i in range(start, stop)]
            assert all(_same(reader.read(i, flip=bool(prefix)), w) for i, w in zip(range(start, stop), want))
            assert all(_same(r, w) for r, w in zip(reader.read_shard(s, flip=bool(prefix)), want, strict=True))
    assert reader._backend._direct, "the remote store was read through zarr, not the direct reader"


def test_hdf5_remote_reads_come_from_the_cache(s3, tmp_path):
    options, requests = s3
    url = _store(options, "hdf5", backend="hdf5")
    requests.clear()
    reader = _open(url, options, tmp_path)
    got = [reader.read(i) for i in (*range(N_IMAGES), *range(N_IMAGES))]
    assert sorted(k for k in requests.object_gets("hdf5") if k.startswith("shards/")) == [
        f"shards/shard-{s:05d}.h5" for s in range(3)]
    m = reader.manifest
    remote = Hdf5Backend(reader._location, m, writable=False)  # h5py on the remote file itself
    for i in range(N_IMAGES):
        assert _same(got[i], unpack_image(m, m.image_ids[i], remote.read_image(i))), i


def _read_all_in_child(reader, order, queue) -> None:
    queue.put([reader.read(int(i)).features.sum() for i in order])


def test_each_shard_fetched_once_and_reused(s3, tmp_path):
    """Two epochs in random order, a second reader, and a forked process (another run) fetch every object once."""
    options, requests = s3
    url = _store(options, "once")
    requests.clear()
    reader = _open(url, options, tmp_path)
    order = np.random.default_rng(0).permutation(N_IMAGES)
    for _ in range(2):
        first = [reader.read(int(i)).features.sum() for i in order]
    gets = requests.object_gets("once")
    shard_objects = [k for k in gets if "/c/" in k]
    assert len(shard_objects) == len(set(shard_objects)) == 3 * 7, gets  # 3 shards x 7 arrays, once each
    assert sorted(k for k in gets if k.startswith("_complete/")) == [f"_complete/shard-0000{s}.json" for s in range(3)]

    requests.clear()
    again = _open(url, options, tmp_path)
    assert [again.read(int(i)).features.sum() for i in order] == first
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_all_in_child, args=(pickle.loads(pickle.dumps(reader)), order, queue))
    child.start()
    assert queue.get(timeout=60) == first
    child.join(timeout=60)
    assert [k for k in requests.object_gets("once") if "/c/" in k or k.startswith("_complete/")] == []


def test_concurrent_processes_fetch_each_shard_once(s3, tmp_path):
    """Two DataLoader-like processes reading the same cold store at once, with prefetching: one GET per object."""
    options, requests = s3
    url = _store(options, "concurrent")
    requests.clear()
    reader = _open(url, options, tmp_path, prefetch=True)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    orders = [np.random.default_rng(k).permutation(N_IMAGES) for k in range(2)]
    children = [ctx.Process(target=_read_all_in_child, args=(reader, order, queue)) for order in orders]
    for child in children:
        child.start()
    sums = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert sorted(map(sorted, sums)) == [sorted(reader.read(i).features.sum() for i in range(N_IMAGES))] * 2
    shard_objects = [k for k in requests.object_gets("concurrent") if "/c/" in k]
    assert len(shard_objects) == len(set(shard_objects)) == 3 * 7, sorted(shard_objects)


def _shard_bytes(url, options, shard) -> int:
    location = open_store(url, storage_options=options)._location
    marker = json.loads(location.read_bytes(f"_complete/shard-{shard:05d}.json"))
    return sum(o["size"] for o in marker["objects"].values())


def test_lru_eviction_at_the_size_limit(s3, tmp_path):
    """Limit: shards 0 and 1. Reading 0, 1, 0, then 2 evicts 1 (least recently used), not 0."""
    options, requests = s3
    url = _store(options, "lru")
    limit = _shard_bytes(url, options, 0) + _shard_bytes(url, options, 1)
    assert _shard_bytes(url, options, 2) <= _shard_bytes(url, options, 1)
    reader = _open(url, options, tmp_path, cache_size=limit)
    for i in (0, 4, 1):  # shards 0, 1, 0
        reader.read(i)
    assert _cached(tmp_path, reader) == [0, 1]
    reader.read(8)  # shard 2
    assert _cached(tmp_path, reader) == [0, 2]
    requests.clear()
    reader.read(5)  # shard 1 was evicted: fetched again
    assert "features/c/1/0/0/0" in requests.object_gets("lru")
    assert _cached(tmp_path, reader) == [1, 2]  # 0 is now the least recently used


def test_changed_remote_shard_is_fetched_again(s3, tmp_path):
    options, requests = s3
    url = _store(options, "changed")
    reader = _open(url, options, tmp_path)
    before = [reader.read(i) for i in range(N_IMAGES)]
    _write(open_writer(url, storage_options=options), [1], seed=7)  # shard 1 rewritten: new objects, new marker

    requests.clear()
    after = _open(url, options, tmp_path)  # a new run lists the store again
    got = [after.read(i) for i in range(N_IMAGES)]
    fetched = requests.object_gets("changed")
    assert {k.split("/c/")[1].split("/")[0] for k in fetched if "/c/" in k} == {"1"}, fetched
    for i in range(N_IMAGES):
        assert _same(got[i], before[i]) == (not 4 <= i < 8), i
    assert np.allclose(got[5].features, make_item(after.manifest, 5, seed=7).features, atol=0.02)


def test_remote_object_that_does_not_match_its_marker_is_refused(s3, tmp_path):
    """An object replaced behind the marker's back (new ETag): fetched again, found damaged, named."""
    import s3fs

    options, _ = s3
    url = _store(options, "tampered")
    reader = _open(url, options, tmp_path)
    reader.read(0)
    fs = s3fs.S3FileSystem(**options)
    key = f"{BUCKET}/tampered/proposals/c/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[3] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with pytest.raises(StoreError, match=r"shard 0: object proposals/c/0/0/0 on the store is \d+ bytes with crc32c"):
        _open(url, options, tmp_path).read(0)


def test_damaged_cached_copy_is_detected_and_fetched_again(s3, tmp_path):
    options, requests = s3
    url = _store(options, "damaged")
    reader = _open(url, options, tmp_path)
    want = [reader.read(i) for i in range(N_IMAGES)]
    cached = tmp_path / "cache" / store_id(reader._location) / "features" / "c" / "1" / "0" / "0" / "0"

    def damage() -> None:
        data = bytearray(cached.read_bytes())
        data[10] ^= 0xFF  # same size: only a checksum can tell
        cached.write_bytes(bytes(data))

    damage()  # between runs: a new reader checks every object's crc32c before its first use
    requests.clear()
    assert _same(_open(url, options, tmp_path).read(5), want[5])
    assert "features/c/1/0/0/0" in requests.object_gets("damaged")
    damage()  # during a run: the chunk's crc32c fails, the copy is checked and fetched again
    requests.clear()
    assert all(_same(reader.read(i), want[i]) for i in range(4, 8))
    assert "features/c/1/0/0/0" in requests.object_gets("damaged")


def test_prefetch_fetches_the_whole_store_once(s3, tmp_path):
    options, requests = s3
    url = _store(options, "prefetch")
    requests.clear()
    reader = _open(url, options, tmp_path, prefetch=True)
    reader.read(0)
    deadline = time.monotonic() + 30
    while _cached(tmp_path, reader) != [0, 1, 2] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _cached(tmp_path, reader) == [0, 1, 2]
    shard_objects = [k for k in requests.object_gets("prefetch") if "/c/" in k]
    assert len(shard_objects) == len(set(shard_objects)) == 21
    assert all(_same(reader.read(i), r) for i, r in enumerate(_open(url, options, tmp_path).read_shard(0)))


def test_unreachable_endpoint_is_one_line_naming_the_store(tmp_path):
    """A closed port, botocore told not to retry: a StoreError naming the store and what failed, at once."""
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "key": "testing", "secret": "testing",
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    t = time.monotonic()
    with pytest.raises(RemoteStoreError) as info:
        open_store(f"s3://{BUCKET}/nowhere", storage_options=options, cache_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"s3://{BUCKET}/nowhere: reading manifest.json failed: cannot reach the endpoint")
    assert "\n" not in message and time.monotonic() - t < 15


def test_retries_are_bounded_and_only_for_transient_errors():
    calls = []

    def throttled():
        calls.append(time.monotonic())
        raise OSError(errno.EBUSY, "Please reduce your request rate (SlowDown)")

    with pytest.raises(RemoteStoreError, match=r"^s3://b/x: fetching shard 2 failed after 3 tries: throttled"):
        call_remote("s3://b/x", "fetching shard 2", throttled, backoff_s=0.01)
    assert len(calls) == 3 and calls[2] - calls[1] >= 1.5 * (calls[1] - calls[0]) > 0  # exponential backoff
    calls.clear()
    with pytest.raises(RemoteStoreError, match="after 2 tries"):  # no try starts after the window
        call_remote("s3://b/x", "listing", throttled, backoff_s=0.2, window_s=0.5)
    flaky = iter([TimeoutError("read timed out"), b"ok"])

    def once_then_ok():
        item = next(flaky)
        if isinstance(item, Exception):
            raise item
        return item

    assert call_remote("s3://b/x", "reading", once_then_ok, backoff_s=0.01) == b"ok"
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(RemoteStoreError, match=r"^s3://b/x: reading manifest.json failed: access denied"):
        call_remote("s3://b/x", "reading manifest.json", denied, backoff_s=0.01)
    assert calls == [1]
    with pytest.raises(FileNotFoundError):  # an answer, not a failure
        call_remote("s3://b/x", "reading", lambda: (_ for _ in ()).throw(FileNotFoundError("x")))
    with pytest.raises(KeyError):  # a bug, not a storage error: unchanged
        call_remote("s3://b/x", "reading", lambda: {}["x"])


@pytest.mark.parametrize("text,size", [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
                                       ("1000", 1000), (4096, 4096), ("2 KiB", 2048)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "20XB", "-1GB", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="--cache-size"):
        parse_size(text)


def test_cli_cache_options():
    from click.testing import CliRunner
    from mimicdet.cli import main

    result = CliRunner().invoke(main, ["train-student", "--store", "x", "--data", ".", "--out", "o",
                                       "--cache-size", "lots"])
    assert result.exit_code == 2 and "--cache-size" in result.output and "20GB" in result.output, result.output
