"""The offline teacher pass: run a trained teacher once over a dataset and write its feature maps, top-K
proposals and head outputs into a feature store (the mimicdet.store package).

Shapes per image i: features ``[C, h_i, w_i]`` (stride-16 map of the preprocessed input), proposals
``float32[k,4]`` x1y1x2y2 in preprocessed-input pixels, scores ``float32[k]``, class logits ``float32[k, Kc]``,
box deltas ``float32[k, 4·Kc]`` (k <= K = ``--proposals``).

Work is organised by shard (S consecutive images): a shard is computed and written as one unit, so a killed run
leaves complete shards only and ``--resume`` redoes just the pending ones. With the teacher on an accelerator, a
DataLoader decodes images in worker processes and a writer thread compresses and writes the previous shard while
the teacher computes the next (bounded queue: memory stays flat). With the teacher on the CPU its forward pass
already keeps every core busy (torch's intra-op threads), so decoding and writing run in line, between batches:
extra processes and threads only take cores away from the forward mid-operation, which costs it more than the
few milliseconds per image they do (benchmarks/extract.py). With Dask (``pipeline/distributed.py``) each task is
one shard.

A run that fails on bad input or a write error (disk full) says how many shards are complete; a first run that
completed none removes the store it created, so the location is left as it was.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mimicdet.data import load_dataset
from mimicdet.data.errors import DataError, StoreError
from mimicdet.store import ImageFeatures, Manifest, create_store
from mimicdet.data.loader import DetectionImages, collate
from mimicdet.data.paths import check_output_apart
from mimicdet.data.progress import progress_bar
from mimicdet.data.records import Dataset, ImageRecord
from mimicdet.data.transforms import Preprocess, resize_params
from mimicdet.detection.device import select_device as resolve_device
from mimicdet.pipeline.teachers import Teacher, TeacherSpec, open_teacher


@dataclass(frozen=True)
class ExtractConfig:
    teacher: Path | str  # a model.pt, or "torchvision:NAME" (with ``weights``)
    data: Path
    out: str  # path or fsspec URL
    split: str = "train"
    backend: str = "zarr"
    dtype: str = "float16"
    proposals: int = 300
    flip: bool = False
    shard_size: int = 64
    batch_size: int = 8
    workers: int = 0  # 0: extract in this process; N >= 1: a Dask LocalCluster of N worker processes
    scheduler: str | None = None  # address of an existing Dask scheduler (other machines)
    mode: str = "create"  # "create" | "resume" | "overwrite"
    device: str = "auto"
    loader_workers: int | None = None  # image-decoding processes; None: 0 with the teacher on the CPU, else 2
    writer_thread: bool | None = None  # write shards in a background thread; None: only off the CPU
    storage_options: dict = field(default_factory=dict)
    progress: bool = True
    # A foreign teacher (pipeline/teachers.py): its weights, FPN level, class map and input sizes.
    weights: str | None = None
    feature_stride: int | None = None  # None: the checkpoint's own; 16 for torchvision:NAME
    class_map: Path | None = None
    min_size: int | None = None
    max_size: int | None = None

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(teacher=str(self.teacher), weights=self.weights, feature_stride=self.feature_stride,
                           class_map=str(self.class_map) if self.class_map else None, min_size=self.min_size,
                           max_size=self.max_size)


def build_manifest(*, teacher: Teacher, dataset: Dataset, cfg: ExtractConfig) -> Manifest:
    """Everything a student needs to check that the store matches what it is asked to train on."""
    pre = teacher.preprocess
    max_h = max_w = 1
    for r in dataset.records:
        p = resize_params(r.width, r.height, pre)
        fh, fw = teacher.feature_size(p.out_height, p.out_width)
        max_h, max_w = max(max_h, fh), max(max_w, fw)
    return Manifest(
        teacher_arch=teacher.arch,
        teacher_width=teacher.width,
        teacher_head=teacher.head,
        teacher_sha256=teacher.sha256,
        classes=teacher.classes,
        dataset_name=dataset.name,
        dataset_split=dataset.split,
        dataset_digest=dataset.digest(),
        image_ids=tuple(r.image_id for r in dataset.records),
        preprocess=pre.to_dict(),
        flips=(False, True) if cfg.flip else (False,),
        feature_layer=teacher.feature_layer,
        stride=teacher.feature_stride,
        channels=teacher.feature_channels,
        max_hw=(max_h, max_w),
        dtype=cfg.dtype,
        num_proposals=cfg.proposals,
        nms_threshold=teacher.nms_threshold,
        shard_size=cfg.shard_size,
        backend=cfg.backend,
    )


def _to_features(record: ImageRecord, out: dict[str, torch.Tensor]) -> ImageFeatures:
    return ImageFeatures(
        image_id=record.image_id,
        features=out["features"].float().cpu().numpy(),
        proposals=out["proposals"].float().cpu().numpy(),
        scores=out["scores"].float().cpu().numpy(),
        class_logits=out["class_logits"].float().cpu().numpy(),
        box_deltas=out["box_deltas"].float().cpu().numpy(),
    )


@torch.inference_mode()
def teacher_pass(
    teacher: Teacher, images: torch.Tensor, image_sizes: list[tuple[int, int]], *, top_k: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    use_amp = device.type == "cuda"
    with torch.autocast(device_type=device.type, enabled=use_amp):
        return teacher.teacher_outputs(images.to(device, non_blocking=True), image_sizes, top_k=top_k)


def extract_shard(
    teacher: Teacher,
    records: Sequence[ImageRecord],
    pre: Preprocess,
    *,
    flips: Sequence[bool],
    top_k: int,
    batch_size: int,
    device: torch.device,
) -> dict[bool, list[ImageFeatures]]:
    """Teacher outputs for one shard's images, for each flip setting, in record order (no DataLoader: used by
    Dask tasks, where each task is one shard)."""
    shard = Dataset("shard", "shard", (), tuple(records))
    images = DetectionImages(shard, pre)
    out: dict[bool, list[ImageFeatures]] = {}
    for flip in flips:
        items: list[ImageFeatures] = []
        for start in range(0, len(records), batch_size):
            with _torch_threads(1):  # decoding in line: see _local_batches
                batch = collate([images[(i, flip)] for i in range(start, min(start + batch_size, len(records)))])
            outs = teacher_pass(teacher, batch.images, batch.image_sizes, top_k=top_k, device=device)
            items += [_to_features(records[start + j], o) for j, o in enumerate(outs)]
        out[flip] = items
    return out


class _Failed:
    """Stands in for a batch whose images could not be read (pickled back from a DataLoader worker)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Guarded(torch.utils.data.Dataset):
    """Input errors travel to the main process as values: an exception raised in a DataLoader worker is re-raised
    there with the worker's traceback pasted into its message, and the user should see only the message."""

    def __init__(self, images: DetectionImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        try:
            return self.images[key]
        except DataError as e:
            return _Failed(str(e))


def _collate_or_fail(items: list):
    failed = next((it for it in items if isinstance(it, _Failed)), None)
    return failed if failed is not None else collate(items)


def loader_workers(cfg: ExtractConfig, device: torch.device) -> int:
    """DataLoader processes for decoding: as configured, else none when the teacher computes on the CPU."""
    if cfg.loader_workers is not None:
        if cfg.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {cfg.loader_workers}")
        return cfg.loader_workers
    return 0 if device.type == "cpu" else 2


def writer_thread(cfg: ExtractConfig, device: torch.device) -> bool:
    return cfg.writer_thread if cfg.writer_thread is not None else device.type != "cpu"


def _local_batches(
    dataset: Dataset,
    pre: Preprocess,
    shards: Sequence[int],
    shard_size: int,
    flips: Sequence[bool],
    cfg: ExtractConfig,
    device: torch.device,
) -> Iterator:
    """Batches in (shard, flip, image) order from a DataLoader, so decoding overlaps the teacher's compute."""
    keys: list[tuple[int, bool]] = []
    for s in shards:
        start, stop = s * shard_size, min((s + 1) * shard_size, len(dataset))
        for flip in flips:
            keys += [(i, flip) for i in range(start, stop)]
    # Batches never straddle a (shard, flip) block so each block is assembled from whole batches.
    batches: list[list[tuple[int, bool]]] = []
    block: list[tuple[int, bool]] = []
    for key in keys:
        if block and (key[0] // shard_size != block[0][0] // shard_size or key[1] != block[0][1]):
            batches += [block[i : i + cfg.batch_size] for i in range(0, len(block), cfg.batch_size)]
            block = []
        block.append(key)
    if block:
        batches += [block[i : i + cfg.batch_size] for i in range(0, len(block), cfg.batch_size)]
    workers = loader_workers(cfg, device)
    loader = torch.utils.data.DataLoader(
        _Guarded(DetectionImages(dataset, pre)),
        batch_sampler=batches,
        collate_fn=_collate_or_fail,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    if workers:
        yield from zip(batches, loader)
        return
    it = iter(loader)
    for keys in batches:
        # In line: torch's small elementwise passes (normalisation) on one thread. Split across the intra-op pool
        # they stall whenever another process holds a core: 100 ms instead of 4 ms per image on a loaded machine.
        with _torch_threads(1):
            batch = next(it)
        yield keys, batch


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _extract_local(
    teacher: Teacher, dataset: Dataset, pre: Preprocess, manifest: Manifest, writer, shards: list[int], cfg: ExtractConfig
) -> None:
    device = next(teacher.parameters()).device
    flips = manifest.flips
    # Writer thread (teacher off the CPU): compression and writes of shard s overlap the compute on shard s+1.
    # On the CPU each finished shard is written in line, before the next batch is decoded.
    todo: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def write_one(job) -> None:
        shard, per_flip = job
        try:
            if not failure:
                writer.write_shard(shard, per_flip[False], per_flip.get(True))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            failure.append(e)

    def write_loop() -> None:
        while (job := todo.get()) is not None:
            write_one(job)

    thread = None
    if writer_thread(cfg, device):
        thread = threading.Thread(target=write_loop, name="store-writer", daemon=True)
        thread.start()

    def put(job) -> None:
        if thread is not None:
            todo.put(job)
        elif job is not None:
            write_one(job)

    total = sum(manifest.shard_range(s)[1] - manifest.shard_range(s)[0] for s in shards) * len(flips)
    bar = progress_bar(total=total, desc="extract", unit="img", disable=not cfg.progress)
    current: int | None = None
    per_flip: dict[bool, list[ImageFeatures]] = {}
    try:
        for keys, batch in _local_batches(dataset, pre, shards, manifest.shard_size, flips, cfg, device):
            if isinstance(batch, _Failed):
                raise DataError(batch.message)
            shard, flip = keys[0][0] // manifest.shard_size, keys[0][1]
            if current is not None and shard != current:
                put((current, per_flip))
                per_flip = {}
            current = shard
            outs = teacher_pass(teacher, batch.images, batch.image_sizes, top_k=manifest.num_proposals, device=device)
            per_flip.setdefault(flip, []).extend(_to_features(dataset.records[i], o) for (i, _), o in zip(keys, outs))
            bar.update(len(keys))
            if failure:
                break
        if current is not None and not failure:
            put((current, per_flip))
    finally:
        if thread is not None:
            todo.put(None)
            thread.join()
        bar.close()
    if failure:
        raise failure[0]


def _what_is_kept(cfg: ExtractConfig, writer) -> str:
    """After a failed run: drop a store this run created if it holds no complete shard (the location is left as
    it was), else say what survives. Not with a remote scheduler, whose workers may still be writing."""
    try:
        if cfg.mode != "resume" and not cfg.scheduler and writer.discard_if_empty():
            return f"nothing was kept at {cfg.out}"
        done = writer.manifest.num_shards - len(writer.pending_shards())
    except OSError as e:  # the location itself is unreachable: the original error says enough
        return f"the state of {cfg.out} is unknown ({e})"
    total = writer.manifest.num_shards
    return f"{done} of {total} shards of {cfg.out} are complete; once fixed, rerun with --resume to finish"


def run_extract(cfg: ExtractConfig) -> dict:
    """Extract the teacher's records for every pending shard of ``cfg.out``. Returns a small summary."""
    if cfg.proposals < 1:
        raise ValueError(f"--proposals must be >= 1, got {cfg.proposals}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    check_output_apart("--out", cfg.out, {"--teacher": cfg.teacher, "--weights": cfg.weights,
                                          "--class-map": cfg.class_map, "--data": cfg.data})
    device = resolve_device(cfg.device)
    spec = cfg.teacher_spec()
    teacher = open_teacher(spec, device)
    pre = teacher.preprocess
    dataset = load_dataset(cfg.data, cfg.split, classes=list(teacher.classes) or None)
    if len(dataset) == 0:
        raise DataError(f"{cfg.data}: split {cfg.split!r} has no images")
    if not teacher.classes:  # a foreign teacher without a class map: the store names the dataset's classes
        spec = replace(spec, classes=tuple(dataset.classes))  # for Dask workers, which open their own
        teacher.classes = spec.classes
    manifest = build_manifest(teacher=teacher, dataset=dataset, cfg=cfg)
    if cfg.scheduler:
        from mimicdet.pipeline.distributed import check_scheduler

        check_scheduler(cfg.scheduler)
    writer = create_store(
        cfg.out, manifest, backend=cfg.backend, mode=cfg.mode, storage_options=cfg.storage_options or None
    )
    shards = list(writer.pending_shards())
    done_before = manifest.num_shards - len(shards)
    try:
        if shards and (cfg.workers or cfg.scheduler):
            from mimicdet.pipeline.distributed import extract_on_dask

            writer.close()
            extract_on_dask(cfg, spec, manifest, dataset, shards)
        elif shards:
            _extract_local(teacher, dataset, pre, manifest, writer, shards, cfg)
    except (DataError, StoreError) as e:
        raise type(e)(f"{e}; {_what_is_kept(cfg, writer)}") from None
    finally:
        writer.close()
    return {
        "store": str(cfg.out),
        "images": manifest.num_images,
        "shards": manifest.num_shards,
        "shards_written": len(shards),
        "shards_already_complete": done_before,
        "flips": list(manifest.flips),
        "dtype": manifest.dtype,
    }
