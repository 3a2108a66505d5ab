"""Export a detector checkpoint for deployment (``mimic export``): ONNX or TorchScript, plus a JSON sidecar.

What is exported is the whole of :meth:`detection.detector.Detector.predict` for ONE image of input size
``H x W`` whose valid area is the whole input (``image_sizes = [(H, W)]``), post-processing included:
RPN decoding, clipping, top-N and NMS; RoIAlign (Fast R-CNN) or position-sensitive RoIAlign (R-FCN); softmax,
class-specific decoding, score threshold and class-wise NMS. Shapes::

    images           float32[1, 3, H, W]  normalised with the checkpoint's preprocess, zero-padded right/bottom
    boxes            float32[D, 4]        detections, x1y1x2y2 in input pixels, best first
    scores           float32[D]
    labels           int64[D]             1..K-1 (label k+1 <-> classes[k]); all 1 with head "none"
    proposals        float32[R, 4]        the RPN's proposals, input pixels, by objectness
    proposal_scores  float32[R]           objectness (sigmoid)

With head ``"none"`` (stage-1 student) the detections are the proposals (as in ``predict``). ``D`` and ``R``
vary per image. ``H x W`` is the input after the checkpoint's resize at its ``input_scale`` (0.5 for a
scale-mimic student) and padding; boxes are in those input pixels.

Input size. By default ``H`` and ``W`` are DYNAMIC (ONNX axes named ``"H"`` and ``"W"``; the TorchScript trace
records the shape arithmetic too): the file takes an image of any size, so it serves every image of the dataset
the checkpoint was trained on, whose preprocessing gives a shorter side of ``min_size`` and a longer side of at
most ``max_size`` (times ``input_scale``), which :func:`prepare_input` zero-pads right/bottom to multiples of the
size divisor as the data loader does (:func:`input_sizes`). :func:`run_export` checks the file against PyTorch at
two different sizes (landscape and portrait, or two heights when ``min_size == max_size``). Given
``height`` AND ``width``, the export is for that one fixed size instead: smaller images are zero-padded into it,
larger ones refused by :func:`prepare_input`.

What remains for the caller (see :func:`prepare_input` and :func:`postprocess`): resize and normalise the image,
zero-pad it (to the size divisor, or to the fixed ``H x W``), and map boxes back to original image pixels (divide
by the resize factor, clip to the image). Because the whole input counts as the image, its boxes may reach into
the padding until :func:`postprocess` clips them, and the RPN clips its proposals to ``H x W`` rather than to
the image (``predict`` given the image's own size clips before NMS, so the two can differ near the right and
bottom edges; with the default padding to the size divisor that margin is under one divisor, e.g. 32 px).

ONNX goes through ``torch.onnx.export(dynamo=False)`` (trace) with torchvision's symbolics for ``roi_align`` and
``nms``; ``ps_roi_align`` has none, so :func:`_ps_roi_align_symbolic` adds one: every (region, bin) pair
becomes a sub-box pooled to ``1 x 1`` from the channel group of its bin, which samples exactly the points
``ps_roi_align`` samples. TorchScript is ``torch.jit.trace`` of the same module (load it after
``import torchvision``, which registers the ops). Each file is checked against PyTorch on two seeded inputs
before it is renamed into place (:func:`match_outputs`: same counts, every row matched within ``atol``,
ties in any order).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.onnx.symbolic_helper import parse_args

from mimicdet.data.errors import DataError
from mimicdet.data.paths import check_output_apart, follow_umask
from mimicdet.detection.checkpoints import file_sha256

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
DYNAMIC_DIMS = ("H", "W")  # names of the input's dynamic height and width (ONNX axes, sidecar shape)
OUTPUT_NAMES = ("boxes", "scores", "labels", "proposals", "proposal_scores")
MIN_OPSET = 16  # RoiAlign's coordinate_transformation_mode (ps_roi_align samples half-pixel-aligned)
MAX_OPSET = 20  # highest opset of torch.onnx's TorchScript-based exporter
REMAINING_POSTPROCESS = (
    "Boxes are in input pixels of the padded H x W input: divide x by the resize factor out_width/orig_width and "
    "y by out_height/orig_height (detection.export.postprocess with data.transforms.PrepParams), then clip to the "
    "original image. Everything else (RPN NMS, RoIAlign, softmax, class-wise NMS, score threshold, top detections) "
    "is inside the exported graph."
)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    checkpoint: Path
    format: str  # "onnx" | "torchscript"
    out: Path
    # Both None (default): dynamic H and W, any input size. Both given: one fixed input size H x W.
    height: int | None = None
    width: int | None = None
    opset: int = 17
    verify: bool = True  # compare the written file with PyTorch before renaming it into place
    # pixels for boxes, probability for scores; onnxruntime's float32 sums differ from PyTorch's by ~1e-5
    # relative, so a 1e-3 px bound is at the edge for boxes of a few hundred pixels.
    atol: float = 1e-2
    overwrite: bool = False

    @property
    def dynamic(self) -> bool:
        """True when the exported input has dynamic height and width (neither was given)."""
        return self.height is None and self.width is None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"export {name} must be a positive number of pixels, got {v!r}")
        if (self.height is None) != (self.width is None):
            raise ValueError(
                "export height and width go together: give both for one fixed input size, or neither for dynamic "
                f"height and width (any size); got height={self.height}, width={self.width}"
            )
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"ONNX opset must be in {MIN_OPSET}..{MAX_OPSET}, got {self.opset}")
        if not self.atol > 0:
            raise ValueError(f"atol must be > 0, got {self.atol}")


class DeployedDetector(nn.Module):
    """``Detector.predict`` on one image with the whole input as its valid area, as a tuple of tensors
    (:data:`OUTPUT_NAMES`), which is what tracing and ONNX need. Use it in eval mode.

    It runs predict's steps itself (features, RPN, head, head post-processing) rather than calling ``predict``,
    because ``predict`` turns ``image_sizes`` into Python ints, which a trace freezes: here the valid area is the
    input's own shape, which tracing records as shape arithmetic, so the file works at any input size.
    :func:`run_export` checks the result against ``predict`` before keeping a file."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        sizes = [(images.shape[-2], images.shape[-1])]
        features = model.features(images)
        proposals, proposal_scores, _ = model.rpn(features, sizes)
        if model.head is None:
            boxes, scores = proposals[0], proposal_scores[0]
            # predict makes these labels with torch.ones(len(p)), a length a trace would freeze; same values.
            labels = torch.ones_like(scores, dtype=torch.int64)
        else:
            out, _ = model.head(features, proposals, sizes)
            det = model.head.postprocess(out.class_logits, out.box_deltas, out.proposals, sizes)[0]
            boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        return boxes, scores, labels, proposals[0], proposal_scores[0]


