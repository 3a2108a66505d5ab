"""The detector family: width-``w`` Inception backbone -> RPN -> optional box head, and its checkpoints.

Shapes: images ``Tensor[N, 3, H, W]``, already normalised and padded (no resizing here); ``image_sizes`` the
valid ``(h_i, w_i)`` of each image; feature map ``Tensor[N, C, ceil(H/16), ceil(W/16)]`` with ``C = 832·w``
(twice the size, stride 8, with ``upsample``); proposals ``list[Tensor[R_i, 4]]`` and boxes x1y1x2y2 in input
pixels; ``K`` classes including background (label 0); head outputs ``[R, K]`` logits, ``[R, 4K]`` deltas.

``forward`` returns ``(DetectorOutputs, dict of named losses)`` in every mode; ``predict`` returns detections.
Precomputed proposals (e.g. a teacher's) are an ordinary input that replaces the RPN's for the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimicdet.data.errors import DataError
from mimicdet.data.paths import atomic_path
from mimicdet.detection.anchors import DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS
from mimicdet.detection.backbone import InceptionBackbone
from mimicdet.detection.heads import HEAD_KINDS, BoxHead, BoxHeadConfig, build_box_head
from mimicdet.detection.rpn import RPN, RPNConfig, default_rpn_channels

HEADS = (*HEAD_KINDS, "none")


@dataclass(frozen=True)
class DetectorConfig:
    num_classes: int  # including background
    width: float = 1.0
    head: str = "fast-rcnn"  # "fast-rcnn" | "rfcn" | "none" (backbone + RPN only: stage-1 student)
    rpn_channels: int | None = None  # None -> min(feature channels, 256)
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_batch_size_per_image: int = 128
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    upsample: bool = False  # scale mimic: learned x2 deconvolution after the backbone -> stride 8
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    rfcn_k: int = 7  # R-FCN position-sensitive grid k x k

    def __post_init__(self) -> None:
        # Normalise sequences so a config read back from JSON compares equal to the original.
        object.__setattr__(self, "anchor_sizes", tuple(int(s) for s in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes counts background and must be an int >= 2, got {self.num_classes!r}")
        if not (self.width > 0 and math.isfinite(self.width)):
            raise ValueError(f"width must be a positive number, got {self.width!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.rpn_channels is not None and self.rpn_channels < 1:
            raise ValueError(f"rpn_channels must be >= 1 or None, got {self.rpn_channels!r}")
        if not self.anchor_sizes or min(self.anchor_sizes) <= 0:
            raise ValueError(f"anchor_sizes must be positive pixel sizes, got {self.anchor_sizes!r}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ValueError(f"aspect_ratios (height/width) must be positive, got {self.aspect_ratios!r}")
        if self.rfcn_k < 1:
            raise ValueError(f"rfcn_k must be >= 1, got {self.rfcn_k!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for tuples), as stored in checkpoints."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"detector config: unknown fields {unknown}; known fields are {sorted(known)}")
        if "num_classes" not in d:
            raise ValueError("detector config: missing field 'num_classes'")
        return cls(**d)


@dataclass
class DetectorOutputs:
    features: Tensor  # [N, C, h, w]: the map the mimic loss reads (after the x2 deconv when upsample=True)
    proposals: list[Tensor]  # per image [R_i, 4] input pixels, sorted by score (the RPN's); empty when training without a head
    proposal_scores: list[Tensor]  # per image [R_i] objectness (sigmoid)
    class_logits: Tensor | None  # [sum R'_i, K] on head_proposals; None when head="none"
    box_deltas: Tensor | None  # [sum R'_i, 4K]
    head_proposals: list[Tensor] | None = None  # per image [R'_i, 4]: what the head scored (sampled in training)
    head_labels: list[Tensor] | None = None  # per image [R'_i] int64 sampled training labels, when targets given


def _upsampler(channels: int) -> nn.ConvTranspose2d:
    """Learned x2 depthwise deconvolution, initialised to bilinear interpolation.

    Depthwise keeps it at 16 parameters per channel (a full C x C 4x4 deconvolution would outweigh a small
    student); channel mixing is the mimic transform's job.
    """
    up = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1, groups=channels, bias=False)
    k = torch.tensor([0.25, 0.75, 0.75, 0.25])  # 1-D bilinear kernel for factor 2
    with torch.no_grad():
        up.weight.copy_((k[:, None] * k[None, :]).expand(channels, 1, 4, 4))
    return up


class Detector(nn.Module):
    """Backbone (+ x2 deconv) -> RPN -> box head, see the module docstring for shapes."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = InceptionBackbone(width=config.width)
        c = self.backbone.out_channels
        self.upsample: nn.Module | None = _upsampler(c) if config.upsample else None
        self.feature_channels: int = c
        self.feature_stride: int = self.backbone.stride // (2 if config.upsample else 1)
        self.rpn = RPN(
            config=RPNConfig(
                in_channels=c,
                stride=self.feature_stride,
                mid_channels=config.rpn_channels if config.rpn_channels is not None else default_rpn_channels(c),
                anchor_sizes=config.anchor_sizes,
                aspect_ratios=config.aspect_ratios,
                pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
                post_nms_top_n_train=config.rpn_post_nms_top_n_train,
                pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
                post_nms_top_n_test=config.rpn_post_nms_top_n_test,
                nms_thresh=config.rpn_nms_thresh,
                fg_iou_thresh=config.rpn_fg_iou_thresh,
                bg_iou_thresh=config.rpn_bg_iou_thresh,
                batch_size_per_image=config.rpn_batch_size_per_image,
                positive_fraction=config.rpn_positive_fraction,
            )
        )
        self.head: BoxHead | None = None
        if config.head != "none":
            self.head = build_box_head(
                BoxHeadConfig(
                    kind=config.head,
                    in_channels=c,
                    stride=self.feature_stride,
                    num_classes=config.num_classes,
                    width=config.width,
                    rfcn_k=config.rfcn_k,
                    fg_iou_thresh=config.box_fg_iou_thresh,
                    bg_iou_thresh=config.box_bg_iou_thresh,
                    batch_size_per_image=config.box_batch_size_per_image,
                    positive_fraction=config.box_positive_fraction,
                    score_thresh=config.box_score_thresh,
                    nms_thresh=config.box_nms_thresh,
                    detections_per_img=config.detections_per_img,
                )
            )

    # --- geometry -------------------------------------------------------------------------------------------
    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        """Cells whose centre lies inside an ``h x w`` image: ``(ceil(h/stride), ceil(w/stride))``.

        This is also the full map size of an unpadded ``h x w`` input when ``upsample`` is off (with it, the map
        of such an input is ``2·ceil(h/16)``, which exceeds ``ceil(h/8)`` by one cell when ``h mod 16`` is in 1..8).
        """
        return math.ceil(h / self.feature_stride), math.ceil(w / self.feature_stride)

    # --- forward --------------------------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        """``Tensor[N, 3, H, W] -> Tensor[N, C, h, w]``: backbone, then the x2 deconvolution when configured."""
        x = self.backbone(images)
        return self.upsample(x) if self.upsample is not None else x

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        proposals: list[Tensor] | None = None,
    ) -> tuple[DetectorOutputs, dict[str, Tensor]]:
        """Losses ``loss_objectness``, ``loss_rpn_box_reg`` (+ ``loss_classifier``, ``loss_box_reg`` with a head)
        whenever ``targets`` are given; targets are required in training mode. ``proposals`` given here replace
        the RPN's as the head's input (the RPN still runs and still gives its losses)."""
        _check_images(images, image_sizes)
        return self.run_from_features(self.features(images), image_sizes, targets, proposals)

    def run_from_features(
        self,
        features: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        proposals: list[Tensor] | None = None,
    ) -> tuple[DetectorOutputs, dict[str, Tensor]]:
        """Same as :meth:`forward` from a feature map already computed by :meth:`features`."""
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        if len(image_sizes) != features.shape[0]:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for {features.shape[0]} images")
        if self.training and targets is None:
            raise ValueError(
                "Detector in training mode needs targets: per image {'boxes': float[M,4], 'labels': int64[M]}"
            )
        if targets is not None:
            _check_targets(targets, len(image_sizes), self.config.num_classes)
        if proposals is not None:
            _check_proposals(proposals, len(image_sizes))
        # Training without a head needs only the RPN losses, not its proposals.
        need_proposals = self.head is not None or not self.training
        rpn_boxes, rpn_scores, losses = self.rpn(features, image_sizes, targets, need_proposals=need_proposals)
        logits = deltas = head_props = head_labels = None
        if self.head is not None:
            head_in = proposals if proposals is not None else rpn_boxes
            out, head_losses = self.head(features, head_in, image_sizes, targets)
            losses.update(head_losses)
            logits, deltas, head_props, head_labels = out.class_logits, out.box_deltas, out.proposals, out.labels
        outputs = DetectorOutputs(
            features=features,
            proposals=rpn_boxes,
            proposal_scores=rpn_scores,
            class_logits=logits,
            box_deltas=deltas,
            head_proposals=head_props,
            head_labels=head_labels,
        )
        return outputs, losses

    def head_outputs(
        self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Raw head outputs on the given proposals: logits ``[sum R_i, K]``, deltas ``[sum R_i, 4K]``."""
        if self.head is None:
            raise ValueError("head_outputs needs a detector with a box head; this one has head='none'")
        _check_proposals(proposals, features.shape[0])
        return self.head.raw_outputs(features, proposals, image_sizes)

    # --- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self, images: Tensor, image_sizes: list[tuple[int, int]], proposals: list[Tensor] | None = None
    ) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes" [D,4], "scores" [D], "labels" [D] int64, "proposals" [R,4], "proposal_scores" [R]}``,
        computed in eval mode (the module's mode is restored afterwards). With ``head="none"`` the detections are
        the proposals themselves, label 1."""
        with _eval_mode(self):
            out, _ = self.forward(images, image_sizes, proposals=proposals)
            if self.head is None:
                dets = [
                    {"boxes": p, "scores": s, "labels": torch.ones(len(p), dtype=torch.int64, device=p.device)}
                    for p, s in zip(out.proposals, out.proposal_scores)
                ]
            else:
                assert out.class_logits is not None and out.box_deltas is not None and out.head_proposals is not None
                dets = self.head.postprocess(out.class_logits, out.box_deltas, out.head_proposals, image_sizes)
        for d, p, s in zip(dets, out.proposals, out.proposal_scores):
            d["proposals"] = p
            d["proposal_scores"] = s
        return dets

    @torch.no_grad()
    def teacher_outputs(
        self, images: Tensor, image_sizes: list[tuple[int, int]], *, top_k: int
    ) -> list[dict[str, Tensor]]:
        """What a teacher writes to the feature store, per image, in eval mode:
        ``"features"`` ``[C, ceil(h_i/stride), ceil(w_i/stride)]`` (the valid area), ``"proposals"`` ``[k, 4]`` and
        ``"scores"`` ``[k]`` (the RPN's top ``k <= top_k``), ``"class_logits"`` ``[k, K]`` and ``"box_deltas"``
        ``[k, 4K]`` of the head on those proposals (``[k, 0]`` when ``head="none"``)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        _check_images(images, image_sizes)
        with _eval_mode(self):
            feats = self.features(images)
            sizes = [(int(h), int(w)) for h, w in image_sizes]
            boxes, scores, _ = self.rpn(feats, sizes)
            boxes, scores = [b[:top_k] for b in boxes], [s[:top_k] for s in scores]
            if self.head is not None:
                logits, deltas = self.head.raw_outputs(feats, boxes, sizes)
            else:
                logits = deltas = feats.new_zeros((sum(len(b) for b in boxes), 0))
        counts = [len(b) for b in boxes]
        result = []
        for i, (lg, dl) in enumerate(zip(logits.split(counts), deltas.split(counts))):
            fh, fw = self.feature_size(*sizes[i])
            result.append(
                {
                    "features": feats[i, :, :fh, :fw].contiguous(),
                    "proposals": boxes[i],
                    "scores": scores[i],
                    "class_logits": lg,
                    "box_deltas": dl,
                }
            )
        return result

    def param_counts(self) -> dict[str, int]:
        """Parameters of ``backbone`` (with the x2 deconvolution when present), ``rpn``, ``head`` and ``total``."""
        count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
        counts = {
            "backbone": count(self.backbone) + count(self.upsample),
            "rpn": count(self.rpn),
            "head": count(self.head),
        }
        counts["total"] = sum(counts.values())
        return counts


class _eval_mode:
    """Context manager: eval mode inside, the previous mode restored after. A model already wholly in eval mode
    is left alone (setting the mode walks every module twice: a fixed cost of every small-image predict)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training
        self.switch = any(m.training for m in module.modules())

    def __enter__(self) -> None:
        if self.switch:
            self.module.eval()

    def __exit__(self, *exc: object) -> None:
        if self.switch:
            self.module.train(self.was_training)


def _check_images(images: Tensor, image_sizes: list[tuple[int, int]]) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be Tensor[N,3,H,W], got {shape}")
    n, _, H, W = images.shape
    if len(image_sizes) != n:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for {n} images")
    for i, (h, w) in enumerate(image_sizes):
        if not (0 < h <= H and 0 < w <= W):
            raise ValueError(f"image_sizes[{i}] = {(h, w)} must lie within the padded input size {(H, W)}")


def _check_targets(targets: list[dict[str, Tensor]], n: int, num_classes: int) -> None:
    if len(targets) != n:
        raise ValueError(f"targets has {len(targets)} entries for {n} images")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must have 'boxes' and 'labels', got keys {sorted(t)}")
        b, lab = t["boxes"], t["labels"]
        if not b.is_floating_point() or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be float[M,4], got {b.dtype}{list(b.shape)}")
        if lab.dtype != torch.int64 or lab.shape != (b.shape[0],):
            raise ValueError(f"targets[{i}]['labels'] must be int64[{b.shape[0]}], got {lab.dtype}{list(lab.shape)}")
        if lab.numel() and (lab.min() < 1 or lab.max() >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must lie in 1..{num_classes - 1}, got {lab.tolist()}")
        if b.numel() and ((b[:, 2:] <= b[:, :2]).any()):
            bad = b[(b[:, 2:] <= b[:, :2]).any(dim=1)][0].tolist()
            raise ValueError(f"targets[{i}]['boxes'] has a box without positive width and height: {bad}")


def _check_proposals(proposals: list[Tensor], n: int) -> None:
    if len(proposals) != n:
        raise ValueError(f"proposals has {len(proposals)} entries for {n} images")
    for i, p in enumerate(proposals):
        if p.dim() != 2 or p.shape[1] != 4:
            raise ValueError(f"proposals[{i}] must be Tensor[R,4] x1y1x2y2, got {list(p.shape)}")


# --- building and checkpoints ---------------------------------------------------------------------------------
def build_detector(config: DetectorConfig) -> Detector:
    return Detector(config)


def _build_from_config(config: dict[str, Any]) -> nn.Module:
    """This tool's detector, or a torchvision one (``"arch": "torchvision:NAME"``) from a checkpoint's config."""
    if isinstance(config, dict) and str(config.get("arch", "")).startswith("torchvision:"):
        from mimicdet.detection.torchvision_detector import TorchvisionConfig, TorchvisionDetector

        return TorchvisionDetector(TorchvisionConfig.from_dict(config))
    return Detector(DetectorConfig.from_dict(config))


def save_detector(path: str | Path, model: Detector, meta: dict[str, Any] | None = None) -> None:
    """Write ``{"model": state_dict, "detector_config": config.to_dict(), "meta": meta}`` atomically
    (temporary file in the same folder, then ``os.replace``). ``meta`` must hold plain types only."""
    payload = {"model": model.state_dict(), "detector_config": model.config.to_dict(), "meta": dict(meta or {})}
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_detector`; returns ``(detector, meta)``.

    Raises ``FileNotFoundError`` for a missing file and ``DataError`` naming the file and the offending keys for a
    checkpoint that is not of this form or whose weights do not fit its config."""
    from mimicdet.detection.checkpoints import load_weights_only

    path = Path(path)
    ckpt = load_weights_only(path, what="detector checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "detector_config" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{path}: expected a dict with 'model' and 'detector_config', got {keys}")
    try:
        model = _build_from_config(ckpt["detector_config"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: field 'detector_config': {e}") from None
    config = model.config
    state = ckpt["model"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise DataError(
            f"{path}: field 'model' does not fit its detector_config "
            f"(width {config.width}, head {config.head!r}, {config.num_classes} classes): "
            f"missing keys {missing[:6]} ({len(missing)}), unexpected keys {unexpected[:6]} ({len(unexpected)}), "
            f"shape mismatches {[f'{k}: {list(state[k].shape)} != {list(own[k].shape)}' for k in bad[:4]]}"
        )
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    meta = ckpt.get("meta", {})
    return model, dict(meta) if isinstance(meta, dict) else {"meta": meta}


__all__ = [
    "DetectorConfig",
    "DetectorOutputs",
    "Detector",
    "build_detector",
    "save_detector",
    "load_detector",
]
