"""Feature store on object storage: both backends against a real S3-compatible server (moto) on loopback,
reached through s3fs exactly as a remote bucket would be."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

from mimicdet.store import create_store, inspect_store, open_store, open_writer, verify_store
from tests.test_featurestore import N_IMAGES, assert_same, make_item, make_manifest, write_shards

BUCKET = "mimicdet-features"


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, storage_options) of a moto S3 server on a free loopback port, with one bucket."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SESSION_TOKEN": "testing",
        }.items():
            env.setenv(key, value)
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield endpoint, options
    server.stop()


def _fs(options):
    import s3fs

    return s3fs.S3FileSystem(**options)


@pytest.mark.slow  # ~10 s for zarr: one request per array and shard against a local server
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_s3_round_trip_resume_and_verify(s3, backend):
    _, options = s3
    url = f"s3://{BUCKET}/round-trip-{backend}"
    writer = create_store(
        url, make_manifest(flips=(False, True), dtype="int8"), backend=backend, storage_options=options
    )
    assert writer.pending_shards() == [0, 1, 2]
    writer.close()
    # Workers reach the store through the same environment-free options; write_shards uses $MIMICDET_S3_ENDPOINT.
    worker = open_writer(url, storage_options=options)
    m = worker.manifest
    for s in (0, 2):
        a, b = worker.shard_range(s)
        worker.write_shard(s, [make_item(m, i) for i in range(a, b)], [make_item(m, i, flip=True) for i in range(a, b)])
    assert create_store(url, m, mode="resume", storage_options=options).pending_shards() == [1]
    a, b = worker.shard_range(1)
    worker.write_shard(1, [make_item(m, i) for i in range(a, b)], [make_item(m, i, flip=True) for i in range(a, b)])

    reader = pickle.loads(pickle.dumps(open_store(url, storage_options=options)))
    assert reader.is_complete()
    for i in range(N_IMAGES):
        want = make_item(m, i, flip=True)
        scale = np.abs(want.features).max(axis=(1, 2)) / 127 * (1 + 2.0**-10)  # float16 scale, rounded up
        assert_same(reader.read(i, flip=True), want, features_tol=scale[:, None, None] / 2 + 1e-6, records="float16")
    assert verify_store(url, storage_options=options).ok
    info = inspect_store(url, storage_options=options)
    assert info["completion"]["done"] == 3 and info["shard_bytes"] > 0

    # A corrupted object on the bucket is caught and named.
    fs = _fs(options)
    marker = open_store(url, storage_options=options)._location.read_bytes("_complete/shard-00001.json")
    objects = json.loads(marker)["objects"]
    key = max(objects, key=lambda k: objects[k]["size"])
    data = bytearray(fs.cat_file(f"{BUCKET}/round-trip-{backend}/{key}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{BUCKET}/round-trip-{backend}/{key}", bytes(data))
    report = verify_store(url, storage_options=options)
    assert any(e.startswith(f"shard 1: object {key} crc32c") for e in report.errors), report.errors


def test_s3_endpoint_from_environment_for_cli(s3, monkeypatch):
    from mimicdet.cli import main

    endpoint, options = s3
    url = f"s3://{BUCKET}/cli"
    create_store(url, make_manifest(), storage_options=options).close()
    monkeypatch.setenv("MIMICDET_S3_ENDPOINT", endpoint)
    write_shards(url, [0, 1])  # no storage_options: picked up from the environment
    runner = CliRunner()
    result = runner.invoke(main, ["inspect-store", url])
    assert result.exit_code == 0 and "2/3 complete" in result.output and "pending [2]" in result.output, result.output
    result = runner.invoke(main, ["verify-store", url])
    assert result.exit_code == 1 and "shard 2: incomplete" in result.output
    write_shards(url, [2])
    assert runner.invoke(main, ["verify-store", url]).exit_code == 0
