"""Second-stage box heads on one feature map: Fast R-CNN (RoIAlign + MLP) and R-FCN (position-sensitive maps).

Shapes: features ``Tensor[N, C, h, w]`` at ``stride``; proposals ``list[Tensor[R_i, 4]]`` x1y1x2y2 in input
pixels; ``K`` classes including background (label 0); raw outputs on ``R = sum R_i`` regions, concatenated in
image order: class logits ``Tensor[R, K]`` and class-specific box deltas ``Tensor[R, 4K]`` (``BoxCoder``
weights 10, 10, 5, 5 relative to the proposal).

Training and inference reuse torchvision's ``RoIHeads`` (GT appended to the proposals, ``Matcher``,
``BalancedPositiveNegativeSampler``, ``fastrcnn_loss``, ``postprocess_detections``). Every head exposes
``raw_outputs(features, proposals, image_sizes)`` so a caller can read its logits and deltas on proposals it
chooses (e.g. a teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import batched_nms, ps_roi_align, roi_align

from mimicdet.detection.backbone import scaled

HEAD_KINDS = ("fast-rcnn", "rfcn")


@dataclass(frozen=True)
class BoxHeadConfig:
    kind: str  # "fast-rcnn" | "rfcn"
    in_channels: int
    stride: int
    num_classes: int  # including background
    width: float = 1.0  # hidden sizes scale with the backbone's width multiplier
    rfcn_k: int = 7  # R-FCN: k x k position-sensitive bins
    roi_size: int = 7  # Fast R-CNN: RoIAlign output size
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class HeadOutputs:
    proposals: list[Tensor]  # per image [R_i, 4]: the regions the head scored (sampled in training)
    class_logits: Tensor  # [R, K]
    box_deltas: Tensor  # [R, 4K]
    labels: list[Tensor] | None = None  # per image [R_i] int64 training labels (0 = background), when sampled


class BoxHead(RoIHeads):
    """Common sampling, loss and post-processing; subclasses define :meth:`raw_outputs`.

    ``forward(features, proposals, image_sizes, targets=None) -> (HeadOutputs, losses)``: with targets, GT boxes
    are appended to the proposals, a balanced sample is drawn and ``{"loss_classifier", "loss_box_reg"}``
    returned (an image without boxes has only background samples, hence zero box loss); without targets the
    head scores every proposal. Targets are required in training mode.
    """

    def __init__(self, *, config: BoxHeadConfig) -> None:
        super().__init__(
            box_roi_pool=None,
            box_head=None,
            box_predictor=None,
            fg_iou_thresh=config.fg_iou_thresh,
            bg_iou_thresh=config.bg_iou_thresh,
            batch_size_per_image=config.batch_size_per_image,
            positive_fraction=config.positive_fraction,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=config.score_thresh,
            nms_thresh=config.nms_thresh,
            detections_per_img=config.detections_per_img,
        )
        self.config = config
        self.num_classes = config.num_classes

    def raw_outputs(
        self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits ``[R, K]`` and box deltas ``[R, 4K]`` on the given proposals."""
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self,
        features: Tensor,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[HeadOutputs, dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("box head in training mode needs targets (per image {'boxes', 'labels'})")
        proposals = [p.detach() for p in proposals]  # proposals are inputs, never trained through
        labels = None
        if targets is not None:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        logits, deltas = self.raw_outputs(features, proposals, image_sizes)
        losses: dict[str, Tensor] = {}
        if labels is not None:
            if logits.shape[0] == 0:  # no proposals and no GT anywhere: nothing to learn from
                zero = logits.sum() + deltas.sum()
                losses = {"loss_classifier": zero, "loss_box_reg": zero}
            else:
                loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, regression_targets)
                losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        return HeadOutputs(proposals=proposals, class_logits=logits, box_deltas=deltas, labels=labels), losses

    def postprocess(
        self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Softmax, class-specific decoding, clipping, score threshold, per-class NMS, top detections_per_img."""
        boxes, scores, labels = self.postprocess_detections(
            class_logits.float(), box_deltas.float(), [p.float() for p in proposals], list(image_sizes)
        )
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]

    def postprocess_batched(
        self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Same detections as :meth:`postprocess` with the filters run on the whole batch at once.

        Decoding, softmax, clipping, the score and small-box filters treat all ``R`` regions together; only
        torchvision's ``batched_nms`` runs per image, on exactly the rows the per-image path gives it (its class
        offsets depend on each image's largest coordinate, so one call over the batch would round differently).
        """
        (r, k), n = class_logits.shape, len(proposals)
        if r == 0:  # nothing to filter (and torchvision's path has its own empty-tensor shapes)
            return self.postprocess(class_logits, box_deltas, proposals, image_sizes)
        counts = torch.tensor([len(p) for p in proposals], device=class_logits.device)
        boxes = self.box_coder.decode(box_deltas.float(), [p.float() for p in proposals])  # [R, K, 4]
        scores = F.softmax(class_logits.float(), -1)
        sizes = torch.tensor(list(image_sizes), dtype=boxes.dtype, device=boxes.device)  # [N, 2] (h, w)
        limits = sizes.flip(1).repeat(1, 2).repeat_interleave(counts, dim=0).unsqueeze(1)  # [R, 1, 4]
        boxes = torch.minimum(boxes.clamp(min=0), limits)[:, 1:].reshape(-1, 4)  # background dropped
        scores = scores[:, 1:].reshape(-1)
        labels = torch.arange(1, k, device=boxes.device).repeat(r)  # (region, class) order, as torchvision
        image = torch.arange(n, device=boxes.device).repeat_interleave(counts * (k - 1))
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (scores > self.score_thresh) & (wh >= 1e-2).all(dim=1)  # torchvision's thresholds
        per_image = torch.bincount(image[keep], minlength=n).tolist()
        out = []
        for b, s, lab in zip(*(t[keep].split(per_image) for t in (boxes, scores, labels))):
            top = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[top], "scores": s[top], "labels": lab[top]})
        return out


