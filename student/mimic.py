"""Mimic losses (Li, Jin, Yan, CVPR 2017, eq. 2-5) and the two small modules they train.

Shapes and units: N images, R regions (``R_n`` in image n), Cs student channels, Ct teacher channels,
H×W feature-map cells at stride ``1/spatial_scale`` input pixels; boxes ``Tensor[R, 4]`` x1y1x2y2 in input
pixels; K classes (with background) in head outputs.

    L_m = 1/(2N) · Σ_i (1/m_i) · ‖u_i − r(v_i)‖²                                        (paper eq. 5)

``u_i`` is the teacher map sampled in region ``i``, ``v_i`` the student map sampled there, ``r`` a 1×1
convolution (Cs -> Ct, with bias), ``m_i`` the number of elements of ``u_i`` and N the number of regions in
the batch. So the loss is half the mean, over regions, of the per-element squared error: a constant error
``e`` gives ``e²/2`` whatever the box sizes, which is why ``λ1 = 1`` works.

Samplers:

- ``"roialign"``: ``u_i``, ``v_i`` are torchvision ``roi_align`` grids (``output_size`` bins, ``m_i = Ct·Ph·Pw``).
  The sample of ``r(V)`` is taken from the full-width ``r(V)``, exactly as the plain form does (bins whose
  samples fall off the map keep torchvision's zero, so the bias counts with the in-map weight only).
- ``"native"``: ``u_i`` is the block of whole cells the box covers (:func:`native_crops`), ``m_i = Ct·h_i·w_i``.

Cell centres follow ``roi_align``: cell ``(i, j)`` is centred on input pixel ``((j + o)/s, (i + o)/s)`` with
``s = spatial_scale`` and ``o = 0.5`` if ``aligned`` else ``0`` (``aligned=False`` is the convention of the
backbone and of torchvision's ``AnchorGenerator``).

``valid_hw[n] = (h, w)`` (map cells) says image n fills only ``map[n, :, :h, :w]`` of a padded batch: every
loss treats image n's maps as if they were that crop (samples clamp and vanish at its edge, padding never
counts and gets no gradient).

Cost. The plain form (tests/mimic_reference.py) pools two Ct-channel maps with ``roi_align``, whose CPU
backward dominates a small student's step. :func:`roi_mimic_loss` computes the same number from linear algebra:

- roialign, maps up to ~50x50: RoIAlign is separable (``P_i X = A^y_i X A^x_iᵀ`` per channel), so
  ``Σ_i ‖P_i D‖² = ⟨D, K·D⟩`` with ``D = r(V) − U`` (``Tensor[N, HW, Ct]``, one GEMM) and
  ``K_n = Σ_i (A^y_iᵀA^y_i) ⊗ (A^x_iᵀA^x_i)`` (``HW × HW``, no gradient). One batched matmul forward; the
  gradient ``2·K·D`` is the product already formed. Cost: ``r`` forward and backward (three Ct·Cs·HW GEMMs, as
  in the plain form) plus Ct·(HW)² per image.
- roialign, larger maps (see ``_use_kernel``): pool-then-transform. ``roi_align`` of the student (Cs channels,
  not Ct) and of the teacher (no gradient), then ``r`` on the pooled bins, with the bias scaled by the pooled
  ones-map (the in-map share of each bin's samples, which torchvision's zeroing off the map makes < 1).
- native: a per-cell weighted MSE, ``weight(y, x) = Σ_i [cell in crop i]/(h_i·w_i)`` built with 2-D prefix
  sums, evaluated (and ``r`` applied, as one GEMM) only on cells with a positive weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

Sampler = Literal["roialign", "native"]
SAMPLERS: tuple[str, ...] = ("roialign", "native")

# Size rule between the two exact roialign forms. The kernel form costs ~Ct·(HW)² per image and holds N·(HW)²
# floats; pool-then-transform ~Ct·Cs·R·Ph·Pw plus torchvision roi_align over Ct + Cs channels, whatever the map
# size. Measured on this 2-core CPU (benchmarks/mimic_loss.py, 128 regions, Cs 208, Ct 832) the kernel wins by
# ~45x at 16x16 maps and still by ~1.3-1.8x at 38x63, where (HW)² is ~4.4 x R·Ph·Pw·Cs; the cap keeps K under
# 32 MB per image.
_KERNEL_ADVANTAGE = 8.0
_KERNEL_MAX_CELLS = 2896


# --------------------------------------------------------------------------------------------- modules


class MimicTransform(nn.Conv2d):
    """The transform ``r``: a 1×1 convolution ``Tensor[N, Cs, H, W] -> Tensor[N, Ct, H, W]`` with bias.

    Weights are Kaiming-normal with a linear gain (std ``1/sqrt(Cs)``, so ``r`` keeps the scale of its
    input), the bias is zero.
    """

    def __init__(self, *, student_channels: int, teacher_channels: int) -> None:
        if student_channels < 1 or teacher_channels < 1:
            raise ValueError(
                f"MimicTransform needs positive channel counts, got student_channels={student_channels}, "
                f"teacher_channels={teacher_channels}"
            )
        super().__init__(student_channels, teacher_channels, kernel_size=1, bias=True)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.bias)


# ---------------------------------------------------------------------------------------- checks


def _linear_params(transform: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``r`` as ``(weight Tensor[Ct, Cs], bias Tensor[Ct] | None)``; it must be a plain 1×1 convolution."""
    if not isinstance(transform, nn.Conv2d):
        raise ValueError(f"transform must be a 1x1 nn.Conv2d (e.g. MimicTransform), got {type(transform).__name__}")
    if (
        tuple(transform.kernel_size) != (1, 1)
        or tuple(transform.stride) != (1, 1)
        or transform.padding not in ((0, 0), "valid")
        or tuple(transform.dilation) != (1, 1)
        or transform.groups != 1
    ):
        raise ValueError(
            "transform must be a 1x1 nn.Conv2d with stride 1, no padding, dilation 1 and groups 1, got "
            f"kernel_size={transform.kernel_size}, stride={transform.stride}, padding={transform.padding}, "
            f"dilation={transform.dilation}, groups={transform.groups}"
        )
    return transform.weight.flatten(1), transform.bias


