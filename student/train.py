"""train-student: the streaming mimic trainer (stage 1: backbone + RPN; stage 2: the full detector).

Losses (named, summed by the trainer with per-name weights):
- ground truth: ``loss_objectness``, ``loss_rpn_box_reg`` (+ ``loss_classifier``, ``loss_box_reg`` in stage 2),
  from labelled images only;
- ``loss_mimic`` (weight λ1 = ``--mimic-weight``): eq. 5 of the paper over regions sampled from the teacher's
  stored proposals (``roi``), or whole-map L2 (``map``), on every image, labelled or not;
- ``loss_logits`` (weight ``--logits-weight``, stage 2): L2 between the student head's class logits (each row
  centred) and the teacher's stored ones on the same teacher proposals (the rows the teacher calls foreground and
  the background rows weigh half each, ``--logits-balance``), plus L2 on the box deltas of the teacher's
  class where the teacher calls a proposal foreground (two-stage mimic / logits-only baseline; see
  :func:`student.mimic.logits_mimic_loss` for why not every output).

Several teachers (``StudentConfig.store`` a sequence of stores over the same images, ``teacher_weights`` one per
store): the student mimics every teacher's map through its own transform ``r_k`` (student channels -> teacher k's
channels), ``L_m = Σ_k w_k · L_m^k``, logged as ``loss_mimic`` (teacher 1, the primary store), ``loss_mimic_2``,
``loss_mimic_3``, ... (unweighted values; the trainer applies ``λ1·w_k``). Regions are the primary teacher's
proposals, used on every teacher's map (the maps share one grid: same preprocessing and stride, checked); the
two-stage logits mimic matches the primary teacher's head outputs only, since each store holds logits for its
own teacher's proposals and only the primary's are the regions the student's head sees.

Geometry: the teacher map has stride ``s_t`` in teacher-input pixels. A scale-mimic student sees the image at
half size and upsamples its stride-16 map x2, so both maps share one grid: teacher proposals (teacher pixels)
sample both with spatial scale ``1/s_t``. For the student head they are mapped to student pixels (× input scale).

The teacher is never imported here (see student/stream.py): only its stored records are read.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimicdet.data import load_dataset
from mimicdet.data.loader import DetectionImages, mix_seeds
from mimicdet.data.paths import check_output_apart
from mimicdet.data.records import Dataset
from mimicdet.data.summary import small_object_warning
from mimicdet.data.transforms import Preprocess
from mimicdet.detection.anchors import DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS
from mimicdet.detection.checkpoints import file_sha256
from mimicdet.detection.run_folder import claim_run_folder
from mimicdet.detection.detector import (
    Detector,
    DetectorConfig,
    build_detector,
    load_detector,
    save_detector,
)
from mimicdet.detection.trainer import (
    CheckpointHook,
    EvalHook,
    MetricsLogHook,
    OptimConfig,
    ProgressBarHook,
    TrainConfig,
    Trainer,
)
from mimicdet.store import StoreReader, open_store
from mimicdet.student.recipe import DEFAULT_LOGITS_WEIGHT, stage2_iters
from mimicdet.store.training import TrainingStores, open_for_training, store_classes
from mimicdet.student.mimic import (
    MimicTransform,
    logits_mimic_loss,
    map_mimic_loss,
    roi_mimic_loss,
)
from mimicdet.student.stream import MimicImages, MixedSampler, channel_stats, make_mimic_loader

CONFIG_NAME = "student_config.json"  # the run identity a rerun is compared with

STRATEGIES = ("roi", "map", "logits", "none")
SAMPLERS = ("roialign", "native")
MIMIC_NORMS = ("none", "channel")



# RPN anchor sizes (input pixels) and height/width ratios of a student that is given none and inherits none.
DEFAULT_ANCHORS: tuple[tuple[int, ...], tuple[float, ...]] = (DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS)


def inherit_anchors(cfg: StudentConfig) -> StudentConfig:
    """Stage 2 keeps the anchors its stage-1 RPN was trained with: unset ones come from --init, and ones given
    that differ from the checkpoint's are refused, naming both."""
    if cfg.stage != 2 or cfg.init is None:
        return cfg
    stage1, _ = load_detector(cfg.init)
    theirs = {"anchor_sizes": tuple(stage1.config.anchor_sizes), "aspect_ratios": tuple(stage1.config.aspect_ratios)}
    for name, value in theirs.items():
        asked = getattr(cfg, name)
        if asked is not None and tuple(asked) != value:
            option = "--" + name.replace("_", "-")
            raise ValueError(
                f"{option} {','.join(map(str, asked))} differs from the --init {cfg.init} RPN's "
                f"{','.join(map(str, value))}; leave {option} out to keep the stage-1 anchors"
            )
    return replace(cfg, **theirs)


