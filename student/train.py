"""train-student: the streaming mimic trainer (stage 1: backbone + RPN; stage 2: the full detector).

Losses (named, summed by the trainer with per-name weights):
- ground truth: ``loss_objectness``, ``loss_rpn_box_reg`` (+ ``loss_classifier``, ``loss_box_reg`` in stage 2),
  from labelled images only;
- ``loss_mimic`` (weight λ1 = ``--mimic-weight``): eq. 5 of the paper over regions sampled from the teacher's
  stored proposals (``roi``), or whole-map L2 (``map``), on every image, labelled or not;
- ``loss_logits`` (weight ``--logits-weight``, stage 2): L2 between the student head's class logits and box
  deltas and the teacher's stored ones, on the same teacher proposals (two-stage mimic / logits-only baseline).

Geometry: the teacher map has stride ``s_t`` in teacher-input pixels. A scale-mimic student sees the image at
half size and upsamples its stride-16 map x2, so both maps share one grid: teacher proposals (teacher pixels)
sample both with spatial scale ``1/s_t``. For the student head they are mapped to student pixels (× input scale).

The teacher is never imported here (see student/stream.py): only its stored records are read.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from data import load_dataset
from data.errors import DataError, StoreError
from data.featurestore import StoreReader, open_store
from data.loader import DetectionImages, mix_seeds
from data.records import Dataset
from data.transforms import Preprocess
from detection.detector import Detector, DetectorConfig, build_detector, load_detector, save_detector
from detection.trainer import (
    CheckpointHook,
    EvalHook,
    MetricsLogHook,
    OptimConfig,
    ProgressBarHook,
    TrainConfig,
    Trainer,
)
from student.mimic import MimicTransform, logits_mimic_loss, map_mimic_loss, roi_mimic_loss
from student.stream import MimicImages, MixedSampler, check_source, make_mimic_loader, open_source

STRATEGIES = ("roi", "map", "logits", "none")
SAMPLERS = ("roialign", "native")


@dataclass(frozen=True)
class StudentConfig:
    store: str
    data: Path
    out: Path
    split: str = "train"
    width: float = 0.25
    stage: int = 1
    init: Path | None = None  # stage 2: the stage-1 student checkpoint
    head: str = "fast-rcnn"  # stage 2 head
    mimic: str = "roi"
    sampler: str = "roialign"
    mimic_weight: float = 1.0
    logits_weight: float | None = None  # None: 1.0 for stage-2 "roi"/"logits", else 0
    scale_mimic: bool = False
    rois_per_image: int = 64
    gt_rois: bool = False  # also mimic on ground-truth boxes
    flip: bool = False
    iters: int = 1000
    batch_size: int = 8
    lr: float = 0.02
    warmup_iters: int = 100
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_channels: int | None = None
    unlabeled: str | None = None  # store of images without labels (mimic only)
    unlabeled_data: Path | None = None  # where those images are
    unlabeled_split: str = "train"
    unlabeled_fraction: float = 0.5
    subset: int | None = None  # use only the first N labelled images (after a seeded shuffle)
    subset_seed: int = 0
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    checkpoint_every: int = 200
    log_every: int = 20
    eval_every: int = 0
    eval_split: str | None = None
    eval_max_images: int | None = None
    overwrite: bool = False
    skip_corrupt: bool = False  # verify the shards used before training and leave damaged images out
    progress: bool = True
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mimic not in STRATEGIES:
            raise ValueError(f"--mimic must be one of {', '.join(STRATEGIES)}, got {self.mimic!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        if self.mimic == "logits" and self.stage == 1:
            raise ValueError("--mimic logits needs --stage 2 (stage 1 has no head whose logits could be matched)")
        if self.unlabeled and not self.unlabeled_data:
            raise ValueError("--unlabeled needs --unlabeled-data: the folder holding those images")
        if not 0.0 <= self.unlabeled_fraction < 1.0:
            raise ValueError(f"--unlabeled-fraction must be in [0, 1), got {self.unlabeled_fraction}")
        if self.rois_per_image < 1:
            raise ValueError(f"--rois-per-image must be >= 1, got {self.rois_per_image}")
        if self.init is not None and self.stage == 1:
            raise ValueError(f"--init {self.init} starts stage 2 from a stage-1 student; add --stage 2")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        for name in ("mimic_weight", "logits_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.eval_every and not self.eval_split:
            raise ValueError("--eval-every needs --eval-split: the split to evaluate on")

    @property
    def input_scale(self) -> float:
        return 0.5 if self.scale_mimic else 1.0

    @property
    def effective_logits_weight(self) -> float:
        if self.logits_weight is not None:
            return self.logits_weight
        return 1.0 if self.stage == 2 and self.mimic in ("roi", "logits") else 0.0

    @property
    def feature_mimic(self) -> bool:
        return self.mimic in ("roi", "map")

    def to_dict(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps(d, default=str))


class StudentModel(nn.Module):
    """The student detector plus the training-only transform layer ``r``. ``forward(batch)`` returns the named
    losses, so DistributedDataParallel can wrap the whole step."""

    def __init__(self, detector: Detector, transform: nn.Module | None, config: StudentConfig, teacher_stride: int):
        super().__init__()
        self.detector = detector
        self.transform = transform
        self.cfg = config
        self.teacher_stride = teacher_stride

    def forward(self, mb) -> dict[str, Tensor]:
        cfg, det, b = self.cfg, self.detector, mb.batch
        n, nl = len(b), mb.num_labelled
        losses: dict[str, Tensor] = {}
        feats: list[Tensor] = []
        if nl:
            out, gt = det(b.images[:nl], b.image_sizes[:nl], b.targets[:nl])
            losses.update(gt)
            feats.append(out.features)
        if nl < n:
            feats.append(det.features(b.images[nl:]))
        student_map = torch.cat(feats) if len(feats) > 1 else feats[0]

        if cfg.feature_mimic or self.cfg.effective_logits_weight > 0:
            rois = self._regions(mb)
        if cfg.feature_mimic:
            teacher_map = mb.teacher_features
            h = min(student_map.shape[-2], teacher_map.shape[-2])
            w = min(student_map.shape[-1], teacher_map.shape[-1])
            s_map, t_map = student_map[..., :h, :w], teacher_map[..., :h, :w]
            valid = [(min(th, h), min(tw, w)) for th, tw in mb.teacher_hw]
            if cfg.mimic == "roi":
                losses["loss_mimic"] = roi_mimic_loss(
                    s_map, t_map, rois, self.transform,
                    spatial_scale=1.0 / self.teacher_stride, sampler=cfg.sampler, valid_hw=valid,
                )
            else:
                losses["loss_mimic"] = map_mimic_loss(s_map, t_map, self.transform, valid_hw=valid)
        if cfg.effective_logits_weight > 0 and det.config.head != "none":
            scale = cfg.input_scale
            student_rois = [r * scale for r in rois]
            logits, deltas = det.head_outputs(student_map, student_rois, b.image_sizes)
            t_logits = torch.cat([tl[idx] for tl, idx in zip(mb.teacher_logits, self._roi_index)])
            t_deltas = torch.cat([td[idx] for td, idx in zip(mb.teacher_deltas, self._roi_index)])
            losses["loss_logits"] = logits_mimic_loss(logits, t_logits, deltas, t_deltas)
        return losses

    def _regions(self, mb) -> list[Tensor]:
        """R teacher proposals per image (teacher-input pixels); remembers which, for the logits match."""
        # Region draws are a function of (seed, iteration): a resumed run draws the same regions.
        generator = torch.Generator().manual_seed(mix_seeds(self.cfg.seed, mb.iteration))
        rois, index = [], []
        for props in mb.teacher_proposals:
            idx = region_indices(props, self.cfg.rois_per_image, generator)
            rois.append(props[idx])
            index.append(idx)
        self._roi_index = index
        return rois


def region_indices(proposals: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """Indices of ``num`` teacher proposals to mimic on: drawn without replacement from the ``2·num``
    best-scoring usable ones (stored proposals are sorted by score), so regions vary across epochs but stay
    confident. Same rule as :func:`student.mimic.sample_regions`; indices are kept for the logits match."""
    wh = proposals[:, 2:] - proposals[:, :2]
    usable = torch.nonzero((wh >= 1.0).all(dim=1) & torch.isfinite(proposals).all(dim=1)).flatten()
    pool = usable[: 2 * num]
    if len(pool) <= num:
        return pool
    pick = torch.randperm(len(pool), generator=generator)[:num].sort().values
    return pool[pick.to(pool.device)]


def _labelled_subset(dataset: Dataset, cfg: StudentConfig) -> Dataset:
    if cfg.subset is None:
        return dataset
    if not 1 <= cfg.subset <= len(dataset):
        raise ValueError(f"--subset must be in [1, {len(dataset)}] for {dataset.name}/{dataset.split}, got {cfg.subset}")
    g = torch.Generator().manual_seed(cfg.subset_seed)
    order = torch.randperm(len(dataset), generator=g)[: cfg.subset].sort().values.tolist()
    return dataset.subset(order)


def build_student(cfg: StudentConfig, classes: tuple[str, ...]) -> Detector:
    config = DetectorConfig(
        num_classes=len(classes) + 1,
        width=cfg.width,
        head="none" if cfg.stage == 1 else cfg.head,
        rpn_channels=cfg.rpn_channels,
        anchor_sizes=tuple(cfg.anchor_sizes),
        aspect_ratios=tuple(cfg.aspect_ratios),
        upsample=cfg.scale_mimic,
    )
    student = build_detector(config)
    if cfg.stage == 2 and cfg.init is not None:
        stage1, meta = load_detector(cfg.init)
        if stage1.config.width != cfg.width or stage1.config.upsample != cfg.scale_mimic:
            raise ValueError(
                f"--init {cfg.init}: stage-1 student has width {stage1.config.width}, upsample "
                f"{stage1.config.upsample}; asked for width {cfg.width}, scale mimic {cfg.scale_mimic}"
            )
        state = stage1.state_dict()
        missing, unexpected = student.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise ValueError(
                f"--init {cfg.init}: weights do not fit the stage-2 student "
                f"(unexpected {unexpected[:3]}, missing {[k for k in missing if not k.startswith('head.')][:3]})"
            )
    elif cfg.stage == 2 and cfg.init is None:
        warnings.warn("stage 2 without --init: the detector starts from random weights", stacklevel=2)
    return student


def check_out_dir(cfg: StudentConfig) -> None:
    """A run folder holds one configuration: rerunning it resumes; a different one needs --overwrite."""
    cfg_path = cfg.out / "student_config.json"
    mine = cfg.to_dict()
    if cfg_path.exists():
        if cfg.overwrite:
            shutil.rmtree(cfg.out)
        else:
            theirs = json.loads(cfg_path.read_text())
            # skip_corrupt may change between runs: a run stopped by a damaged image resumes with it.
            keys = ("iters", "progress", "workers", "device", "overwrite", "checkpoint_every", "log_every",
                    "eval_every", "eval_max_images", "skip_corrupt")
            diff = {k for k in set(mine) | set(theirs) if k not in keys and mine.get(k) != theirs.get(k)}
            if diff:
                raise FileExistsError(
                    f"{cfg.out}: holds a run with a different configuration ({', '.join(sorted(diff))}); "
                    "use --overwrite or another --out"
                )
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = cfg_path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(mine, indent=1))
    tmp.replace(cfg_path)


def _preprocess_of(store: StoreReader) -> Preprocess:
    return Preprocess.from_dict(dict(store.manifest.preprocess))


def run_train_student(cfg: StudentConfig) -> dict:
    """Train a student from a feature store; writes ``out/model.pt`` (student only) and returns a summary.
    Everything is checked before the run folder is touched; ``summary["skipped_images"]`` lists the damaged
    images left out (``--skip-corrupt``)."""
    # The teacher fixed the class order (label k+1 <-> classes[k]); read the data with the store's classes.
    classes = open_store(cfg.store, storage_options=cfg.storage_options or None).manifest.classes
    full = load_dataset(cfg.data, cfg.split, classes=list(classes) or None)
    store = open_source(cfg.store, full, storage_options=cfg.storage_options)
    dataset, skipped = check_source(
        store, _labelled_subset(full, cfg), skip_corrupt=cfg.skip_corrupt, storage_options=cfg.storage_options
    )
    manifest = store.manifest
    store.check_compatible(classes=dataset.classes)
    pre = _preprocess_of(store)
    flip = cfg.flip
    if flip and not manifest.has_flips:
        warnings.warn(
            f"{cfg.store}: store has no flipped teacher records; flips are turned off "
            "(re-extract with --flip to train with flips)",
            stacklevel=2,
        )
        flip = False
    sources = [(dataset, store)]
    images = [DetectionImages(dataset, pre, scale=cfg.input_scale)]
    n_unl = 0
    if cfg.unlabeled:
        unl = load_dataset(cfg.unlabeled_data, cfg.unlabeled_split, classes=list(classes) or None)
        unl = replace(unl, records=tuple(replace(r, labelled=False) for r in unl.records))
        unl_store = open_source(cfg.unlabeled, unl, storage_options=cfg.storage_options)
        if unl_store.manifest.teacher_sha256 != manifest.teacher_sha256:
            raise StoreError(
                f"{cfg.unlabeled}: made by teacher {unl_store.manifest.teacher_sha256[:12]}, but {cfg.store} by "
                f"{manifest.teacher_sha256[:12]}; both stores must come from the same teacher"
            )
        unl_store.check_compatible(preprocess=pre, stride=manifest.stride, channels=manifest.channels)
        if flip and not unl_store.manifest.has_flips:
            raise StoreError(f"{cfg.unlabeled}: has no flipped records but {cfg.store} does; extract both alike")
        unl, unl_skipped = check_source(
            unl_store, unl, skip_corrupt=cfg.skip_corrupt, storage_options=cfg.storage_options
        )
        skipped += unl_skipped
        sources.append((unl, unl_store))
        images.append(DetectionImages(unl, pre, scale=cfg.input_scale))
        n_unl = len(unl)

    torch.manual_seed(cfg.seed)  # the student's initial weights
    student = build_student(cfg, dataset.classes)
    # One grid for both maps: student stride (in its own pixels) / input scale == teacher stride.
    if student.feature_stride / cfg.input_scale != manifest.stride:
        raise StoreError(
            f"{cfg.store}: store features.stride {manifest.stride} != student stride "
            f"{student.feature_stride} at input scale {cfg.input_scale}"
            + ("" if cfg.scale_mimic else " (scale mimic needs --scale-mimic)")
        )
    transform = MimicTransform(student_channels=student.feature_channels, teacher_channels=manifest.channels) if cfg.feature_mimic else None
    model = StudentModel(student, transform, cfg, manifest.stride)

    meta = _student_meta(cfg, dataset, manifest, pre)
    train_cfg = TrainConfig(
        iters=cfg.iters,
        optim=OptimConfig(
            lr=cfg.lr, warmup_iters=min(cfg.warmup_iters, max(1, cfg.iters // 5)), schedule=cfg.schedule,
            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        ),
        batch_size=cfg.batch_size,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        seed=cfg.seed,
        device=cfg.device,
    )
    hooks = [CheckpointHook(cfg.checkpoint_every), MetricsLogHook(cfg.log_every), ProgressBarHook(enabled=cfg.progress, desc=f"student s{cfg.stage}")]
    if cfg.eval_every and cfg.eval_split:
        hooks.append(EvalHook(cfg.eval_every, _recall_eval(cfg, meta)))
    # Built once here so a batch composition it refuses is refused before the run folder is touched.
    MixedSampler(len(dataset), n_unl, cfg.batch_size, unlabelled_fraction=cfg.unlabeled_fraction, seed=cfg.seed)
    if skipped:
        shown = ", ".join(repr(k.image_id) for k in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(f"--skip-corrupt: left out {len(skipped)} damaged image(s): {shown}", stacklevel=2)

    rank, world = _dist_rank_world()
    if world > 1:
        _init_dist(cfg.device)
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    if rank == 0:
        check_out_dir(cfg)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the run folder is ready before any process reads a checkpoint from it
    mimic_images = MimicImages(sources, images)

    def batches(start_iter: int):
        sampler = MixedSampler(
            len(dataset), n_unl, cfg.batch_size,
            unlabelled_fraction=cfg.unlabeled_fraction, seed=cfg.seed, start_iter=start_iter, flip=flip,
        )
        if world > 1:  # each process takes its share of the same global batch
            sampler = RankShare(sampler, rank, world)
        return iter(make_mimic_loader(mimic_images, sampler, num_workers=cfg.workers))

    if world > 1:
        # Only rank 0 writes checkpoints, logs and evaluations; every rank resumes from its checkpoint.
        hooks = hooks if rank == 0 else []
        model = _wrap_ddp(model, cfg.device)
    trainer = Trainer(
        model=model,
        config=train_cfg,
        loss_fn=lambda m, b: m(b.to(trainer.device)),
        batches=batches,
        out_dir=cfg.out,
        hooks=hooks,
        loss_weights={"loss_mimic": cfg.mimic_weight, "loss_logits": cfg.effective_logits_weight},
        meta=meta,
    )
    try:
        summary = trainer.train()
        if rank == 0:
            save_detector(cfg.out / "model.pt", student.cpu(), meta | {"iterations": trainer.iter, "world_size": world})
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    summary["model"] = str(cfg.out / "model.pt")
    summary["world_size"] = world
    summary["skipped_images"] = [asdict(k) for k in skipped]
    return summary


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (RANK / WORLD_SIZE set), else (0, 1)."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _wrap_ddp(model: nn.Module, device: str) -> nn.Module:
    """DistributedDataParallel: gloo on CPU, nccl on CUDA. Gradients are averaged across processes, so with
    the global batch split evenly the step equals one process's step on the whole batch (batch-norm
    statistics aside: each process normalises over its own share)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = _init_dist(device)
    model.to(dev)
    # Unused parameters happen: a share with no labelled image skips the RPN losses.
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


