"""The detector composer, its RPN and heads: shapes, losses with known answers, precomputed proposals,
the x2 upsample, a tiny overfit, and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from mimicdet.data.errors import DataError
from mimicdet.detection.detector import (
    Detector,
    DetectorConfig,
    DetectorOutputs,
    build_detector,
    load_detector,
    save_detector,
)
from mimicdet.detection.anchors import PEDESTRIAN_ASPECT_RATIOS
from mimicdet.detection.rpn import FixedStrideAnchorGenerator

torch.set_num_threads(1)

WIDTHS = (1.0, 0.5, 0.25, 0.125)
HEADS = ("fast-rcnn", "rfcn", "none")


def _target(boxes: list[list[float]], label: int = 1) -> dict[str, torch.Tensor]:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.full((len(b),), label, dtype=torch.int64)}


def _tiny(head: str = "fast-rcnn", **kw) -> Detector:
    torch.manual_seed(0)
    return build_detector(DetectorConfig(num_classes=3, width=0.125, head=head, **kw))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("width", WIDTHS)
def test_shapes_for_every_width_and_head(width: float, head: str) -> None:
    torch.manual_seed(0)
    m = build_detector(DetectorConfig(num_classes=3, width=width, head=head, box_batch_size_per_image=16))
    c = round(832 * width)
    assert (m.feature_channels, m.feature_stride) == (c, 16)
    counts = m.param_counts()
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["total"] == counts["backbone"] + counts["rpn"] + counts["head"]
    assert (counts["head"] == 0) == (head == "none")

    images = torch.randn(2, 3, 64, 80)
    sizes = [(64, 80), (50, 40)]
    targets = [_target([[8, 8, 40, 50]], 2), _target([])]
    m.train()
    out, losses = m(images, sizes, targets)
    assert isinstance(out, DetectorOutputs)
    assert out.features.shape == (2, c, 4, 5)
    expected = {"loss_objectness", "loss_rpn_box_reg"}
    if head != "none":
        expected |= {"loss_classifier", "loss_box_reg"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    if head == "none":
        assert out.class_logits is None and out.box_deltas is None
    else:
        r = sum(len(p) for p in out.head_proposals)
        assert r <= 2 * 16
        assert out.class_logits.shape == (r, 3) and out.box_deltas.shape == (r, 12)
    for p, s in zip(out.proposals, out.proposal_scores):
        assert p.shape == (len(s), 4) and len(s) <= 300
        assert torch.all(s[:-1] >= s[1:])  # sorted by objectness


def test_config_round_trips_through_json_and_rejects_unknown_fields() -> None:
    cfg = DetectorConfig(num_classes=2, width=0.25, head="rfcn", aspect_ratios=PEDESTRIAN_ASPECT_RATIOS, upsample=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["aspect_ratios"] == [2.0, 3.0]
    assert DetectorConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown fields.*'widht'"):
        DetectorConfig.from_dict({**d, "widht": 1})
    with pytest.raises(ValueError, match="head must be one of"):
        DetectorConfig(num_classes=2, head="yolo")
    with pytest.raises(ValueError, match="num_classes"):
        DetectorConfig(num_classes=1)


def test_anchor_generator_uses_the_true_stride() -> None:
    gen = FixedStrideAnchorGenerator(sizes=(16,), aspect_ratios=(1.0,), stride=16)
    feats = torch.zeros(1, 1, 2, 3)
    anchors = gen(ImageList(feats, [(20, 40)]), [feats])[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.tensor([[0, 0], [16, 0], [32, 0], [0, 16], [16, 16], [32, 16]], dtype=torch.float32)
    assert torch.equal(centres, expected)
    assert torch.equal(anchors[0], torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    # torchvision's generator agrees when the padded size is a multiple of the stride, and guesses 15 on 250 px.
    tv = AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),))
    assert torch.equal(tv(ImageList(torch.zeros(1, 3, 32, 48), [(32, 48)]), [feats])[0], anchors)
    feats16 = torch.zeros(1, 1, 16, 16)
    tv250 = tv(ImageList(torch.zeros(1, 3, 250, 250), [(250, 250)]), [feats16])[0]
    ours = gen(ImageList(feats16, [(250, 250)]), [feats16])[0]
    assert tv250[-1, 0].item() == 15 * 15 - 8 and ours[-1, 0].item() == 15 * 16 - 8


def test_pedestrian_aspect_ratios_are_tall() -> None:
    gen = FixedStrideAnchorGenerator(sizes=(32,), aspect_ratios=PEDESTRIAN_ASPECT_RATIOS, stride=16)
    a = gen.cell_anchors[0]
    hw = (a[:, 3] - a[:, 1]) / (a[:, 2] - a[:, 0])
    assert torch.allclose(hw, torch.tensor([2.0, 3.0]), atol=0.15)  # anchors are rounded to whole pixels


@pytest.mark.parametrize("head", ["fast-rcnn", "rfcn"])
def test_image_without_boxes_gives_zero_box_losses(head: str) -> None:
    m = _tiny(head).train()
    _, losses = m(torch.randn(1, 3, 64, 64), [(64, 64)], [_target([])])
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert losses["loss_classifier"].item() > 0 and losses["loss_objectness"].item() > 0
    sum(losses.values()).backward()  # background-only images still train the classifiers


def test_head_box_loss_has_known_value_for_a_perfect_proposal() -> None:
    # A proposal equal to the GT box has zero regression target; with zero predicted deltas the box loss is 0,
    # with deltas of 1 on every coordinate it is smooth_l1(1, beta=1/9) * 4 / R = (1 - 1/18) * 4 / R.
    m = _tiny("fast-rcnn").train()
    head = m.head
    gt = _target([[10, 10, 40, 50]])
    feats = m.features(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        head.bbox_pred.weight.zero_()
        head.bbox_pred.bias.fill_(1.0)
    out, losses = head(feats, [gt["boxes"].clone()], [(64, 64)], [gt])
    r = out.class_logits.shape[0]
    assert r == 2  # the proposal and the appended GT box, both positive
    assert out.labels[0].tolist() == [1, 1]
    assert losses["loss_box_reg"].item() == pytest.approx((1 - 1 / 18) * 4 * 2 / r, rel=1e-5)


def test_training_mode_needs_valid_targets() -> None:
    m = _tiny().train()
    x, sizes = torch.randn(1, 3, 32, 32), [(32, 32)]
    with pytest.raises(ValueError, match="needs targets"):
        m(x, sizes)
    with pytest.raises(ValueError, match=r"labels.*1\.\.2"):
        m(x, sizes, [_target([[0, 0, 10, 10]], label=3)])
    with pytest.raises(ValueError, match="positive width"):
        m(x, sizes, [_target([[5, 5, 5, 10]])])
    with pytest.raises(ValueError, match="image_sizes"):
        m(x, [(40, 32)], [_target([])])


def test_predict_returns_sane_detections_and_restores_mode() -> None:
    m = _tiny("fast-rcnn", detections_per_img=20).train()
    x = torch.randn(2, 3, 64, 96)
    sizes = [(64, 96), (40, 50)]
    dets = m.predict(x, sizes)
    assert m.training  # predict ran in eval mode and put the mode back
    assert len(dets) == 2
    for d, (h, w) in zip(dets, sizes):
        assert set(d) == {"boxes", "scores", "labels", "proposals", "proposal_scores"}
        n = len(d["scores"])
        assert n <= 20 and d["boxes"].shape == (n, 4) and d["labels"].dtype == torch.int64
        assert torch.all(d["scores"] > 0.05) and torch.all(d["scores"][:-1] >= d["scores"][1:])
        assert torch.all((d["labels"] >= 1) & (d["labels"] <= 2))
        for boxes in (d["boxes"], d["proposals"]):  # clipped to the valid image, not the padded one
            assert torch.all(boxes[:, 0::2] <= w) and torch.all(boxes[:, 1::2] <= h) and torch.all(boxes >= 0)


def test_predict_without_head_returns_proposals_as_detections() -> None:
    m = _tiny("none")
    d = m.predict(torch.randn(1, 3, 64, 64), [(64, 64)])[0]
    assert torch.equal(d["boxes"], d["proposals"]) and torch.equal(d["scores"], d["proposal_scores"])
    assert torch.all(d["labels"] == 1)


def test_upsample_doubles_the_map_and_halves_the_stride() -> None:
    base, up = _tiny(), _tiny(upsample=True)
    assert up.feature_stride == 8 and up.feature_channels == base.feature_channels
    x = torch.randn(1, 3, 64, 96)
    assert up.features(x).shape == (1, 104, 8, 12)
    assert up.param_counts()["backbone"] == base.param_counts()["backbone"] + 104 * 16
    # Initialised to bilinear x2: a constant map stays constant away from the border.
    c = torch.ones(1, 104, 4, 4)
    assert torch.allclose(up.upsample(c)[..., 1:-1, 1:-1], torch.ones(1, 104, 6, 6))
    out, _ = up.eval()(x, [(64, 96)])
    assert out.features.shape[-2:] == (8, 12)
    assert up.feature_size(64, 90) == (8, 12)


@pytest.mark.parametrize("head", ["fast-rcnn", "rfcn"])
def test_given_proposals_feed_the_head(head: str) -> None:
    m = _tiny(head).eval()
    x, sizes = torch.randn(2, 3, 64, 64), [(64, 64), (64, 64)]
    given = [torch.tensor([[0.0, 0, 20, 20], [10, 10, 50, 60], [5, 5, 30, 15]]), torch.tensor([[1.0, 2, 33, 44]])]
    out, losses = m(x, sizes, proposals=given)
    assert losses == {}
    assert [p.tolist() for p in out.head_proposals] == [p.tolist() for p in given]
    logits, deltas = m.head_outputs(out.features, given, sizes)
    assert torch.equal(out.class_logits, logits) and deltas.shape == (4, 12)
    # The RPN still runs and still gives its own proposals.
    assert len(out.proposals[0]) > 3

    # Training with targets: the head samples from the given proposals plus the GT boxes only.
    m.train()
    targets = [_target([[8, 8, 40, 40]]), _target([])]
    out, losses = m(x, sizes, targets, proposals=given)
    assert {"loss_objectness", "loss_classifier"} <= set(losses)
    allowed = [torch.cat([given[0], targets[0]["boxes"]]), given[1]]
    for used, ok in zip(out.head_proposals, allowed):
        assert all(any(torch.equal(u, a) for a in ok) for u in used)


def test_teacher_outputs_are_cropped_and_consistent() -> None:
    m = _tiny("fast-rcnn").train()
    x, sizes = torch.randn(2, 3, 64, 96), [(64, 96), (33, 40)]
    recs = m.teacher_outputs(x, sizes, top_k=7)
    assert m.training
    assert recs[0]["features"].shape == (104, 4, 6) and recs[1]["features"].shape == (104, 3, 3)
    m.eval()
    feats = m.features(x)
    assert torch.equal(recs[1]["features"], feats[1, :, :3, :3])
    for r in recs:
        k = len(r["proposals"])
        assert 1 <= k <= 7 and r["scores"].shape == (k,)
        assert r["class_logits"].shape == (k, 3) and r["box_deltas"].shape == (k, 12)
    logits, _ = m.head_outputs(feats, [r["proposals"] for r in recs], sizes)
    assert torch.allclose(torch.cat([r["class_logits"] for r in recs]), logits, atol=1e-6)


def test_checkpoint_round_trip_and_refusal(tmp_path) -> None:
    m = _tiny("rfcn", upsample=True).eval()
    path = tmp_path / "sub" / "det.pt"
    save_detector(path, m, {"iter": 12, "dataset": "raccoon"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["det.pt"]  # no temp file left
    loaded, meta = load_detector(path)
    assert meta == {"iter": 12, "dataset": "raccoon"} and loaded.config == m.config
    x = torch.randn(1, 3, 64, 64)
    a, b = m.predict(x, [(64, 64)])[0], loaded.eval().predict(x, [(64, 64)])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])

    ckpt = torch.load(path, weights_only=True)
    ckpt["detector_config"]["width"] = 0.25  # weights of a w = 1/8 model under a w = 1/4 config
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(DataError, match=r"wrong\.pt.*shape mismatches.*backbone\.conv1"):
        load_detector(tmp_path / "wrong.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["rpn.head.conv.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(DataError, match=r"missing keys \['rpn\.head\.conv\.weight'\]"):
        load_detector(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="'model' and 'detector_config'"):
        load_detector(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "nope.pt")


def _squares() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Four 64x64 noise images with 1-2 bright squares off the anchor grid."""
    boxes = [
        [[5, 7, 27, 29]],
        [[31, 19, 57, 45], [3, 39, 21, 57]],
        [[21, 5, 43, 27]],
        [[9, 29, 35, 55], [41, 7, 55, 21]],
    ]
    g = torch.Generator().manual_seed(1)
    images = 0.1 * torch.randn(4, 3, 64, 64, generator=g)
    for img, bl in zip(images, boxes):
        for x1, y1, x2, y2 in bl:
            img[:, y1:y2, x1:x2] += 2.0
    return images, [_target(bl) for bl in boxes]


