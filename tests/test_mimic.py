"""Known-answer tests for the mimic losses and their modules (student/mimic.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mimicdet.student import mimic
from mimicdet.student.mimic import (
    MimicTransform,
    logits_mimic_loss,
    map_mimic_loss,
    native_crops,
    roi_mimic_loss,
)
from mimicdet.student.train import region_indices
from tests.mimic_reference import roi_mimic_loss_reference

torch.set_num_threads(1)

SAMPLERS = ("roialign", "native")
FORMS = {"fast": roi_mimic_loss, "reference": roi_mimic_loss_reference}


@pytest.fixture(params=["kernel", "pool-then-transform"])
def roialign_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test through each of the two exact roialign forms (the size rule picks one in use)."""
    monkeypatch.setattr(mimic, "_KERNEL_ADVANTAGE", math.inf if request.param == "kernel" else 0.0)
    return request.param


def conv(weight: list[list[float]] | torch.Tensor, bias: list[float] | torch.Tensor, dtype=torch.float64) -> nn.Conv2d:
    """A 1x1 conv with the given weight [Ct, Cs] and bias [Ct]."""
    w = torch.as_tensor(weight, dtype=dtype)
    r = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=1).to(dtype)
    with torch.no_grad():
        r.weight.copy_(w[:, :, None, None])
        r.bias.copy_(torch.as_tensor(bias, dtype=dtype))
    return r


def identity(channels: int, dtype=torch.float64) -> nn.Conv2d:
    return conv(torch.eye(channels), torch.zeros(channels), dtype)


def random_boxes(gen: torch.Generator, count: int, h: int, w: int, stride: int) -> torch.Tensor:
    """Boxes of 0.2..12 cells, centred anywhere on a map 30% larger than the image (many cross the border)."""
    size = torch.exp(torch.empty(count, 2, dtype=torch.float64).uniform_(math.log(0.2), math.log(12), generator=gen))
    centre = (torch.rand(count, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.3) * torch.tensor([w, h])
    return torch.cat([centre - size / 2, centre + size / 2], 1) * stride


# --------------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("form", FORMS)
def test_identical_maps_give_zero(sampler: str, form: str, roialign_path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    rois = [random_boxes(gen, 7, 5, 6, 16) for _ in range(2)]
    loss = FORMS[form](student, student.clone(), rois, identity(3), spatial_scale=1 / 16, sampler=sampler)
    assert loss.item() == 0.0


@pytest.mark.parametrize("form", FORMS)
def test_native_whole_map_is_half_the_mean_squared_difference(form: str) -> None:
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    student = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    rois = [torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)]  # stride 1: cells 0 and 1 both ways
    loss = FORMS[form](student, teacher, rois, identity(1), spatial_scale=1.0, sampler="native")
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4 / 2)


@pytest.mark.parametrize("form", FORMS)
def test_roialign_single_bin_known_answer(form: str, roialign_path: str) -> None:
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    student = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    rois = [torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)]  # one sample at (0.5, 0.5): mean 2.5
    loss = FORMS[form](
        student, teacher, rois, identity(1), spatial_scale=1.0, sampler="roialign", output_size=1, sampling_ratio=1
    )
    assert loss.item() == pytest.approx(2.5**2 / 2)


@pytest.mark.parametrize("form", FORMS)
def test_roialign_bias_counts_only_samples_on_the_map(form: str, roialign_path: str) -> None:
    # Box x in [-3, 1]: samples at x = -2 (off the map, torchvision's zero) and x = 0; y samples 0.5, 1.5.
    # r(V) = bias 1 everywhere, so the pooled r(V) is (1 + 1 + 0 + 0)/4 = 0.5 and the loss 0.5²/2.
    zeros = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    rois = [torch.tensor([[-3.0, 0.0, 1.0, 2.0]], dtype=torch.float64)]
    loss = FORMS[form](
        zeros, zeros, rois, conv([[1.0]], [1.0]), spatial_scale=1.0, sampler="roialign", output_size=1,
        sampling_ratio=2,
    )
    assert loss.item() == pytest.approx(0.125)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("box", [[16.0, 16.0, 40.0, 30.0], [0.0, 0.0, 160.0, 128.0], [50.0, 70.0, 51.0, 71.0]])
