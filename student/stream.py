"""Student-side data: dataset images joined with the teacher's stored records, streamed by DataLoader workers.

This module must never import the teacher (``pipeline``): the whole point of the offline pipeline is that the
student's process holds only the student and the store reader.

Per item: the student's input image (exactly the teacher's preprocessing, at ``scale`` 1.0, or 0.5 for scale
mimic), its ground truth in student-input pixels (none for unlabelled images), and the teacher's record for
the same image and flip: features ``float32[Ct, h, w]`` and proposals ``float32[k, 4]`` in TEACHER-input
pixels (best first), class logits ``[k, Kc]``, box deltas ``[k, 4Kc]``.

A batch (:class:`MimicBatch`) holds labelled images first, then unlabelled ones (mimic only).

Several teachers: ``MimicImages(..., more_teachers=[t_2, ...])`` also reads, for every image, the feature map of
each further teacher (same images, same preprocessing; proposals and head outputs come from the first, primary,
store only), batched as ``MimicBatch.more_teacher_features[k]`` ``float32[N, Ct_k, Hf, Wf]``. A further teacher
``t_k`` is one store per source (its records of the labelled images, of the unlabelled ones), or one store that
holds the images of every source.

Damaged data stops training with a StoreError (or DataError for an unreadable image) naming the store, shard and
image, raised in the training process even when DataLoader workers hit it. :func:`mimicdet.store.training.check_source` runs before
training: it finds truncated or missing shard objects at once, and with ``skip_corrupt`` decodes every shard the
run uses and leaves the damaged images out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimicdet.data.errors import DataError, StoreError
from mimicdet.store import StoreReader
from mimicdet.data.loader import Batch, DetectionImages, IterationSampler, collate, loader_generator, mix_seeds
from mimicdet.data.records import Dataset

# A key addresses one item of one source: (source, index, flip, iteration); source 0 = labelled,
# 1 = unlabelled. The iteration travels with the batch so per-step randomness can be a function of it.
MixedKey = tuple[int, int, bool, int]


class MimicImages(torch.utils.data.Dataset):
    """One or two (dataset, store) sources; ``__getitem__((source, index, flip, iteration))``.

    ``more_teachers``: one entry per further teacher, its store for each source (or one store for every source);
    their feature maps are read alongside the source's record (``item["more_teachers"]``, one
    ``float32[Ct_k, h, w]`` per further teacher)."""

    def __init__(
        self,
        sources: list[tuple[Dataset, StoreReader]],
        images: list[DetectionImages],
        *,
        more_teachers: Sequence[StoreReader | Sequence[StoreReader]] = (),
    ):
        self.sources = sources
        self.images = images
        # per further teacher, per source: its store.
        self.more_teachers = [
            [t] * len(sources) if isinstance(t, StoreReader) else list(t) for t in more_teachers
        ]
        for k, stores in enumerate(self.more_teachers):
            if len(stores) != len(sources):
                raise ValueError(
                    f"more_teachers[{k}]: {len(stores)} stores for {len(sources)} sources; give one per source"
                )
        # dataset index -> store index, per source (stores are addressed by image id, not position).
        self._store_index = [
            np.array([store.index_of(r.image_id) for r in ds.records], np.int64) for ds, store in sources
        ]
        # per further teacher, per source: dataset index -> index in that teacher's store.
        self._more_index = []
        for stores in self.more_teachers:
            per_source = []
            for (ds, _), store in zip(sources, stores):
                missing = [r.image_id for r in ds.records if r.image_id not in store]
                if missing:
                    raise StoreError(
                        f"{store.url}: store has no record for {len(missing)} of {len(ds)} images of "
                        f"{ds.name}/{ds.split} (first: {missing[0]!r}); every teacher must cover the same images"
                    )
                per_source.append(np.array([store.index_of(r.image_id) for r in ds.records], np.int64))
            self._more_index.append(per_source)

    def __len__(self) -> int:
        return sum(len(ds) for ds, _ in self.sources)

    def __getitem__(self, key: MixedKey) -> dict:
        source, index, flip, iteration = key
        item = self.images[source][(index, flip)]
        item["iteration"] = iteration
        _, store = self.sources[source]
        rec = _read_checked(store, int(self._store_index[source][index]), flip)
        item["teacher"] = {
            "features": torch.from_numpy(rec.features),
            "proposals": torch.from_numpy(rec.proposals),
            "class_logits": torch.from_numpy(rec.class_logits),
            "box_deltas": torch.from_numpy(rec.box_deltas),
        }
        if self.more_teachers:
            item["more_teachers"] = [
                torch.from_numpy(
                    _read_checked(more[source], int(idx[source][index]), flip, names=("features",)).features
                )
                for more, idx in zip(self.more_teachers, self._more_index)
            ]
        if source == 1:
            item["labelled"] = False
        return item


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
    teacher_features: torch.Tensor  # float32[N, Ct, Hf, Wf], zero-padded
    teacher_hw: list[tuple[int, int]]  # valid (h, w) of each teacher map
    teacher_proposals: list[torch.Tensor]  # [k_i, 4] teacher-input pixels
    teacher_logits: list[torch.Tensor]  # [k_i, Kc]
    teacher_deltas: list[torch.Tensor]  # [k_i, 4Kc]
    # Further teachers (several-teacher mimic), one entry per store: float32[N, Ct_k, Hf_k, Wf_k], zero-padded,
    # and the valid (h, w) of each image's map.
    more_teacher_features: list[torch.Tensor] = field(default_factory=list)
    more_teacher_hw: list[list[tuple[int, int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.batch)

    def to(self, device: torch.device | str) -> "MimicBatch":
        move = lambda ts: [t.to(device, non_blocking=True) for t in ts]  # noqa: E731
        return replace(
            self,
            batch=self.batch.to(device),
            teacher_features=self.teacher_features.to(device, non_blocking=True),
            teacher_proposals=move(self.teacher_proposals),
            teacher_logits=move(self.teacher_logits),
            teacher_deltas=move(self.teacher_deltas),
            more_teacher_features=move(self.more_teacher_features),
        )


def collate_mimic(items: list[dict], *, size_divisor: int) -> MimicBatch:
    items = sorted(items, key=lambda it: not it["labelled"])  # stable: labelled first, order kept
    batch = collate(items, size_divisor=size_divisor)
    maps = [it["teacher"]["features"] for it in items]
    features = _pad_maps(maps)
    more = [[it["more_teachers"][k] for it in items] for k in range(len(items[0].get("more_teachers", ())))]
    return MimicBatch(
        batch=batch,
        num_labelled=sum(bool(it["labelled"]) for it in items),
        iteration=int(items[0]["iteration"]),
        teacher_features=features,
        teacher_hw=[(int(m.shape[1]), int(m.shape[2])) for m in maps],
        teacher_proposals=[it["teacher"]["proposals"] for it in items],
        teacher_logits=[it["teacher"]["class_logits"] for it in items],
        teacher_deltas=[it["teacher"]["box_deltas"] for it in items],
        more_teacher_features=[_pad_maps(ms) for ms in more],
        more_teacher_hw=[[(int(m.shape[1]), int(m.shape[2])) for m in ms] for ms in more],
    )


def _pad_maps(maps: list[torch.Tensor]) -> torch.Tensor:
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

    kind: str  # "store" | "data"
    message: str

    def error(self) -> Exception:
        if self.kind == "data":
            return DataError(self.message)
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
            return LoadFailure("store", str(e))
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