def without_head_targets(cfg: StudentConfig, manifest) -> StudentConfig:
    """A store without head outputs (a foreign teacher extracted without --class-map) leaves the logits match
    nothing to match: stage 2 trains its head on ground truth alone, and says so once. ``manifest``: the
    primary store's."""
    if cfg.stage != 2 or not cfg.logits_weight or manifest.teacher_head != "none":
        return cfg
    why = f"{cfg.primary_store} holds no head outputs (teacher {manifest.teacher_arch}, extracted without --class-map)"
    if cfg.mimic == "logits":
        raise ValueError(f"--mimic logits: {why}; extract it with --class-map, or use --mimic roi")
    warnings.warn(f"{why}: stage 2 trains its head on ground truth alone (logits weight 0)", stacklevel=3)
    return replace(cfg, logits_weight=0.0)


def mimic_loss_name(k: int) -> str:
    """The logged name of teacher k's feature mimic term (0 = the primary store): loss_mimic, loss_mimic_2, ..."""
    return "loss_mimic" if k == 0 else f"loss_mimic_{k + 1}"


@dataclass(frozen=True)
class StudentConfig:
    # One store, or several teachers' stores over the same images (the first is the primary: proposals, logits).
    store: str | tuple[str, ...]
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
    # "channel": standardise each teacher channel (store mean and std) before eq. 5, so no few large channels
    # dominate the L2; "none": the paper's eq. 5 on the raw map.
    mimic_norm: str = "none"
    # None: DEFAULT_LOGITS_WEIGHT for stage-2 "roi"/"logits", else 0; resolved on construction, so a run's
    # student_config.json records the weight it trained with.
    logits_weight: float | None = None
    # Teacher-foreground and background rows weigh half each in the logits match (False: the plain row mean).
    logits_balance: bool = True
    scale_mimic: bool = False
    rois_per_image: int = 64
    flip: bool = False
    iters: int = 1000
    batch_size: int = 8
    lr: float = 0.02
    warmup_iters: int = 100
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    # None: DEFAULT_ANCHORS, or in stage 2 the --init checkpoint's (resolved by inherit_anchors).
    anchor_sizes: tuple[int, ...] | None = None
    aspect_ratios: tuple[float, ...] | None = None
    rpn_channels: int | None = None
    unlabeled: str | tuple[str, ...] | None = None  # store of images without labels (mimic only); one per teacher
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
    # A remote store's local shard cache (store/cache.py): the folder (None: the user's cache folder) and the most
    # bytes it may hold (None: store.cache.DEFAULT_CACHE_SIZE).
    cache_dir: str | None = None
    cache_size: int | None = None
    # One weight w_k per store (L_m = Σ_k w_k·L_m^k); None means 1 each.
    teacher_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        stores = (self.store,) if isinstance(self.store, (str, Path)) else tuple(self.store)
        stores = tuple(str(s) for s in stores)
        if not stores:
            raise ValueError("--store: give at least one feature store")
        dup = sorted({s for s in stores if stores.count(s) > 1})
        if dup:
            raise ValueError(f"--store {dup[0]} is given more than once; give each teacher's store once")
        object.__setattr__(self, "store", stores[0] if len(stores) == 1 else stores)
        if self.teacher_weights is not None:
            weights = tuple(float(w) for w in self.teacher_weights)
            if len(weights) != len(stores):
                raise ValueError(
                    f"--teacher-weight: {len(weights)} weight(s) for {len(stores)} --store(s); give one per store "
                    "(in the same order) or none (1 each)"
                )
            for url, w in zip(stores, weights):
                if not (math.isfinite(w) and w >= 0):
                    raise ValueError(f"--teacher-weight for {url} must be a number >= 0, got {w}")
            # All ones is the default: normalised away so the config (and the run folder) reads the same either way.
            object.__setattr__(self, "teacher_weights", None if all(w == 1.0 for w in weights) else weights)
        if len(stores) > 1:
            if self.mimic not in ("roi", "map"):
                raise ValueError(
                    f"several --store teachers need a feature mimic (--mimic roi or map), got --mimic {self.mimic}: "
                    "logits are matched to the first (primary) store's teacher only"
                )
        if self.unlabeled is not None:
            unl = (self.unlabeled,) if isinstance(self.unlabeled, (str, Path)) else tuple(self.unlabeled)
            unl = tuple(str(u) for u in unl)
            if unl and len(unl) != len(stores):
                raise ValueError(
                    f"--unlabeled: {len(unl)} store(s) for {len(stores)} --store teacher(s); give each teacher's "
                    "store of the unlabelled images, in --store order"
                )
            object.__setattr__(self, "unlabeled", None if not unl else unl[0] if len(unl) == 1 else unl)
        if self.mimic not in STRATEGIES:
            raise ValueError(f"--mimic must be one of {', '.join(STRATEGIES)}, got {self.mimic!r}")
        if self.mimic_norm not in MIMIC_NORMS:
            raise ValueError(f"--mimic-norm must be one of {', '.join(MIMIC_NORMS)}, got {self.mimic_norm!r}")
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
        if self.logits_weight is None:
            default = DEFAULT_LOGITS_WEIGHT if self.stage == 2 and self.mimic in ("roi", "logits") else 0.0
            object.__setattr__(self, "logits_weight", default)
        if self.stage == 1 or self.init is None:
            if self.anchor_sizes is None:
                object.__setattr__(self, "anchor_sizes", DEFAULT_ANCHORS[0])
            if self.aspect_ratios is None:
                object.__setattr__(self, "aspect_ratios", DEFAULT_ANCHORS[1])
        if self.eval_every and not self.eval_split:
            raise ValueError("--eval-every needs --eval-split: the split to evaluate on")

    @property
    def stores(self) -> tuple[str, ...]:
        """Every teacher's store, the primary first."""
        return (self.store,) if isinstance(self.store, str) else tuple(self.store)

    @property
    def unlabeled_stores(self) -> tuple[str, ...]:
        """Each teacher's store of the unlabelled images, in ``stores`` order (empty without ``unlabeled``)."""
        if self.unlabeled is None:
            return ()
        return (self.unlabeled,) if isinstance(self.unlabeled, str) else tuple(self.unlabeled)

    @property
    def primary_store(self) -> str:
        """The store whose proposals are the mimic regions and whose head outputs the logits mimic matches."""
        return self.stores[0]

    @property
    def weights(self) -> tuple[float, ...]:
        """w_k per store (1 each unless ``teacher_weights`` says otherwise)."""
        return self.teacher_weights if self.teacher_weights is not None else (1.0,) * len(self.stores)

    @property
    def input_scale(self) -> float:
        return 0.5 if self.scale_mimic else 1.0

    @property
    def feature_mimic(self) -> bool:
        return self.mimic in ("roi", "map")

    def stage2(self, out: Path, *, iters: int | None = None, **changes: Any) -> "StudentConfig":
        """The stage-2 run that follows this stage-1 one in ``out``: the full detector from its ``model.pt``, half
        its iterations unless ``iters`` says otherwise, the logits weight of the stage-2 recipe (unless
        ``changes`` sets one) and no periodic recall curve; ``changes`` set any other field."""
        if self.stage != 1:
            raise ValueError(f"stage2() follows a stage-1 run; {self.out} is stage {self.stage}")
        follow = dict(out=Path(out), stage=2, init=Path(self.out) / "model.pt", logits_weight=None, eval_every=0,
                      eval_split=None, iters=stage2_iters(self.iters) if iters is None else iters)
        return replace(self, **(follow | changes))

    def to_dict(self) -> dict:
        d = asdict(self)
        # Options at their plain default are left out, so a run folder's identity names only what it departs in.
        if d["teacher_weights"] is None:
            del d["teacher_weights"]
        if d["mimic_norm"] == "none":
            del d["mimic_norm"]
        return json.loads(json.dumps(d, default=str))


