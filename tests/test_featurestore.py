"""Feature store: one shared suite (StoreTests) run against the zarr and the HDF5 backend on real files,
plus manifest, quantiser and CLI tests. Tiny arrays: C=8 channels, maps up to 4x5, K=6 proposals, 2 classes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mimicdet.data.errors import StoreError
from mimicdet.store import (
    ImageFeatures,
    Manifest,
    StoreReader,
    create_store,
    describe_store,
    inspect_store,
    open_store,
    open_writer,
    verify_store,
)

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, SHARD = 10, 4  # shards: [0,4) [4,8) [8,10)


def make_manifest(**overrides) -> Manifest:
    fields = dict(
        teacher_arch="inception-bn",
        teacher_width=1.0,
        teacher_head="fast-rcnn",
        teacher_sha256=hashlib.sha256(b"teacher checkpoint").hexdigest(),
        classes=("raccoon", "dog"),
        dataset_name="toy",
        dataset_split="train",
        dataset_digest=hashlib.sha256(b"toy/train").hexdigest(),
        image_ids=tuple(f"img{i:03d}" for i in range(N_IMAGES)),
        preprocess={"min_size": 256, "max_size": 400, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        feature_layer="inception4e",
        stride=16,
        channels=8,
        max_hw=(4, 5),
        num_proposals=6,
        nms_threshold=0.7,
        shard_size=SHARD,
    )
    fields.update(overrides)
    return Manifest(**fields)


def make_item(m: Manifest, index: int, seed: int = 0, flip: bool = False) -> ImageFeatures:
    """Deterministic record for image `index`; images 0-3 cover the edge cases (max map, 1x1 map, k=0, k=K)."""
    rng = np.random.default_rng([seed, index, int(flip)])
    (H, W), K, Kc = m.max_hw, m.num_proposals, m.num_classes
    h, w = {0: (H, W), 1: (1, 1)}.get(index, (int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))))
    k = {2: 0, 3: K}.get(index, int(rng.integers(0, K + 1)))
    xy = rng.uniform(0, 200, (k, 2))
    return ImageFeatures(
        image_id=m.image_ids[index],
        features=np.maximum(rng.normal(0, 3, (m.channels, h, w)), 0).astype(np.float32),
        proposals=np.concatenate([xy, xy + rng.uniform(1, 50, (k, 2))], 1).astype(np.float32),
        scores=np.sort(rng.uniform(size=k))[::-1].astype(np.float32),
        class_logits=rng.normal(size=(k, Kc)).astype(np.float32),
        box_deltas=rng.normal(size=(k, 4 * Kc)).astype(np.float32),
    )


def write_shards(url: str, shards, seed: int = 0) -> None:
    """What one extraction worker does: open the existing store and write its shards."""
    writer = open_writer(url)
    m = writer.manifest
    for s in shards:
        a, b = writer.shard_range(s)
        flipped = [make_item(m, i, seed, flip=True) for i in range(a, b)] if m.has_flips else None
        writer.write_shard(s, [make_item(m, i, seed) for i in range(a, b)], flipped)
    writer.close()


def _read_in_child(reader: StoreReader, index: int, queue) -> None:
    item = reader.read(index)
    queue.put((item.image_id, item.features.tobytes()))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_same(
    got: ImageFeatures, want: ImageFeatures, *, features_tol: np.ndarray | None = None, records: str = "float32"
) -> None:
    """`records`: the store's records dtype; float16 records read back as exactly the float16 rounding."""
    assert got.image_id == want.image_id
    assert got.features.dtype == np.float32 and got.features.shape == want.features.shape
    if features_tol is None:  # float16: exactly the fp16 rounding of what was written
        np.testing.assert_array_equal(got.features, want.features.astype(np.float16).astype(np.float32))
    else:
        assert (np.abs(got.features - want.features) <= features_tol).all()
    for name in ("proposals", "scores", "class_logits", "box_deltas"):
        assert getattr(got, name).dtype == np.float32
        expected = getattr(want, name).astype(records).astype(np.float32)
        np.testing.assert_array_equal(getattr(got, name), expected, err_msg=name)