def test_constant_error_gives_half_its_square_for_any_box_size(
    sampler: str, box: list[float], roialign_path: str
) -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(1, 2, 8, 10, generator=gen, dtype=torch.float64)
    r = conv([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]], [0.1, -0.2, 0.3])
    teacher = r(student).detach() + 0.3  # every element off by e = 0.3
    for form in FORMS.values():
        rois = [torch.tensor([box], dtype=torch.float64)]
        loss = form(student, teacher, rois, r, spatial_scale=1 / 16, sampler=sampler)
        assert loss.item() == pytest.approx(0.3**2 / 2, rel=1e-12)


# ------------------------------------------------------------------------------ fast form == plain form


def _loss_and_grads(fn, student, teacher, rois, r, **kwargs) -> tuple[float, ...]:
    student = student.detach().clone().requires_grad_(True)
    r.zero_grad()
    loss = fn(student, teacher, rois, r, **kwargs)
    loss.backward()
    return loss.item(), student.grad.clone(), r.weight.grad.clone(), r.bias.grad.clone()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"aligned": True, "sampling_ratio": 0},
        {"output_size": (3, 5), "sampling_ratio": 1},
        {"valid_hw": [(7, 9), (4, 6), (2, 9)]},
    ],
    ids=["default", "aligned-adaptive", "3x5-bins", "valid-hw"],
)
def test_fast_form_matches_reference_with_gradients(sampler: str, options: dict, roialign_path: str) -> None:
    gen = torch.Generator().manual_seed(2)
    n, cs, ct, h, w = 3, 4, 5, 7, 9
    student = torch.randn(n, cs, h, w, generator=gen, dtype=torch.float64)
    teacher = torch.randn(n, ct, h, w, generator=gen, dtype=torch.float64)
    r = MimicTransform(student_channels=cs, teacher_channels=ct).double()
    nn.init.normal_(r.bias, generator=gen)
    rois = [random_boxes(gen, 25, h, w, 16), random_boxes(gen, 0, h, w, 16), random_boxes(gen, 40, h, w, 16)]
    kwargs = dict(spatial_scale=1 / 16, sampler=sampler, **options)
    expected = _loss_and_grads(roi_mimic_loss_reference, student, teacher, rois, r, **kwargs)
    got = _loss_and_grads(roi_mimic_loss, student, teacher, rois, r, **kwargs)
    assert got[0] == pytest.approx(expected[0], rel=1e-12)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
    if "valid_hw" in options:  # padding gets no gradient
        assert got[1][1, :, 4:, :].abs().max() == 0 and got[1][2, :, 2:, :].abs().max() == 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fast_form_matches_reference_in_float32_with_fp16_teacher(sampler: str, roialign_path: str) -> None:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 6, 8, 8, generator=gen)
    teacher = torch.randn(2, 10, 8, 8, generator=gen).half()
    r = MimicTransform(student_channels=6, teacher_channels=10)
    rois = [random_boxes(gen, 30, 8, 8, 16).float() for _ in range(2)]
    kwargs = dict(spatial_scale=1 / 16, sampler=sampler)
    expected = _loss_and_grads(roi_mimic_loss_reference, student, teacher.float(), rois, r, **kwargs)
    got = _loss_and_grads(roi_mimic_loss, student, teacher, rois, r, **kwargs)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_losses_run_in_float32_under_fp16_autocast(sampler: str, roialign_path: str) -> None:
    # Under CUDA AMP the student's map is fp16; the fast forms' un-normalised sum of squared errors passed
    # fp16's 65504 (inf at the first step). CPU autocast in fp16 reproduces that.
    gen = torch.Generator().manual_seed(5)
    student = (30 * torch.randn(2, 6, 12, 12, generator=gen)).half().requires_grad_()
    teacher = torch.zeros(2, 10, 12, 12).half()
    r = MimicTransform(student_channels=6, teacher_channels=10)
    rois = [random_boxes(gen, 64, 12, 12, 16).float() for _ in range(2)]
    kwargs = dict(spatial_scale=1 / 16, sampler=sampler)
    expected = roi_mimic_loss(student.detach().float(), teacher.float(), rois, r, **kwargs)
    with torch.autocast("cpu", dtype=torch.float16):
        got = roi_mimic_loss(student, teacher, rois, r, **kwargs)
        mapped = map_mimic_loss(student, teacher, r)
        logits = logits_mimic_loss(300 * student[0, :3].flatten(1).t(), torch.zeros(144, 3).half())
    assert got.dtype == mapped.dtype == logits.dtype == torch.float32
    assert math.isfinite(got.item()) and got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(mapped.item()) and math.isfinite(logits.item())
    (got + mapped + logits).backward()
    assert student.grad.dtype == torch.float16 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("form", FORMS)