# --- ONNX symbolic for torchvision's ps_roi_align ------------------------------------------------------------
@parse_args("v", "v", "f", "i", "i", "i")
def _ps_roi_align_symbolic(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):  # noqa: ANN001
    """ONNX graph of ``torchvision.ops.ps_roi_align`` (output ``[R, C, ph, pw]`` from ``[N, C·ph·pw, h, w]``).

    Bin ``b = i·pw + j`` of region ``r`` reads input channels ``c·ph·pw + b``. The map is regrouped into
    ``N·ph·pw`` images of ``C`` channels (image ``n·ph·pw + b`` holds bin ``b``'s channels of image ``n``), each
    bin becomes its own sub-box ``x1 + j·bw .. x1 + (j+1)·bw`` (``bw = (x2 - x1) / pw``, likewise in y), and ONNX
    ``RoiAlign`` pools each sub-box to ``1 x 1`` with the same sampling ratio and half-pixel offset: the same
    sample points as ``ps_roi_align``, with no k² redundant pooling.
    """
    ph, pw, ratio = pooled_height, pooled_width, max(sampling_ratio, 0)  # torchvision: <= 0 is adaptive, ONNX: 0
    bins = ph * pw

    def const(values: Any, dtype: torch.dtype = torch.int64):  # noqa: ANN202
        return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

    def part(t, start: int, end: int, axis: int = 0):  # noqa: ANN001, ANN202
        return g.op("Slice", t, const([start]), const([end]), const([axis]))

    shape = g.op("Shape", input)
    x = g.op("Reshape", input, g.op("Concat", part(shape, 0, 1), const([-1, bins]), part(shape, 2, 4), axis_i=0))
    x = g.op("Transpose", x, perm_i=[0, 2, 1, 3, 4])  # [N, bins, C, h, w]
    x = g.op("Reshape", x, g.op("Concat", const([-1]), part(g.op("Shape", x), 2, 5), axis_i=0))

    rois = g.op("Cast", rois, to_i=torch.onnx.TensorProtoDataType.FLOAT)
    x1, y1, x2, y2 = (part(rois, k, k + 1, axis=1) for k in range(1, 5))  # each [R, 1]
    bw = g.op("Div", g.op("Sub", x2, x1), const(float(pw), torch.float32))
    bh = g.op("Div", g.op("Sub", y2, y1), const(float(ph), torch.float32))
    jj = torch.arange(pw, dtype=torch.float32).repeat(ph)[None]  # [1, bins]: column of each bin
    ii = torch.arange(ph, dtype=torch.float32).repeat_interleave(pw)[None]  # row of each bin
    edges = [
        g.op("Add", x1, g.op("Mul", bw, const(jj.tolist(), torch.float32))),
        g.op("Add", y1, g.op("Mul", bh, const(ii.tolist(), torch.float32))),
        g.op("Add", x1, g.op("Mul", bw, const((jj + 1).tolist(), torch.float32))),
        g.op("Add", y1, g.op("Mul", bh, const((ii + 1).tolist(), torch.float32))),
    ]  # each [R, bins]
    edges = [g.op("Unsqueeze", e, const([2])) for e in edges]
    boxes = g.op("Reshape", g.op("Concat", *edges, axis_i=2), const([-1, 4]))  # [R·bins, 4]
    image = g.op("Cast", part(rois, 0, 1, axis=1), to_i=torch.onnx.TensorProtoDataType.INT64)  # [R, 1]
    batch = g.op("Add", g.op("Mul", image, const(bins)), const([list(range(bins))]))  # [R, bins]
    batch = g.op("Reshape", batch, const([-1]))

    pooled = g.op(
        "RoiAlign", x, boxes, batch,
        coordinate_transformation_mode_s="half_pixel",  # ps_roi_align subtracts half a cell, like aligned=True
        mode_s="avg", output_height_i=1, output_width_i=1, sampling_ratio_i=ratio, spatial_scale_f=spatial_scale,
    )  # fmt: skip
    out = g.op("Reshape", pooled, g.op("Concat", const([-1, ph, pw]), part(g.op("Shape", pooled), 1, 2), axis_i=0))
    out = g.op("Transpose", out, perm_i=[0, 3, 1, 2])
    return out, None  # ps_roi_align's second output (channel mapping) is used only for its backward


