"""The data pipeline shared by teacher and student trainers and by evaluation.

Shapes: N images per batch; each image ``float32[3, H, W]`` normalised (see :mod:`data.transforms`), padded
with zeros (the mean colour after normalisation) at the right and bottom to a common ``H x W`` divisible by
``size_divisor``; boxes ``float32[M, 4]`` x1y1x2y2 in input pixels; labels ``int64[M]`` (1..K).

Keys are ``(index, flip)`` pairs. Batches are a pure function of ``(seed, iteration)``, so a resumed run gets
exactly the batches it would have had:

- epoch ``e`` is ``torch.randperm(n)`` from a ``torch.Generator`` seeded with ``mix(seed, e)``, where
  ``mix`` is numpy's ``SeedSequence`` (plain ``seed + e`` would make seed 1 replay seed 0 one epoch late);
  iteration ``i`` takes positions ``i*B .. i*B+B-1`` of the concatenated epochs (batches may straddle epochs);
- flips (when enabled) are fair coins from ``numpy.random.default_rng([seed, i])``.

A DataLoader prefetches, so the sampler cannot know which batch the trainer has consumed: the trainer records
its own iteration and saves ``sampler.state(iteration)``; ``IterationSampler.from_state`` resumes there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimicdet.data.errors import DataError
from mimicdet.data.images import load_image
from mimicdet.data.records import Dataset
from mimicdet.data.transforms import Preprocess, PrepParams, prepare

Key = tuple[int, bool]


def mix_seeds(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


class DetectionImages(torch.utils.data.Dataset):
    """Dataset records -> preprocessed training items, addressed by ``(index, flip)`` keys.

    ``scale`` is the input scale (0.5 for a scale-mimic student). A plain ``int`` key draws the flip from
    ``flip_prob`` with a generator seeded by ``(seed, index)``.
    """

    def __init__(self, dataset: Dataset, pre: Preprocess, *, flip_prob: float = 0.0, seed: int = 0, scale: float = 1.0):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"DetectionImages: flip_prob must be in [0, 1], got {flip_prob}")
        divisor = pre.size_divisor * scale
        if not (scale > 0 and divisor >= 1 and float(divisor).is_integer()):
            raise ValueError(
                f"DetectionImages: size_divisor {pre.size_divisor} * scale {scale} must be a whole number of pixels"
            )
        self.dataset = dataset
        self.pre = pre
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.scale = float(scale)
        self.size_divisor = int(divisor)

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> Key:
        flip = bool(self.flip_prob) and np.random.default_rng([self.seed, index]).random() < self.flip_prob
        return index, bool(flip)

    def __getitem__(self, key: Key | int) -> dict:
        index, flip = key if isinstance(key, (tuple, list)) else self.key(int(key))
        rec = self.dataset.records[index]
        image = load_image(rec.path)
        if image.shape[:2] != (rec.height, rec.width):
            raise DataError(
                f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but its record says {rec.width}x{rec.height}"
            )
        tensor, boxes, params = prepare(image, rec.boxes, self.pre, flip=bool(flip), scale=self.scale)
        keep = ~rec.ignore
        return {
            "image": tensor,
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(rec.labels[keep]),
            "ignore_boxes": torch.from_numpy(boxes[rec.ignore]),
            "index": int(index),
            "image_id": rec.image_id,
            "flip": bool(flip),
            "params": params,
            "labelled": rec.labelled,
            "size_divisor": self.size_divisor,
        }


class IterationSampler:
    """Infinite batch sampler of ``(index, flip)`` keys, a pure function of ``(seed, iteration)``."""

    def __init__(self, n: int, batch_size: int, *, seed: int, start_iter: int = 0, flip: bool = False):
        if n < 1 or batch_size < 1 or start_iter < 0:
            raise ValueError(
                f"IterationSampler: need n >= 1, batch_size >= 1, start_iter >= 0; got {n}, {batch_size}, {start_iter}"
            )
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start_iter, self.flip = int(start_iter), bool(flip)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(mix_seeds(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, iteration: int) -> list[Key]:
        """The keys of batch ``iteration``."""
        start = iteration * self.batch_size
        positions = range(start, start + self.batch_size)
        indices = [int(self._perm(p // self.n)[p % self.n]) for p in positions]
        if self.flip:
            flips = np.random.default_rng([self.seed, iteration]).random(self.batch_size) < 0.5
        else:
            flips = np.zeros(self.batch_size, bool)
        return [(i, bool(f)) for i, f in zip(indices, flips)]

    def __iter__(self) -> Iterator[list[Key]]:
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1

    def state(self, iteration: int | None = None) -> dict:
        """What :meth:`from_state` needs to resume at ``iteration`` (default: this sampler's start)."""
        it = self.start_iter if iteration is None else int(iteration)
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "flip": self.flip, "iteration": it}

    @classmethod
    def from_state(cls, state: dict) -> "IterationSampler":
        return cls(
            state["n"], state["batch_size"], seed=state["seed"], start_iter=state["iteration"], flip=state["flip"]
        )


