"""`mimic export`: ONNX (run with onnxruntime) and TorchScript (loaded back) reproduce Detector.predict, the
ps_roi_align symbolic, the deployment helpers, and bad input through the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.ops import ps_roi_align

from mimicdet.cli import main
from mimicdet.data.transforms import Preprocess
from mimicdet.detection.detector import Detector, load_detector, save_detector
from mimicdet.detection.export import (
    OUTPUT_NAMES,
    ExportConfig,
    InputSizes,
    _register_symbolics,
    example_input,
    input_sizes,
    match_outputs,
    onnx_runner,
    postprocess,
    prepare_input,
    read_sidecar,
    reference_outputs,
    run_export,
    torchscript_runner,
)
from tests.pipeline_fixtures import CLASSES, make_tiny_teacher

from tests.voc_fixtures import RACCOON
SIZE = 128
HEADS = ("fast-rcnn", "rfcn", "none")


torch.set_num_threads(1)  # tiny models: a second thread only contends with other test processes


def _deployable(path: Path, head: str, *, upsample: bool = False, input_scale: float = 1.0) -> Path:
    """A tiny w=1/8 detector (random weights, calibrated BN) whose predictors are sharpened x30, so scores spread
    out, NMS suppresses and the numbers of proposals and detections change from image to image (no top-N cap
    on detections). ``upsample`` + ``input_scale=0.5`` make it a scale-mimic student."""
    make_tiny_teacher(path, size=SIZE, head=head)
    base, meta = load_detector(path)
    model = Detector(dataclasses.replace(base.config, detections_per_img=1000, upsample=upsample))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing == (["upsample.weight"] if upsample else [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and name.split(".")[-2] in ("cls_logits", "bbox_pred", "cls_score", "cls_maps",
                                                                     "box_maps"):
                p.mul_(30.0)
    save_detector(path, model, {**meta, "role": "student", "input_scale": input_scale})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {head: _deployable(root / f"{head}.pt", head) for head in HEADS}


def _runner(fmt: str, path: Path):
    return onnx_runner(path) if fmt == "onnx" else torchscript_runner(path)


# --- the exported files reproduce predict ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("head", HEADS)
def test_export_reproduces_predict_on_new_images(checkpoints, tmp_path, head, fmt):
    out = tmp_path / f"model.{fmt}"
    summary = run_export(ExportConfig(checkpoint=checkpoints[head], format=fmt, out=out))
    # By default the input's height and width are dynamic.
    assert summary["input_shape"] == [1, 3, "H", "W"] and summary["dynamic"] and summary["head"] == head
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"{out.name}.json"])

    model, _ = load_detector(checkpoints[head])
    run = _runner(fmt, out)
    counts = []
    # Neither input is one the file was traced or verified with, and neither size is the traced one.
    for seed, (h, w) in ((5, (96, 160)), (6, (SIZE, 2 * SIZE))):
        x = example_input(h, w, seed=seed)
        expected, got = reference_outputs(model, x), run(x.numpy())
        assert set(got) == set(OUTPUT_NAMES)
        assert got["labels"].dtype == np.int64 and got["boxes"].dtype == np.float32
        assert match_outputs(expected, got, atol=1e-2) < 1e-2  # 1/100 px, 0.01 score
        counts.append((len(got["boxes"]), len(got["proposals"])))
    # The numbers of rows change with the image, so nothing was frozen into the trace.
    assert len({r for _, r in counts}) > 1 and len({d for d, _ in counts}) > 1, counts
    if head == "none":
        assert all(d == r for d, r in counts)

    side = read_sidecar(out)
    assert side["format"] == fmt and side["head"] == head and side["classes"] == list(CLASSES)
    assert side["preprocess"] == Preprocess(min_size=SIZE, max_size=SIZE).to_dict() and side["input_scale"] == 1.0
    assert side["input"]["shape"] == [1, 3, "H", "W"] and side["input"]["dynamic"] is True
    assert side["input"]["size_divisor"] == 32 and side["input"]["largest_preprocessed"] == [SIZE, SIZE]
    assert "ANY height H and width W" in side["input"]["accepts"]
    assert [o["name"] for o in side["outputs"]] == list(OUTPUT_NAMES)
    assert side["postprocess_in_graph"] and "original image" in side["postprocess_remaining"]
    assert side["verified_max_abs_diff"] < 1e-2
    # min_size == max_size: checked at the square and at one a divisor taller.
    assert side["verified_sizes"] == [[SIZE, SIZE], [SIZE + 32, SIZE]]


def test_scale_mimic_student_takes_half_size_input(tmp_path):
    ckpt = _deployable(tmp_path / "student.pt", "fast-rcnn", upsample=True, input_scale=0.5)
    out = tmp_path / "student.onnx"
    summary = run_export(ExportConfig(checkpoint=ckpt, format="onnx", out=out))
    assert summary["input_shape"] == [1, 3, "H", "W"]
    side = read_sidecar(out)
    assert side["input_scale"] == 0.5 and side["detector_config"]["upsample"] is True
    # Sides 128 at scale 0.5 -> 64, padded to multiples of 32 * 0.5.
    assert side["input"]["size_divisor"] == 16 and side["input"]["largest_preprocessed"] == [64, 64]
    assert side["verified_sizes"] == [[64, 64], [80, 64]]
    model, _ = load_detector(ckpt)
    run = onnx_runner(out)
    for seed, (h, w) in ((3, (64, 64)), (4, (48, 64))):
        x = example_input(h, w, seed=seed)
        assert match_outputs(reference_outputs(model, x), run(x.numpy()), atol=1e-2) < 1e-2


# --- the default input serves the dataset's own photos ---------------------------------------------------------
# Photos of a dataset come in every aspect: preprocessing with min_size 96 and max_size 160 gives inputs from
# 96 x 160 (landscape) to 160 x 96 (portrait), neither of which fits a square of the shorter side.
PHOTO_PRE = Preprocess(min_size=96, max_size=160)
PHOTOS = ("raccoon-1.jpg", "raccoon-103.jpg", "raccoon-104.jpg", "raccoon-108.jpg")  # wide, tall, very wide, 5:4


@pytest.fixture(scope="module")
def photo_checkpoint(tmp_path_factory) -> Path:
    path = _deployable(tmp_path_factory.mktemp("photo") / "fast-rcnn.pt", "fast-rcnn")
    model, meta = load_detector(path)
    save_detector(path, model, {**meta, "preprocess": PHOTO_PRE.to_dict()})
    return path


def test_input_sizes_known_answers():
    pre = {"preprocess": PHOTO_PRE.to_dict()}
    assert input_sizes(pre) == InputSizes(shorter=96, longest=160, divisor=32)
    assert input_sizes(pre).check_sizes() == [(96, 160), (160, 96)]
    half = {"preprocess": Preprocess(min_size=100, max_size=150, size_divisor=32).to_dict(), "input_scale": 0.5}
    assert input_sizes(half) == InputSizes(shorter=64, longest=80, divisor=16)  # 50 -> 64, 75 -> 80
    square = {"preprocess": Preprocess(min_size=128, max_size=128).to_dict()}
    assert input_sizes(square).check_sizes() == [(128, 128), (160, 128)]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_default_export_runs_the_datasets_photos_of_every_aspect(photo_checkpoint, tmp_path, fmt):
    """prepare_input -> exported file -> postprocess on landscape, portrait and square photos equals predict on the
    same input mapped back to original pixels; the sidecar says what the file accepts."""
    from mimicdet.data.images import load_image
    from mimicdet.data.transforms import prepare

    out = tmp_path / f"photo.{fmt}"
    summary = run_export(ExportConfig(checkpoint=photo_checkpoint, format=fmt, out=out))
    assert summary["input_shape"] == [1, 3, "H", "W"]
    side = read_sidecar(out)
    accepts = side["input"]["accepts"]
    assert "ANY height H and width W" in accepts and "shorter side to 96 px" in accepts
    assert "at most 160 px" in accepts and "multiples of 32" in accepts and "at most 160 x 160" in accepts
    assert side["verified_sizes"] == [[96, 160], [160, 96]]  # landscape and portrait

    model, _ = load_detector(photo_checkpoint)
    run = _runner(fmt, out)
    shapes = set()
    for name in PHOTOS:
        image = load_image(RACCOON / "JPEGImages" / name)
        x, params = prepare_input(image, side)
        tensor, _, expected_params = prepare(image, np.zeros((0, 4), np.float32), PHOTO_PRE, flip=False)
        h, w = tensor.shape[-2:]
        assert params == expected_params
        # Padded right/bottom to multiples of 32, as the loader pads; at most the largest preprocessed input.
        assert x.shape == (1, 3, -(-h // 32) * 32, -(-w // 32) * 32) and max(x.shape[2:]) <= 160
        assert not x[0, :, h:, :].any() and not x[0, :, :, w:].any()
        shapes.add(x.shape)
        got = postprocess(run(x), params)
        expected = postprocess(reference_outputs(model, torch.from_numpy(x)), params)
        assert len(got["boxes"]) == len(expected["boxes"]) > 0
        assert got["boxes"][:, 2].max() <= image.shape[1] and got["boxes"][:, 3].max() <= image.shape[0]
        match_outputs(expected, got, atol=3e-2)  # original pixels are ~3-6x input pixels here
    assert len(shapes) >= 3  # the photos gave inputs of different shapes, all run by the one file


def test_fixed_size_export_says_so_and_onnx_refuses_other_sizes(photo_checkpoint, tmp_path):
    out = tmp_path / "fixed.onnx"
    summary = run_export(ExportConfig(checkpoint=photo_checkpoint, format="onnx", out=out, height=96, width=96))
    assert summary["input_shape"] == [1, 3, 96, 96] and summary["dynamic"] is False
    side = read_sidecar(out)
    assert side["input"]["dynamic"] is False and side["verified_sizes"] == [[96, 96], [96, 96]]
    accepts = side["input"]["accepts"]
    assert accepts.startswith("Exactly one image [1, 3, 96, 96]") and "exceeds 96 x 96 are refused" in accepts
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # onnxruntime: the input's size is fixed
        onnx_runner(out)(example_input(96, 160).numpy())
    from mimicdet.data.images import load_image

    with pytest.raises(ValueError, match="larger than the exported 96x96"):
        prepare_input(load_image(RACCOON / "JPEGImages" / "raccoon-1.jpg"), side)

    big = tmp_path / "big.onnx"
    run_export(ExportConfig(checkpoint=photo_checkpoint, format="onnx", out=big, height=160, width=160, verify=False))
    assert "Every image of this preprocessing fits" in read_sidecar(big)["input"]["accepts"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_image_without_detections_gives_empty_outputs(checkpoints, tmp_path, fmt):
    model, meta = load_detector(checkpoints["rfcn"])
    with torch.no_grad():  # background wins every vote: no class score passes 0.05
        model.head.cls_maps.bias.view(-1, model.config.rfcn_k**2)[0] += 50.0
    ckpt = tmp_path / "background.pt"
    save_detector(ckpt, model, meta)
    out = tmp_path / f"bg.{fmt}"
    run_export(ExportConfig(checkpoint=ckpt, format=fmt, out=out, height=96, width=160, verify=False))
    x = example_input(96, 160, seed=4)
    got = _runner(fmt, out)(x.numpy())
    assert got["boxes"].shape == (0, 4) and got["scores"].shape == (0,) and got["labels"].shape == (0,)
    assert len(got["proposals"]) > 0
    match_outputs(reference_outputs(model, x), got, atol=1e-2)


# --- ps_roi_align in ONNX --------------------------------------------------------------------------------------
class _PSRoIAlign(torch.nn.Module):
    def __init__(self, k: int, sampling_ratio: int) -> None:
        super().__init__()
        self.k, self.sampling_ratio = k, sampling_ratio

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return ps_roi_align(x, rois, output_size=self.k, spatial_scale=1 / 16, sampling_ratio=self.sampling_ratio)


@pytest.mark.filterwarnings("ignore")  # the exporter's deprecation and tracer notices
@pytest.mark.parametrize("k,sampling_ratio", [(3, 2), (2, 0)])
def test_ps_roi_align_symbolic_matches_torchvision(tmp_path, k, sampling_ratio):
    _register_symbolics()
    C = 2
    rois = torch.tensor(
        [[0, 3.0, 5.0, 60.0, 90.0], [1, -10.0, 20.0, 200.0, 40.0], [0, 30.0, 30.0, 31.0, 31.0], [1, 20, 24, 100, 90]]
    )  # one inside, one crossing the border, one smaller than a cell, one on image 1
    module = _PSRoIAlign(k, sampling_ratio)
    path = tmp_path / "ps.onnx"
    x = torch.randn(2, C * k * k, 8, 9, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(module, (x, rois[:2]), str(path), opset_version=17, dynamo=False, input_names=["x", "rois"],
                      dynamic_axes={"rois": {0: "R"}})
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "rois": rois.numpy()})[0]
    np.testing.assert_allclose(got, module(x, rois).numpy(), atol=1e-5)

    # Known answer: on a map whose every channel is constant, bin (i, j) of class c reads channel c·k² + i·k + j.
    const = torch.arange(C * k * k, dtype=torch.float32)[None, :, None, None].expand(2, -1, 8, 9).contiguous()
    inside = rois[[0, 3]]
    got = session.run(None, {"x": const.numpy(), "rois": inside.numpy()})[0]
    expected = np.broadcast_to(np.arange(C * k * k, dtype=np.float32).reshape(1, C, k, k), got.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# --- comparison and deployment helpers -------------------------------------------------------------------------
def _outputs(boxes, scores, labels, proposals=((0, 0, 10, 10),), proposal_scores=(0.9,)) -> dict[str, np.ndarray]:
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "labels": np.asarray(labels, np.int64),
        "proposals": np.asarray(proposals, np.float32).reshape(-1, 4),
        "proposal_scores": np.asarray(proposal_scores, np.float32),
    }


def test_match_outputs_accepts_ties_in_any_order_and_names_what_differs():
    a = _outputs([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 8, 8]], [0.9, 0.5, 0.5], [1, 2, 2])
    tied = _outputs([[0, 0, 10, 10], [5, 5, 8, 8], [20, 20, 30, 30.0004]], [0.9, 0.5, 0.5], [1, 2, 2])
    assert match_outputs(a, tied, atol=1e-3) == pytest.approx(4e-4, abs=1e-5)
    moved = _outputs([[0, 0, 10, 10], [20, 20, 30, 30.01], [5, 5, 8, 8]], [0.9, 0.5, 0.5], [1, 2, 2])
    with pytest.raises(ValueError, match=r"boxes\[1\].*differs by 0.01"):
        match_outputs(a, moved, atol=1e-3)
    relabelled = _outputs([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 8, 8]], [0.9, 0.5, 0.5], [2, 2, 2])
    with pytest.raises(ValueError, match=r"boxes\[0\] \(label 1"):
        match_outputs(a, relabelled, atol=1e-3)
    shorter = _outputs([[0, 0, 10, 10]], [0.9], [1])
    with pytest.raises(ValueError, match="boxes: exported gives 1 rows, PyTorch 3"):
        match_outputs(a, shorter, atol=1e-3)


def test_prepare_input_pads_and_postprocess_maps_back_to_original_pixels():
    side = {
        "preprocess": Preprocess(min_size=64, max_size=128).to_dict(),
        "input_scale": 1.0,
        "input": {"shape": [1, 3, 64, 128]},
    }
    image = np.full((40, 60, 3), 255, np.uint8)  # h=40, w=60 -> factor 1.6 -> 96 x 64 input
    x, params = prepare_input(image, side)
    assert x.shape == (1, 3, 64, 128) and x.dtype == np.float32
    white = (1 - np.array(side["preprocess"]["mean"])) / np.array(side["preprocess"]["std"])
    np.testing.assert_allclose(x[0, :, :, :96], np.broadcast_to(white[:, None, None], (3, 64, 96)), atol=1e-5)
    assert not x[0, :, :, 96:].any()  # zero padding right of the image

    out = _outputs(
        [[0, 0, 96, 64], [80, 16, 120, 48], [100, 0, 120, 10]], [0.9, 0.8, 0.7], [1, 2, 1],
        proposals=[[16, 8, 48, 40]], proposal_scores=[0.6],
    )  # fmt: skip
    final = postprocess(out, params)
    np.testing.assert_allclose(final["boxes"], [[0, 0, 60, 40], [50, 10, 60, 30]], atol=1e-5)
    np.testing.assert_allclose(final["scores"], [0.9, 0.8])  # the box wholly in the padding is gone
    assert final["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(final["proposals"], [[10, 5, 30, 25]], atol=1e-5)

    # A portrait image (h=60, w=40) becomes 64 x 96, taller than the exported input.
    with pytest.raises(ValueError, match="becomes a 64x96 input, larger than the exported 128x64"):
        prepare_input(np.zeros((60, 40, 3), np.uint8), side)

    # A dynamic export takes it, padded right/bottom to multiples of the size divisor only.
    dynamic = {**side, "input": {"shape": [1, 3, "H", "W"], "size_divisor": 32}}
    x, params = prepare_input(np.full((60, 40, 3), 255, np.uint8), dynamic)
    assert x.shape == (1, 3, 96, 64) and (params.out_height, params.out_width) == (96, 64)
    x, _ = prepare_input(image, dynamic)  # 96 x 64 -> 64 x 96 padded: nothing to add
    assert x.shape == (1, 3, 64, 96)
    x, _ = prepare_input(np.zeros((40, 50, 3), np.uint8), dynamic)  # -> 80 x 64 input, padded to 96 wide
    assert x.shape == (1, 3, 64, 96) and not x[0, :, :, 80:].any()


def test_export_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="format must be one of onnx, torchscript, got 'tflite'"):
        ExportConfig(checkpoint=tmp_path / "m.pt", format="tflite", out=tmp_path / "m")
    with pytest.raises(ValueError, match="opset must be in 16..20, got 11"):
        ExportConfig(checkpoint=tmp_path / "m.pt", format="onnx", out=tmp_path / "m", opset=11)
    with pytest.raises(ValueError, match="height must be a positive number of pixels, got 0"):
        ExportConfig(checkpoint=tmp_path / "m.pt", format="onnx", out=tmp_path / "m", height=0)
    with pytest.raises(ValueError, match="height and width go together.*got height=96, width=None"):
        ExportConfig(checkpoint=tmp_path / "m.pt", format="onnx", out=tmp_path / "m", height=96)


def test_failed_verification_leaves_nothing(checkpoints, tmp_path):
    out = tmp_path / "m.onnx"
    # onnxruntime's float arithmetic differs from PyTorch's by ~1e-5: far above this tolerance.
    with pytest.raises(ValueError, match="does not reproduce PyTorch on test input 0.*nothing was written"):
        run_export(ExportConfig(checkpoint=checkpoints["fast-rcnn"], format="onnx", out=out, atol=1e-12))
    assert list(tmp_path.iterdir()) == []


# --- the command -----------------------------------------------------------------------------------------------
def test_cli_export_writes_model_and_sidecar(checkpoints, tmp_path):
    out = tmp_path / "student.onnx"
    args = ["export", str(checkpoints["rfcn"]), "--format", "onnx", "--out", str(out), "--height", "96",
            "--width", "160"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "rfcn head, input 1x3x96x160" in result.output
    side = json.loads((tmp_path / "student.onnx.json").read_text())
    assert side["input"]["shape"] == [1, 3, 96, 160] and side["opset"] == 17 and side["input"]["dynamic"] is False
    x = example_input(96, 160, seed=9)
    model, _ = load_detector(checkpoints["rfcn"])
    match_outputs(reference_outputs(model, x), onnx_runner(out)(x.numpy()), atol=1e-2)

    before = out.read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.output and "Traceback" not in again.output
    assert out.read_bytes() == before
    replaced = CliRunner().invoke(main, [*args, "--overwrite", "--no-verify", "--format", "torchscript"])
    assert replaced.exit_code == 0, replaced.output
    assert "not verified" in replaced.output and json.loads(Path(f"{out}.json").read_text())["format"] == "torchscript"


def test_cli_help_documents_outputs_and_remaining_postprocessing():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    for phrase in ("boxes [D,4]", "proposal_scores [R]", "class-wise NMS", "postprocess", "half-size"):
        assert phrase in result.output
    # What input the file accepts, by default and with a fixed size.
    flat = " ".join(result.output.split())
    for phrase in ("by default H and W are dynamic (any size)", "longer side at most max_size",
                   "multiple of the size divisor", "checked against PyTorch at two sizes",
                   "With --height and --width together", "larger ones refused", "[default: dynamic height, any size]",
                   "says exactly what the file accepts"):
        assert phrase in flat, phrase


def test_cli_default_export_is_dynamic(checkpoints, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(checkpoints["none"]), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "none head, input 1x3xHxW" in result.output
    assert read_sidecar(out)["input"]["shape"] == [1, 3, "H", "W"]
    one = CliRunner().invoke(main, ["export", str(checkpoints["none"]), "--format", "onnx", "--out",
                                    str(tmp_path / "n.onnx"), "--height", "96"])
    assert one.exit_code == 1 and "height and width go together" in one.output and "Traceback" not in one.output


def _bad(tmp_path: Path, args: list[str]) -> tuple[int, str]:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(main, ["export", *args, "--out", str(out_dir / "m.onnx")])
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert list(out_dir.iterdir()) == []  # nothing half-written, no temporary files
    return result.exit_code, result.output


def test_cli_missing_checkpoint(tmp_path):
    code, output = _bad(tmp_path, [str(tmp_path / "nope.pt"), "--format", "onnx"])
    assert code == 2 and "does not exist" in output


def test_cli_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, output = _bad(tmp_path, [str(bad), "--format", "onnx"])
    assert code == 1 and f"{bad}: not a readable detector checkpoint" in output


def test_cli_checkpoint_of_something_else(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    code, output = _bad(tmp_path, [str(other), "--format", "torchscript"])
    assert code == 1 and "expected a dict with 'model' and 'detector_config'" in output


def test_cli_unknown_format(checkpoints, tmp_path):
    code, output = _bad(tmp_path, [str(checkpoints["none"]), "--format", "tflite"])
    assert code == 2 and "'tflite' is not one of 'onnx', 'torchscript'" in output


def test_cli_missing_output_folder(checkpoints, tmp_path):
    result = CliRunner().invoke(
        main, ["export", str(checkpoints["none"]), "--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")]
    )
    assert result.exit_code == 1 and "output folder does not exist" in result.output


def test_deployment_path_on_a_real_image_matches_predict_in_original_pixels(checkpoints, tmp_path):
    """prepare_input -> onnxruntime -> postprocess on a raccoon photo equals predict + mapping back, when the
    exported input is exactly the image's input size (nothing padded)."""
    from mimicdet.data.images import load_image
    from mimicdet.data.transforms import prepare

    image = load_image(RACCOON / "JPEGImages" / "raccoon-1.jpg")
    model, meta = load_detector(checkpoints["fast-rcnn"])
    tensor, _, params = prepare(image, np.zeros((0, 4), np.float32), Preprocess.from_dict(meta["preprocess"]),
                                flip=False)
    h, w = tensor.shape[-2:]
    assert (h, w) != (SIZE, SIZE)  # a non-square photo: the export size comes from the options
    out = tmp_path / "raccoon.onnx"
    run_export(ExportConfig(checkpoint=checkpoints["fast-rcnn"], format="onnx", out=out, height=h, width=w,
                            verify=False))
    x, got_params = prepare_input(image, read_sidecar(out))
    assert got_params == params
    final = postprocess(onnx_runner(out)(x), got_params)

    det = reference_outputs(model, tensor[None])
    expected = postprocess(det, params)
    assert len(final["boxes"]) == len(det["boxes"]) > 0
    assert final["boxes"][:, 2].max() <= image.shape[1] and final["boxes"][:, 3].max() <= image.shape[0]
    match_outputs(expected, final, atol=1e-2)  # original pixels are ~3x input pixels here