def _register_symbolics() -> None:
    import torchvision  # noqa: F401  (registers roi_align and nms symbolics)

    # Registered at the lowest opset it needs, it serves every opset above too.
    torch.onnx.register_custom_op_symbolic("torchvision::ps_roi_align", _ps_roi_align_symbolic, MIN_OPSET)


# --- writing --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence tracing's warnings about shapes read as Python ints (what is read this way is a constant on
    purpose, e.g. the configured top-N) and the deprecation notices of the TorchScript-based exporter,
    ``jit.save`` and ``jit.load``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        # torchvision's clip_boxes_to_image, traced with the image size as a traced value (a dynamic export)
        warnings.filterwarnings("ignore", category=UserWarning, message="To copy construct from a tensor")
        yield


def example_input(height: int, width: int, *, seed: int = 0) -> Tensor:
    """A seeded ``float32[1, 3, H, W]`` normalised-looking input (unit Gaussian noise)."""
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def export_onnx(
    model: nn.Module, path: Path, *, height: int, width: int, opset: int = 17, dynamic: bool = False
) -> None:
    """Write ``DeployedDetector(model)`` to ``path`` as ONNX, traced on a ``1 x 3 x height x width`` input.

    ``dynamic``: the input's height and width are dynamic axes (``"H"``, ``"W"``) and the file takes any size;
    otherwise the input is fixed at ``height x width``. The output rows are named ``"D"`` and ``"R"`` either way."""
    _register_symbolics()
    module = DeployedDetector(model).eval()
    axes: dict[str, dict[int, str]] = {n: {0: "R" if n.startswith("proposal") else "D"} for n in OUTPUT_NAMES}
    if dynamic:
        axes[INPUT_NAME] = {2: DYNAMIC_DIMS[0], 3: DYNAMIC_DIMS[1]}
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module, (example_input(height, width),), str(path), opset_version=opset, dynamo=False,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
        )  # fmt: skip


