"""Train a teacher detector (``mimic train-teacher``).

Dataset -> deterministic loader -> Detector -> Trainer. A run folder ``RUN`` holds ``run.json`` (what the run
is: dataset identity, preprocessing, detector and optimiser settings), the resumable ``checkpoint.pt``,
``metrics.jsonl`` / ``eval.jsonl`` logs and, once finished, ``model.pt`` (a :func:`detection.detector.save_detector`
checkpoint whose ``meta`` records classes, preprocessing, input scale, dataset name and digest). Running the
same command again resumes; a different configuration against an existing RUN is refused unless ``overwrite``.

Default budget: the built-in dataset (256 x 256 images), width 1, batch 8, must train within 10 minutes on two
CPU cores; ``DEFAULT_ITERS`` follows from the measured seconds per iteration (see the constant).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from mimicdet.data.errors import DataError
from mimicdet.data.paths import check_output_apart
from mimicdet.data.records import Dataset
from mimicdet.detection.anchors import ANCHOR_PRESETS
from mimicdet.detection.run_folder import MODEL_NAME, claim_run_folder
from mimicdet.detection.torchvision_detector import TorchvisionConfig, parse_arch
from mimicdet.detection.trainer import Hook, OptimConfig, TrainConfig, Trainer, default_hooks

if TYPE_CHECKING:  # torchvision-heavy modules are imported when a run starts, not at CLI start-up
    from mimicdet.data.transforms import Preprocess
    from mimicdet.detection.detector import DetectorConfig

RUN_NAME = "run.json"
HEADS = ("fast-rcnn", "rfcn")

# Measured on the built-in dataset (256 x 256) at batch 8, width 1, fast-rcnn, two idle CPU cores: 1.6-1.7 s/iter,
# under 1% of it waiting for data; 300 iterations take about 8.5 minutes with start-up and the final save.
DEFAULT_ITERS = 300
DEFAULT_LR = 0.02



@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    data: Path
    out: Path
    split: str = "train"
    # "inception": this tool's detector (width, head, anchors below); "torchvision:NAME": torchvision's Faster
    # R-CNN of that name, trained by this tool's trainer on the same preprocessed batches.
    arch: str = "inception"
    # Train on ``subset`` images of the split drawn by ``subset_seed`` (the students' ``--subset`` rule): a
    # control teacher that knows only what a student's labelled images hold.
    subset: int | None = None
    subset_seed: int = 0
    width: float = 1.0
    head: str = "fast-rcnn"
    iters: int = DEFAULT_ITERS
    batch_size: int = 8
    lr: float = DEFAULT_LR
    warmup_iters: int | None = None  # None: a tenth of the run, at most 100
    min_size: int = 256
    max_size: int = 512
    anchor_preset: str = "default"
    anchor_sizes: tuple[int, ...] | None = None  # overrides the preset's
    aspect_ratios: tuple[float, ...] | None = None  # overrides the preset's
    rpn_channels: int | None = None
    init_from: Path | None = None  # torchvision GoogLeNet state dict for the width-1 backbone
    flip: bool = False
    eval_every: int = 0  # 0: no periodic evaluation
    eval_split: str = "test"
    eval_max_images: int | None = 200
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    overwrite: bool = False
    progress: bool | None = None  # None: progress bar only on a terminal

    def __post_init__(self) -> None:
        if self.arch != "inception":
            parse_arch(self.arch)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.anchor_preset not in ANCHOR_PRESETS:
            raise ValueError(f"anchor_preset must be one of {sorted(ANCHOR_PRESETS)}, got {self.anchor_preset!r}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be >= 1 or None, got {self.subset}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.eval_max_images is not None and self.eval_max_images < 1:
            raise ValueError(f"eval_max_images must be >= 1 or None, got {self.eval_max_images}")

    def anchors(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        sizes, ratios = ANCHOR_PRESETS[self.anchor_preset]
        return tuple(self.anchor_sizes or sizes), tuple(self.aspect_ratios or ratios)

    def train_config(self) -> TrainConfig:
        warmup = self.warmup_iters if self.warmup_iters is not None else min(100, self.iters // 10)
        return TrainConfig(
            iters=self.iters,
            optim=OptimConfig(lr=self.lr, warmup_iters=warmup),
            batch_size=self.batch_size,
            checkpoint_every=self.checkpoint_every,
            eval_every=self.eval_every,
            log_every=self.log_every,
            seed=self.seed,
            device=self.device,
        )


def labelled_only(dataset: Dataset) -> Dataset:
    """The records that carry annotations: a teacher learns from boxes only."""
    keep = [i for i, r in enumerate(dataset.records) if r.labelled]
    if not keep:
        raise DataError(f"dataset {dataset.name}/{dataset.split}: no labelled images to train a teacher on")
    return dataset if len(keep) == len(dataset) else dataset.subset(keep)


def detector_loss(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """The detector's own named losses (RPN objectness and box regression, head classification and boxes)."""
    device = next(model.parameters()).device
    b = batch.to(device)
    _, losses = model(b.images, b.image_sizes, b.targets)
    return losses


def run_identity(*, dataset: Dataset, preprocess: dict, detector: dict, train: TrainConfig,
                 flip: bool, init_from: Path | None) -> dict:
    """What makes two runs the same run (plain JSON). Device, workers and logging do not enter."""
    t = train.to_dict()
    return {
        "dataset": {"name": dataset.name, "split": dataset.split, "digest": dataset.digest(),
                    "num_images": len(dataset), "classes": list(dataset.classes)},
        "preprocess": preprocess,
        "detector": detector,
        "train": {k: t[k] for k in ("iters", "batch_size", "seed", "optim")} | {"flip": flip},
        "init_from": str(init_from) if init_from is not None else None,
    }