class EvalSampler:
    """Finite batches of ``(index, False)`` keys in dataset order, for evaluation and extraction."""

    def __init__(self, n: int, batch_size: int = 1, *, flip: bool = False):
        if n < 0 or batch_size < 1:
            raise ValueError(f"EvalSampler: need n >= 0 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.flip = int(n), int(batch_size), bool(flip)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        for start in range(0, self.n, self.batch_size):
            yield [(i, self.flip) for i in range(start, min(start + self.batch_size, self.n))]


@dataclass
class Batch:
    images: torch.Tensor  # float32[N, 3, H, W], zero-padded
    image_sizes: list[tuple[int, int]]  # (h, w) of each image before padding
    targets: list[dict[str, torch.Tensor]]  # {"boxes": float32[M, 4], "labels": int64[M]}
    ignore_boxes: list[torch.Tensor]  # float32[J, 4] per image
    indices: list[int]
    image_ids: list[str]
    flips: list[bool]
    params: list[PrepParams]
    labelled: list[bool]

    def __len__(self) -> int:
        return len(self.indices)

    def _map(self, fn) -> "Batch":
        return replace(
            self,
            images=fn(self.images),
            targets=[{k: fn(v) for k, v in t.items()} for t in self.targets],
            ignore_boxes=[fn(b) for b in self.ignore_boxes],
        )

    def to(self, device: torch.device | str) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())


def collate(items: list[dict], *, size_divisor: int | None = None) -> Batch:
    """Stack items into a zero-padded batch whose height and width are multiples of ``size_divisor``.

    By default the divisor is the one the items carry (:attr:`DetectionImages.size_divisor`, which follows
    the preprocessing and the input scale), else 32.
    """
    if not items:
        raise ValueError("collate: empty batch")
    if size_divisor is None:
        carried = {it.get("size_divisor", 32) for it in items}
        if len(carried) != 1:
            raise ValueError(f"collate: items disagree on size_divisor {sorted(carried)}")
        size_divisor = carried.pop()
    sizes = [tuple(it["image"].shape[1:]) for it in items]
    h = math.ceil(max(s[0] for s in sizes) / size_divisor) * size_divisor
    w = math.ceil(max(s[1] for s in sizes) / size_divisor) * size_divisor
    images = items[0]["image"].new_zeros((len(items), 3, h, w))
    for k, it in enumerate(items):
        images[k, :, : sizes[k][0], : sizes[k][1]] = it["image"]
    return Batch(
        images=images,
        image_sizes=[(int(a), int(b)) for a, b in sizes],
        targets=[{"boxes": it["boxes"], "labels": it["labels"]} for it in items],
        ignore_boxes=[it["ignore_boxes"] for it in items],
        indices=[it["index"] for it in items],
        image_ids=[it["image_id"] for it in items],
        flips=[it["flip"] for it in items],
        params=[it["params"] for it in items],
        labelled=[it["labelled"] for it in items],
    )


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding and resizing are per-item; threads inside a worker only contend


def loader_generator() -> torch.Generator:
    """A DataLoader's own RNG: its base seed is then not drawn from the global RNG, whose stream belongs to
    training (RPN and RoI sampling) and is restored on resume. Keys carry every random choice (flips), so
    workers need no seed of their own."""
    return torch.Generator().manual_seed(0)


def make_loader(
    images: DetectionImages, sampler, *, num_workers: int = 2, pin_memory: bool | None = None
) -> DataLoader:
    """A DataLoader over ``images`` driven by a batch ``sampler`` (IterationSampler or EvalSampler).

    Workers persist across iterations; memory is pinned only when CUDA is available (unless told otherwise).
    """
    return DataLoader(
        images,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, size_divisor=images.size_divisor),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=loader_generator(),
    )