def _check_maps(student_map: Tensor, teacher_map: Tensor, transform: nn.Module) -> tuple[Tensor, Tensor | None]:
    if student_map.dim() != 4 or teacher_map.dim() != 4:
        raise ValueError(
            f"student_map and teacher_map must be Tensor[N, C, H, W], got student {tuple(student_map.shape)} "
            f"and teacher {tuple(teacher_map.shape)}"
        )
    if student_map.shape[0] != teacher_map.shape[0] or student_map.shape[2:] != teacher_map.shape[2:]:
        raise ValueError(
            f"student map {tuple(student_map.shape)} and teacher map {tuple(teacher_map.shape)} must have the same "
            "batch size and spatial size (upsample the student's map first for scale mimic)"
        )
    if not student_map.is_floating_point() or not teacher_map.is_floating_point():
        raise ValueError(
            f"maps must be floating point, got student {student_map.dtype} and teacher {teacher_map.dtype}"
        )
    weight, bias = _linear_params(transform)
    if weight.shape != (teacher_map.shape[1], student_map.shape[1]):
        raise ValueError(
            f"transform maps {weight.shape[1]} -> {weight.shape[0]} channels but the student map has "
            f"{student_map.shape[1]} and the teacher map {teacher_map.shape[1]}"
        )
    return weight, bias


