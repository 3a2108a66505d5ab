"""The plain form of :func:`mimicdet.student.mimic.roi_mimic_loss` (same arguments, same value), the oracle its
fast forms are tested against: ``r`` runs on the full student map; each region of ``r(V)`` and of the teacher
map is sampled (torchvision ``roi_align``, or a crop of whole cells) and its squared error summed, one region at
a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from mimicdet.student.mimic import (
    Sampler,
    _check_maps,
    _check_rois,
    _check_sampler,
    _check_valid_hw,
    _in_fp32,
    _pair,
    _zero_loss,
    native_crops,
)


@_in_fp32
def roi_mimic_loss_reference(
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
    _check_sampler(sampler)
    _check_maps(student_map, teacher_map, transform)
    n, _, h, w = student_map.shape
    sizes = _check_valid_hw(valid_hw, n, h, w)
    boxes = _check_rois(rois, n, student_map)
    total = sum(len(r) for r in boxes)
    if total == 0:
        return _zero_loss(student_map, transform.weight)
    output_size = _pair(output_size)
    teacher = teacher_map.detach().to(student_map.dtype)
    mapped = transform(student_map)
    terms = []
    for k, (r, (vh, vw)) in enumerate(zip(boxes, sizes)):
        u_map, v_map = teacher[k : k + 1, :, :vh, :vw], mapped[k : k + 1, :, :vh, :vw]
        if sampler == "roialign":
            u = roi_align(u_map, [r], output_size, spatial_scale, sampling_ratio, aligned)
            v = roi_align(v_map, [r], output_size, spatial_scale, sampling_ratio, aligned)
            terms.extend(((u - v).square().flatten(1).mean(1)).unbind())
        else:
            crops = native_crops(r, spatial_scale=spatial_scale, height=vh, width=vw, aligned=aligned)
            for y0, y1, x0, x1 in crops.tolist():
                terms.append((u_map[0, :, y0:y1, x0:x1] - v_map[0, :, y0:y1, x0:x1]).square().mean())
    return torch.stack(terms).sum() / (2.0 * total)
