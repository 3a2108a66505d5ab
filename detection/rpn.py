"""Region proposal network on one feature map, built from torchvision's RPN parts.

Shapes: features ``Tensor[N, C, h, w]`` at a fixed ``stride`` (16, or 8 after the x2 deconvolution);
``A = len(sizes)·len(aspect_ratios)`` anchors per cell; proposals ``list[Tensor[R_i, 4]]`` x1y1x2y2 in input
pixels, sorted by objectness, with scores ``list[Tensor[R_i]]`` (sigmoid probabilities).

Eval-mode post-processing of a whole batch at once (:func:`filter_proposals_batched`, used by the lean copy of
:mod:`detection.lean`) gives the same proposals as torchvision's per-image ``filter_proposals``.

Aspect ratio means height / width (torchvision's convention). Anchor centres are ``stride·(i, j)``, which is
where the backbone's feature cell ``(i, j)`` is centred (see ``detection.backbone``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import nms

from mimicdet.detection.anchors import DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS


def default_rpn_channels(in_channels: int) -> int:
    """Width of the RPN's 3x3 conv: ``min(in_channels, 256)`` (torchvision keeps ``in_channels``, which on an
    832-channel map costs 6.2M parameters, more than the whole backbone)."""
    return min(in_channels, 256)


class FixedStrideAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` for one map with a known stride.

    torchvision derives the stride as ``padded_size // grid_size``, which is wrong whenever the padded size is
    not a multiple of the stride (a 250-pixel side gives a 16-cell map and a "stride" of 15). Here it is given.
    """

    def __init__(self, *, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...], stride: int) -> None:
        super().__init__(sizes=(tuple(sizes),), aspect_ratios=(tuple(aspect_ratios),))
        self.stride = int(stride)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        s = torch.tensor(self.stride, dtype=torch.int64, device=device)
        # Anchors stay float32 even under fp16 autocast: pixel coordinates up to ~2000 need the precision.
        dtype = torch.float64 if feature_maps[0].dtype == torch.float64 else torch.float32
        self.set_cell_anchors(dtype, device)
        per_map = self.grid_anchors(grid_sizes, [[s, s] for _ in grid_sizes])
        anchors = torch.cat(per_map)
        return [anchors for _ in image_list.image_sizes]