def _check_valid_hw(valid_hw: Sequence[tuple[int, int]] | None, n: int, h: int, w: int) -> list[tuple[int, int]]:
    if valid_hw is None:
        return [(h, w)] * n
    if len(valid_hw) != n:
        raise ValueError(f"valid_hw must hold one (h, w) per image: {n} images, got {len(valid_hw)} entries")
    out = []
    for k, hw in enumerate(valid_hw):
        vh, vw = (int(v) for v in hw)
        if not (1 <= vh <= h and 1 <= vw <= w):
            raise ValueError(f"valid_hw[{k}] must lie within 1..{h} x 1..{w} map cells, got {tuple(hw)}")
        out.append((vh, vw))
    return out


def _check_rois(rois: Sequence[Tensor], n: int, like: Tensor) -> list[Tensor]:
    if isinstance(rois, Tensor) or len(rois) != n:
        got = f"a Tensor of shape {tuple(rois.shape)}" if isinstance(rois, Tensor) else f"{len(rois)} entries"
        raise ValueError(f"rois must be a list with one Tensor[R_n, 4] per image ({n} images), got {got}")
    out = []
    for k, r in enumerate(rois):
        if r.dim() != 2 or r.shape[1] != 4:
            raise ValueError(f"rois[{k}] must be Tensor[R, 4] (x1, y1, x2, y2 pixels), got {tuple(r.shape)}")
        out.append(r.to(device=like.device, dtype=like.dtype))
    return out


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    return int(ph), int(pw)


def _zero_loss(student_map: Tensor, weight: Tensor) -> Tensor:
    # No region: a zero that still reaches the student and r, so backward() works on the loss alone.
    return (student_map * 0).sum() + (weight * 0).sum()


# ---------------------------------------------------------------------------------------- sampling


def native_crops(
    boxes: Tensor, *, spatial_scale: float, height: int, width: int, aligned: bool = False
) -> Tensor:
    """Whole-cell crops of ``boxes`` (``Tensor[R, 4]`` x1y1x2y2 px) -> ``Tensor[R, 4]`` int64 ``(y0, y1, x0, x1)``.

    A crop is the cells whose centres fall inside the box, half-open: cell ``j`` (centre ``(j + o)/s`` px)
    is in when ``x1 <= (j + o)/s < x2``, i.e. ``j`` in ``[ceil(x1·s − o), ceil(x2·s − o))``. A box holding no
    centre takes the one cell whose centre is nearest the box centre. Crops are clamped to the ``height × width``
    map and keep at least one cell (a box off the map gets the nearest border cell). ``y1``/``x1`` are exclusive.
    """
    off = 0.5 if aligned else 0.0
    b = boxes.to(torch.float64) * spatial_scale - off

    def axis(lo: Tensor, hi: Tensor, size: int) -> tuple[Tensor, Tensor]:
        first = torch.ceil(lo)
        stop = torch.ceil(hi)
        nearest = torch.floor((lo + hi) / 2 + 0.5)
        empty = stop <= first
        first = torch.where(empty, nearest, first).clamp(0, size - 1)
        stop = torch.where(empty, nearest + 1, stop)
        stop = torch.maximum(stop, first + 1).clamp(max=size)
        return first.long(), stop.long()

    y0, y1 = axis(b[:, 1], b[:, 3], height)
    x0, x1 = axis(b[:, 0], b[:, 2], width)
    return torch.stack([y0, y1, x0, x1], dim=1)


