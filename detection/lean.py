"""A lean inference copy of a detector: the same outputs within float rounding, less fixed cost per image.

``make_lean(detector) -> Detector`` returns a copy in eval mode (the reference model is left as it is):

- backbone: every BatchNorm folded into its convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``); in each
  Inception block the three 1x1 convolutions that read the block's input run as one; conv + ReLU run as one
  oneDNN call with packed weights where a conv is big enough to repay that call's fixed cost, as plain conv and
  in-place ReLU otherwise; the map stays channels-last from the first layer to the heads;
- RPN: anchors cached per map size; proposals filtered for the whole batch (:func:`rpn.filter_proposals_batched`)
  with NMS stopped at the top-N (:func:`rpn.nms_first`);
- Fast R-CNN head: on small maps RoIAlign as two matrix products (:func:`roi_align_separable`), which costs a
  fraction of torchvision's per-sample loop there; every head post-processes the batch at once
  (:meth:`heads.BoxHead.postprocess_batched`).

Shapes as in :mod:`detection.detector`: images ``Tensor[N, 3, H, W]``; features ``Tensor[N, C, h, w]`` (here in
channels-last memory); proposals ``list[Tensor[R_i, 4]]`` x1y1x2y2 in input pixels; RoI features
``Tensor[R, C, P, P]`` with ``P`` the RoIAlign output size.

The copy is for inference only: its folded and merged weights are not the trainable ones, so its modules refuse
training mode; save and train the reference model. Under tracing (``detection.export``) it runs plain
operators only (no oneDNN calls, torchvision's RoIAlign and per-image post-processing), so it exports too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.detection.image_list import ImageList
from torchvision.models.googlenet import BasicConv2d, Inception
from torchvision.ops import roi_align

from mimicdet.detection.backbone import _LAYERS, InceptionBackbone, feature_size
from mimicdet.detection.detector import Detector
from mimicdet.detection.heads import BoxHead, FastRCNNHead, RFCNHead, _pool_inputs
from mimicdet.detection.rpn import RPN, LightRPNHead, filter_proposals_batched

# A conv of at least this many multiply-adds runs as one oneDNN call with ReLU fused and packed weights; below,
# that call's fixed cost outweighs what it saves and plain conv + in-place ReLU is faster (one CPU thread, minima:
# RPN 3x3 convs on a 12x12 map 0.90 vs 1.10 ms for 208->208 and 5.0 vs 16.9 ms for 832->256; a 1x1 208->32
# conv there 43 vs 28 us; even at 3-4M).
FUSED_MIN_MACS = 4_000_000
# RoIAlign as two matrix products costs ~R·P·C·h·w multiply-adds against torchvision's ~16·R·P²·C scattered
# reads: cheaper up to maps of about this many cells (inputs up to 384x384; one CPU thread, minima of 40: on
# 12x12 cells 1.6 vs 3.7 ms for 32 channels, 5.9 vs 14.0 ms for 128; even at about 26x26).
SEPARABLE_MAX_CELLS = 24 * 24


def make_lean(detector: Detector) -> Detector:
    """An eval-mode copy of ``detector`` for inference, see the module docstring; ``detector`` is unchanged."""
    if not isinstance(detector, Detector) or not isinstance(detector.backbone, InceptionBackbone):
        raise TypeError(f"make_lean takes this tool's Detector (Inception backbone), got {type(detector).__name__}")
    lean = copy.deepcopy(detector).eval()
    for p in lean.parameters():
        p.requires_grad_(False)
    lean.backbone = LeanBackbone(lean.backbone)
    lean.rpn = LeanRPN.from_rpn(lean.rpn)
    if isinstance(lean.head, FastRCNNHead):
        lean.head = LeanFastRCNNHead.from_head(lean.head)
    elif isinstance(lean.head, RFCNHead):
        lean.head = _swap_class(lean.head, LeanRFCNHead)
    return lean.eval()


def _plain() -> bool:
    """Plain operators only: while tracing or exporting, whose graphs know no oneDNN calls nor data-dependent
    shortcuts."""
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def _inference_only(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} holds folded inference weights; train the reference model")


# --- convolutions ---------------------------------------------------------------------------------------------
def _folded(block: BasicConv2d) -> nn.Conv2d:
    """``conv -> BatchNorm`` (eval statistics) as one conv with a bias."""
    return fuse_conv_bn_eval(block.conv.eval(), block.bn.eval())


class LeanConv(nn.Module):
    """``relu(conv(x))`` (or without the ReLU) for channels-last ``x``, with BatchNorm already folded in."""

    def __init__(self, conv: nn.Conv2d, *, relu: bool = True) -> None:
        super().__init__()
        if conv.groups != 1 or conv.bias is None:
            raise ValueError(f"LeanConv takes an ungrouped conv with a bias, got groups={conv.groups}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.relu = relu
        self._packed: tuple[tuple[int, int], Tensor] | None = None  # (weight identity, oneDNN-packed weight)

    @classmethod
    def cat(cls, convs: list[nn.Conv2d]) -> LeanConv:
        """One conv computing ``convs`` side by side (same input and geometry): outputs concatenated."""
        first = convs[0]
        joint = nn.Conv2d(first.in_channels, sum(c.out_channels for c in convs), first.kernel_size,
                          stride=first.stride, padding=first.padding, dilation=first.dilation)  # fmt: skip
        with torch.no_grad():
            joint.weight.copy_(torch.cat([c.weight for c in convs]))
            joint.bias.copy_(torch.cat([c.bias for c in convs]))
        return cls(joint)

    def __getstate__(self) -> dict:
        # oneDNN's opaque packed weights cannot be copied or pickled; they are re-packed on first use.
        return {**self.__dict__, "_packed": None}

    def macs(self, x: Tensor) -> int:
        """Multiply-adds of this conv on ``x``."""
        _, cin, h, w = x.shape
        cout, _, kh, kw = self.weight.shape
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return x.shape[0] * oh * ow * cout * cin * kh * kw

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(self)
        fused = self.relu and x.device.type == "cpu" and x.dtype == torch.float32 and not _plain()
        if fused and torch.backends.mkldnn.is_available() and self.macs(x) >= FUSED_MIN_MACS:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(), self.bias, self.padding, self.stride, self.dilation, 1, "relu", [None], ""
            )
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return torch.relu_(y) if self.relu else y

    def _packed_weight(self) -> Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            w = self.weight.detach()
            # The input size only guides oneDNN's choice of layout; any typical size serves every input size.
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w, self.padding, self.stride, self.dilation, 1, [1, w.shape[1], 64, 64]
            )
            self._packed = (key, packed)
        return self._packed[1]


class LeanInception(nn.Module):
    """An Inception block with folded BatchNorm and its three input-side 1x1 convs as one."""

    def __init__(self, block: Inception) -> None:
        super().__init__()
        heads = [_folded(block.branch1), _folded(block.branch2[0]), _folded(block.branch3[0])]
        self.splits = [c.out_channels for c in heads]
        self.reduce = LeanConv.cat(heads)  # [branch1 | branch2's 1x1 | branch3's 1x1]
        self.branch2 = LeanConv(_folded(block.branch2[1]))
        self.branch3 = LeanConv(_folded(block.branch3[1]))
        self.pool = block.branch4[0]
        self.branch4 = LeanConv(_folded(block.branch4[1]))

    def forward(self, x: Tensor) -> Tensor:
        y1, y2, y3 = self.reduce(x).split(self.splits, dim=1)
        return torch.cat([y1, self.branch2(y2), self.branch3(y3), self.branch4(self.pool(x))], 1)


class LeanBackbone(nn.Module):
    """:class:`InceptionBackbone` with folded BatchNorm; ``Tensor[N, 3, H, W] -> Tensor[N, C, H/16, W/16]`` in
    channels-last memory (the reference returns contiguous NCHW; the values agree within float rounding)."""

    def __init__(self, backbone: InceptionBackbone) -> None:
        super().__init__()
        self.width, self.out_channels, self.stride = backbone.width, backbone.out_channels, backbone.stride
        layers: list[nn.Module] = []
        for name in _LAYERS:
            m = getattr(backbone, name)
            if isinstance(m, BasicConv2d):
                m = LeanConv(_folded(m))
            elif isinstance(m, Inception):
                m = LeanInception(m)
            layers.append(m)
        self.layers = nn.Sequential(*layers)

    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        return feature_size(h, w)

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(self)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"backbone input must be Tensor[N,3,H,W], got shape {list(x.shape)}")
        return self.layers(x.contiguous(memory_format=torch.channels_last))


# --- RPN ------------------------------------------------------------------------------------------------------
class LeanRPNHead(nn.Module):
    """:class:`rpn.LightRPNHead` with the conv's ReLU fused; :meth:`flat` gives the batch's outputs already in
    the anchors' order: logits ``[N, h·w·A]`` and deltas ``[N·h·w·A, 4]``."""

    def __init__(self, head: LightRPNHead) -> None:
        super().__init__()
        self.conv = LeanConv(head.conv)
        self.cls_logits, self.bbox_pred = head.cls_logits, head.bbox_pred

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        t = [self.conv(f) for f in x]
        return [self.cls_logits(f) for f in t], [self.bbox_pred(f) for f in t]

    def flat(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.conv(x)
        n = x.shape[0]
        # On a channels-last map the outputs are [N, h, w, A] and [N, h, w, A·4] in memory: the (cell, anchor)
        # order of torchvision's concat_box_prediction_layers, so these reshapes copy nothing.
        logits = self.cls_logits(t).permute(0, 2, 3, 1).reshape(n, -1)
        deltas = self.bbox_pred(t).permute(0, 2, 3, 1).reshape(-1, 4)
        return logits, deltas


class LeanRPN(RPN):
    """:class:`rpn.RPN` whose eval-mode proposals come from :func:`rpn.filter_proposals_batched`, on anchors
    cached per map size. Training mode, targets and tracing take the reference path."""

    @classmethod
    def from_rpn(cls, rpn: RPN) -> LeanRPN:
        lean = _swap_class(rpn, cls)
        lean.head = LeanRPNHead(rpn.head)
        lean._anchor_cache = {}
        return lean

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_anchor_cache": {}}

    def anchors_for(self, features: Tensor) -> Tensor:
        """``[h·w·A, 4]`` anchors of a map the size of ``features`` (computed once per size, dtype and device)."""
        key = (*features.shape[-2:], features.dtype, features.device)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) >= 16:  # evaluation sees a handful of padded sizes; keep it bounded
                self._anchor_cache.clear()
            self._anchor_cache[key] = self.anchor_generator(ImageList(features[:1], [(1, 1)]), [features[:1]])[0]
        return self._anchor_cache[key]

    def forward(  # type: ignore[override]
        self,
        features: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        need_proposals: bool = True,
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        if self.training or targets is not None or not need_proposals or _plain():
            return super().forward(features, image_sizes, targets, need_proposals=need_proposals)
        logits, deltas = self.head.flat(features)
        anchors = self.anchors_for(features)
        n = features.shape[0]
        anchors = anchors.expand(n, -1, -1).reshape(-1, 4)  # a view for one image
        boxes = self.box_coder.decode_single(deltas.to(anchors.dtype), anchors).view(n, -1, 4)
        proposals, scores = filter_proposals_batched(
            boxes, logits, image_sizes, pre_nms_top_n=self.pre_nms_top_n(), post_nms_top_n=self.post_nms_top_n(),
            nms_thresh=self.nms_thresh, min_size=self.min_size, score_thresh=self.score_thresh,
        )  # fmt: skip
        return proposals, scores, {}


# --- box heads ------------------------------------------------------------------------------------------------
def _axis_weights(start: Tensor, end: Tensor, size: Tensor, cells: int, bins: int, samples: int) -> Tensor:
    """RoIAlign's bilinear weights along one axis (``aligned=False``), averaged over each bin's samples.

    ``start``, ``end``: ``[M]`` region edges in map cells on a map side of ``size [M]`` cells (``<= cells``) ->
    ``[M, bins, cells]``: row ``p`` spreads bin ``p``'s samples over the cells as torchvision's CPU kernel does
    (samples beyond ``[-1, size]`` count zero, the rest are clamped into ``[0, size - 1]`` and split between the
    two nearest cells), so the product of the two axes' weights is its 2-D weight.
    """
    length = torch.clamp(end - start, min=1.0)
    step = (length / bins)[:, None, None]
    p = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    s = torch.arange(samples, dtype=start.dtype, device=start.device) + 0.5
    size = size.to(start.dtype)[:, None, None]
    # The kernel's expression and order: start + p·step + (s·step) / samples.
    pos = (start[:, None, None] + p * step) + (s * step) / samples  # [M, bins, samples]
    inside = (pos >= -1.0) & (pos <= size)
    # Samples off the map go 2 cells out, where the hat function below is 0 on every cell.
    pos = torch.where(inside, torch.minimum(pos.clamp(min=0), size - 1), -2.0)
    cell = torch.arange(cells, dtype=start.dtype, device=start.device)
    # Linear interpolation is the hat function max(0, 1 - |pos - cell|) of the clamped position.
    weight = (pos.unsqueeze(-1) - cell).abs_().neg_().add_(1).clamp_(min=0)  # [M, bins, samples, cells]
    return weight.sum(2).div_(samples)


def roi_align_separable(
    features: Tensor, rois: list[Tensor], *, output_size: int, spatial_scale: float, sampling_ratio: int
) -> Tensor:
    """``torchvision.ops.roi_align(..., aligned=False)`` for ``sampling_ratio > 0`` as two matrix products.

    Its weights factor into one matrix per axis, ``Ay [R, P, h]`` and ``Ax [R, P, w]``, so each region's output is
    ``Ay · F · Axᵀ``. Returns ``[R, P, P, C]`` (bin row, bin column, channel): the caller's next layer reads it in
    that order, which saves a transpose. Equal to ``roi_align`` within float rounding (sums in another order).
    """
    n, c, h, w = features.shape
    counts = [len(r) for r in rois]
    boxes = torch.cat(rois) * spatial_scale  # [R, 4] in cells
    r, p = len(boxes), output_size
    # Both axes in one pass: rows [0, R) are y (map height h), rows [R, 2R) are x (map width w).
    side = torch.tensor([h, w], device=boxes.device).repeat_interleave(r)
    both = _axis_weights(boxes[:, [1, 0]].T.reshape(-1), boxes[:, [3, 2]].T.reshape(-1), side, max(h, w),
                         output_size, sampling_ratio)  # fmt: skip
    ay, ax = both[:r, :, :h], both[r:, :, :w]  # [R, P, h], [R, P, w]
    fmap = features.permute(0, 2, 3, 1).reshape(n, h, w * c)  # free for a channels-last map
    out = features.new_empty(r, p, p, c)
    start = 0
    for i, count in enumerate(counts):  # one pair of products per image: a padded batch would copy ~R·P·w·C more
        end = start + count
        rows = (ay[start:end].reshape(-1, h) @ fmap[i]).view(count, p, w, c)  # [R_i, P, w, C]
        torch.matmul(ax[start:end].unsqueeze(1), rows, out=out[start:end])  # [R_i, 1, P, w] @ -> [R_i, P, P, C]
        start = end
    return out


class _BatchedPostprocess(BoxHead):
    """Eval-mode post-processing of the whole batch at once (:meth:`BoxHead.postprocess_batched`)."""

    def postprocess(
        self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        if _plain():
            return super().postprocess(class_logits, box_deltas, proposals, image_sizes)
        return self.postprocess_batched(class_logits, box_deltas, proposals, image_sizes)


class LeanRFCNHead(_BatchedPostprocess, RFCNHead):
    """R-FCN head with batched post-processing."""


class LeanFastRCNNHead(_BatchedPostprocess, FastRCNNHead):
    """Fast R-CNN head with the reduce conv's ReLU fused, separable RoIAlign on small maps and batched
    post-processing. ``fc6`` keeps its weights; on the separable path it reads them in (bin, channel) order."""

    @classmethod
    def from_head(cls, head: FastRCNNHead) -> LeanFastRCNNHead:
        lean = _swap_class(head, cls)
        lean.reduce = LeanConv(head.reduce)
        return lean

    def raw_outputs(
        self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        _inference_only(self)
        x, rois = _pool_inputs(self.reduce(features), proposals)
        cfg = self.config
        if not _plain() and x.shape[-2] * x.shape[-1] <= SEPARABLE_MAX_CELLS and cfg.roi_size > 0:
            pooled = roi_align_separable(
                x, rois, output_size=cfg.roi_size, spatial_scale=1.0 / cfg.stride, sampling_ratio=2
            )  # [R, P, P, C]
            x = F.relu(F.linear(pooled.flatten(1), self._fc6_weight_pqc(), self.fc6.bias))
        else:
            x = roi_align(x, rois, output_size=cfg.roi_size, spatial_scale=1.0 / cfg.stride, sampling_ratio=2,
                          aligned=False)  # fmt: skip
            x = torch.relu(self.fc6(x.flatten(1)))
        x = torch.relu(self.fc7(x))
        return self.cls_score(x), self.bbox_pred(x)

    def _fc6_weight_pqc(self) -> Tensor:
        """``fc6.weight`` with its input columns reordered from (channel, bin row, bin column) to (row, column,
        channel), the order :func:`roi_align_separable` returns."""
        w = self.fc6.weight
        key = (w.data_ptr(), w._version)
        cached = getattr(self, "_fc6_pqc", None)
        if cached is None or cached[0] != key:
            p = self.config.roi_size
            pqc = w.detach().view(w.shape[0], -1, p, p).permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
            self._fc6_pqc = cached = (key, pqc)
        return cached[1]


def _swap_class(module: nn.Module, cls: type) -> nn.Module:
    """``module`` (a copy we own) as an instance of the lean subclass ``cls``: same state, lean methods."""
    module.__class__ = cls
    return module
