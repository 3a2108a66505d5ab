"""Student-side data: dataset images joined with the teacher's stored records, streamed by DataLoader workers.

This module must never import the teacher (``pipeline``): the whole point of the offline pipeline is that the
student's process holds only the student and the store reader.

Per item: the student's input image (exactly the teacher's preprocessing, at ``scale`` 1.0, or 0.5 for scale
mimic), its ground truth in student-input pixels (none for unlabelled images), and the teacher's record for
the same image and flip: features ``float32[Ct, h, w]`` and proposals ``float32[k, 4]`` in TEACHER-input
pixels (best first), class logits ``[k, Kc]``, box deltas ``[k, 4Kc]``.

A batch (:class:`MimicBatch`) holds labelled images first, then unlabelled ones (mimic only).

Several teachers: each source names one store per teacher (same images, same preprocessing), the primary
first; every teacher's feature map is read for every image, batched as ``MimicBatch.teacher_features[k]``
``float32[N, Ct_k, Hf, Wf]``. Proposals and head outputs come from the primary store only.

Damaged data stops training with a StoreError (or DataError for an unreadable image) naming the store, shard and
image, raised in the training process even when DataLoader workers hit it. :func:`mimicdet.store.training.check_source` runs before
training: it finds truncated or missing shard objects at once, and with ``skip_corrupt`` decodes every shard the
run uses and leaves the damaged images out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimicdet.data.errors import DataError, StoreError
from mimicdet.store import StoreReader
from mimicdet.store.remote import RemoteStoreError
from mimicdet.data.loader import Batch, DetectionImages, IterationSampler, collate, loader_generator, mix_seeds
from mimicdet.data.records import Dataset

# A key addresses one item of one source: (source, index, flip, iteration); source 0 = labelled,
# 1 = unlabelled. The iteration travels with the batch so per-step randomness can be a function of it.
MixedKey = tuple[int, int, bool, int]


class MimicImages(torch.utils.data.Dataset):
    """One or two sources (labelled, unlabelled), each a dataset and its teachers' stores (one store, or one per
    teacher with the primary first); ``__getitem__((source, index, flip, iteration))``."""

    def __init__(
        self,
        sources: list[tuple[Dataset, StoreReader | Sequence[StoreReader]]],
        images: list[DetectionImages],
    ):
        self.sources = [(ds, [stores] if isinstance(stores, StoreReader) else list(stores)) for ds, stores in sources]
        self.images = images
        counts = {len(stores) for _, stores in self.sources}
        if len(counts) != 1 or not counts.pop():
            raise ValueError(f"every source needs one store per teacher; got {[len(s) for _, s in self.sources]}")
        # per source, per teacher: dataset index -> index in that teacher's store (stores are addressed by image
        # id, not position).
        self._store_index = [[_index_in(store, ds) for store in stores] for ds, stores in self.sources]

    def __len__(self) -> int:
        return sum(len(ds) for ds, _ in self.sources)

    def __getitem__(self, key: MixedKey) -> dict:
        source, index, flip, iteration = key
        item = self.images[source][(index, flip)]
        item["iteration"] = iteration
        (primary, *more), (first, *more_index) = self.sources[source][1], self._store_index[source]
        rec = _read_checked(primary, int(first[index]), flip)
        features = [rec.features] + [
            _read_checked(store, int(idx[index]), flip, names=("features",)).features
            for store, idx in zip(more, more_index)
        ]
        item["teacher"] = {
            "features": [torch.from_numpy(f) for f in features],
            "proposals": torch.from_numpy(rec.proposals),
            "class_logits": torch.from_numpy(rec.class_logits),
            "box_deltas": torch.from_numpy(rec.box_deltas),
        }
        if source == 1:
            item["labelled"] = False
        return item


def _index_in(store: StoreReader, dataset: Dataset) -> np.ndarray:
    """``int64[len(dataset)]``: where each image's record lies in ``store``; StoreError for a missing one."""
    missing = [r.image_id for r in dataset.records if r.image_id not in store]
    if missing:
        raise StoreError(
            f"{store.url}: store has no record for {len(missing)} of {len(dataset)} images of "
            f"{dataset.name}/{dataset.split} (first: {missing[0]!r}); every teacher must cover the same images"
        )
    return np.array([store.index_of(r.image_id) for r in dataset.records], np.int64)