class StudentModel(nn.Module):
    """The student detector plus the training-only transform layer ``r_k`` of each teacher (the primary first;
    none without feature mimic). ``forward(batch)`` returns the named losses, so DistributedDataParallel can wrap
    the whole step."""

    def __init__(self, detector: Detector, transforms: Sequence[nn.Module], config: StudentConfig,
                 teacher_stride: int):
        super().__init__()
        self.detector = detector
        self.transforms = nn.ModuleList(transforms)
        self.cfg = config
        self.teacher_stride = teacher_stride
        # Per teacher: (mean, std) per channel for --mimic-norm channel (recomputed from the store each run).
        self.teacher_stats: list[tuple[Tensor, Tensor]] = []

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

        if cfg.feature_mimic or self.cfg.logits_weight > 0:
            rois = self._regions(mb)
        if cfg.feature_mimic:
            teachers = zip(mb.teacher_features, mb.teacher_hw, self.transforms, strict=True)
            for k, (teacher_map, teacher_hw, transform) in enumerate(teachers):
                if self.teacher_stats:
                    mean, std = (t.to(teacher_map.device)[:, None, None] for t in self.teacher_stats[k])
                    teacher_map = (teacher_map - mean) / std  # padding cells change too, but never count
                losses[mimic_loss_name(k)] = self._feature_mimic(student_map, teacher_map, teacher_hw, rois, transform)
        if cfg.logits_weight > 0 and det.config.head != "none":
            scale = cfg.input_scale
            student_rois = [r * scale for r in rois]
            logits, deltas = det.head_outputs(student_map, student_rois, b.image_sizes)
            t_logits = torch.cat([tl[idx] for tl, idx in zip(mb.teacher_logits, self._roi_index)])
            t_deltas = torch.cat([td[idx] for td, idx in zip(mb.teacher_deltas, self._roi_index)])
            losses["loss_logits"] = logits_mimic_loss(logits, t_logits, deltas, t_deltas,
                                                      balance=cfg.logits_balance)
        return losses

    def _feature_mimic(self, student_map: Tensor, teacher_map: Tensor, teacher_hw, rois, transform) -> Tensor:
        """One teacher's ``L_m``: both maps cropped to their common grid, regions = the primary's proposals."""
        h = min(student_map.shape[-2], teacher_map.shape[-2])
        w = min(student_map.shape[-1], teacher_map.shape[-1])
        s_map, t_map = student_map[..., :h, :w], teacher_map[..., :h, :w]
        valid = [(min(th, h), min(tw, w)) for th, tw in teacher_hw]
        if self.cfg.mimic == "roi":
            return roi_mimic_loss(
                s_map, t_map, rois, transform,
                spatial_scale=1.0 / self.teacher_stride, sampler=self.cfg.sampler, valid_hw=valid,
            )
        return map_mimic_loss(s_map, t_map, transform, valid_hw=valid)

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
    confident. Indices are kept for the logits match."""
    wh = proposals[:, 2:] - proposals[:, :2]
    usable = torch.nonzero((wh >= 1.0).all(dim=1) & torch.isfinite(proposals).all(dim=1)).flatten()
    pool = usable[: 2 * num]
    if len(pool) <= num:
        return pool
    pick = torch.randperm(len(pool), generator=generator)[:num].sort().values
    return pool[pick.to(pool.device)]


def build_student(cfg: StudentConfig, classes: tuple[str, ...]) -> Detector:
    if cfg.anchor_sizes is None or cfg.aspect_ratios is None:  # not yet resolved by run_train_student
        cfg = inherit_anchors(cfg)
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


# Where the inputs are is not what the run is: stages on separate machines copy stores and folders. These keys
# are compared through the content digests of ``input_digests``; the others must be equal to resume.
LOCATION_KEYS = ("store", "unlabeled", "data", "unlabeled_data", "init", "out", "storage_options")
# May change between calls of one run (skip_corrupt: a run stopped by a damaged image resumes with it).
FREE_KEYS = ("iters", "progress", "workers", "device", "overwrite", "checkpoint_every", "log_every", "eval_every",
             "eval_max_images", "skip_corrupt", "cache_dir", "cache_size")


def input_digests(cfg: StudentConfig) -> dict:
    """The run's inputs by content: each store's manifest checksum (teacher, dataset digest, preprocessing, all
    of it) and the --init checkpoint's sha256."""
    options = cfg.storage_options or None
    return {
        "stores": [open_store(url, storage_options=options).manifest.content_sha256() for url in cfg.stores],
        "unlabeled": [open_store(url, storage_options=options).manifest.content_sha256()
                      for url in cfg.unlabeled_stores],
        "init": file_sha256(cfg.init) if cfg.init is not None else None,
    }


