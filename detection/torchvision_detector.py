"""torchvision's two-stage detectors as teachers: the detector a user already has, behind the same interface as
this tool's own (``forward`` for training losses, ``predict``, ``teacher_outputs``).

torchvision's ``GeneralizedRCNNTransform`` (resize, normalise, pad) is bypassed: images arrive preprocessed by
this tool's :class:`mimicdet.data.transforms.Preprocess`, with the teacher's normalisation (ImageNet mean/std)
and sizes recorded in the checkpoint, so a student reads exactly the inputs the teacher saw. Shapes::

    images           float32[N, 3, H, W]   normalised, zero-padded right/bottom to a multiple of 32
    image_sizes      [(h_i, w_i)]          the valid area of each image, input pixels
    features         float32[C=256, ceil(h_i/s), ceil(w_i/s)]  the FPN level of stride s (``feature_stride``)
    proposals        float32[k, 4]         x1y1x2y2 input pixels, by objectness (best first)
    class_logits     float32[k, K]         K = num_classes (background first)
    box_deltas       float32[k, 4K]

The FPN level is chosen by stride. A detector without a level of the asked stride but with one of twice it (the
MobileNetV3 FPN has strides 32, 32, 64) serves that level upsampled x2 (bilinear), and says so in
``feature_layer``; any other mismatch is refused naming the strides it has.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")
PREFIX = "torchvision:"
# torchvision's detection transform normalises with ImageNet statistics and pads to multiples of 32.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISOR = 32
# Weight enums by architecture, for the class names and file names of torchvision's published weights.
WEIGHT_ENUMS = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights",
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
}


def parse_arch(spec: str) -> str:
    """``"torchvision:fasterrcnn_resnet50_fpn"`` -> ``"fasterrcnn_resnet50_fpn"``; ValueError naming the choices."""
    name = spec.removeprefix(PREFIX)
    if not spec.startswith(PREFIX) or name not in ARCHS:
        raise ValueError(f"{spec!r} is not a torchvision teacher; expected one of "
                         f"{', '.join(PREFIX + a for a in ARCHS)}")
    return name


@dataclass(frozen=True)
class TorchvisionConfig:
    arch: str  # "torchvision:<name>"
    num_classes: int  # background included
    feature_stride: int = 16
    head: str = "fast-rcnn"
    width: float = 1.0  # no width multiplier: the whole detector

    def __post_init__(self) -> None:
        parse_arch(self.arch)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TorchvisionConfig":
        return cls(**d)


class TorchvisionDetector(nn.Module):
    """A torchvision Faster R-CNN, fed preprocessed batches (its own transform is not used)."""

    def __init__(self, config: TorchvisionConfig) -> None:
        super().__init__()
        from torchvision.models import detection

        self.config = config
        from mimicdet.detection.detector import DetectorConfig

        builder = getattr(detection, parse_arch(config.arch))
        # Training samples as this tool's detector does (torchvision's 512 head regions per image cost a CPU step
        # four times as much); inference keeps torchvision's settings.
        ours = DetectorConfig(num_classes=config.num_classes)
        self.model = builder(weights=None, weights_backbone=None, num_classes=config.num_classes,
                             box_batch_size_per_image=ours.box_batch_size_per_image,
                             rpn_pre_nms_top_n_train=ours.rpn_pre_nms_top_n_train,
                             rpn_post_nms_top_n_train=ours.rpn_post_nms_top_n_train)
        self.feature_channels: int = self.backbone.out_channels
        self.feature_layer, level_stride = self._pick_level(config.feature_stride)
        self._upsample = level_stride // config.feature_stride  # 1, or 2 for a level of twice the stride
        self.feature_stride: int = config.feature_stride

    def _pick_level(self, stride: int) -> tuple[str, int]:
        """The FPN output of ``stride`` (or of ``2·stride``, served upsampled) and its own stride."""
        strides = self.level_strides()
        for want in (stride, 2 * stride):
            level = next((k for k, s in strides.items() if s == want), None)
            if level is not None:
                return level, want
        raise ValueError(f"{self.config.arch} has FPN levels at strides "
                         f"{', '.join(f'{k}: {s}' for k, s in strides.items())}; none at {stride} or {2 * stride} "
                         f"(the student's feature stride); pass --feature-stride with one of them")

    @torch.no_grad()
    def level_strides(self) -> dict[str, int]:
        """FPN output name -> stride, read off one small forward pass."""
        was = self.backbone.training
        self.backbone.eval()
        side = 256
        out = self.backbone(torch.zeros(1, 3, side, side))
        self.backbone.train(was)
        return {k: side // v.shape[-1] for k, v in out.items()}

    # The parts by this tool's names (properties, so the state dict keeps torchvision's keys under "model.").
    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def rpn(self) -> nn.Module:
        return self.model.rpn

    @property
    def head(self) -> nn.Module:
        return self.model.roi_heads

    @property
    def nms_threshold(self) -> float:
        return float(self.rpn.nms_thresh)

    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        return math.ceil(h / self.feature_stride), math.ceil(w / self.feature_stride)

    # --- forward --------------------------------------------------------------------------------------------
    def _features(self, images: Tensor, image_sizes: list[tuple[int, int]]):
        from torchvision.models.detection.image_list import ImageList

        return ImageList(images, [(int(h), int(w)) for h, w in image_sizes]), self.backbone(images)

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):
        """``(detections, losses)``; the losses of torchvision's RPN and box head (same names as this tool's)."""
        image_list, feats = self._features(images, image_sizes)
        proposals, losses = self.rpn(image_list, feats, targets)
        detections, head_losses = self.head(feats, proposals, image_list.image_sizes, targets)
        return detections, losses | head_losses

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes", "scores", "labels", "proposals", "proposal_scores"}`` in eval mode."""
        was = self.training
        self.eval()
        try:
            image_list, feats = self._features(images, image_sizes)
            boxes, scores = self._proposals(image_list, feats)
            dets, _ = self.head(feats, boxes, image_list.image_sizes)
        finally:
            self.train(was)
        for d, b, s in zip(dets, boxes, scores):
            d["proposals"], d["proposal_scores"] = b, s
        return dets

    def _proposals(self, image_list, feats) -> tuple[list[Tensor], list[Tensor]]:
        """The RPN's post-NMS proposals with their objectness (torchvision's ``rpn.forward`` drops the scores)."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.rpn
        maps = list(feats.values())
        objectness, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(image_list, maps)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, image_sizes: list[tuple[int, int]], *, top_k: int) -> list[dict]:
        """What a teacher writes to the feature store, per image (see the module docstring)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        was = self.training
        self.eval()
        try:
            image_list, feats = self._features(images, image_sizes)
            boxes, scores = self._proposals(image_list, feats)
            boxes, scores = [b[:top_k] for b in boxes], [s[:top_k] for s in scores]
            head = self.head
            pooled = head.box_head(head.box_roi_pool(feats, boxes, image_list.image_sizes))
            logits, deltas = head.box_predictor(pooled)
        finally:
            self.train(was)
        level = feats[self.feature_layer]
        if self._upsample > 1:
            level = F.interpolate(level, scale_factor=self._upsample, mode="bilinear", align_corners=False)
        counts = [len(b) for b in boxes]
        out = []
        for i, (lg, dl) in enumerate(zip(logits.split(counts), deltas.split(counts))):
            fh, fw = self.feature_size(*image_list.image_sizes[i])
            out.append({"features": level[i, :, :fh, :fw].contiguous(), "proposals": boxes[i], "scores": scores[i],
                        "class_logits": lg, "box_deltas": dl})
        return out

    def describe_layer(self) -> str:
        """The manifest's ``feature_layer``: the FPN output and, when resampled, how."""
        up = f" upsampled x{self._upsample}" if self._upsample > 1 else ""
        return f"fpn.{self.feature_layer} (stride {self.feature_stride * self._upsample}){up}"

    def param_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        counts = {"backbone": count(self.backbone), "rpn": count(self.rpn), "head": count(self.head)}
        counts["total"] = sum(counts.values())
        return counts

    def load_torchvision_state(self, state: dict[str, Tensor], source: str) -> None:
        """Weights in torchvision's own layout (``backbone.*``, ``rpn.*``, ``roi_heads.*``). Frozen batch norm
        (torchvision's COCO weights) has no ``num_batches_tracked``: that is the only gap allowed."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        bad = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ValueError(
                f"{source}: not {self.config.arch} weights with {self.config.num_classes} classes: missing keys "
                f"{missing[:4]} ({len(missing)}), unexpected keys {unexpected[:4]} ({len(unexpected)}), shape "
                f"mismatches {[f'{k}: {list(state[k].shape)} != {list(own[k].shape)}' for k in bad[:3]]}")
        self.model.load_state_dict(state, strict=False)


def load_init_weights(model: TorchvisionDetector, path) -> int:
    """Start ``model`` from a file in torchvision's layout: a whole detector (its box predictor is kept only when
    the class count matches), or a classification backbone (ResNet-50 / MobileNetV3 ImageNet weights) for the
    backbone body. Returns how many tensors were loaded; ValueError when none fit."""
    from mimicdet.detection.checkpoints import load_weights_only

    state = load_weights_only(path, what="torchvision state dict")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith("backbone.") for k in state):
        target, own = model.model, model.model.state_dict()
    else:  # a classifier: ResNet keys match the body's; MobileNetV3's sit under "features."
        target, own = model.backbone.body, model.backbone.body.state_dict()
        state = {k.removeprefix("features."): v for k, v in state.items()}
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise ValueError(f"--init-from {path}: no tensor fits {model.config.arch} (expected torchvision's layout)")
    target.load_state_dict(fits, strict=False)
    return len(fits)


def num_classes_of(state: dict[str, Tensor]) -> int:
    """Classes (background included) of a torchvision Faster R-CNN state dict, from its box predictor."""
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ValueError(f"no {key}: not a torchvision Faster R-CNN state dict")
    return int(state[key].shape[0])


def coco_categories(arch: str) -> list[str] | None:
    """torchvision's class names for its COCO weights of ``arch`` (background first), from the installed
    package (nothing is downloaded)."""
    from torchvision.models.detection import faster_rcnn

    enum = getattr(faster_rcnn, WEIGHT_ENUMS[parse_arch(PREFIX + arch.removeprefix(PREFIX))])
    return list(enum.DEFAULT.meta["categories"])


def published_weights_file(arch: str, name: str):
    """Where torchvision's cache keeps its published weights ``name`` (e.g. ``COCO_V1``) of ``arch``, and their
    download address: ``(path, url)``."""
    from pathlib import Path

    from torchvision.models.detection import faster_rcnn

    enum = getattr(faster_rcnn, WEIGHT_ENUMS[parse_arch(PREFIX + arch.removeprefix(PREFIX))])
    try:
        weights = enum[name]
    except KeyError:
        raise ValueError(f"{arch} has no published weights {name!r}; torchvision's are "
                         f"{', '.join(w.name for w in enum)} (or give a file)") from None
    url = weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url