_RECORD_ARRAYS = ("features", "proposals", "class_logits", "box_deltas")


def _read_checked(store: StoreReader, store_index: int, flip: bool, *, names: Sequence[str] = _RECORD_ARRAYS):
    """``store.read`` plus the checks a record needs before training on it: channels as the manifest says (``r``
    is sized from it) and no NaN/Inf in ``names``; StoreError naming store, shard and image otherwise."""
    rec = store.read(store_index, flip=flip)
    where = (
        f"{store.url}: shard {store.shard_of(store_index)} image {store_index} ({rec.image_id!r})"
        + (" (flipped)" if flip else "")
    )
    if rec.features.shape[0] != store.manifest.channels:  # the transform r is sized from the manifest
        raise StoreError(
            f"{where}: stored features have {rec.features.shape[0]} channels, the manifest says "
            f"{store.manifest.channels}"
        )
    for name in names:
        bad = int(np.size(getattr(rec, name)) - np.count_nonzero(np.isfinite(getattr(rec, name))))
        if bad:  # the teacher wrote NaN/Inf (checksums cannot catch that); training on it would poison the run
            raise StoreError(f"{where}: {bad} NaN/Inf values in {name}")
    return rec


@dataclass
class MimicBatch:
    batch: Batch  # the student's images and targets (labelled first)
    num_labelled: int
    iteration: int  # the training iteration this batch was drawn for
    # Per teacher (the primary first): float32[N, Ct_k, Hf_k, Wf_k], zero-padded, and each image's valid (h, w).
    teacher_features: list[torch.Tensor]
    teacher_hw: list[list[tuple[int, int]]]
    teacher_proposals: list[torch.Tensor]  # the primary's, per image: [k_i, 4] teacher-input pixels
    teacher_logits: list[torch.Tensor]  # [k_i, Kc]
    teacher_deltas: list[torch.Tensor]  # [k_i, 4Kc]

    def __len__(self) -> int:
        return len(self.batch)

    def to(self, device: torch.device | str) -> "MimicBatch":
        move = lambda ts: [t.to(device, non_blocking=True) for t in ts]  # noqa: E731
        return replace(
            self,
            batch=self.batch.to(device),
            teacher_features=move(self.teacher_features),
            teacher_proposals=move(self.teacher_proposals),
            teacher_logits=move(self.teacher_logits),
            teacher_deltas=move(self.teacher_deltas),
        )


def collate_mimic(items: list[dict], *, size_divisor: int) -> MimicBatch:
    items = sorted(items, key=lambda it: not it["labelled"])  # stable: labelled first, order kept
    batch = collate(items, size_divisor=size_divisor)
    per_teacher = [[it["teacher"]["features"][k] for it in items] for k in range(len(items[0]["teacher"]["features"]))]
    return MimicBatch(
        batch=batch,
        num_labelled=sum(bool(it["labelled"]) for it in items),
        iteration=int(items[0]["iteration"]),
        teacher_features=[pad_maps(maps) for maps in per_teacher],
        teacher_hw=[[(int(m.shape[1]), int(m.shape[2])) for m in maps] for maps in per_teacher],
        teacher_proposals=[it["teacher"]["proposals"] for it in items],
        teacher_logits=[it["teacher"]["class_logits"] for it in items],
        teacher_deltas=[it["teacher"]["box_deltas"] for it in items],
    )


def pad_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """``[C, h_i, w_i]`` maps -> ``[N, C, max h, max w]``, zero-padded."""
    h = max(m.shape[1] for m in maps)
    w = max(m.shape[2] for m in maps)
    features = maps[0].new_zeros((len(maps), maps[0].shape[0], h, w))
    for k, m in enumerate(maps):
        features[k, :, : m.shape[1], : m.shape[2]] = m
    return features