def check_out_dir(cfg: StudentConfig) -> None:
    """A run folder holds one configuration: rerunning it resumes (wherever its inputs now lie, if their content
    is the same); a different one needs --overwrite."""
    inputs = {"--data": cfg.data, "--init": cfg.init, "--unlabeled-data": cfg.unlabeled_data}
    inputs |= {f"--store {url}": url for url in cfg.stores} | {f"--unlabeled {url}": url for url in cfg.unlabeled_stores}
    check_output_apart("--out", cfg.out, inputs)
    identity = cfg.to_dict() | {"inputs": input_digests(cfg)}
    claim_run_folder(cfg.out, CONFIG_NAME, identity, ignore=FREE_KEYS + LOCATION_KEYS, overwrite=cfg.overwrite)


def train_config(cfg: StudentConfig) -> TrainConfig:
    """The optimiser, schedule and loop settings of a student run (warm-up: at most a fifth of the run)."""
    return TrainConfig(
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


def run_train_student(cfg: StudentConfig) -> dict:
    """Train a student from a feature store; writes ``out/model.pt`` (student only) and returns a summary.
    Everything is checked before the run folder is touched; ``summary["skipped_images"]`` lists the damaged
    images left out (``--skip-corrupt``)."""
    cfg = inherit_anchors(cfg)
    # The teacher fixed the class order (label k+1 <-> classes[k]); read the data with the store's classes.
    classes = list(store_classes(cfg.primary_store, cfg.storage_options)) or None
    full = load_dataset(cfg.data, cfg.split, classes=classes)
    torch.manual_seed(cfg.seed)  # the student's initial weights
    student = build_student(cfg, full.classes)
    opened = open_for_training(
        cfg.stores, full, subset=cfg.subset, subset_seed=cfg.subset_seed,
        unlabelled_stores=cfg.unlabeled_stores,
        unlabelled=load_dataset(cfg.unlabeled_data, cfg.unlabeled_split, classes=classes) if cfg.unlabeled else None,
        flip=cfg.flip, skip_corrupt=cfg.skip_corrupt, student_stride=student.feature_stride,
        input_scale=cfg.input_scale, scale_mimic=cfg.scale_mimic, storage_options=cfg.storage_options,
        cache_dir=cfg.cache_dir, cache_size=cfg.cache_size,
    )
    dataset, unl, flip, skipped = opened.labelled, opened.unlabelled, opened.flip, list(opened.skipped)
    manifest, pre = opened.manifest, opened.preprocess
    cfg = without_head_targets(cfg, manifest)  # before the run folder records the configuration
    sources = [(dataset, opened.readers)]
    images = [DetectionImages(dataset, pre, scale=cfg.input_scale)]
    n_unl = 0
    if unl is not None:
        sources.append((unl, opened.unlabelled_readers))
        images.append(DetectionImages(unl, pre, scale=cfg.input_scale))
        n_unl = len(unl)

    model = student_model(cfg, student, opened.readers)

    meta = _student_meta(cfg, dataset, manifest, pre)
    if len(opened.readers) > 1:
        meta["teachers"] = teachers_meta(cfg, opened.readers)
    train_cfg = train_config(cfg)
    hooks = _hooks(cfg, meta)
    # Built once here so a batch composition it refuses is refused before the run folder is touched.
    MixedSampler(len(dataset), n_unl, cfg.batch_size, unlabelled_fraction=cfg.unlabeled_fraction, seed=cfg.seed)
    _warn_before_training(cfg, opened)
    rank, world = _claim_run_folder(cfg)
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
        loss_weights={"loss_logits": cfg.logits_weight}
        | {mimic_loss_name(k): cfg.mimic_weight * w for k, w in enumerate(cfg.weights)},
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
    return summary | {"model": str(cfg.out / "model.pt"), "world_size": world,
                      "skipped_images": [asdict(k) for k in skipped]}


def _hooks(cfg: StudentConfig, meta: dict) -> list:
    # Logs before the checkpoint: every log line up to a checkpoint's iteration exists once that checkpoint does.
    hooks = [MetricsLogHook(cfg.log_every), CheckpointHook(cfg.checkpoint_every),
             ProgressBarHook(enabled=cfg.progress, desc=f"student s{cfg.stage}")]
    if cfg.eval_every and cfg.eval_split:
        hooks.append(EvalHook(cfg.eval_every, _recall_eval(cfg, meta)))
    return hooks


def student_model(cfg: StudentConfig, student: Detector, readers: Sequence[StoreReader]) -> StudentModel:
    """The student plus its transform ``r_k`` per teacher (student channels -> that teacher's channels) and, for
    ``--mimic-norm channel``, each teacher's channel statistics."""
    def r(reader: StoreReader) -> MimicTransform:
        return MimicTransform(student_channels=student.feature_channels, teacher_channels=reader.manifest.channels)

    transforms = [r(reader) for reader in readers] if cfg.feature_mimic else []
    model = StudentModel(student, transforms, cfg, readers[0].manifest.stride)
    if cfg.mimic_norm == "channel" and cfg.feature_mimic:
        model.teacher_stats = [channel_stats(reader) for reader in readers]
    return model


def _warn_before_training(cfg: StudentConfig, opened: TrainingStores) -> None:
    small = small_object_warning(opened.labelled, opened.preprocess, opened.manifest.stride, scale=cfg.input_scale)
    if small:
        warnings.warn(small, stacklevel=3)
    skipped = opened.skipped
    if skipped:
        shown = ", ".join(repr(k.image_id) for k in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(f"--skip-corrupt: left out {len(skipped)} damaged image(s): {shown}", stacklevel=3)


def _claim_run_folder(cfg: StudentConfig) -> tuple[int, int]:
    """(rank, world size): joins the torchrun group, and rank 0 claims the run folder before any process reads
    a checkpoint from it."""
    rank, world = _dist_rank_world()
    if world > 1:
        _init_dist(cfg.device)
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    if rank == 0:
        check_out_dir(cfg)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return rank, world


def teachers_meta(cfg: StudentConfig, stores: list[StoreReader]) -> list[dict]:
    """What a several-teacher checkpoint records of its teachers, in --store order (the first is the primary)."""
    return [
        {
            "store": url,
            "weight": w,
            "loss": mimic_loss_name(k),
            "teacher_sha256": s.manifest.teacher_sha256,
            "teacher_width": s.manifest.teacher_width,
            "teacher_head": s.manifest.teacher_head,
            "channels": s.manifest.channels,
            "dtype": s.manifest.dtype,
        }
        for k, (url, s, w) in enumerate(zip(cfg.stores, stores, cfg.weights))
    ]


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

    from mimicdet.detection.device import select_device

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
    from mimicdet.detection.evaluate import evaluate_model

    eval_set = load_dataset(cfg.data, cfg.eval_split)

    def fn(model: nn.Module, iteration: int) -> dict:
        det = model.detector if hasattr(model, "detector") else model.module.detector
        report = evaluate_model(det, meta, eval_set, metrics=("recall",), progress=False,
                                max_images=cfg.eval_max_images)
        return {k: v for k, v in report.get("recall", {}).items() if isinstance(v, (int, float))}

    return fn
