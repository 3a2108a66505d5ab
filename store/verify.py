"""Checking a store: checksums and completion of every shard, and that it was made from a given dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from mimicdet.data.errors import StoreError
from mimicdet.store.backend import Backend, load_manifest, make_backend, shard_problem
from mimicdet.store.format import FLIP_PREFIX, image_arrays, unpack_image
from mimicdet.store.manifest import (
    TEMP_SUFFIX,
    Location,
    Manifest,
    ObjectInfo,
    marker_key,
    parse_marker,
)
from mimicdet.store.writer import ids_text


@dataclass
class VerifyReport:
    url: str
    num_shards: int = 0
    complete_shards: int = 0
    images_checked: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational (e.g. a renamed dataset folder); never fail
    # store index -> the first problem found with that image (every image of a shard for shard-wide problems)
    bad_images: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: str, images: Sequence[int] | range = ()) -> None:
        self.errors.append(problem)
        for i in images:
            self.bad_images.setdefault(int(i), problem)

    def format(self) -> str:
        head = "OK" if self.ok else f"FAILED ({len(self.errors)} problems)"
        lines = [
            f"store {self.url}: {head}",
            f"  shards complete: {self.complete_shards}/{self.num_shards}, "
            f"images decoded and checked: {self.images_checked}",
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_store(
    url: str | Path,
    *,
    dataset: Any | None = None,
    storage_options: Mapping[str, Any] | None = None,
    shards: Sequence[int] | None = None,
    deep: bool = True,
) -> VerifyReport:
    """Check the manifest, every completion marker, every shard object's size and crc32c, decode every chunk
    (zarr/HDF5 checksums), compare the stored arrays' shapes with the manifest, look for NaN/Inf, and, given a
    `data.records.Dataset`, that it is the one the store was made from. Never raises for a broken store:
    everything found is in the report, and ``report.bad_images`` names the images affected.

    ``shards`` limits the check to those shards (default: all). ``deep=False`` checks only what needs no data
    read: markers, and that every object is present with the size its marker records (truncation)."""
    location = Location(url, storage_options)
    report = VerifyReport(url=location.url)
    try:
        manifest = load_manifest(location)
    except (StoreError, FileNotFoundError) as e:
        report.errors.append(str(e))
        return report
    report.num_shards = manifest.num_shards
    selected = range(manifest.num_shards) if shards is None else sorted(set(int(s) for s in shards))
    backend = make_backend(location, manifest, writable=False)
    sizes = location.list_sizes()
    for shard in selected:
        images = range(*manifest.shard_range(shard))
        corrupted = False
        problem = shard_problem(location, manifest, backend, shard, sizes)
        if problem is not None:
            report.add(problem, images)
            if "no completion marker" in problem or not deep:
                continue
        else:
            report.complete_shards += 1
            if not deep:
                continue
            marker = parse_marker(location.read_bytes(marker_key(shard)), source=marker_key(shard))
            for obj, info in sorted(marker.objects.items()):
                actual = ObjectInfo.of(location.read_bytes(obj))
                if actual != info:
                    corrupted = True
                    report.errors.append(
                        f"shard {shard}: object {obj} crc32c {actual.crc32c:08x} != {info.crc32c:08x} "
                        "recorded in its marker (corrupted)"
                    )
        found = len(report.bad_images)
        _check_shard_data(manifest, backend, shard, report)
        if corrupted and len(report.bad_images) == found:
            # The chunk checksums did not say which image: count the whole shard as damaged.
            for i in images:
                report.bad_images.setdefault(i, f"shard {shard}: corrupted (crc32c mismatch)")
    backend.close()
    for key in sorted(sizes):
        if key.endswith(TEMP_SUFFIX):
            report.warnings.append(
                f"leftover temporary file {key} from an interrupted write (ignored by readers; --resume removes it)"
            )
    if dataset is not None:
        problems, notes = check_dataset(manifest, dataset)
        report.errors += problems
        report.notes += notes
    return report


def _check_shard_data(manifest: Manifest, backend: Backend, shard: int, report: VerifyReport) -> None:
    """Decode every chunk of a shard; name the images that fail to decode, whose arrays do not have the shape the
    manifest gives, or that hold non-finite values."""
    start, stop = manifest.shard_range(shard)
    ids = manifest.image_ids
    H, W = manifest.max_hw
    specs = manifest.arrays()
    for prefix in [""] + ([FLIP_PREFIX] if manifest.has_flips else []):
        label = " (flipped)" if prefix else ""
        rows: list[tuple[int, dict[str, np.ndarray]]] = []
        try:
            arrays = backend.read_shard(shard, prefix)
            rows = [(i, image_arrays(arrays, i - start)) for i in range(start, stop)]
        except Exception as shard_error:  # a checksum or format error: find which images are affected
            failures = []
            for i in range(start, stop):
                try:
                    rows.append((i, backend.read_image(i, prefix)))
                except Exception as e:
                    failures.append((i, e))
            if len(failures) == stop - start:  # e.g. an unreadable file or shard index: one line, not S
                report.add(
                    f"shard {shard}{label} (images {ids_text(ids[start:stop])}): cannot be decoded "
                    f"({type(shard_error).__name__}: {shard_error})",
                    range(start, stop),
                )
            else:
                for i, e in failures:
                    report.add(
                        f"shard {shard} image {i} ({ids[i]!r}){label}: cannot be decoded ({type(e).__name__}: {e})",
                        [i],
                    )
        if rows:
            wrong = [
                f"{name} {list(rows[0][1][name].shape)} {rows[0][1][name].dtype} (manifest: {list(shape)} {dtype})"
                for name, (shape, dtype) in specs.items()
                if name.startswith(FLIP_PREFIX) == bool(prefix)
                and (rows[0][1][name[len(prefix):]].shape != shape or rows[0][1][name[len(prefix):]].dtype != dtype)
            ]
            if wrong:
                report.add(
                    f"shard {shard}{label} (images {ids_text(ids[start:stop])}): stored arrays do not have the "
                    f"per-image shape the manifest gives: {'; '.join(wrong)}",
                    range(start, stop),
                )
                continue
        for i, a in rows:
            where = f"shard {shard} image {i} ({ids[i]!r}){label}"
            h, w = (int(v) for v in a["feature_hw"])
            k = int(a["num_proposals"])
            if not (1 <= h <= H and 1 <= w <= W and 0 <= k <= manifest.num_proposals):
                report.add(f"{where}: feature_hw {[h, w]} / num_proposals {k} out of range", [i])
                continue
            item = unpack_image(manifest, ids[i], a)
            for name in ("features", "proposals", "scores", "class_logits", "box_deltas"):
                v = getattr(item, name)
                bad = int(v.size - np.count_nonzero(np.isfinite(v)))
                if bad:
                    report.add(f"{where}: {bad} NaN/Inf values in {name}", [i])
        report.images_checked += len(rows) if not prefix else 0


def check_dataset(manifest: Manifest, dataset: Any) -> tuple[list[str], list[str]]:
    """Whether a store was made from ``dataset`` (a `data.records.Dataset`): the one rule of `mimic verify-store
    --data` and `mimic train-student` (student.stream.open_source). Returns (problems, notes); any problem refuses.

    Every image id of the dataset must be in the store. When the dataset holds exactly the store's images, the
    digest of their ids and sizes (`Dataset.digest`, in the store's order) must be the manifest's dataset.digest;
    a dataset holding only some of the store's images is checked by id alone (the digest covers all of them). The
    dataset's name (its folder's name) and split name do not decide: a renamed or copied folder gets a note."""
    problems: list[str] = []
    notes: list[str] = []
    where = f"{dataset.name}/{dataset.split}"
    index = {image_id: i for i, image_id in enumerate(manifest.image_ids)}
    missing = [r.image_id for r in dataset.records if r.image_id not in index]
    if missing:
        problems.append(
            f"store has no record for {len(missing)} of {len(dataset)} images of {where} (first: {missing[0]!r})"
        )
    if missing or len(dataset) == manifest.num_images:
        records = dataset.records if missing else tuple(sorted(dataset.records, key=lambda r: index[r.image_id]))
        digest = replace(dataset, records=records).digest()
        if digest != manifest.dataset_digest:
            problems.append(f"store dataset.digest {manifest.dataset_digest!r} != dataset {digest!r}")
    else:
        notes.append(
            f"dataset {where} holds {len(dataset)} of the store's {manifest.num_images} images: checked by image id "
            "only (the store's dataset.digest covers all of them)"
        )
    if tuple(dataset.classes) != tuple(manifest.classes):
        problems.append(f"store teacher.classes {list(manifest.classes)!r} != dataset {list(dataset.classes)!r}")
    for name, a, b in (("name", manifest.dataset_name, dataset.name), ("split", manifest.dataset_split, dataset.split)):
        if a != b:
            notes.append(f"store dataset.{name} {a!r} != dataset {b!r} (only a name: the dataset.digest decides)")
    return problems, notes