class MixedSampler:
    """Infinite batches of ``(source, index, flip)`` keys: ``labelled_per_batch`` from source 0 and the rest
    from source 1 (when present). A pure function of ``(seed, iteration)``, so resumes are exact."""

    def __init__(
        self,
        n_labelled: int,
        n_unlabelled: int,
        batch_size: int,
        *,
        unlabelled_fraction: float,
        seed: int,
        start_iter: int = 0,
        flip: bool = False,
    ):
        n_unl = round(batch_size * unlabelled_fraction) if n_unlabelled else 0
        n_lab = batch_size - n_unl
        if n_lab < 1:
            raise ValueError(
                f"--unlabeled-fraction {unlabelled_fraction} leaves no labelled image in a batch of {batch_size}"
            )
        self.labelled = IterationSampler(n_labelled, n_lab, seed=seed, flip=flip)
        self.unlabelled = (
            IterationSampler(n_unlabelled, n_unl, seed=mix_seeds(seed, 1), flip=flip) if n_unl else None
        )
        self.start_iter = start_iter

    def batch(self, iteration: int) -> list[MixedKey]:
        keys = [(0, i, f, iteration) for i, f in self.labelled.batch(iteration)]
        if self.unlabelled is not None:
            keys += [(1, i, f, iteration) for i, f in self.unlabelled.batch(iteration)]
        return keys

    def __iter__(self) -> Iterator[list[MixedKey]]:
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


@dataclass(frozen=True)
class LoadFailure:
    """A batch whose data could not be read, carried back from a DataLoader worker as a value: an exception raised
    in a worker is re-raised with the worker's traceback pasted into its message."""

    kind: str  # "store" | "remote" (the storage service failed, not the data) | "data"
    message: str

    def error(self) -> Exception:
        if self.kind == "data":
            return DataError(self.message)
        if self.kind == "remote":
            return StoreError(self.message)
        listed = "" if "verify-store" in self.message else " (`mimic verify-store` lists them)"
        return StoreError(f"{self.message}; --skip-corrupt trains without the damaged images{listed}")


class _Guarded(torch.utils.data.Dataset):
    def __init__(self, images: MimicImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: MixedKey):
        try:
            return self.images[key]
        except StoreError as e:
            return LoadFailure("remote" if isinstance(e, RemoteStoreError) else "store", str(e))
        except DataError as e:
            return LoadFailure("data", str(e))


def _collate_or_fail(items: list, *, size_divisor: int):
    failed = next((it for it in items if isinstance(it, LoadFailure)), None)
    return failed if failed is not None else collate_mimic(items, size_divisor=size_divisor)


class _MimicLoader(DataLoader):
    """Raises a batch's LoadFailure in the training process, with the message alone."""

    def __iter__(self):
        # Start the underlying iterator now, not at the first next(): the trainer builds it inside a forked RNG
        # so that a fresh and a resumed run see the same training RNG stream.
        return _raise_failures(super().__iter__())


def _raise_failures(batches: Iterator) -> Iterator:
    for batch in batches:
        if isinstance(batch, LoadFailure):
            raise batch.error()
        yield batch


def make_mimic_loader(
    dataset: MimicImages, sampler, *, num_workers: int = 2, prefetch_factor: int = 4
) -> DataLoader:
    size_divisor = dataset.images[0].size_divisor
    return _MimicLoader(
        _Guarded(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(_collate_or_fail, size_divisor=size_divisor),
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=loader_generator(),
    )


def channel_stats(store: StoreReader, *, max_images: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (``float32[Ct]`` each) of the teacher's feature cells over up to
    ``max_images`` images spread evenly through ``store`` (unflipped). Deterministic: the same images every run."""
    n = len(store)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    total = sq = None
    cells = 0
    for i in picks:
        f = _read_checked(store, int(i), False, names=("features",)).features.astype(np.float64)
        f = f.reshape(f.shape[0], -1)
        total = f.sum(1) if total is None else total + f.sum(1)
        sq = (f * f).sum(1) if sq is None else sq + (f * f).sum(1)
        cells += f.shape[1]
    mean = total / cells
    std = np.sqrt(np.maximum(sq / cells - mean * mean, 0.0))
    # A channel that never varies carries no signal; 1 keeps it at its centred value instead of dividing by 0.
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))