class StoreTests:
    """Backend-independent behaviour. Subclasses set `backend` and implement `chunk_location`."""

    backend: str

    def chunk_location(self, store: Path, marker: dict, shard: int, local: int) -> tuple[Path, int, int]:
        """(file, byte offset, length) of the `features` chunk of image `local` of `shard`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def create(self, path: Path, mode: str = "create", **overrides):
        return create_store(str(path), make_manifest(**overrides), backend=self.backend, mode=mode)

    def filled(self, path: Path, seed: int = 0, **overrides) -> Path:
        self.create(path, **overrides).close()
        write_shards(str(path), range(3), seed)
        return path

    def marker(self, store: Path, shard: int) -> dict:
        return json.loads((store / "_complete" / f"shard-{shard:05d}.json").read_text())

    def largest_object(self, store: Path, shard: int) -> Path:
        objects = self.marker(store, shard)["objects"]
        return store / max(objects, key=lambda k: objects[k]["size"])

    # ------------------------------------------------------------------ round trips
    def test_round_trip_float16_exact(self, tmp_path):
        store = self.filled(tmp_path / "s")
        reader = open_store(str(store))
        m = reader.manifest
        assert len(reader) == N_IMAGES and reader.is_complete() and reader.completed_shards() == [0, 1, 2]
        for i in range(N_IMAGES):
            assert_same(reader.read(i), make_item(m, i))
        assert [x.features.shape[1:] for x in reader.read_shard(0)] == [
            (4, 5),
            (1, 1),
            *[make_item(m, i).features.shape[1:] for i in (2, 3)],
        ]
        assert [len(x.proposals) for x in reader.read_shard(0)][2:] == [0, 6]
        assert_same(reader.read_shard(2)[1], make_item(m, 9))

    def test_round_trip_int8_within_half_scale(self, tmp_path):
        store = self.filled(tmp_path / "s", dtype="int8")
        reader = open_store(str(store))
        assert reader.manifest.records_dtype == "float16"  # the compact default for int8
        for i in range(N_IMAGES):
            want = make_item(reader.manifest, i)
            scale = np.abs(want.features).max(axis=(1, 2)) / 127
            scale16 = scale * (1 + 2.0**-10)  # the float16 scale is rounded up by less than one float16 step
            assert_same(reader.read(i), want, features_tol=scale16[:, None, None] / 2 + 1e-6, records="float16")

    def test_int8_with_float32_records_is_exact_on_records(self, tmp_path):
        store = self.filled(tmp_path / "s", dtype="int8", records_dtype="float32")
        reader = open_store(str(store))
        assert reader.manifest.quantisation == "per-channel-symmetric"
        for i in (0, 5, 9):
            want = make_item(reader.manifest, i)
            scale = np.abs(want.features).max(axis=(1, 2)) / 127
            assert_same(reader.read(i), want, features_tol=scale[:, None, None] / 2 + 1e-6)

    def test_a_format_version_1_store_is_still_read(self, tmp_path):
        """Version 1 (before ``proposals.dtype``): float32 records, no such field in the manifest."""
        store = self.filled(tmp_path / "s", dtype="int8", format_version=1)
        doc = json.loads((store / "manifest.json").read_text())
        assert doc["format_version"] == 1 and "dtype" not in doc["proposals"]
        reader = open_store(str(store))
        assert reader.manifest.records_dtype == "float32" and reader.manifest.arrays()["scale"][1] == "float32"
        want = make_item(reader.manifest, 5)
        scale = np.abs(want.features).max(axis=(1, 2)) / 127
        assert_same(reader.read(5), want, features_tol=scale[:, None, None] / 2 + 1e-6)
        assert verify_store(str(store)).ok

    def test_all_zero_shard_round_trips(self, tmp_path):
        """A shard equal to the fill value everywhere (no proposals, zero maps) is still written and marked."""
        writer = self.create(tmp_path / "s", dtype="int8")
        m = writer.manifest
        empty = [
            ImageFeatures(
                image_id,
                np.zeros((8, 4, 5), np.float32),
                *(np.zeros(s, np.float32) for s in [(0, 4), (0,), (0, 3), (0, 12)]),
            )
            for image_id in m.image_ids[8:]
        ]
        writer.write_shard(2, empty)
        assert writer.pending_shards() == [0, 1]
        got = open_store(str(tmp_path / "s")).read(9)
        np.testing.assert_array_equal(got.features, np.zeros((8, 4, 5), np.float32))
        assert got.proposals.shape == (0, 4) and got.class_logits.shape == (0, 3)
        assert verify_store(str(tmp_path / "s")).complete_shards == 1

    def test_flips_are_stored_separately(self, tmp_path):
        store = self.filled(tmp_path / "s", flips=(False, True))
        reader = open_store(str(store))
        for i in (0, 5, 9):
            assert_same(reader.read(i, flip=True), make_item(reader.manifest, i, flip=True))
            assert_same(reader.read(i), make_item(reader.manifest, i))
        plain = open_store(str(self.filled(tmp_path / "p")))
        with pytest.raises(StoreError, match="no flipped features"):
            plain.read(0, flip=True)

    def test_shard_cache_reads_the_same(self, tmp_path):
        store = self.filled(tmp_path / "s", flips=(False, True), dtype="int8")
        plain, cached = open_store(str(store)), pickle.loads(pickle.dumps(open_store(str(store), cache_shards=1)))
        assert cached.cache_shards == 1
        for i, flip in [(5, False), (4, True), (9, False), (0, True), (5, True)]:
            a, b = cached.read(i, flip=flip), plain.read(i, flip=flip)
            np.testing.assert_array_equal(a.features, b.features)
            np.testing.assert_array_equal(a.box_deltas, b.box_deltas)
        assert len(cached._cache) == 1  # LRU of one shard

    def test_index_of_and_contains(self, tmp_path):
        reader = open_store(str(self.filled(tmp_path / "s")))
        assert reader.index_of("img007") == 7 and "img007" in reader and "nope" not in reader
        with pytest.raises(StoreError, match="'nope' is not in the store"):
            reader.index_of("nope")

    # ------------------------------------------------------------------ writer validation
    def test_write_validates_against_manifest(self, tmp_path):
        writer = self.create(tmp_path / "s")
        m = writer.manifest
        items = [make_item(m, i) for i in range(4)]
        with pytest.raises(StoreError, match=r"expected records for images \['img000'"):
            writer.write_shard(0, items[::-1])
        bad = replace(items[1], features=np.zeros((7, 2, 2), np.float32))
        with pytest.raises(StoreError, match=r"image 'img001': features must be float\[8, h<=4, w<=5\].*\[7, 2, 2\]"):
            writer.write_shard(0, [items[0], bad, *items[2:]])
        too_big = replace(items[1], features=np.zeros((8, 5, 5), np.float32))
        with pytest.raises(StoreError, match="features must be"):
            writer.write_shard(0, [items[0], too_big, *items[2:]])
        wrong_k = replace(items[3], scores=np.zeros(5, np.float32))
        with pytest.raises(
            StoreError, match=r"image 'img003': scores must be float32\[6\] for its 6 proposals, got shape \[5\]"
        ):
            writer.write_shard(0, [*items[:3], wrong_k])
        too_many = replace(items[3], proposals=np.zeros((7, 4), np.float32))
        with pytest.raises(
            StoreError, match=r"image 'img003': proposals must be float32\[k<=6, 4\], got shape \[7, 4\]"
        ):
            writer.write_shard(0, [*items[:3], too_many])
        ints = replace(items[0], class_logits=np.zeros((items[0].proposals.shape[0], 3), np.int64))
        with pytest.raises(StoreError, match="image 'img000': class_logits: expected a float array, got dtype int64"):
            writer.write_shard(0, [ints, *items[1:]])
        with pytest.raises(StoreError, match="got flipped records"):
            writer.write_shard(0, items, items)
        with pytest.raises(StoreError, match="shard 3 out of range"):
            writer.write_shard(3, items)
        assert writer.pending_shards() == [0, 1, 2]  # nothing was written by the refused calls

    def test_missing_flipped_records_refused(self, tmp_path):
        writer = self.create(tmp_path / "s", flips=(False, True))
        with pytest.raises(StoreError, match="pass the flipped records"):
            writer.write_shard(2, [make_item(writer.manifest, i) for i in (8, 9)])

    # ------------------------------------------------------------------ modes
    def test_create_refuses_existing(self, tmp_path):
        self.create(tmp_path / "s").close()
        with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
            self.create(tmp_path / "s")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("not a store")
        with pytest.raises(FileExistsError, match="not a feature store"):
            self.create(tmp_path / "other")

    def test_resume_refuses_changed_manifest_naming_fields(self, tmp_path):
        self.create(tmp_path / "s").close()
        changed = dict(
            teacher_sha256=hashlib.sha256(b"other checkpoint").hexdigest(),
            preprocess={**make_manifest().preprocess, "min_size": 320},
            dataset_digest=hashlib.sha256(b"other").hexdigest(),
        )
        with pytest.raises(StoreError) as err:
            self.create(tmp_path / "s", mode="resume", **changed)
        msg = str(err.value)
        assert "teacher.sha256" in msg and "dataset.digest" in msg and "preprocess.min_size 256 != requested 320" in msg
        assert "stride" not in msg and "--overwrite" in msg

    def test_resume_completes_pending_shards(self, tmp_path):
        store = tmp_path / "s"
        self.create(store).close()
        write_shards(str(store), [0, 2])
        writer = self.create(store, mode="resume")
        assert writer.pending_shards() == [1]
        reader = open_store(str(store))
        assert reader.completed_shards() == [0, 2] and not reader.is_complete()
        with pytest.raises(StoreError, match=r"image 5 \('img005'\) is in shard 1, which is not complete"):
            reader.read(5)
        write_shards(str(store), writer.pending_shards())
        assert writer.pending_shards() == [] and reader.is_complete()
        assert_same(reader.read(5), make_item(reader.manifest, 5))

    def test_resume_on_empty_location_creates(self, tmp_path):
        writer = self.create(tmp_path / "s", mode="resume")
        assert writer.pending_shards() == [0, 1, 2]

    def test_overwrite_replaces_store(self, tmp_path):
        store = self.filled(tmp_path / "s", seed=1)
        writer = self.create(store, mode="overwrite", channels=4)
        assert writer.pending_shards() == [0, 1, 2]
        assert open_store(str(store)).manifest.channels == 4

    # ------------------------------------------------------------------ interruption and corruption
    def test_shard_without_marker_is_pending(self, tmp_path):
        store = self.filled(tmp_path / "s")
        (store / "_complete" / "shard-00001.json").unlink()  # objects written, killed before the marker
        assert open_writer(str(store)).pending_shards() == [1]
        assert open_store(str(store)).completed_shards() == [0, 2]
        report = verify_store(str(store))
        assert not report.ok and any(e.startswith("shard 1: incomplete") for e in report.errors)

    def test_truncated_shard_object_is_pending_and_reported(self, tmp_path):
        store = self.filled(tmp_path / "s")
        victim = self.largest_object(store, 1)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        assert open_writer(str(store)).pending_shards() == [1]
        report = verify_store(str(store))
        assert any(e.startswith("shard 1: object") and "truncated" in e for e in report.errors), report.errors
        write_shards(str(store), [1])  # resume rewrites it
        assert verify_store(str(store)).ok

    def test_flipped_byte_is_detected_naming_shard(self, tmp_path):
        store = self.filled(tmp_path / "s")
        victim = self.largest_object(store, 1)
        flip_byte(victim, victim.stat().st_size // 2)
        report = verify_store(str(store))
        assert not report.ok
        assert any(e.startswith("shard 1: object") and "crc32c" in e for e in report.errors), report.errors
        assert not any(e.startswith(("shard 0", "shard 2")) for e in report.errors)

    def test_corrupt_chunk_names_the_image(self, tmp_path):
        store = self.filled(tmp_path / "s")
        path, offset, length = self.chunk_location(store, self.marker(store, 1), 1, 2)  # image 6
        flip_byte(path, offset + length // 2)
        report = verify_store(str(store))
        assert any(e.startswith("shard 1 image 6 ('img006')") and "cannot be decoded" in e for e in report.errors), (
            report.errors
        )
        assert not any("image 5" in e or "image 7" in e for e in report.errors)
        reader = open_store(str(store))
        assert_same(reader.read(7), make_item(reader.manifest, 7))  # neighbours still read

    @pytest.mark.parametrize("dtype", ["float16", "int8"])
    def test_nan_and_inf_are_reported(self, tmp_path, dtype):
        writer = self.create(tmp_path / "s", dtype=dtype)
        m = writer.manifest
        items = [make_item(m, i) for i in range(4)]
        items[1].features[3, 0, 0] = np.nan
        items[3].proposals[2, 1] = np.inf
        with pytest.warns(RuntimeWarning) as warned:
            writer.write_shard(0, items)
        assert sorted(str(w.message).split(" shard 0 ")[1] for w in warned) == [
            "image 'img001': 1 non-finite values stored (verify-store will report them)",
            "image 'img003': 1 non-finite values stored (verify-store will report them)",
        ]
        report = verify_store(str(tmp_path / "s"))
        assert any(
            e.startswith("shard 0 image 1 ('img001')") and "NaN/Inf values in features" in e for e in report.errors
        )
        assert any(
            e.startswith("shard 0 image 3 ('img003')") and "1 NaN/Inf values in proposals" in e for e in report.errors
        )

    def test_float16_overflow_warns(self, tmp_path):
        writer = self.create(tmp_path / "s")
        items = [make_item(writer.manifest, i) for i in range(4)]
        items[2].features[0, 0, 0] = 1e6
        with pytest.warns(RuntimeWarning, match="beyond the float16 range"):
            writer.write_shard(0, items)

    def test_manifest_invalid_json(self, tmp_path):
        store = self.filled(tmp_path / "s")
        (store / "manifest.json").write_text('{"format": "mimicdet-feature-store", ')
        with pytest.raises(StoreError, match=r"manifest\.json: manifest is not valid JSON"):
            open_store(str(store))
        report = verify_store(str(store))
        assert not report.ok and "not valid JSON" in report.errors[0]

    def test_manifest_wrong_field_type(self, tmp_path):
        store = self.filled(tmp_path / "s")
        doc = json.loads((store / "manifest.json").read_text())
        doc["features"]["stride"] = "16"
        (store / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(
            StoreError, match=r"manifest\.json: field features\.stride: expected a positive integer, got '16'"
        ):
            open_store(str(store))
        assert "features.stride" in verify_store(str(store)).errors[0]

    def test_killed_writer_leaves_complete_shards_only(self, tmp_path):
        """SIGKILL a real writer process mid-run: every marked shard verifies, the rest are pending."""
        store = tmp_path / "s"
        manifest = make_manifest(
            image_ids=tuple(f"img{i:03d}" for i in range(160)), shard_size=8, max_hw=(20, 25), channels=16
        )
        create_store(str(store), manifest, backend=self.backend).close()
        script = textwrap.dedent(f"""
            from tests.test_featurestore import write_shards
            write_shards({str(store)!r}, range(20))
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while (
                len(list((store / "_complete").glob("*.json"))) < 3
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        done = open_store(str(store)).completed_shards()
        writer = create_store(str(store), manifest, backend=self.backend, mode="resume")
        pending = writer.pending_shards()
        assert len(done) >= 3 and pending and sorted(done + pending) == list(range(20))
        report = verify_store(str(store))
        assert [e for e in report.errors if "incomplete" not in e] == []  # nothing half-written is marked complete
        assert report.complete_shards == len(done)
        write_shards(str(store), pending)
        assert verify_store(str(store)).ok

    # ------------------------------------------------------------------ inspect, verify, compatibility
    def test_inspect_sizes_and_ratio(self, tmp_path):
        store = self.filled(tmp_path / "s")
        info = inspect_store(str(store))
        m = make_manifest()
        on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        items = [make_item(m, i) for i in range(N_IMAGES)]
        raw = sum(
            4 * (x.features.size + x.proposals.size + x.scores.size + x.class_logits.size + x.box_deltas.size)
            for x in items
        )
        assert info["bytes_on_disk"] == on_disk
        assert info["raw_float32_bytes"] == raw
        assert info["compression_ratio"] == pytest.approx(raw / info["shard_bytes"])
        assert info["bytes_per_image"] == pytest.approx(info["shard_bytes"] / N_IMAGES)
        assert info["completion"] == {"done": 3, "total": 3, "pending": []}
        assert info["manifest"]["layout"]["backend"] == self.backend
        (store / "_complete" / "shard-00002.json").unlink()
        assert inspect_store(str(store))["completion"] == {"done": 2, "total": 3, "pending": [2]}
        assert "2/3 complete" in describe_store(str(store))

    def test_verify_against_dataset(self, tmp_path):
        from mimicdet.data.records import Dataset, empty_record

        store = self.filled(tmp_path / "s")
        records = tuple(empty_record(f"img{i:03d}", Path(f"{i}.jpg"), 64, 48) for i in range(N_IMAGES))
        dataset = Dataset("toy", "train", ("raccoon", "dog"), records)
        store2 = self.filled(tmp_path / "s2", dataset_digest=dataset.digest())
        assert verify_store(str(store2), dataset=dataset).ok
        errors = verify_store(str(store), dataset=dataset).errors
        assert errors == [f"store dataset.digest {make_manifest().dataset_digest!r} != dataset {dataset.digest()!r}"]

    def test_check_compatible_names_both_sides(self, tmp_path):
        reader = open_store(str(self.filled(tmp_path / "s")))
        m = reader.manifest
        reader.check_compatible(
            dataset_digest=m.dataset_digest,
            preprocess=dict(m.preprocess),
            stride=16,
            channels=8,
            teacher_sha=m.teacher_sha256,
            classes=["raccoon", "dog"],
        )
        with pytest.raises(StoreError) as err:
            reader.check_compatible(preprocess={**m.preprocess, "min_size": 320}, stride=8, classes=["raccoon"])
        msg = str(err.value)
        assert "store preprocess.min_size 256 != requested 320" in msg
        assert "store features.stride 16 != requested 8" in msg
        assert "store teacher.classes ['raccoon', 'dog'] != requested ['raccoon']" in msg

    # ------------------------------------------------------------------ processes
    def test_concurrent_writers_of_disjoint_shards(self, tmp_path):
        store = tmp_path / "s"
        self.create(store, flips=(False, True)).close()
        ctx = mp.get_context("spawn")
        workers = [ctx.Process(target=write_shards, args=(str(store), shards)) for shards in ([0, 2], [1])]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert [w.exitcode for w in workers] == [0, 0]
        reader = open_store(str(store))
        assert reader.is_complete() and verify_store(str(store)).ok
        for i in range(N_IMAGES):
            assert_same(reader.read(i, flip=True), make_item(reader.manifest, i, flip=True))

    def test_reader_pickles_and_survives_fork(self, tmp_path):
        reader = open_store(str(self.filled(tmp_path / "s")))
        want = reader.read(6)  # handles are open in this process now
        clone = pickle.loads(pickle.dumps(reader))
        np.testing.assert_array_equal(clone.read(6).features, want.features)
        queue = mp.get_context("fork").Queue()
        child = mp.get_context("fork").Process(target=_read_in_child, args=(reader, 5, queue))
        child.start()
        image_id, data = queue.get(timeout=30)
        child.join(30)
        assert child.exitcode == 0 and image_id == "img005"
        assert data == reader.read(5).features.tobytes()


class TestZarrStore(StoreTests):
    backend = "zarr"

    def chunk_location(self, store, marker, shard, local):
        path = store / f"features/c/{shard}/0/0/0"
        data = path.read_bytes()
        # Shard index at the end: uint64 (offset, nbytes) per chunk, then its crc32c.
        index = np.frombuffer(data[-(SHARD * 16 + 4) : -4], "<u8").reshape(SHARD, 2)
        return path, int(index[local, 0]), int(index[local, 1])

    def test_one_object_per_array_and_shard(self, tmp_path):
        store = self.filled(tmp_path / "s", dtype="int8")
        marker = self.marker(store, 2)
        names = [
            "features",
            "scale",
            "feature_hw",
            "proposals",
            "scores",
            "num_proposals",
            "class_logits",
            "box_deltas",
        ]
        assert sorted(marker["objects"]) == sorted(
            f"{n}/c/2" + "/0" * nd for n, nd in zip(names, [3, 1, 1, 2, 1, 0, 2, 2])
        )
        assert marker["image_ids"] == ["img008", "img009"]
        meta = json.loads((store / "features" / "zarr.json").read_text())
        codec = meta["codecs"][0]
        assert codec["name"] == "sharding_indexed" and codec["configuration"]["chunk_shape"] == [1, 8, 4, 5]
        assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "zstd", "crc32c"]
        assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]


    @pytest.mark.parametrize("dtype", ["float16", "int8"])
    def test_direct_reads_equal_zarrs_own_decoder(self, tmp_path, dtype):
        from mimicdet.store.zarr_backend import ZarrBackend

        store = self.filled(tmp_path / "s", dtype=dtype, flips=(False, True))  # last shard holds 2 of 4 images
        reader = open_store(str(store))
        direct = reader._backend
        assert direct._direct_reader() is not None  # the fast path is taken for this layout
        plain = ZarrBackend(direct.location, reader.manifest, writable=False)
        for prefix in ("", "flip/"):
            for i in range(N_IMAGES):
                got, want = direct.read_image(i, prefix), plain.read_image(i, prefix)
                assert sorted(got) == sorted(want)
                for name in want:
                    assert got[name].dtype == want[name].dtype and got[name].flags.writeable
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{prefix}{name} image {i}")
            for shard in range(3):
                got, want = direct.read_shard(shard, prefix), plain.read_shard(shard, prefix)
                for name in want:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{prefix}{name} shard {shard}")

    @pytest.mark.parametrize("dtype", ["float16", "int8"])
    def test_shard_objects_equal_zarrs_own_encoding(self, tmp_path, dtype):
        """Shards are encoded by the backend, not by zarr's setitem: every object must be byte for byte what
        zarr writes for the same arrays, full and short shards, flipped arrays included."""
        import asyncio

        from mimicdet.store.format import pack_shard
        from mimicdet.store.zarr_backend import chunk_codecs
        from zarr.core.sync import sync

        store = self.filled(tmp_path / "s", dtype=dtype, flips=(False, True))  # last shard holds 2 of 4 images
        writer = open_writer(str(store))
        backend, m = writer._backend, writer.manifest
        assert chunk_codecs(m, backend._array_map()) is not None  # the layout takes the backend's encoder
        for shard in range(m.num_shards):
            ours = {k: (store / k).read_bytes() for k in backend.shard_keys(shard)}
            a, b = m.shard_range(shard)
            arrays = pack_shard(m, [make_item(m, i) for i in range(a, b)], "test")
            arrays |= {"flip/" + k: v for k, v in pack_shard(m, [make_item(m, i, flip=True) for i in range(a, b)], "test").items()}
            amap, zstore = backend._array_map(), backend._open_store()

            async def zarr_writes() -> None:
                await asyncio.gather(*(zstore.delete(k) for k in ours))
                await asyncio.gather(*(amap[n].setitem(slice(a, b), v) for n, v in arrays.items()))

            sync(zarr_writes())
            assert len(ours) == len(arrays) == len(m.arrays())
            for key, data in ours.items():
                assert (store / key).read_bytes() == data, f"{key} (shard {shard}) differs from zarr's encoding"

    def test_direct_reads_see_a_rewritten_shard(self, tmp_path):
        store = self.filled(tmp_path / "s")
        reader = open_store(str(store))
        before = reader.read(5).features  # caches shard 1's indexes
        write_shards(str(store), [1], seed=7)  # other content, other chunk sizes
        time.sleep(0.01)
        assert_same(reader.read(5), make_item(reader.manifest, 5, seed=7))
        assert not np.array_equal(before, reader.read(5).features)

    def test_direct_reads_refuse_a_damaged_chunk_or_index(self, tmp_path):
        store = self.filled(tmp_path / "s")
        path, offset, length = self.chunk_location(store, self.marker(store, 1), 1, 2)
        flip_byte(path, offset + length // 2)
        reader = open_store(str(store))
        assert_same(reader.read(5), make_item(reader.manifest, 5))  # the other chunks still read
        with pytest.raises(StoreError, match=r"shard 1 image 6 \('img006'\): cannot be read .*checksum"):
            reader.read(6)
        flip_byte(path, path.stat().st_size - 10)  # inside the shard index
        with pytest.raises(StoreError, match=r"shard 1 image 4 .*checksum"):
            open_store(str(store)).read(4)


class TestHdf5Store(StoreTests):
    backend = "hdf5"

    def chunk_location(self, store, marker, shard, local):
        import h5py

        path = store / "shards" / f"shard-{shard:05d}.h5"
        with h5py.File(path, "r") as f:
            ds = f["features"]
            assert ds.fletcher32 and ds.compression == "gzip"
            info = ds.id.get_chunk_info_by_coord((local, 0, 0, 0))
        return path, int(info.byte_offset), int(info.size)


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_json_round_trip():
    m = make_manifest(flips=[False, True], dtype="int8", preprocess={"min_size": 256, "mean": (0.5, 0.5, 0.5)})
    assert m.flips == (False, True) and m.preprocess["mean"] == [0.5, 0.5, 0.5]
    back = Manifest.from_json(m.to_json())
    assert back == m and back.diff(m) == []
    doc = json.loads(m.to_json())
    assert doc["dataset"]["num_images"] == 10 and doc["layout"]["num_shards"] == 3
    assert doc["features"]["quantisation"] == "per-channel-symmetric, float16 scale rounded up"
    assert doc["proposals"]["num_classes"] == 3 and doc["proposals"]["dtype"] == "float16"
    assert doc["format_version"] == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("teacher_sha256", "abc", "teacher.sha256: expected a sha256 hex digest"),
        ("stride", 0, "features.stride: expected a positive integer, got 0"),
        ("channels", True, "features.channels: expected a positive integer, got True"),
        ("dtype", "bfloat16", "features.dtype: expected 'float16' or 'int8', got 'bfloat16'"),
        ("flips", (True,), r"flips: expected \[false\] or \[false, true\]"),
        ("max_hw", (4,), r"features.max_hw: expected \[Hmax, Wmax\]"),
        ("nms_threshold", 1.5, r"proposals.nms_threshold: expected an IoU threshold in \(0, 1\]"),
        ("image_ids", ("a", "b", "a"), "dataset.image_ids: expected unique names, got \"duplicate 'a'\""),
        ("preprocess", {"fn": object()}, "preprocess: expected a JSON-serialisable dict"),
    ],
)
def test_manifest_validation_names_field(field, value, message):
    with pytest.raises(StoreError, match=message):
        make_manifest(**{field: value})