def _init_dist(device: str) -> torch.device:
    """Join the torchrun process group once; returns this process's device."""
    import os

    import torch.distributed as dist

    from detection.device import select_device

    dev = select_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


class RankShare:
    """This process's share of each global batch: keys ``rank::world`` (labelled and unlabelled alike)."""

    def __init__(self, sampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self):
        for keys in self.sampler:
            yield keys[self.rank :: self.world]


def _student_meta(cfg: StudentConfig, dataset: Dataset, manifest, pre: Preprocess) -> dict:
    return {
        "role": "student",
        "classes": list(dataset.classes),
        "preprocess": pre.to_dict(),
        "input_scale": cfg.input_scale,
        "stage": cfg.stage,
        "mimic": cfg.mimic,
        "dataset": {"name": dataset.name, "split": dataset.split, "digest": dataset.digest(), "images": len(dataset)},
        "teacher_sha256": manifest.teacher_sha256,
        "student_config": cfg.to_dict(),
    }


def _recall_eval(cfg: StudentConfig, meta: dict):
    from detection.evaluate import evaluate_model

    eval_set = load_dataset(cfg.data, cfg.eval_split)

    def fn(model: nn.Module, iteration: int) -> dict:
        det = model.detector if hasattr(model, "detector") else model.module.detector
        report = evaluate_model(det, meta, eval_set, metrics=("recall",), progress=False,
                                max_images=cfg.eval_max_images)
        return {k: v for k, v in report.get("recall", {}).items() if isinstance(v, (int, float))}

    return fn