def export_torchscript(model: nn.Module, path: Path, *, height: int, width: int) -> None:
    """Write ``torch.jit.trace(DeployedDetector(model))``, traced on a ``1 x 3 x height x width`` input, to ``path``.

    The trace records the input's shape arithmetic, so the file runs at other sizes too; :func:`run_export`
    checks it at two sizes when the export is dynamic."""
    module = DeployedDetector(model).eval()
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, (example_input(height, width),), check_trace=False)
        torch.jit.save(traced, str(path))


def require_onnxruntime():  # noqa: ANN202
    try:
        import onnxruntime
    except ImportError:  # an optional dependency
        raise ValueError(
            "running an ONNX file (also to verify an export) needs onnxruntime: pip install 'mimicdet[export]', "
            "or export with --no-verify"
        ) from None
    return onnxruntime


def onnx_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``images float32[1,3,H,W] -> {name: array}`` with onnxruntime on CPU."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initialisers are noise here
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(None, {INPUT_NAME: np.asarray(images, np.float32)})))


def torchscript_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``images float32[1,3,H,W] -> {name: array}`` with the TorchScript file loaded back."""
    import torchvision  # noqa: F401  (registers the torchvision:: ops the file calls)

    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(torch.as_tensor(np.asarray(images, np.float32)))
        return {name: t.numpy() for name, t in zip(OUTPUT_NAMES, out)}

    return run


def reference_outputs(model: nn.Module, images: Tensor) -> dict[str, np.ndarray]:
    """PyTorch's ``predict`` on ``images [1,3,H,W]`` with the whole input valid, as numpy arrays."""
    det = model.predict(images, [tuple(images.shape[-2:])])[0]
    return {name: det[name].numpy() for name in OUTPUT_NAMES}


def match_outputs(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], *, atol: float) -> float:
    """Largest difference between two sets of outputs, matched row by row regardless of order among ties.

    Detections (``boxes, scores, labels``) and proposals (``proposals, proposal_scores``) must come in the same
    numbers; each expected row is paired with the closest unpaired row of the same label whose score lies
    within ``atol`` (equal scores may come in either order). Raises ``ValueError`` naming the output when a
    count differs or a row has no partner within ``atol``; returns the largest box or score difference."""
    for name in OUTPUT_NAMES:
        if name not in got:
            raise ValueError(f"exported outputs lack {name!r} (got {sorted(got)})")
    worst = 0.0
    for boxes, scores, labels in (("boxes", "scores", "labels"), ("proposals", "proposal_scores", None)):
        eb, gb = np.asarray(expected[boxes], np.float64), np.asarray(got[boxes], np.float64)
        es, gs = np.asarray(expected[scores], np.float64), np.asarray(got[scores], np.float64)
        el = np.asarray(expected[labels]) if labels else np.zeros(len(es), np.int64)
        gl = np.asarray(got[labels]) if labels else np.zeros(len(gs), np.int64)
        if gb.shape[1:] != (4,):
            raise ValueError(f"{boxes}: exported shape {list(gb.shape)}, expected [rows, 4]")
        for name, arr in ((boxes, gb), (scores, gs), (labels, gl)):
            if arr.shape[:1] != eb.shape[:1]:
                raise ValueError(f"{name or boxes}: exported gives {arr.shape[0]} rows, PyTorch {eb.shape[0]}")
        free = np.ones(len(gb), bool)
        for i in range(len(eb)):
            cand = np.nonzero(free & (gl == el[i]) & (np.abs(gs - es[i]) <= atol))[0]
            if not len(cand):
                raise ValueError(f"{boxes}[{i}] (label {el[i]}, score {es[i]:.6f}): no exported row within {atol}")
            dist = np.abs(gb[cand] - eb[i]).max(axis=1)
            k = cand[int(dist.argmin())]
            if dist.min() > atol:
                raise ValueError(
                    f"{boxes}[{i}] = {eb[i].round(3).tolist()}: closest exported box "
                    f"{gb[k].round(3).tolist()} differs by {dist.min():.3g} > {atol}"
                )
            free[k] = False
            worst = max(worst, float(dist.min()), float(abs(gs[k] - es[i])))
    return worst