def test_manifest_from_json_checks_derived_fields():
    doc = json.loads(make_manifest().to_json())
    doc["dataset"]["num_images"] = 11
    with pytest.raises(StoreError, match=r"x.json: field dataset.num_images: expected 10 \(derived\), got 11"):
        Manifest.from_json(json.dumps(doc), source="x.json")
    del doc["teacher"]
    with pytest.raises(StoreError, match="field teacher.arch: missing"):
        Manifest.from_json(json.dumps(doc), source="x.json")


def test_manifest_diff_names_fields():
    a = make_manifest()
    b = make_manifest(
        image_ids=a.image_ids[:5] + ("other",) + a.image_ids[6:], preprocess={**a.preprocess, "min_size": 320}, stride=8
    )
    assert a.diff(b) == [
        "dataset.image_ids: 10 ids ([5] = 'img005') != 10 ids ([5] = 'other')",
        "preprocess.min_size: 256 != 320",
        "features.stride: 16 != 8",
    ]


def test_float16_packing_matches_numpys_rounding():
    """Maps are cast through torch (fast); the stored bits must be numpy's: round to nearest even, subnormals,
    Inf past 65504 (and the warning that goes with it), NaN kept."""
    from mimicdet.store.format import _float32_to_float16, _has_inf16

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(40000).astype(np.float32) * s for s in (1e-7, 1e-3, 1, 1e3, 7e4)]
                       + [np.array([np.nan, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 6e-8, 3e-8, 0.0, -0.0],
                                   np.float32)])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = np.empty_like(want)
    _float32_to_float16(x, out=got)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    crop = np.zeros((3, 4, 5), np.float16)  # a smaller map written into the padded slot, as pack_shard does
    _float32_to_float16(x[:24].reshape(3, 2, 4), out=crop[:, :2, :4])
    np.testing.assert_array_equal(crop[:, :2, :4].view(np.uint16), want[:24].reshape(3, 2, 4).view(np.uint16))
    assert not crop[:, 2:].any() and not crop[:, :, 4:].any()
    assert _has_inf16(want) and not _has_inf16(want[:40000]) and _has_inf16(np.array([np.nan], np.float16))