def _recall(gt: list[dict[str, torch.Tensor]], found: list[torch.Tensor], iou: float = 0.5) -> float:
    hits = sum(int((box_iou(t["boxes"], f).max(dim=1).values >= iou).sum()) for t, f in zip(gt, found) if len(f))
    return hits / sum(len(t["boxes"]) for t in gt)


def test_eighth_width_detector_overfits_four_tiny_images() -> None:
    torch.manual_seed(0)
    m = build_detector(
        DetectorConfig(
            num_classes=2, width=0.125, anchor_sizes=(16, 32), aspect_ratios=(1.0,),
            rpn_batch_size_per_image=64, box_batch_size_per_image=32,
        )  # fmt: skip
    )
    images, targets = _squares()
    sizes = [(64, 64)] * 4
    before = _recall(targets, [d["proposals"][:10] for d in m.predict(images, sizes)])
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    best = (0.0, 0.0)
    for it in range(1, 201):
        _, losses = m(images, sizes, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        if it >= 40 and it % 10 == 0:
            dets = m.predict(images, sizes)
            rpn = _recall(targets, [d["proposals"][:10] for d in dets])
            det = _recall(targets, [d["boxes"][:5] for d in dets])
            best = max(best, (min(rpn, det), rpn))
            if min(rpn, det) >= 0.9:
                break
    assert before < 0.9
    # Recall of the top-10 proposals and of the top-5 detections, both at IoU 0.5.
    assert best[0] >= 0.9, f"recall (min of proposals, detections) reached only {best}"