def test_no_gradient_reaches_the_teacher(sampler: str, form: str, roialign_path: str) -> None:
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(1, 2, 4, 4, generator=gen, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4, generator=gen, requires_grad=True)
    r = MimicTransform(student_channels=2, teacher_channels=3)
    rois = [random_boxes(gen, 5, 4, 4, 16).float()]
    loss = FORMS[form](student, teacher, rois, r, spatial_scale=1 / 16, sampler=sampler)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert r.weight.grad.abs().sum() > 0 and r.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_no_regions_give_zero_and_backward_works(sampler: str) -> None:
    student = torch.randn(2, 2, 3, 3, requires_grad=True)
    r = MimicTransform(student_channels=2, teacher_channels=2)
    rois = [torch.zeros(0, 4)] * 2
    loss = roi_mimic_loss(student, torch.randn(2, 2, 3, 3), rois, r, spatial_scale=1.0, sampler=sampler)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------ input errors


def test_shape_mismatch_names_both_shapes() -> None:
    r = MimicTransform(student_channels=2, teacher_channels=3)
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\).*\(1, 3, 4, 5\)"):
        _call(teacher=(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\).*\(1, 3, 4, 4\)"):
        map_mimic_loss(torch.zeros(2, 2, 4, 4), torch.zeros(1, 3, 4, 4), r)


def _call(student=(1, 2, 4, 4), teacher=(1, 3, 4, 4), rois=((1, 4),), transform=None, **options) -> None:
    r = transform if transform is not None else MimicTransform(student_channels=2, teacher_channels=3)
    boxes = [torch.zeros(shape) for shape in rois]
    options = {"spatial_scale": 1.0, "sampler": "native", **options}
    roi_mimic_loss(torch.zeros(student), torch.zeros(teacher), boxes, r, **options)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"teacher": (1, 4, 4, 4)}, "2 -> 3 channels"),
        ({"student": (2, 2, 4, 4), "teacher": (2, 3, 4, 4)}, r"\(2 images\), got 1 entries"),
        ({"rois": ((1, 5),)}, r"rois\[0\]"),
        ({"sampler": "grid"}, "sampler"),
        ({"valid_hw": [(5, 4)]}, r"valid_hw\[0\]"),
        ({"transform": nn.Conv2d(2, 3, 3)}, "1x1"),
    ],
    ids=["channels", "rois-per-image", "roi-shape", "sampler", "valid-hw", "transform"],
)
def test_bad_arguments_are_named(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(**arguments)


# ------------------------------------------------------------------------------------------ native crops


@pytest.mark.parametrize(
    ("box", "aligned", "expected"),
    [
        ([0, 0, 32, 32], False, [0, 2, 0, 2]),  # centres 0 and 16 inside, 32 is the open end
        ([1, 1, 32, 33], False, [1, 3, 1, 2]),  # centre 0 left out
        ([5, 5, 10, 10], False, [0, 1, 0, 1]),  # no centre inside: the cell nearest the box centre
        ([20, 0, 28, 8], False, [0, 1, 2, 3]),  # box centre x = 24 px -> cell 1.5 rounds to 2
        ([500, -90, 900, -40], False, [0, 1, 3, 4]),  # off the map: nearest border cell
        ([-40, -40, 40, 200], False, [0, 3, 0, 3]),  # clamped to the 3x4 map
        ([0, 0, 16, 16], True, [0, 1, 0, 1]),  # aligned: centres at 8, 24, ...
        ([8, 8, 40, 40], True, [0, 2, 0, 2]),
    ],
)
def test_native_crops(box: list[float], aligned: bool, expected: list[int]) -> None:
    boxes = torch.tensor([box], dtype=torch.float32)
    crops = native_crops(boxes, spatial_scale=1 / 16, height=3, width=4, aligned=aligned)
    assert crops.tolist() == [expected]


# ------------------------------------------------------------------------------------------ map / logits


def test_map_mimic_known_answers_and_padding_ignored() -> None:
    student = torch.zeros(2, 1, 3, 3, requires_grad=True)
    teacher = torch.full((2, 1, 3, 3), 100.0)  # padding: huge error that must not count
    teacher[0, :, :2, :2] = 1.0  # image 0: 2x2 valid, error 1
    teacher[1, :, :1, :1] = 3.0  # image 1: 1x1 valid, error 3
    r = identity(1, torch.float32)
    loss = map_mimic_loss(student, teacher, r, valid_hw=[(2, 2), (1, 1)])
    assert loss.item() == pytest.approx((1 + 9) / 2 / 2)  # 1/(2N) Σ_n ‖·‖²/m_n
    loss.backward()
    assert student.grad[0, :, 2:, :].abs().sum() == 0 and student.grad[1, :, 1:, :].abs().sum() == 0
    fp16_teacher = torch.full((1, 1, 2, 2), 0.5).half()
    assert map_mimic_loss(torch.zeros(1, 1, 2, 2), fp16_teacher, r).item() == pytest.approx(0.125)


def test_map_mimic_no_gradient_to_teacher() -> None:
    teacher = torch.randn(1, 3, 4, 4, requires_grad=True)
    map_mimic_loss(torch.randn(1, 2, 4, 4), teacher, MimicTransform(student_channels=2, teacher_channels=3)).backward()
    assert teacher.grad is None


def test_logits_mimic_plain_form_known_answer() -> None:
    """center=False, foreground_threshold=None: plain L2 over every logit and every delta column."""
    student_logits = torch.zeros(2, 3, requires_grad=True)
    teacher_logits = torch.ones(2, 3, requires_grad=True)
    plain = dict(center=False, balance=False, foreground_threshold=None)
    assert logits_mimic_loss(student_logits, teacher_logits, **plain).item() == pytest.approx(0.5)
    loss = logits_mimic_loss(
        student_logits, teacher_logits, torch.zeros(2, 12), torch.full((2, 12), 2.0).half(), delta_weight=0.5, **plain
    )
    assert loss.item() == pytest.approx(0.5 + 0.5 * (4 / 2))
    loss.backward()
    assert teacher_logits.grad is None
    torch.testing.assert_close(student_logits.grad, torch.full((2, 3), -1 / 6))  # d/ds of (s-t)²/(2·R·K)


def test_logits_mimic_ignores_a_per_row_shift_of_the_logits() -> None:
    teacher = torch.tensor([[4.0, -2.0, 1.0], [0.0, 3.0, -3.0]])
    shifted = teacher + torch.tensor([[7.5], [-2.0]])  # same softmax
    assert logits_mimic_loss(shifted, teacher).item() == pytest.approx(0.0, abs=1e-12)
    # centred rows: s − s̄ = [0, 0, 0] against t − t̄ = [3, -3, 0] and [0, 3, -3] -> (9+9)·2 / (2·2·3) = 3
    assert logits_mimic_loss(torch.zeros(2, 3), teacher).item() == pytest.approx(3.0)


def test_logits_mimic_weighs_teacher_foreground_and_background_rows_half_each() -> None:
    """Three background rows the student matches exactly and one foreground row it misses: balanced, the miss
    is half the loss; the plain row mean dilutes it to a quarter (what taught heads to call objects background)."""
    teacher = torch.tensor([[5.0, -5.0], [4.0, -4.0], [6.0, -6.0], [-2.0, 2.0]])  # rows 0-2 background, row 3 fg
    student = teacher.clone()
    student[3] = torch.tensor([2.0, -2.0])  # centred error [4, -4] on the foreground row: 0.5·16 = 8 per row
    student.requires_grad_(True)
    balanced = logits_mimic_loss(student, teacher)
    assert balanced.item() == pytest.approx(8.0 / 2)
    assert logits_mimic_loss(student, teacher, balance=False).item() == pytest.approx(8.0 / 4)
    balanced.backward()
    assert student.grad is not None and student.grad[:3].abs().sum() == 0 and student.grad[3, 1] < 0
    # One kind of row only: the plain mean.
    assert logits_mimic_loss(student[:3], teacher[:3]).item() == pytest.approx(0.0)
    assert logits_mimic_loss(student[3:], teacher[3:]).item() == pytest.approx(8.0)


def test_logits_mimic_matches_deltas_on_teacher_foreground_rows_and_class_only() -> None:
    """Row 0: teacher says class 2 (p > 0.5); row 1: background. Only row 0's class-2 columns are matched."""
    teacher_logits = torch.tensor([[0.0, 0.0, 6.0], [6.0, 0.0, 0.0]])
    teacher_deltas = torch.arange(24, dtype=torch.float32).view(2, 12)
    student_deltas = torch.zeros(2, 12, requires_grad=True)
    loss = logits_mimic_loss(teacher_logits.clone(), teacher_logits, student_deltas, teacher_deltas, delta_weight=2.0)
    want = 2.0 * 0.5 * (teacher_deltas[0, 8:12] ** 2).mean()  # columns 8..11 are class 2's
    assert loss.item() == pytest.approx(want.item())
    loss.backward()
    grad = student_deltas.grad
    assert grad is not None and grad[1].abs().sum() == 0 and grad[0, :8].abs().sum() == 0
    assert (grad[0, 8:12] < 0).all()
    # No foreground row at all: the delta term is 0 but still part of the graph.
    background = torch.tensor([[6.0, 0.0, 0.0]] * 2)
    zero = logits_mimic_loss(background, background, student_deltas, teacher_deltas)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="4K"):
        logits_mimic_loss(teacher_logits, teacher_logits, torch.zeros(2, 8), torch.zeros(2, 8))