# --- deployment helpers ---------------------------------------------------------------------------------------
def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an exported file (``FILE.json`` next to ``FILE``)."""
    side = Path(f"{path}.json")
    if not side.is_file():
        raise FileNotFoundError(f"export sidecar not found: {side}")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{side}: not JSON ({e})") from None


def prepare_input(image: np.ndarray, sidecar: dict[str, Any]) -> tuple[np.ndarray, Any]:
    """``uint8[h, w, 3]`` RGB -> ``(float32[1, 3, H, W], PrepParams)``: the checkpoint's resize at its
    ``input_scale``, normalisation, then zero padding right/bottom: for a dynamic export (the sidecar's shape is
    ``[1, 3, "H", "W"]``) up to multiples of the sidecar's ``size_divisor``, as the data loader pads a batch of one;
    for a fixed one up to its ``H x W`` (a larger input is refused)."""
    from mimicdet.data.transforms import Preprocess, prepare

    pre = Preprocess.from_dict(sidecar["preprocess"])
    _, _, H, W = sidecar["input"]["shape"]
    tensor, _, params = prepare(image, np.zeros((0, 4), np.float32), pre, flip=False, scale=sidecar["input_scale"])
    h, w = tensor.shape[-2:]
    if not (isinstance(H, int) and isinstance(W, int)):  # dynamic: pad to the size divisor, as the loader does
        div = int(sidecar["input"].get("size_divisor") or _divisor(pre, float(sidecar["input_scale"])))
        H, W = -(-h // div) * div, -(-w // div) * div
    if h > H or w > W:
        raise ValueError(
            f"image of {image.shape[1]}x{image.shape[0]} px becomes a {w}x{h} input, larger than the exported "
            f"{W}x{H}; export with --width/--height of at least {w}/{h}"
        )
    out = np.zeros((1, 3, H, W), np.float32)
    out[0, :, :h, :w] = tensor.numpy()
    return out, params


def postprocess(outputs: dict[str, np.ndarray], params: Any) -> dict[str, np.ndarray]:
    """Exported outputs in input pixels -> the same in ORIGINAL image pixels, clipped to the image.

    ``params`` is the image's :class:`data.transforms.PrepParams` (from :func:`prepare_input`). Boxes whose
    clipped area is empty (they lay wholly in the padding) are dropped with their scores and labels."""
    result = dict(outputs)
    for boxes, rest in (("boxes", ("scores", "labels")), ("proposals", ("proposal_scores",))):
        b = params.unmap_boxes(np.asarray(outputs[boxes], np.float32))
        b[:, 0::2] = b[:, 0::2].clip(0, params.orig_width)
        b[:, 1::2] = b[:, 1::2].clip(0, params.orig_height)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        result[boxes] = b[keep]
        for name in rest:
            result[name] = np.asarray(outputs[name])[keep]
    return result


# --- the command ----------------------------------------------------------------------------------------------
def _divisor(pre: Any, scale: float) -> int:
    """The padding multiple at ``scale``: ``size_divisor·scale``, as :mod:`data.loader` pads."""
    return max(1, round(pre.size_divisor * scale))


@dataclass(frozen=True)
class InputSizes:
    """The padded inputs a checkpoint's preprocessing makes, at its ``input_scale``, padded as the loader pads."""

    shorter: int  # the padded shorter side of an image resized to min_size (elongated images get less)
    longest: int  # the padded longer-side cap from max_size: no input exceeds longest x longest
    divisor: int  # H and W are padded to multiples of this

    def check_sizes(self) -> list[tuple[int, int]]:
        """Two different ``(H, W)`` a dynamic export is checked at: landscape and portrait inputs of this
        dataset, or, when the two coincide (``min_size == max_size``), the square and one a divisor taller."""
        first = (self.shorter, self.longest)
        second = (self.longest, self.shorter) if self.longest != self.shorter else (self.shorter + self.divisor,
                                                                                     self.shorter)
        return [first, second]


