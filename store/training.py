"""Can a student train on these stores? Every decision in one place, the first mismatch named.

:func:`open_for_training` opens each teacher's store of the labelled images (and of the unlabelled ones), and
checks, in this order: each store was made from the dataset given and is complete; the shards the run will read
are intact (``--skip-corrupt`` leaves damaged images out instead); several teachers' stores describe the same
images and preprocessing; the classes agree; flips exist where asked for (turned off with a warning when the
labelled stores lack them); each unlabelled store comes from the same teacher as its labelled one, with the same
preprocessing, stride and channels; and the student's map lies on the teacher's grid.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from mimicdet.data.errors import StoreError
from mimicdet.data.records import Dataset
from mimicdet.data.transforms import Preprocess
from mimicdet.store.manifest import Manifest
from mimicdet.store.reader import StoreReader, open_store
from mimicdet.store.verify import check_dataset, verify_store

# Manifest fields (as diff_fields names them) that must agree between the stores of several teachers: the same
# images, preprocessed alike, on one feature grid. Teacher identity, width, channels, dtype and head may differ.
_SAME_IMAGES_FIELDS = ("dataset.name", "dataset.split", "dataset.digest", "dataset.image_ids", "features.stride")


@dataclass(frozen=True)
class SkippedImage:
    store: str
    image_id: str
    problem: str


@dataclass(frozen=True)
class TrainingStores:
    """What a student trains on: per source (labelled, then unlabelled if any) its images and, per teacher (the
    primary first), the store of those images."""

    labelled: Dataset  # after --subset and --skip-corrupt
    readers: tuple[StoreReader, ...]  # each teacher's store of the labelled images
    unlabelled: Dataset | None
    unlabelled_readers: tuple[StoreReader, ...]
    flip: bool  # train with flips (asked for, and every store has them)
    skipped: tuple[SkippedImage, ...]

    @property
    def manifest(self) -> Manifest:
        """The primary store's manifest: proposals, head outputs and the grid come from its teacher."""
        return self.readers[0].manifest

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(dict(self.manifest.preprocess))


def store_classes(url: str, storage_options: Mapping | None = None) -> tuple[str, ...]:
    """The class order the teacher fixed (label k+1 <-> classes[k]): read the data with these."""
    return tuple(open_store(url, storage_options=storage_options or None).manifest.classes)


def open_for_training(
    stores: Sequence[str],
    dataset: Dataset,
    *,
    subset: int | None = None,
    subset_seed: int = 0,
    unlabelled_stores: Sequence[str] = (),
    unlabelled: Dataset | None = None,
    flip: bool = False,
    skip_corrupt: bool = False,
    student_stride: int | None = None,
    input_scale: float = 1.0,
    scale_mimic: bool = False,
    storage_options: Mapping | None = None,
    cache_dir: str | None = None,
    cache_size: str | int | None = None,
) -> TrainingStores:
    """Open and check the stores a student trains on (see the module docstring); raises StoreError naming the
    store and the first mismatch. ``dataset``: the whole labelled split (the stores were made from it);
    ``subset``: train on that many of its images, drawn by ``subset_seed``. ``student_stride``: the student map's
    stride in its own input pixels, which ``input_scale`` times the teacher's input; it must land on the primary
    store's grid. ``cache_dir``, ``cache_size``: the local shard cache of remote stores (see ``open_store``); their
    readers prefetch the whole store when it fits."""
    opts = dict(storage_options or {})
    open_one = functools.partial(open_source, storage_options=opts, cache_dir=cache_dir, cache_size=cache_size)
    primary = open_one(stores[0], dataset)
    labelled, skipped = check_source(primary, dataset.seeded_subset(subset, subset_seed), skip_corrupt=skip_corrupt,
                                     storage_options=opts)
    readers = [primary]
    for url in stores[1:]:
        more = open_one(url, dataset)
        check_same_images(primary, more)
        labelled, more_skipped = check_source(more, labelled, skip_corrupt=skip_corrupt, storage_options=opts)
        skipped += more_skipped
        readers.append(more)
    manifest = primary.manifest
    primary.check_compatible(classes=labelled.classes)
    pre = Preprocess.from_dict(dict(manifest.preprocess))
    for url, reader in zip(stores, readers):
        if flip and not reader.manifest.has_flips:
            warnings.warn(f"{url}: store has no flipped teacher records; flips are turned off (re-extract with --flip "
                          "to train with flips)", stacklevel=3)
            flip = False
    unl_readers: list[StoreReader] = []
    if unlabelled_stores:
        if unlabelled is None:
            raise ValueError("unlabelled stores need the unlabelled dataset they were made from")
        unlabelled = replace(unlabelled, records=tuple(replace(r, labelled=False) for r in unlabelled.records))
        # Teacher k's store of the unlabelled images comes from teacher k (the same one as its labelled store).
        for k, (unl_url, url, lab) in enumerate(zip(unlabelled_stores, stores, readers)):
            unl = open_one(unl_url, unlabelled)
            if unl.manifest.teacher_sha256 != lab.manifest.teacher_sha256:
                raise StoreError(
                    f"{unl_url}: made by teacher {unl.manifest.teacher_sha256[:12]}, but {url} by "
                    f"{lab.manifest.teacher_sha256[:12]}; both stores must come from the same teacher"
                )
            unl.check_compatible(preprocess=pre, stride=manifest.stride, channels=lab.manifest.channels)
            if k:
                check_same_images(unl_readers[0], unl)
            if flip and not unl.manifest.has_flips:
                raise StoreError(f"{unl_url}: has no flipped records but {url} does; extract both alike")
            unlabelled, unl_skipped = check_source(unl, unlabelled, skip_corrupt=skip_corrupt, storage_options=opts)
            skipped += unl_skipped
            unl_readers.append(unl)
    else:
        unlabelled = None
    # One grid for both maps: student stride (in its own pixels) / input scale == teacher stride.
    if student_stride is not None and student_stride / input_scale != manifest.stride:
        raise StoreError(
            f"{stores[0]}: store features.stride {manifest.stride} != student stride {student_stride} at input "
            f"scale {input_scale}" + ("" if scale_mimic else " (scale mimic needs --scale-mimic)")
        )
    return TrainingStores(labelled, tuple(readers), unlabelled, tuple(unl_readers), flip, tuple(skipped))