def test_quantise_int8_known_answer():
    from mimicdet.store import quantise_int8

    x = np.array([[[-254.0, 0.0, 127.0]], [[0.0, 0.0, 0.0]], [[1.27, -0.635, 0.3]]], np.float32)
    q, scale = quantise_int8(x)
    np.testing.assert_allclose(scale, [2.0, 0.0, 0.01], rtol=1e-6)
    np.testing.assert_array_equal(q, [[[-127, 0, 64]], [[0, 0, 0]], [[127, -64, 30]]])
    assert q.dtype == np.int8


def test_quantise_int8_float16_scale_rounds_up():
    from mimicdet.store import quantise_int8

    # Channel 2: max 1.3208, scale 0.0104, whose nearest float16 (0.0103989) is below it; the stored scale is the
    # next float16 up, 0.0104065, so 1.3208 / 0.0104065 = 126.9 -> 127 is not clipped. 2.0 and 0.0 are exact.
    x = np.array([[[-254.0, 0.0, 127.0]], [[0.0, 0.0, 0.0]], [[1.3208, -0.6604, 0.3]]], np.float32)
    q, scale = quantise_int8(x, "float16")
    assert scale.dtype == np.float16
    assert scale[0] == 2.0 and scale[1] == 0.0
    assert np.float16(np.float32(1.3208) / 127) < np.float32(1.3208) / 127  # the case this test is about
    assert scale[2] == np.nextafter(np.float16(np.float32(1.3208) / 127), np.float16(1))
    np.testing.assert_array_equal(q, [[[-127, 0, 64]], [[0, 0, 0]], [[127, -63, 29]]])
    err = np.abs(q * scale.astype(np.float32)[:, None, None] - x)
    assert (err <= scale.astype(np.float32)[:, None, None] / 2 + 1e-7).all()


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_inspect_and_verify(tmp_path):
    from mimicdet.cli import main

    store = tmp_path / "s"
    create_store(str(store), make_manifest()).close()
    write_shards(str(store), range(3))
    runner = CliRunner()
    result = runner.invoke(main, ["inspect-store", str(store)])
    assert result.exit_code == 0, result.output
    assert (
        "3/3 complete" in result.output and "toy/train: 10 images" in result.output and "compression" in result.output
    )
    result = runner.invoke(main, ["verify-store", str(store)])
    assert result.exit_code == 0 and "OK" in result.output
    flip_byte(store / "features/c/1/0/0/0", 10)
    result = runner.invoke(main, ["verify-store", str(store)])
    assert result.exit_code == 1 and "shard 1: object features/c/1/0/0/0 crc32c" in result.output
    result = runner.invoke(main, ["verify-store", str(store), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "give --data and --split together" in result.output
    result = runner.invoke(main, ["inspect-store", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "not a feature store" in result.output and "Traceback" not in result.output


def test_cli_verify_against_real_dataset(tmp_path):
    from mimicdet.cli import main
    from mimicdet.data import load_dataset

    from tests.voc_fixtures import RACCOON

    dataset = load_dataset(RACCOON, "test")
    m = make_manifest(
        dataset_name=dataset.name,
        dataset_split=dataset.split,
        dataset_digest=dataset.digest(),
        image_ids=tuple(r.image_id for r in dataset.records),
        classes=tuple(dataset.classes),
        shard_size=64,
    )
    create_store(str(tmp_path / "s"), m).close()
    runner = CliRunner()
    result = runner.invoke(main, ["verify-store", str(tmp_path / "s"), "--data", str(RACCOON), "--split", "test"])
    assert result.exit_code == 1 and "shard 0: incomplete" in result.output and "digest" not in result.output
    result = runner.invoke(main, ["verify-store", str(tmp_path / "s"), "--data", str(RACCOON), "--split", "train"])
    assert result.exit_code == 1 and "store dataset.digest" in result.output
