"""The teacher adapter: the only thing ``extract-teacher`` needs from a model.

Given preprocessed images a :class:`Teacher` returns, per image, the feature map of one named layer at a known
stride, the top-K proposals with scores, and the head's class logits and box deltas on those proposals where it
has them in the dataset's classes (see :meth:`Teacher.teacher_outputs`). Two kinds of model fill it:

- this tool's Inception detector, from a ``model.pt`` written by ``train-teacher``;
- torchvision's Faster R-CNN (ResNet-50 FPN v1/v2, MobileNetV3 FPN): a ``model.pt`` written by
  ``train-teacher --arch torchvision:NAME``, or ``torchvision:NAME`` with a state dict in torchvision's own layout
  (``--weights FILE``, or the name of torchvision's published weights, read from its cache).

A foreign teacher's classes are its own. ``--class-map FILE`` (JSON ``{"teacher class": "dataset class"}``)
turns its logits into the dataset's: column 0 (background) stays, each dataset class takes the log-sum-exp of the
teacher classes mapped to it, and the deltas of the first of them. Without a map the store carries features and
proposals only (no head outputs), and stage-2 students train their head on ground truth alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mimicdet.data.errors import DataError
from mimicdet.data.transforms import Preprocess
from mimicdet.detection.checkpoints import file_sha256, load_weights_only
from mimicdet.detection.torchvision_detector import (  # noqa: F401 (PREFIX: the spec's marker, for callers)
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREFIX,
    SIZE_DIVISOR,
    TorchvisionConfig,
    TorchvisionDetector,
    coco_categories,
    num_classes_of,
    parse_arch,
    published_weights_file,
)

INCEPTION_LAYER = "inception4e"
# torchvision's detection transform: shorter side 800, longer side at most 1333.
TORCHVISION_SIZES = (800, 1333)


@dataclass(frozen=True)
class TeacherSpec:
    """How to open a teacher (hashable: Dask workers open it once each)."""

    teacher: str  # a model.pt, or "torchvision:NAME"
    weights: str | None = None  # torchvision:NAME only: a state dict file, or a published name such as COCO_V1
    feature_stride: int | None = None  # None: a checkpoint's own stride; 16 (P4) for torchvision:NAME
    class_map: str | None = None  # JSON {"teacher class": "dataset class"}
    min_size: int | None = None  # torchvision:NAME only: the input sizes (default torchvision's 800 / 1333)
    max_size: int | None = None
    # The dataset's classes, for a foreign teacher without a class map (its store names them, with no head outputs).
    classes: tuple[str, ...] = ()


class Teacher(nn.Module):
    """A detector in the role of teacher, with what the store's manifest records of it."""

    def __init__(self, model: nn.Module, *, arch: str, classes: tuple[str, ...], preprocess: Preprocess,
                 sha256: str, feature_layer: str, head: str, columns: list[list[int]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.arch, self.classes, self.preprocess, self.sha256 = arch, classes, preprocess, sha256
        self.feature_layer, self.head = feature_layer, head
        # Per dataset class (background first): the teacher's logit columns that make it, when classes are mapped.
        self.columns = columns
        self.feature_stride: int = model.feature_stride
        self.feature_channels: int = model.feature_channels
        self.width = float(model.config.width)
        self.nms_threshold = float(model.nms_threshold if isinstance(model, TorchvisionDetector)
                                   else model.config.rpn_nms_thresh)

    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        return self.model.feature_size(h, w)

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, image_sizes: list[tuple[int, int]], *, top_k: int) -> list[dict]:
        """Per image: ``features`` ``[C, h, w]``, ``proposals`` ``[k, 4]``, ``scores`` ``[k]``, ``class_logits``
        ``[k, K]`` and ``box_deltas`` ``[k, 4K]`` in the dataset's K classes (zeros with no head outputs)."""
        outs = self.model.teacher_outputs(images, image_sizes, top_k=top_k)
        kc = len(self.classes) + 1
        for o in outs:
            if self.head == "none":  # the store's layout keeps its columns; the manifest says they are empty
                o["class_logits"] = o["class_logits"].new_zeros((len(o["proposals"]), kc))
                o["box_deltas"] = o["box_deltas"].new_zeros((len(o["proposals"]), 4 * kc))
            elif self.columns is not None:
                o["class_logits"], o["box_deltas"] = map_classes(o["class_logits"], o["box_deltas"], self.columns)
        return outs


def map_classes(logits: Tensor, deltas: Tensor, columns: list[list[int]]) -> tuple[Tensor, Tensor]:
    """``[k, Kt]`` teacher logits and ``[k, 4Kt]`` deltas -> the dataset's ``[k, K]`` and ``[k, 4K]``: each
    output class the log-sum-exp of its teacher columns (so its softmax share is theirs summed) and the deltas of
    the first of them."""
    k = logits.shape[0]
    mapped = torch.stack([torch.logsumexp(logits[:, cols], dim=1) for cols in columns], dim=1)
    blocks = deltas.view(k, -1, 4)
    return mapped, blocks[:, [cols[0] for cols in columns]].reshape(k, -1)


def open_teacher(spec: TeacherSpec, device: torch.device) -> Teacher:
    """The teacher ``spec`` names, in eval mode on ``device``."""
    if spec.teacher.startswith(PREFIX):
        teacher = _published_teacher(spec)
    else:
        teacher = _checkpoint_teacher(spec)
    return teacher.eval().to(device)


def _checkpoint_teacher(spec: TeacherSpec) -> Teacher:
    from mimicdet.detection.detector import load_detector

    path = Path(spec.teacher)
    if spec.weights is not None:
        raise ValueError(f"--weights goes with --teacher torchvision:NAME; {path} holds its own weights")
    model, meta = load_detector(path)
    if "preprocess" not in meta:
        raise DataError(f"{path}: checkpoint meta has no 'preprocess'; was it written by `mimic train-teacher`?")
    classes = tuple(meta.get("classes", ()))
    _check_stride(model, spec, path)
    if isinstance(model, TorchvisionDetector):
        layer, arch = model.describe_layer(), model.config.arch
    else:
        layer, arch = INCEPTION_LAYER, "inception-bn"
    if spec.class_map is not None:
        raise ValueError(f"--class-map: {path} was trained on {len(classes)} named classes; its logits are "
                         "already the dataset's")
    return Teacher(model, arch=arch, classes=classes, preprocess=Preprocess.from_dict(meta["preprocess"]),
                   sha256=file_sha256(path), feature_layer=layer, head=model.config.head)


def _check_stride(model: nn.Module, spec: TeacherSpec, source: Path | str) -> None:
    if spec.feature_stride is not None and model.feature_stride != spec.feature_stride:
        raise ValueError(f"--feature-stride {spec.feature_stride}: {source} has its features at stride "
                         f"{model.feature_stride}")


def _published_teacher(spec: TeacherSpec) -> Teacher:
    """``torchvision:NAME`` with weights in torchvision's layout, preprocessed as torchvision's transform does."""
    arch = parse_arch(spec.teacher)
    path = _weights_path(arch, spec.weights)
    state = load_weights_only(path, what="torchvision state dict")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint of torchvision's references
    try:
        num_classes = num_classes_of(state)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    model = TorchvisionDetector(TorchvisionConfig(arch=PREFIX + arch, num_classes=num_classes,
                                                  feature_stride=spec.feature_stride or 16))
    try:
        model.load_torchvision_state(state, str(path))
    except ValueError as e:
        raise DataError(str(e)) from None
    coco = coco_categories(arch)
    names = coco if num_classes == len(coco) else None
    columns, classes = None, spec.classes
    if spec.class_map is not None:
        columns, classes = read_class_map(Path(spec.class_map), names, num_classes)
    min_size, max_size = spec.min_size or TORCHVISION_SIZES[0], spec.max_size or TORCHVISION_SIZES[1]
    pre = Preprocess(min_size=min_size, max_size=max(max_size, min_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     size_divisor=SIZE_DIVISOR)
    return Teacher(model, arch=PREFIX + arch, classes=classes, preprocess=pre, sha256=file_sha256(path),
                   feature_layer=model.describe_layer(), head="fast-rcnn" if columns else "none", columns=columns)


def _weights_path(arch: str, weights: str | None) -> Path:
    """A state dict file, or torchvision's published weights by name from torchvision's cache."""
    if weights is None:
        raise ValueError(f"--teacher torchvision:{arch} needs --weights: a state dict file, or the name of "
                         "torchvision's published weights (e.g. COCO_V1) when its cache holds them")
    if Path(weights).is_file():
        return Path(weights)
    if "/" in weights or weights.endswith((".pt", ".pth")):
        raise FileNotFoundError(f"--weights: {weights} does not exist")
    path, url = published_weights_file(arch, weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights}: not in torchvision's cache ({path}); this tool downloads "
                                f"nothing: fetch {url} on a machine with internet and put it there, or pass the "
                                "file itself")
    return path


def read_class_map(path: Path, teacher_names: list[str] | None, num_classes: int) -> tuple[list[list[int]], tuple]:
    """``--class-map`` JSON ``{"teacher class": "dataset class"}`` -> (teacher columns per output class, background
    first; the dataset classes in output order). Teacher classes are names (of torchvision's COCO weights) or
    column numbers 1..K-1."""
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"--class-map {path}: not a readable JSON file ({e})") from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f"--class-map {path}: expected a JSON object {{\"teacher class\": \"dataset class\"}}")
    by_target: dict[str, list[int]] = {}
    for name, target in mapping.items():
        by_target.setdefault(target, []).append(_teacher_column(path, name, teacher_names, num_classes))
    return [[0], *by_target.values()], tuple(by_target)


def _teacher_column(path: Path, name: str, teacher_names: list[str] | None, num_classes: int) -> int:
    if teacher_names is not None and name in teacher_names[1:]:
        return teacher_names.index(name)
    if name.isdigit() and 0 < int(name) < num_classes:
        return int(name)
    known = f"its names ({', '.join(teacher_names[1:6])}, ...) or" if teacher_names else ""
    raise DataError(f"--class-map {path}: {name!r} is not a class of the teacher; use {known} column numbers "
                    f"1..{num_classes - 1}")