def open_source(
    store_url: str, dataset: Dataset, *, storage_options: Mapping | None = None, cache_dir: str | None = None,
    cache_size: str | int | None = None,
) -> StoreReader:
    """Open a store, check it was made from ``dataset`` by :func:`check_dataset`, the rule
    `mimic verify-store --data` applies (every image id present; when it holds exactly those images, the digest of
    ids and image sizes decides, not the dataset folder's name), and that it is complete."""
    store = open_store(store_url, storage_options=storage_options or None, cache_dir=cache_dir,
                       cache_size=cache_size, prefetch=True)
    note = store.cache_note()  # lists a remote store once; forked DataLoader workers reuse that listing
    if note:
        warnings.warn(note, stacklevel=3)
    problems, _notes = check_dataset(store.manifest, dataset)  # notes (a renamed folder) do not concern training
    if problems:
        raise StoreError(
            f"{store_url}: store was made from another dataset: {problems[0]}; extract the teacher on this dataset"
        )
    if not store.is_complete():
        done = len(store.completed_shards())
        raise StoreError(
            f"{store_url}: store is incomplete ({done}/{store.manifest.num_shards} shards); "
            "finish it with `mimic extract-teacher ... --resume`"
        )
    return store


def check_source(
    store: StoreReader, dataset: Dataset, *, skip_corrupt: bool, storage_options: Mapping | None = None
) -> tuple[Dataset, list[SkippedImage]]:
    """Verify the shards of ``store`` that ``dataset``'s images live in, before training on them.

    Without ``skip_corrupt``: markers and object sizes only (no data read; finds truncated or missing objects
    and edited markers), raising StoreError naming the shard and image; damaged contents are found when read.
    With it: also every checksum, decode and NaN/Inf check (one read of those shards), and the damaged images
    are dropped. Returns the dataset to train on and what was skipped."""
    index = [store.index_of(r.image_id) for r in dataset.records]
    shards = sorted({store.shard_of(i) for i in index})
    report = verify_store(store.url, shards=shards, deep=skip_corrupt, storage_options=storage_options or None)
    if report.errors and not report.bad_images:
        raise StoreError(f"{store.url}: {report.errors[0]}")
    hits = [k for k, i in enumerate(index) if i in report.bad_images]
    if not hits:
        return dataset, []
    first = f"{dataset.records[hits[0]].image_id!r} ({report.bad_images[index[hits[0]]]})"
    if not skip_corrupt:
        raise StoreError(
            f"{store.url}: {len(hits)} of the {len(dataset)} images to train on are damaged, first {first}; "
            "--skip-corrupt trains without them (`mimic verify-store` lists them)"
        )
    if len(hits) == len(dataset):
        raise StoreError(f"{store.url}: every one of the {len(dataset)} images to train on is damaged, first {first}")
    skipped = [SkippedImage(store.url, dataset.records[k].image_id, report.bad_images[index[k]]) for k in hits]
    drop = set(hits)
    return dataset.subset([k for k in range(len(dataset)) if k not in drop]), skipped


def check_same_images(primary: StoreReader, other: StoreReader) -> None:
    """Refuse, naming both stores and every field that differs, a further teacher's store that does not describe
    the primary store's dataset and preprocessing (its map would sit on another grid or another image)."""
    diffs = [
        f"{path} {b} != {a}"
        for path, a, b in primary.manifest.diff_fields(other.manifest)
        if path in _SAME_IMAGES_FIELDS or path == "preprocess" or path.startswith("preprocess.")
    ]
    if diffs:
        raise StoreError(
            f"{other.url} and {primary.url}: the stores of several teachers must describe the same dataset and "
            f"preprocessing; {other.url} differs from {primary.url} in {'; '.join(diffs)}"
        )