def _datasets(config: TeacherConfig) -> tuple[Dataset, Dataset | None]:
    """The labelled training split, and the held-out split when periodic evaluation is on."""
    from mimicdet.data import load_dataset

    train_set = labelled_only(load_dataset(config.data, config.split).seeded_subset(config.subset, config.subset_seed))
    if config.eval_every == 0:
        return train_set, None
    eval_set = labelled_only(load_dataset(config.data, config.eval_split, classes=train_set.classes))
    if config.eval_max_images is not None:
        eval_set = eval_set.subset(range(min(config.eval_max_images, len(eval_set))))
    return train_set, eval_set


def _preprocess(config: TeacherConfig) -> Preprocess:
    from mimicdet.data.transforms import Preprocess

    if config.init_from is not None and config.arch == "inception":
        # torchvision's GoogLeNet weights expect (x - 0.5) / 0.5 inputs (its transform_input=True).
        return Preprocess(min_size=config.min_size, max_size=config.max_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    return Preprocess(min_size=config.min_size, max_size=config.max_size)


def _detector_config(config: TeacherConfig, num_classes: int) -> DetectorConfig | TorchvisionConfig:
    from mimicdet.detection.detector import DetectorConfig

    if config.arch != "inception":
        return TorchvisionConfig(arch=config.arch, num_classes=num_classes)

    sizes, ratios = config.anchors()
    return DetectorConfig(num_classes=num_classes, width=config.width, head=config.head,
                          rpn_channels=config.rpn_channels, anchor_sizes=sizes, aspect_ratios=ratios)


def _build(det_config, init_from: Path | None) -> torch.nn.Module:
    """The detector to train, with ``--init-from`` weights: a GoogLeNet state dict for this tool's backbone; for
    a torchvision detector, its own layout (a whole detector, or a classification backbone)."""
    from mimicdet.detection.backbone import load_googlenet_weights
    from mimicdet.detection.detector import build_detector
    from mimicdet.detection.torchvision_detector import TorchvisionDetector, load_init_weights

    if isinstance(det_config, TorchvisionConfig):
        model = TorchvisionDetector(det_config)
        if init_from is not None:
            load_init_weights(model, init_from)
        return model
    model = build_detector(det_config)
    if init_from is not None:
        load_googlenet_weights(model.backbone, init_from)
    return model


def train_teacher(config: TeacherConfig, *, hooks: Sequence[Hook] = ()) -> dict:
    """Trains (or resumes) the teacher described by ``config``; returns a summary with the model path.

    ``hooks`` run after the usual ones (metrics log, evaluation, checkpoint, progress bar)."""
    from mimicdet.data.loader import DetectionImages, IterationSampler, make_loader
    from mimicdet.detection.detector import save_detector
    from mimicdet.detection.evaluate import evaluate_model, headline

    if config.init_from is not None and not Path(config.init_from).is_file():
        raise FileNotFoundError(f"--init-from: weights file not found: {config.init_from}")
    train_set, eval_set = _datasets(config)
    pre = _preprocess(config)
    det_config = _detector_config(config, train_set.num_classes)
    train_config = config.train_config()
    identity = run_identity(dataset=train_set, preprocess=pre.to_dict(), detector=det_config.to_dict(),
                            train=train_config, flip=config.flip, init_from=config.init_from)
    out = Path(config.out)
    check_output_apart("--out", out, {"--data": config.data, "--init-from": config.init_from})
    claim_run_folder(out, RUN_NAME, identity, overwrite=config.overwrite)

    torch.manual_seed(config.seed)  # deterministic initial weights
    model = _build(det_config, config.init_from)

    meta = {
        "role": "teacher",
        "classes": list(train_set.classes),
        "preprocess": pre.to_dict(),
        "input_scale": 1.0,
        "dataset": identity["dataset"],
        "detector_config": det_config.to_dict(),
        "train": identity["train"],
        "init_from": identity["init_from"],
    }
    images = DetectionImages(train_set, pre, seed=config.seed)

    def batches(start_iter: int):
        sampler = IterationSampler(len(train_set), config.batch_size, seed=config.seed, start_iter=start_iter,
                                   flip=config.flip)
        return iter(make_loader(images, sampler, num_workers=config.workers))

    eval_fn = None
    if eval_set is not None:
        def eval_fn(m: torch.nn.Module, iteration: int) -> dict:
            report = evaluate_model(m, meta, eval_set, metrics=("recall", "voc"), device=config.device,
                                    profile=False, progress=False)
            return headline(report)

    trainer = Trainer(
        model=model,
        config=train_config,
        loss_fn=detector_loss,
        batches=batches,
        out_dir=out,
        hooks=[*default_hooks(train_config, eval_fn=eval_fn, progress=config.progress), *hooks],
        meta=meta,
    )
    summary = trainer.train()
    model_path = out / MODEL_NAME
    save_detector(model_path, trainer.model.cpu(), {**meta, "iterations": trainer.iter})
    return {"model": str(model_path), "params": model.param_counts(), **summary}


def format_summary(summary: dict) -> str:
    """One line per fact, for the CLI."""
    lines = [f"model: {summary['model']}  ({summary['params']['total'] / 1e6:.2f} M parameters)"]
    if summary["steps"]:
        lines.append(
            f"trained iterations {summary['start_iteration']}..{summary['iteration']}: "
            f"{summary['s_per_iter']:.2f} s/iter, {100 * summary['data_fraction']:.0f}% waiting for data; "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary["losses"].items())
        )
    else:
        lines.append(f"already trained ({summary['iteration']} iterations); nothing to resume")
    return "\n".join(lines)