def _axis_weights(
    lo: Tensor, hi: Tensor, size: Tensor, full: int, *, spatial_scale: float, bins: int, sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """One axis of torchvision's RoIAlign as a matrix: box edges ``[R]`` -> ``Tensor[R, bins, full]``.

    ``A[r, p, k]`` is the weight of map row (or column) ``k`` in bin ``p`` of box ``r`` on a map ``size[r]``
    long, including ``1/grid``; RoIAlign of box ``r`` is ``A^y X A^xᵀ`` per channel. Mirrors
    ``roi_align_kernel.cpp``: samples outside ``[-1, size]`` count zero, samples in ``[-1, 0]`` clamp to 0,
    samples past ``size - 1`` clamp to the last cell.
    """
    off = 0.5 if aligned else 0.0
    start = lo * spatial_scale - off
    length = hi * spatial_scale - off - start
    if not aligned:
        length = length.clamp(min=1.0)
    bin_size = length / bins
    if sampling_ratio > 0:
        grid = torch.full_like(length, float(sampling_ratio))
        g_max = sampling_ratio
    else:
        grid = torch.ceil(length / bins)
        g_max = max(int(grid.max().item()) if grid.numel() else 1, 1)
    p = torch.arange(bins, device=lo.device, dtype=lo.dtype)[None, :, None]
    it = torch.arange(g_max, device=lo.device, dtype=lo.dtype)[None, None, :]
    pos = (
        start[:, None, None] + p * bin_size[:, None, None] + (it + 0.5) * (bin_size / grid)[:, None, None]
    )  # [R, bins, G], same expression order as torchvision
    limit = size.to(lo.dtype)[:, None, None]
    keep = (it < grid[:, None, None]) & (pos >= -1.0) & (pos <= limit)
    pos = pos.clamp(min=0.0)
    low = pos.long()  # pos >= 0, so truncation is floor
    top = (size - 1).to(low.dtype)[:, None, None]
    at_top = low >= top
    low = torch.where(at_top, top, low)
    high = torch.where(at_top, top, low + 1)
    frac = torch.where(at_top, torch.zeros_like(pos), pos - low.to(pos.dtype))
    share = keep.to(lo.dtype) / grid.clamp(min=1.0)[:, None, None]
    out = torch.zeros(lo.shape[0], bins, full, dtype=lo.dtype, device=lo.device)
    out.scatter_add_(2, low, (1.0 - frac) * share)
    out.scatter_add_(2, high, frac * share)
    return out


# ------------------------------------------------------------------------------------- fast forms


class _SymmetricQuadraticForm(torch.autograd.Function):
    """``Σ_n ⟨D_n, K_n D_n⟩`` for symmetric ``K`` (``D: Tensor[N, M, C]``, ``K: Tensor[N, M, M]``, no grad to K).

    The gradient ``2·K·D`` is the product the forward already formed, so it is kept instead of recomputed.
    """

    @staticmethod
    def forward(ctx, d: Tensor, k: Tensor) -> Tensor:  # type: ignore[override]
        kd = torch.bmm(k, d)
        ctx.save_for_backward(kd)
        return torch.dot(d.flatten(), kd.flatten())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (kd,) = ctx.saved_tensors
        return kd * (2.0 * grad), None


def _channels_last_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``Tensor[N, C, H, W] -> Tensor[N·H·W, C]`` (one copy, cast included; rows ordered n, y, x)."""
    return x.to(dtype=dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _residual_rows(student_map: Tensor, teacher_map: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``r(V) − U`` (the loss is even in it) on every cell as ``Tensor[N·H·W, Ct]``: one GEMM, U and b fused in."""
    target = _channels_last_rows(teacher_map, student_map.dtype)
    offset = target.neg() if bias is None else bias - target
    return torch.addmm(offset, _channels_last_rows(student_map, student_map.dtype), weight.t())


def _roi_weights(
    rois: list[Tensor], sizes: list[tuple[int, int]], h: int, w: int, *, spatial_scale: float,
    output_size: tuple[int, int], sampling_ratio: int, aligned: bool,
) -> tuple[Tensor, Tensor]:
    boxes = torch.cat(rois)
    counts = torch.tensor([len(r) for r in rois], device=boxes.device)
    hs = torch.tensor([s[0] for s in sizes], device=boxes.device).repeat_interleave(counts)
    ws = torch.tensor([s[1] for s in sizes], device=boxes.device).repeat_interleave(counts)
    common = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)
    ay = _axis_weights(boxes[:, 1], boxes[:, 3], hs, h, bins=output_size[0], **common)
    ax = _axis_weights(boxes[:, 0], boxes[:, 2], ws, w, bins=output_size[1], **common)
    return ay, ax