def test_logits_mimic_edge_cases() -> None:
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = logits_mimic_loss(empty, torch.zeros(0, 3))
    loss.backward()
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        logits_mimic_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="together"):
        logits_mimic_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 12))


# ------------------------------------------------------------------------------------------ regions


def test_region_indices_drop_unusable_boxes_and_keep_all_when_few() -> None:
    proposals = torch.tensor(
        [[0, 0, 10, 10], [5, 5, 5, 20], [0, 0, 20, 20], [1, 1, 3, 3], [0, 0, math.nan, 4], [2, 2, 30, 30]],
        dtype=torch.float32,
    )  # stored best first
    # zero width and NaN dropped; with no more than ``num`` usable boxes, all of them in store order
    assert region_indices(proposals, 4, torch.Generator().manual_seed(0)).tolist() == [0, 2, 3, 5]


def test_region_indices_seeded_subset_of_the_best_two_num() -> None:
    gen = torch.Generator().manual_seed(0)
    corners = torch.rand(50, 2, generator=gen) * 100
    proposals = torch.cat([corners, corners + 5], 1)
    a = region_indices(proposals, 5, torch.Generator().manual_seed(7))
    b = region_indices(proposals, 5, torch.Generator().manual_seed(7))
    c = region_indices(proposals, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 5 and set(a.tolist()) <= set(range(10))
    assert a.tolist() == sorted(a.tolist())  # kept in store (score) order


# ------------------------------------------------------------------------------------------ modules


def test_mimic_transform_init() -> None:
    torch.manual_seed(0)
    r = MimicTransform(student_channels=256, teacher_channels=512)
    assert r.bias.abs().max() == 0
    assert r.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert r(torch.zeros(1, 256, 2, 3)).shape == (1, 512, 2, 3)


def test_logits_mimic_needs_deltas_together() -> None:
    with pytest.raises(ValueError, match="together"):
        logits_mimic_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 12))