def _pool_inputs(x: Tensor, proposals: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Map and boxes in one dtype for torchvision's RoI ops; half-precision maps are pooled in float32 (boxes
    in fp16 would lose up to half a pixel at 1000+ px, and not every RoI op has an autocast rule)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x, [p.to(x.dtype) for p in proposals]


def _init_predictors(cls: nn.Module, box: nn.Module) -> None:
    # Small initial outputs: near-uniform class scores, near-zero deltas (the proposals themselves).
    nn.init.normal_(cls.weight, std=0.01)
    nn.init.normal_(box.weight, std=0.001)
    nn.init.zeros_(cls.bias)
    nn.init.zeros_(box.bias)


class FastRCNNHead(BoxHead):
    """1x1 conv ``C -> 128w`` + ReLU on the map, RoIAlign ``7x7``, two FC layers of ``512w``, then class logits
    ``K`` and class-specific deltas ``4K``. Reducing channels before pooling keeps the first FC layer small
    (torchvision's 1024-wide MLP on an 832-channel map would hold 42M parameters)."""

    def __init__(self, *, config: BoxHeadConfig) -> None:
        super().__init__(config=config)
        reduced = scaled(128, config.width)
        hidden = scaled(512, config.width)
        self.reduce = nn.Conv2d(config.in_channels, reduced, kernel_size=1)
        self.fc6 = nn.Linear(reduced * config.roi_size**2, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.cls_score = nn.Linear(hidden, config.num_classes)
        self.bbox_pred = nn.Linear(hidden, 4 * config.num_classes)
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.reduce.bias)
        _init_predictors(self.cls_score, self.bbox_pred)

    def raw_outputs(
        self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        x, rois = _pool_inputs(torch.relu(self.reduce(features)), proposals)
        x = roi_align(
            x,
            rois,
            output_size=self.config.roi_size,
            spatial_scale=1.0 / self.config.stride,
            sampling_ratio=2,
            aligned=False,  # cell (i, j) sits at pixel stride*(i, j), see detection.backbone
        )
        x = torch.relu(self.fc6(x.flatten(1)))
        x = torch.relu(self.fc7(x))
        return self.cls_score(x), self.bbox_pred(x)


class RFCNHead(BoxHead):
    """1x1 conv ``C -> 512w`` + ReLU, then 1x1 convs to ``k·k·K`` class and ``k·k·4K`` box score maps;
    position-sensitive RoIAlign into ``k x k`` bins and an average vote give ``[R, K]`` and ``[R, 4K]``."""

    def __init__(self, *, config: BoxHeadConfig) -> None:
        super().__init__(config=config)
        k, K = config.rfcn_k, config.num_classes
        reduced = scaled(512, config.width)
        self.reduce = nn.Conv2d(config.in_channels, reduced, kernel_size=1)
        self.cls_maps = nn.Conv2d(reduced, k * k * K, kernel_size=1)
        self.box_maps = nn.Conv2d(reduced, k * k * 4 * K, kernel_size=1)
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.reduce.bias)
        _init_predictors(self.cls_maps, self.box_maps)

    def raw_outputs(
        self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        k, scale = self.config.rfcn_k, 1.0 / self.config.stride
        x = torch.relu(self.reduce(features))
        # ps_roi_align: output channel c, bin (i, j) reads input channel (c*k + i)*k + j.
        cls_maps, boxes = _pool_inputs(self.cls_maps(x), proposals)
        box_maps, _ = _pool_inputs(self.box_maps(x), proposals)
        cls = ps_roi_align(cls_maps, boxes, output_size=k, spatial_scale=scale, sampling_ratio=2)
        box = ps_roi_align(box_maps, boxes, output_size=k, spatial_scale=scale, sampling_ratio=2)
        return cls.mean(dim=(2, 3)), box.mean(dim=(2, 3))


def build_box_head(config: BoxHeadConfig) -> BoxHead:
    if config.kind == "fast-rcnn":
        return FastRCNNHead(config=config)
    if config.kind == "rfcn":
        return RFCNHead(config=config)
    raise ValueError(f"box head kind must be one of {HEAD_KINDS}, got {config.kind!r}")