def input_sizes(meta: dict[str, Any]) -> InputSizes:
    """:class:`InputSizes` of a checkpoint's ``meta`` (its ``preprocess`` and ``input_scale``)."""
    from mimicdet.detection.evaluate import checkpoint_preprocess

    pre, scale = checkpoint_preprocess(meta)
    div = _divisor(pre, scale)

    def padded(side: int) -> int:
        return -(-math.ceil(side * scale - 1e-9) // div) * div

    return InputSizes(shorter=padded(pre.min_size), longest=padded(pre.max_size), divisor=div)


def _accepts(cfg: ExportConfig, pre: Any, scale: float, sizes: InputSizes) -> str:
    """The sidecar's sentence on what input the exported file takes."""
    made = (
        f"this checkpoint's preprocessing resizes an image's shorter side to {pre.min_size * scale:g} px with the "
        f"longer side at most {pre.max_size * scale:g} px (min_size {pre.min_size}, max_size {pre.max_size} at "
        f"input_scale {scale:g})"
    )
    tail = (
        "The whole input counts as the image: boxes may reach into the padding until postprocess clips them to "
        "the original image."
    )
    if cfg.dynamic:
        return (
            f"One image [1, 3, H, W] of ANY height H and width W (dynamic axes). {made}; prepare_input zero-pads "
            f"it right/bottom to multiples of {sizes.divisor} as the data loader does, so inputs from this dataset "
            f"are at most {sizes.longest} x {sizes.longest}. {tail}"
        )
    H, W = cfg.height, cfg.width
    fits = (
        f"Every image of this preprocessing fits (its inputs are at most {sizes.longest} x {sizes.longest})."
        if H >= sizes.longest and W >= sizes.longest  # type: ignore[operator]
        else f"Images whose input exceeds {H} x {W} are refused ({made}, up to {sizes.longest} x {sizes.longest})."
    )
    return (
        f"Exactly one image [1, 3, {H}, {W}] (a fixed size, from --height/--width): prepare_input zero-pads a "
        f"smaller input right/bottom into it. {fits} {tail}"
    )



def _sidecar(cfg: ExportConfig, model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    from mimicdet.detection.evaluate import checkpoint_preprocess

    pre, scale = checkpoint_preprocess(meta)
    sizes = input_sizes(meta)
    head = model.config.head
    return {
        "format": cfg.format,
        "file": cfg.out.name,
        "opset": cfg.opset if cfg.format == "onnx" else None,
        "checkpoint": str(cfg.checkpoint),
        "checkpoint_sha256": file_sha256(cfg.checkpoint),
        "classes": list(meta.get("classes", [])),
        "preprocess": pre.to_dict(),
        "input_scale": scale,
        "input": {
            "name": INPUT_NAME,
            "shape": _input_shape(cfg),
            "dtype": "float32",
            "dynamic": cfg.dynamic,
            "accepts": _accepts(cfg, pre, scale, sizes),
            "size_divisor": sizes.divisor,
            "largest_preprocessed": [sizes.longest, sizes.longest],
            "layout": "NCHW RGB, (pixel/255 - mean)/std, zero-padded right/bottom; the whole input is the valid area",
        },
        "outputs": [
            {"name": "boxes", "shape": ["D", 4], "dtype": "float32", "meaning": "detections x1y1x2y2, input pixels"},
            {"name": "scores", "shape": ["D"], "dtype": "float32", "meaning": "class probability"},
            {"name": "labels", "shape": ["D"], "dtype": "int64", "meaning": "label k+1 is classes[k]"},
            {"name": "proposals", "shape": ["R", 4], "dtype": "float32", "meaning": "RPN proposals, input pixels"},
            {"name": "proposal_scores", "shape": ["R"], "dtype": "float32", "meaning": "objectness (sigmoid)"},
        ],
        "head": head,
        "detections_are_proposals": head == "none",
        "detector_config": model.config.to_dict(),
        "postprocess_in_graph": True,
        "postprocess_remaining": REMAINING_POSTPROCESS,
        "runtime": "onnxruntime" if cfg.format == "onnx" else "torch.jit.load after `import torchvision`",
    }


def _input_shape(cfg: ExportConfig) -> list[int | str]:
    return [1, 3, *DYNAMIC_DIMS] if cfg.dynamic else [1, 3, cfg.height, cfg.width]  # type: ignore[list-item]


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder and return it (the caller renames it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        follow_umask(tmp)  # mkstemp made it 0600; writers that reopen the name keep the mode
        write(Path(tmp))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def lean_or_same(model: nn.Module) -> nn.Module:
    """The lean inference copy (:func:`detection.lean.make_lean`) of this tool's detector; any other model as is."""
    from mimicdet.detection.detector import Detector
    from mimicdet.detection.lean import make_lean

    return make_lean(model) if isinstance(model, Detector) else model


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Load ``cfg.checkpoint``, export it to ``cfg.out`` (+ ``cfg.out.json``), verify, and return a summary.

    Nothing is left at ``cfg.out`` unless every step succeeded: the files are written under temporary names
    in the same folder and renamed into place at the end."""
    from mimicdet.detection.detector import load_detector

    out = Path(cfg.out)
    side_path = Path(f"{out}.json")
    for p in (out, side_path):
        check_output_apart("--out", p, {"CHECKPOINT": cfg.checkpoint})
    if not cfg.overwrite:
        for p in (out, side_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out.parent}")
    if cfg.format == "onnx" and cfg.verify:
        require_onnxruntime()  # fail before the work, not after it
    model, meta = load_detector(cfg.checkpoint)
    model.eval()
    sidecar = _sidecar(cfg, model, meta)
    if cfg.dynamic:
        # Traced on the first size; the second size (and seed) catches shapes or values frozen into the trace.
        checks = input_sizes(meta).check_sizes()
    else:
        checks = [(cfg.height, cfg.width)] * 2  # seed 1 catches values frozen into the trace
    height, width = checks[0]
    exported = lean_or_same(model)  # the file follows the lean inference path; the checks compare with the model

    if cfg.format == "onnx":
        tmp = _write_atomically(out, lambda p: export_onnx(exported, p, height=height, width=width,
                                                           opset=cfg.opset, dynamic=cfg.dynamic))
        runner = onnx_runner
    else:
        tmp = _write_atomically(out, lambda p: export_torchscript(exported, p, height=height, width=width))
        runner = torchscript_runner
    try:
        if cfg.verify:
            run = runner(tmp)
            worst = 0.0
            for seed, (h, w) in enumerate(checks):  # seed 0 at the traced size is the traced example
                x = example_input(h, w, seed=seed)
                try:
                    worst = max(worst, match_outputs(reference_outputs(model, x), run(x.numpy()), atol=cfg.atol))
                except ValueError as e:
                    raise ValueError(
                        f"exported {cfg.format} file does not reproduce PyTorch on test input {seed} ({h}x{w} px): "
                        f"{e}; nothing was written (--no-verify keeps it anyway)"
                    ) from None
            sidecar["verified_max_abs_diff"] = worst
            sidecar["verified_sizes"] = [[h, w] for h, w in checks]
        tmp_side = _write_atomically(side_path, lambda p: p.write_text(json.dumps(sidecar, indent=2) + "\n"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    os.replace(tmp_side, side_path)
    return {
        "out": str(out),
        "sidecar": str(side_path),
        "format": cfg.format,
        "input_shape": _input_shape(cfg),
        "dynamic": cfg.dynamic,
        "head": model.config.head,
        "bytes": out.stat().st_size,
        "verified_max_abs_diff": sidecar.get("verified_max_abs_diff"),
    }


__all__ = [
    "FORMATS",
    "OUTPUT_NAMES",
    "ExportConfig",
    "DeployedDetector",
    "export_onnx",
    "export_torchscript",
    "onnx_runner",
    "torchscript_runner",
    "reference_outputs",
    "match_outputs",
    "read_sidecar",
    "prepare_input",
    "postprocess",
    "InputSizes",
    "input_sizes",
    "run_export",
]