def _roialign_kernel(
    student_map: Tensor, teacher_map: Tensor, rois: list[Tensor], weight: Tensor, bias: Tensor | None,
    sizes: list[tuple[int, int]], *, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """``Σ_i ‖P_i(U − r(V))‖²`` (sum over regions, bins and channels) as ``Σ_n ⟨D_n, K_n D_n⟩``."""
    n, _, h, w = student_map.shape
    ay, ax = _roi_weights(
        rois, sizes, h, w, spatial_scale=spatial_scale, output_size=output_size,
        sampling_ratio=sampling_ratio, aligned=aligned,
    )
    # B^y_i = A^yᵀA^y (H×H), B^x_i (W×W); K_n = Σ_i B^y_i ⊗ B^x_i, laid out over cells (y, x).
    by = torch.bmm(ay.transpose(1, 2), ay).flatten(1)
    bx = torch.bmm(ax.transpose(1, 2), ax).flatten(1)
    kernels = []
    for by_n, bx_n in zip(by.split([len(r) for r in rois]), bx.split([len(r) for r in rois])):
        k = (by_n.t() @ bx_n).view(h, h, w, w).permute(0, 2, 1, 3).reshape(h * w, h * w)
        kernels.append((k + k.t()) * 0.5)  # exactly symmetric, so the saved 2·K·D is the exact gradient
    kernel = torch.stack(kernels)
    d = _residual_rows(student_map, teacher_map, weight, bias).view(n, h * w, -1)
    return _SymmetricQuadraticForm.apply(d, kernel)


def _roi_align_per_image(
    x: Tensor, rois: list[Tensor], sizes: list[tuple[int, int]], *, spatial_scale: float,
    output_size: tuple[int, int], sampling_ratio: int, aligned: bool,
) -> Tensor:
    """torchvision ``roi_align`` where image n's map is ``x[n, :, :h_n, :w_n]`` -> ``Tensor[R, C, Ph, Pw]``."""
    args = (output_size, spatial_scale, sampling_ratio, aligned)
    if all(s == tuple(x.shape[2:]) for s in sizes):
        return roi_align(x, rois, *args)
    crops = [x[k : k + 1, :, :vh, :vw] for k, (vh, vw) in enumerate(sizes)]
    return torch.cat([roi_align(crop, [r], *args) for crop, r in zip(crops, rois)])


def _roialign_pool_then_transform(
    student_map: Tensor, teacher_map: Tensor, rois: list[Tensor], weight: Tensor, bias: Tensor | None,
    sizes: list[tuple[int, int]], *, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """``Σ_i ‖P_i U − (W·P_i V + b·P_i 1)‖²``: pools Cs channels, not Ct; ``P_i 1`` = in-map share per bin."""
    common = dict(
        spatial_scale=spatial_scale, output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned
    )
    pooled_s = _roi_align_per_image(student_map, rois, sizes, **common)
    with torch.no_grad():
        pooled_t = _roi_align_per_image(teacher_map.to(student_map.dtype), rois, sizes, **common)
    cs, ct = student_map.shape[1], teacher_map.shape[1]
    pred = pooled_s.permute(0, 2, 3, 1).reshape(-1, cs) @ weight.t()
    if bias is not None:
        with torch.no_grad():
            ones = student_map.new_ones(student_map.shape[0], 1, *student_map.shape[2:])
            share = _roi_align_per_image(ones, rois, sizes, **common).reshape(-1, 1)
        pred = pred + share * bias
    return (pooled_t.permute(0, 2, 3, 1).reshape(-1, ct) - pred).square().sum()


def _native_weights(
    rois: list[Tensor], sizes: list[tuple[int, int]], h: int, w: int, *, spatial_scale: float, aligned: bool
) -> Tensor:
    """``weight[n, y, x] = Σ_{i in image n} [cell in crop i] / (h_i·w_i)`` (float64) via 2-D prefix sums."""
    n = len(rois)
    device = rois[0].device
    crops = torch.cat(
        [
            native_crops(r, spatial_scale=spatial_scale, height=vh, width=vw, aligned=aligned)
            for r, (vh, vw) in zip(rois, sizes)
        ]
    )
    image = torch.arange(n, device=device).repeat_interleave(torch.tensor([len(r) for r in rois], device=device))
    y0, y1, x0, x1 = crops.unbind(1)
    share = 1.0 / ((y1 - y0) * (x1 - x0)).to(torch.float64)
    diff = torch.zeros(n, h + 1, w + 1, dtype=torch.float64, device=device)
    for ys, xs, sign in ((y0, x0, 1.0), (y0, x1, -1.0), (y1, x0, -1.0), (y1, x1, 1.0)):
        diff.index_put_((image, ys, xs), sign * share, accumulate=True)
    weight = diff.cumsum(1).cumsum(2)[:, :h, :w]
    # The prefix sums leave ~1e-17 residues on uncovered cells; a count map says exactly which are covered.
    hits = torch.zeros(n, h + 1, w + 1, dtype=torch.int64, device=device)
    ones = torch.ones_like(y0)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        hits.index_put_((image, ys, xs), sign * ones, accumulate=True)
    return torch.where(hits.cumsum(1).cumsum(2)[:, :h, :w] > 0, weight, 0.0)


def _native_weighted(
    student_map: Tensor, teacher_map: Tensor, rois: list[Tensor], weight: Tensor, bias: Tensor | None,
    sizes: list[tuple[int, int]], *, spatial_scale: float, aligned: bool,
) -> Tensor:
    """``Σ_i ‖crop_i(U − r(V))‖² / (h_i·w_i)`` as ``Σ_cells weight·‖U − r(V)‖²`` on covered cells."""
    n, _, h, w = student_map.shape
    cell_weight = _native_weights(rois, sizes, h, w, spatial_scale=spatial_scale, aligned=aligned)
    image, ys, xs = torch.nonzero(cell_weight, as_tuple=True)
    v = student_map[image, :, ys, xs]  # [M, Cs]
    target = teacher_map[image, :, ys, xs].to(student_map.dtype)  # [M, Ct]; fp16 store maps cast here, once
    offset = target.neg() if bias is None else bias - target
    per_cell = torch.addmm(offset, v, weight.t()).square().sum(1)  # ‖r(V) − U‖² per cell
    return torch.dot(per_cell, cell_weight[image, ys, xs].to(per_cell.dtype))


def _use_kernel(h: int, w: int, rois_per_image: float, bins: int, student_channels: int) -> bool:
    cells = h * w
    bins_work = max(rois_per_image, 1.0) * bins * student_channels
    return cells <= _KERNEL_MAX_CELLS and cells**2 <= _KERNEL_ADVANTAGE * bins_work


# ------------------------------------------------------------------------------------------ losses

_Loss = TypeVar("_Loss", bound=Callable[..., Tensor])
_HALF = (torch.float16, torch.bfloat16)


def _in_fp32(fn: _Loss) -> _Loss:
    """Run a loss in float32 whatever autocast says: the fast forms sum every squared error before normalising,
    and under CUDA AMP that sum in fp16 passed 65504 (inf at the first step of a real run). Half-precision tensor
    arguments are cast up (autograd carries the gradient back to fp16); the cost is small beside the network."""

    def up(x):
        return x.float() if isinstance(x, Tensor) and x.dtype in _HALF else x

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapped  # type: ignore[return-value]



@_in_fp32
def roi_mimic_loss(
    student_map: Tensor,
    teacher_map: Tensor,
    rois: Sequence[Tensor],
    transform: nn.Module,
    *,
    spatial_scale: float,
    sampler: Sampler,
    output_size: int | tuple[int, int] = 7,
    sampling_ratio: int = 2,
    aligned: bool = False,
    valid_hw: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Region mimic loss, paper eq. 5, exactly; the fast form of the plain one in tests/mimic_reference.py.

    Args:
        student_map: ``Tensor[N, Cs, H, W]`` (after the ×2 upsample for scale mimic).
        teacher_map: ``Tensor[N, Ct, H, W]``, a target: fp16 is accepted (cast once), no gradient flows to it.
        rois: one ``Tensor[R_n, 4]`` per image, x1y1x2y2 input pixels (the teacher's proposals).
        transform: ``r``, a 1×1 ``nn.Conv2d`` Cs -> Ct (:class:`MimicTransform`).
        spatial_scale: map cells per input pixel, ``1/stride``.
        sampler: ``"roialign"`` (RoIAlign grid, ``m_i = Ct·Ph·Pw``) or ``"native"`` (:func:`native_crops`,
            ``m_i = Ct·h_i·w_i``).
        output_size, sampling_ratio, aligned: torchvision ``roi_align`` arguments (roialign sampler).
        valid_hw: per image ``(h, w)`` map cells holding the image; the rest is padding and is ignored.

    Returns:
        Scalar ``1/(2N) Σ_i ‖u_i − r(v_i)‖² / m_i`` (N regions in the batch; 0 when there are none).
    """
    _check_sampler(sampler)
    weight, bias = _check_maps(student_map, teacher_map, transform)
    n, cs, h, w = student_map.shape
    sizes = _check_valid_hw(valid_hw, n, h, w)
    boxes = _check_rois(rois, n, student_map)
    total = sum(len(r) for r in boxes)
    if total == 0:
        return _zero_loss(student_map, weight)
    teacher_map = teacher_map.detach()
    ct = teacher_map.shape[1]
    if sampler == "native":
        err = _native_weighted(
            student_map, teacher_map, boxes, weight, bias, sizes, spatial_scale=spatial_scale, aligned=aligned
        )
        return err / (2.0 * total * ct)
    ph, pw = _pair(output_size)
    common = dict(
        spatial_scale=spatial_scale, output_size=(ph, pw), sampling_ratio=sampling_ratio, aligned=aligned
    )
    if _use_kernel(h, w, total / n, ph * pw, cs):
        err = _roialign_kernel(student_map, teacher_map, boxes, weight, bias, sizes, **common)
    else:
        err = _roialign_pool_then_transform(student_map, teacher_map, boxes, weight, bias, sizes, **common)
    return err / (2.0 * total * ct * ph * pw)


@_in_fp32
def map_mimic_loss(
    student_map: Tensor,
    teacher_map: Tensor,
    transform: nn.Module,
    *,
    valid_hw: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Whole-map L2 (FitNets-style baseline): ``1/(2N) Σ_n ‖U_n − r(V_n)‖² / m_n`` over each image's valid area.

    N images, ``m_n = Ct·h_n·w_n``. Maps as in :func:`roi_mimic_loss`; no gradient reaches the teacher map.
    """
    weight, bias = _check_maps(student_map, teacher_map, transform)
    n, _, h, w = student_map.shape
    sizes = _check_valid_hw(valid_hw, n, h, w)
    teacher = teacher_map.detach()
    mapped = F.conv2d(student_map, weight[:, :, None, None], bias)
    if valid_hw is None:
        return 0.5 * F.mse_loss(mapped, teacher.to(mapped.dtype))
    terms = [
        F.mse_loss(mapped[k, :, :vh, :vw], teacher[k, :, :vh, :vw].to(mapped.dtype)) for k, (vh, vw) in enumerate(sizes)
    ]
    return 0.5 * torch.stack(terms).mean()


@_in_fp32
def logits_mimic_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_deltas: Tensor | None = None,
    teacher_deltas: Tensor | None = None,
    *,
    delta_weight: float = 1.0,
    center: bool = True,
    balance: bool = True,
    foreground_threshold: float | None = 0.5,
) -> Tensor:
    """Two-stage mimic: L2 between head outputs on the same R proposals (K classes with background at 0).

    Logits ``Tensor[R, K]``: the mean over rows of ``‖(s_i − s̄_i) − (t_i − t̄_i)‖²/(2K)``, each row centred on its mean
    (``center``): softmax ignores a shift, so the teacher's mean logit carries no knowledge, and matching it
    made the student's head chase logits of magnitude ~8 on top of its own cross-entropy. With ``balance``,
    the rows the teacher calls foreground (its most likely class is not background) and the background rows
    weigh half each, when both occur: a teacher's top proposals are mostly background (94 % on the raccoon
    photos), with confident logit gaps near −10, and the unbalanced mean taught a 1/4 student's head to call
    its true objects background (fg probability 0.035, below the 0.05 score threshold; 7.0 mAP on held-out
    images against 63.1 balanced; docs/experiments/stage2-real-photos.md).

    Box deltas ``Tensor[R, 4K]`` (when both are given), times ``delta_weight``: ``1/(2F) Σ_{i∈F} ‖s_i[c_i] −
    t_i[c_i]‖²/4`` over the F proposals the teacher calls foreground (best foreground probability >
    ``foreground_threshold``), on the 4 columns of the teacher's class ``c_i``. A Fast R-CNN head's regression is
    trained only for the true class on foreground proposals; its other outputs are untrained, and matching them
    (``foreground_threshold=None``: all rows and columns) collapsed a 1/4 student's head to constant scores on
    real photos (docs/experiments/stage2-real-photos.md). F = 0 or R = 0 gives 0. Teacher outputs are detached targets (fp16
    accepted).
    """
    _check_head_outputs("logits", student_logits, teacher_logits)
    if (student_deltas is None) != (teacher_deltas is None):
        raise ValueError("student_deltas and teacher_deltas must be given together or not at all")
    s, t = student_logits, teacher_logits.detach().to(student_logits.dtype)
    if s.shape[0] == 0:
        loss = (s * 0).sum()
    else:
        sc, tc = (s - s.mean(dim=1, keepdim=True), t - t.mean(dim=1, keepdim=True)) if center else (s, t)
        per_row = 0.5 * (sc - tc).pow(2).mean(dim=1)
        if balance:
            teacher_fg = t.argmax(dim=1) > 0
            loss = torch.stack([per_row[m].mean() for m in (teacher_fg, ~teacher_fg) if m.any()]).mean()
        else:
            loss = per_row.mean()
    if student_deltas is None:
        return loss
    _check_head_outputs("deltas", student_deltas, teacher_deltas)
    r, k = s.shape
    if student_deltas.shape[1] != 4 * k:
        raise ValueError(f"box deltas must be Tensor[R, 4K] with K = {k} classes, got {tuple(student_deltas.shape)}")
    sd, td = student_deltas, teacher_deltas.detach().to(student_deltas.dtype)
    if foreground_threshold is not None:
        fg_prob, fg_class = t.float().softmax(dim=1)[:, 1:].max(dim=1)
        rows = torch.nonzero(fg_prob > foreground_threshold).flatten()
        cols = fg_class[rows] + 1
        sd, td = sd.view(r, k, 4)[rows, cols], td.view(r, k, 4)[rows, cols]
    if sd.shape[0] == 0:
        return loss + (student_deltas * 0).sum()
    return loss + float(delta_weight) * 0.5 * F.mse_loss(sd, td)


def _check_head_outputs(name: str, s: Tensor, t: Tensor) -> None:
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(
            f"student and teacher {name} must be Tensor[R, M] of the same shape, got {tuple(s.shape)} and "
            f"{tuple(t.shape)}"
        )


__all__ = [
    "SAMPLERS",
    "MimicTransform",
    "Sampler",
    "logits_mimic_loss",
    "map_mimic_loss",
    "native_crops",
    "roi_mimic_loss",
]