class LightRPNHead(nn.Module):
    """3x3 conv ``in -> mid`` + ReLU, then 1x1 objectness (``A``) and 1x1 box deltas (``4A``).

    Same interface as torchvision's ``RPNHead``: ``forward(list[Tensor[N,C,h,w]]) -> (logits, deltas)``.
    """

    def __init__(self, *, in_channels: int, mid_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(mid_channels, 4 * num_anchors, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = torch.relu(self.conv(feature))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


@dataclass(frozen=True)
class RPNConfig:
    in_channels: int
    stride: int
    mid_channels: int | None = None  # None -> default_rpn_channels(in_channels)
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    pre_nms_top_n_train: int = 1000
    post_nms_top_n_train: int = 300
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


class RPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` on a single map, returning proposal scores too.

    ``forward(features, image_sizes, targets=None) -> (proposals, scores, losses)``; losses
    ``{"loss_objectness", "loss_rpn_box_reg"}`` are computed whenever ``targets`` are given (training or not)
    and are required in training mode. Pre/post-NMS top-N follow the module's train/eval mode.
    """

    def __init__(self, *, config: RPNConfig) -> None:
        mid = config.mid_channels if config.mid_channels is not None else default_rpn_channels(config.in_channels)
        anchors = FixedStrideAnchorGenerator(
            sizes=config.anchor_sizes, aspect_ratios=config.aspect_ratios, stride=config.stride
        )
        head = LightRPNHead(
            in_channels=config.in_channels, mid_channels=mid, num_anchors=anchors.num_anchors_per_location()[0]
        )
        super().__init__(
            anchors,
            head,
            fg_iou_thresh=config.fg_iou_thresh,
            bg_iou_thresh=config.bg_iou_thresh,
            batch_size_per_image=config.batch_size_per_image,
            positive_fraction=config.positive_fraction,
            pre_nms_top_n={"training": config.pre_nms_top_n_train, "testing": config.pre_nms_top_n_test},
            post_nms_top_n={"training": config.post_nms_top_n_train, "testing": config.post_nms_top_n_test},
            nms_thresh=config.nms_thresh,
        )
        self.config = config

    def forward(  # type: ignore[override]
        self,
        features: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        need_proposals: bool = True,
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """``need_proposals=False`` skips decoding, top-N and NMS (empty proposal lists): a stage-1 student
        trains on the losses alone, and proposal filtering was about a fifth of its step."""
        if self.training and targets is None:
            raise ValueError("RPN in training mode needs targets (per image {'boxes', 'labels'})")
        # Anchors depend only on the grid and the fixed stride; the ImageList carries the image sizes.
        image_list = ImageList(features, list(image_sizes))
        objectness, deltas = self.head([features])
        anchors = self.anchor_generator(image_list, [features])
        num_images = features.shape[0]
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        # Proposals do not backprop into the RPN's regression (Faster R-CNN's approximate joint training).
        boxes: list[Tensor] = []
        scores: list[Tensor] = []
        if need_proposals:
            proposals = self.box_coder.decode(deltas.detach().to(anchors[0].dtype), anchors).view(num_images, -1, 4)
            boxes, scores = self.filter_proposals(proposals, objectness, image_list.image_sizes, num_anchors_per_level)

        losses: dict[str, Tensor] = {}
        if targets is not None:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, scores, losses


# --- batched eval-mode post-processing (the lean inference path) -------------------------------------------------
def nms_first(boxes: Tensor, scores: Tensor, iou_threshold: float, top_n: int) -> Tensor:
    """``nms(boxes, scores, iou_threshold)[:top_n]``, usually from a prefix of the list only.

    ``scores [R]`` must already be in non-increasing order (``topk``'s). Greedy NMS decides a box from the boxes
    ranked above it alone, so NMS on the first ``L`` boxes keeps exactly the boxes the full run keeps among them:
    when that is ``top_n`` boxes, the rest of the list cannot change the answer. ``L = 2·top_n`` first (NMS costs
    O(L²): 1000 RPN candidates and 300 proposals cost a third), the whole list when that keeps too few.
    """
    n = boxes.shape[0]
    prefix = 2 * top_n
    if prefix < n:
        keep = nms(boxes[:prefix], scores[:prefix], iou_threshold)
        if keep.numel() >= top_n:
            return keep[:top_n]
    return nms(boxes, scores, iou_threshold)[:top_n]


def filter_proposals_batched(
    proposals: Tensor,
    logits: Tensor,
    image_sizes: list[tuple[int, int]],
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """Eval-mode proposals of a one-map RPN for a batch: ``proposals [N, A, 4]`` decoded boxes and ``logits
    [N, A]`` objectness -> per image ``[R_i, 4]`` boxes and ``[R_i]`` sigmoid scores, by objectness.

    Top-``pre_nms_top_n`` by objectness, clipping to each image, small-box and score filters run on the whole
    batch; only NMS runs per image (one call each: a single call over the batch with offset boxes would scan
    every image's boxes for each kept one, O((N·k)²), and the offsets change the IoUs' rounding). Same result as
    torchvision's ``filter_proposals`` with one level: its ``batched_nms`` of up to 1000 boxes is plain NMS (the
    coordinate trick with a zero offset), and above that is mirrored here.
    """
    n, a = logits.shape
    k = min(pre_nms_top_n, a)
    top, idx = logits.topk(k, dim=1)  # sorted, as torchvision's per-level topk
    boxes = proposals.gather(1, idx.unsqueeze(-1).expand(n, k, 4))
    scores = torch.sigmoid(top)
    sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # [N, 2] (h, w)
    limits = sizes.flip(1).repeat(1, 2).unsqueeze(1)  # [N, 1, 4]: (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), limits)  # clip_boxes_to_image's clamp(0, side)
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (wh >= min_size).all(dim=-1) & (scores >= score_thresh)
    all_valid = bool(valid.all())
    out_boxes, out_scores = [], []
    for b, s, v in zip(boxes, scores, valid):
        if not all_valid:
            b, s = b[v], s[v]
        if b.numel() > 4000:  # torchvision's batched_nms: per-level NMS, then a re-sort by score
            keep = nms(b, s, nms_thresh).sort().values
            keep = keep[s[keep].sort(descending=True)[1]][:post_nms_top_n]
        else:
            keep = nms_first(b, s, nms_thresh, post_nms_top_n)
        out_boxes.append(b[keep])
        out_scores.append(s[keep])
    return out_boxes, out_scores
