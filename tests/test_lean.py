"""The lean inference copy (detection.lean): BN folding, fused and merged convs, separable RoIAlign, batched RPN
and head post-processing, and the whole of predict agree with the reference model; the copy exports; the
reference model is untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

from mimicdet.detection import lean as lean_mod
from mimicdet.detection.backbone import InceptionBackbone
from mimicdet.detection.detector import Detector, DetectorConfig, build_detector
from mimicdet.detection.export import OUTPUT_NAMES, example_input, export_onnx, match_outputs, onnx_runner
from mimicdet.detection.heads import BoxHeadConfig, FastRCNNHead
from mimicdet.detection.lean import LeanBackbone, LeanConv, make_lean, roi_align_separable
from mimicdet.detection.rpn import RPN, RPNConfig, filter_proposals_batched, nms_first

torch.set_num_threads(1)

SIZES = [(96, 128), (70, 100), (128, 64)]  # a padded 128 x 128 batch of three images of different sizes


def _calibrated(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms (a fresh BN would make folding a no-op), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def _tiny(head: str = "fast-rcnn", **kw) -> Detector:
    """A w=1/8 detector with BN statistics calibrated on random images and sharpened predictors (RPN x10, head
    x30), so proposals and detections vary in number and NMS suppresses."""
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(num_classes=3, width=0.125, head=head, anchor_sizes=(16, 32), **kw))
    with torch.no_grad():
        model.backbone.train()
        for _ in range(3):
            model.backbone(torch.randn(4, 3, 128, 128))
        for name, p in model.named_parameters():
            part, layer = name.split(".")[0], name.split(".")[-2]
            if name.endswith("weight") and layer in ("cls_logits", "bbox_pred", "cls_score", "cls_maps", "box_maps"):
                p.mul_(10.0 if part == "rpn" else 30.0)
    return model.eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    images = torch.zeros(len(SIZES), 3, 128, 128)
    g = torch.Generator().manual_seed(seed)
    for i, (h, w) in enumerate(SIZES):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    return images, SIZES


# --- backbone: folding, merged and fused convs ----------------------------------------------------------------
@pytest.mark.parametrize("width", [0.125, 0.25])
def test_folded_backbone_matches_reference(width):
    torch.manual_seed(0)
    ref = _calibrated(InceptionBackbone(width=width))
    lean = LeanBackbone(ref).eval()
    x = torch.randn(2, 3, 80, 112)
    with torch.no_grad():
        expected, got = ref(x), lean(x)
    assert got.shape == expected.shape == (2, ref.out_channels, 5, 7)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lean.modules())


@pytest.mark.parametrize("fused_min_macs", [0, 10**15])  # every conv fused (oneDNN) / every conv plain
def test_lean_conv_paths_match_conv_bn_relu(monkeypatch, fused_min_macs):
    monkeypatch.setattr(lean_mod, "FUSED_MIN_MACS", fused_min_macs)
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(16)
    _calibrated(bn)
    lean = LeanConv(torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn)).eval()
    x = torch.randn(2, 8, 20, 30).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), F.relu(bn(conv(x))), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(lean)(x), lean(x))  # packed weights are dropped from copies


# --- RPN post-processing --------------------------------------------------------------------------------------
def _rpn(pre: int, post: int) -> RPN:
    cfg = RPNConfig(in_channels=8, stride=16, pre_nms_top_n_test=pre, post_nms_top_n_test=post)
    return RPN(config=cfg).eval()


def _raw_proposals(n: int, a: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded boxes ``[n, a, 4]`` spilling over 128 x 128 images, some degenerate, with objectness ``[n, a]``
    that has ties (saturated sigmoids and repeated logits)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, a, 2, generator=g) * 160 - 20
    wh = torch.rand(n, a, 2, generator=g) * 60
    wh[:, ::17] = 0.0  # empty boxes: removed as too small
    logits = torch.randn(n, a, generator=g) * 4
    logits[:, ::5] = logits[:, ::5].round()  # ties
    logits[:, ::29] = 30.0  # sigmoid saturates to exactly 1.0
    return torch.cat([xy, xy + wh], dim=2), logits


@pytest.mark.parametrize(
    ("a", "pre", "post"), [(1500, 1000, 300), (1500, 1000, 50), (200, 1000, 300), (1500, 1200, 300)]
)
def test_batched_rpn_filter_gives_torchvision_proposals(a, pre, post):
    rpn = _rpn(pre, post)
    for seed in range(3):
        boxes, logits = _raw_proposals(3, a, seed)
        expected = rpn.filter_proposals(boxes, logits.reshape(-1, 1), SIZES, [a])
        got = filter_proposals_batched(
            boxes, logits, SIZES, pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=rpn.nms_thresh,
            min_size=rpn.min_size, score_thresh=rpn.score_thresh,
        )  # fmt: skip
        for e, g_ in zip(expected, got):
            for eb, gb in zip(e, g_):
                assert torch.equal(eb, gb)


def test_nms_first_is_nms_top_n_also_when_the_prefix_keeps_too_few():
    g = torch.Generator().manual_seed(0)
    for clustered in (False, True):
        xy = torch.rand(800, 2, generator=g) * (10 if clustered else 200)  # clustered: most boxes suppressed
        boxes = torch.cat([xy, xy + 20 + torch.rand(800, 2, generator=g) * 20], dim=1)
        scores = torch.rand(800, generator=g).round(decimals=2).sort(descending=True).values  # ties
        for top_n in (10, 100, 300, 1000):
            assert torch.equal(nms_first(boxes, scores, 0.5, top_n), nms(boxes, scores, 0.5)[:top_n])


# --- box head: separable RoIAlign and batched post-processing -------------------------------------------------
def test_separable_roi_align_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 9, 13, generator=g).contiguous(memory_format=torch.channels_last)
    rois = []
    for n in (37, 11):
        xy = torch.rand(n, 2, generator=g) * 260 - 40  # some regions start off the map
        rois.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 180], dim=1))
    rois[0][0] = torch.tensor([1.0, 2.0, 1.5, 2.2])  # smaller than a cell: RoIAlign widens it to one cell
    rois[1][0] = torch.tensor([300.0, 300.0, 400.0, 400.0])  # wholly off the map: zeros
    for one_image in (False, True):
        f, r = (features[:1], rois[:1]) if one_image else (features, rois)
        expected = roi_align(f, r, output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=False)
        got = roi_align_separable(f, r, output_size=7, spatial_scale=1 / 16, sampling_ratio=2)
        torch.testing.assert_close(got.permute(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)


def test_batched_head_postprocess_gives_torchvision_detections():
    torch.manual_seed(0)
    head = FastRCNNHead(config=BoxHeadConfig(kind="fast-rcnn", in_channels=8, stride=16, num_classes=4,
                                             detections_per_img=20)).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    proposals = []
    for n in (50, 0, 30):  # the middle image has no proposals
        xy = torch.rand(n, 2, generator=g) * 100
        proposals.append(torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 60], dim=1))
    logits = torch.randn(80, 4, generator=g) * 3
    deltas = torch.randn(80, 16, generator=g)
    expected = head.postprocess(logits, deltas, proposals, SIZES)
    got = head.postprocess_batched(logits, deltas, proposals, SIZES)
    assert [len(d["boxes"]) for d in got] == [len(d["boxes"]) for d in expected]
    assert len(got[1]["boxes"]) == 0 and len(got[0]["boxes"]) == 20  # detections_per_img caps the first
    for e, d in zip(expected, got):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(e[k], d[k])


# --- the whole detector -----------------------------------------------------------------------------------------
def _assert_same_predictions(expected: list[dict], got: list[dict]) -> None:
    assert all(len(e["proposals"]) for e in expected) and sum(len(e["boxes"]) for e in expected)
    for e, d in zip(expected, got):
        assert set(d) == set(e)
        for boxes, scores in (("boxes", "scores"), ("proposals", "proposal_scores")):
            assert len(d[boxes]) == len(e[boxes])
            torch.testing.assert_close(d[boxes], e[boxes], rtol=0, atol=1e-3)  # pixels
            torch.testing.assert_close(d[scores], e[scores], rtol=0, atol=1e-4)
        assert torch.equal(d["labels"], e["labels"])


@pytest.mark.parametrize(("head", "upsample"), [("fast-rcnn", False), ("rfcn", False), ("none", False),
                                                ("fast-rcnn", True)])  # fmt: skip
def test_lean_predict_matches_reference(head, upsample):
    model = _tiny(head, upsample=upsample).train()
    before = copy.deepcopy(model.state_dict())
    lean = make_lean(model)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    images, sizes = _batch()
    expected = model.predict(images, sizes)
    assert model.training  # predict restores the mode
    _assert_same_predictions(expected, lean.predict(images, sizes))
    _assert_same_predictions(expected[1:2], lean.predict(images[1:2], sizes[1:2]))  # batch of one
    _assert_same_predictions(expected, copy.deepcopy(lean).predict(images, sizes))


def test_lean_copy_refuses_training():
    lean = make_lean(_tiny())
    images, sizes = _batch()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}] * 3
    with pytest.raises(RuntimeError, match="folded inference weights; train the reference model"):
        lean.train()(images, sizes, targets)


def test_lean_copy_exports_and_matches_reference_predict(tmp_path):
    model = _tiny()
    path = tmp_path / "lean.onnx"
    export_onnx(make_lean(model), path, height=96, width=128, dynamic=True)
    run = onnx_runner(path)
    for seed, (h, w) in ((3, (96, 128)), (4, (128, 96))):
        x = example_input(h, w, seed=seed)
        det = model.predict(x, [(h, w)])[0]
        expected = {k: det[k].numpy() for k in OUTPUT_NAMES}
        got = run(x.numpy())
        assert len(got["proposals"]) > 0 and len(got["boxes"]) > 0
        assert match_outputs(expected, got, atol=1e-2) < 1e-2
        assert np.array_equal(np.sort(got["labels"]), np.sort(expected["labels"]))
