"""Cost of a detector: parameters, FLOPs, latency and peak memory for one image of a given size.

Units: parameters as counts; FLOPs as GFLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs
per multiply-add; convolutions and matrix products only, so RoIAlign and NMS are not counted); latency in
milliseconds of ``Detector.predict`` (and of the backbone alone) on one ``1 x 3 x h x w`` image under
``torch.inference_mode``; memory in MiB.

``profile_models(..., lean=True)`` also times each model's :func:`detection.lean.make_lean` copy in the same
rounds; :func:`time_round_robin` times any callables that way.

Peak memory is measured with torch's ``MemTracker`` (live tensor storages, parameters included, on any device);
on CUDA ``torch.cuda.max_memory_allocated`` is reported too. Where ``MemTracker`` is missing (older torch) the
process's ``ru_maxrss`` growth during the first run stands in: a high-water mark of the whole process, so it
reads 0 when an earlier, larger run already set the mark.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable, Hashable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from mimicdet.detection.detector import Detector

MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input(input_size: tuple[int, int], device: torch.device) -> tuple[Tensor, list[tuple[int, int]]]:
    h, w = input_size
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be (h, w) with positive sides, got {input_size}")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, h, w, generator=gen).to(device), [(h, w)]


def count_gflops(model: Detector, images: Tensor, image_sizes: list[tuple[int, int]]) -> dict[str, float]:
    """GFLOPs of ``predict`` (whole detector) and of the backbone alone, on ``images``."""
    with torch.inference_mode():
        with FlopCounterMode(display=False) as whole:
            model.predict(images, image_sizes)
        with FlopCounterMode(display=False) as trunk:
            model.backbone(images)
    return {"total": whole.get_total_flops() / 1e9, "backbone": trunk.get_total_flops() / 1e9}


def peak_memory(model: Detector, images: Tensor, image_sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Peak memory of one ``predict``: total and activations (MiB), and the method used."""
    device = images.device
    out: dict[str, Any] = {}
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # older torch, or a build without torch.distributed
        MemTracker = None  # noqa: N806
    if MemTracker is not None:
        tracker = MemTracker()
        tracker.track_external(model)
        with torch.inference_mode(), tracker:
            model.predict(images, image_sizes)
        snap = tracker.get_tracker_snapshot("peak")[device]
        act = sum(v for k, v in snap.items() if getattr(k, "value", "") == "Activation")
        out.update(method="MemTracker", peak_mb=snap["Total"] / MIB, activation_mb=act / MIB)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with torch.inference_mode():
            model.predict(images, image_sizes)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out.update(method="ru_maxrss delta", peak_mb=(after - before) / 1024, activation_mb=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model.predict(images, image_sizes)
        _sync(device)
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MIB
    return out


def time_predict_ms(model: Detector, images: Tensor, image_sizes: list[tuple[int, int]]) -> float:
    """Wall time of one ``predict`` in milliseconds (device synchronised on both sides)."""
    return _time_ms(lambda: model.predict(images, image_sizes), images.device)


def time_backbone_ms(model: Detector, images: Tensor) -> float:
    """Wall time of the backbone alone on ``images``, in milliseconds."""
    return _time_ms(lambda: model.backbone(images), images.device)


def time_round_robin(
    runs: dict[Hashable, Callable[[], object]], *, repeats: int, warmup: int, device: str | torch.device = "cpu"
) -> dict[Hashable, list[float]]:
    """Milliseconds of each callable over ``repeats`` rounds after ``warmup`` rounds, one call of each per round,
    so that machine-load drift hits every callable alike and their ratios are comparable."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = torch.device(device)
    samples: dict[Hashable, list[float]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, fn in runs.items():
            ms = _time_ms(fn, dev)
            if i >= warmup:
                samples[name].append(ms)
    return samples


def _time_ms(fn, device: torch.device) -> float:
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
    return (time.perf_counter() - t0) * 1e3


def latency_summary(samples_ms: list[float]) -> dict[str, float]:
    """Median, 90th percentile (linear interpolation) and minimum of latency samples (ms). On a shared machine
    the minimum is the closest to the uncontended cost."""
    if not samples_ms:
        raise ValueError("latency_summary needs at least one sample")
    s = sorted(samples_ms)
    pos = 0.9 * (len(s) - 1)
    lo = int(pos)
    p90 = s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)
    return {"median_ms": statistics.median(s), "p90_ms": p90, "min_ms": s[0], "n": len(s)}


def profile_static(
    model: Detector, input_size: tuple[int, int], *, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Everything but latency: params, GFLOPs (whole and backbone), peak memory. Puts ``model`` in eval mode."""
    dev = torch.device(device)
    model.to(dev).eval()
    images, sizes = _input(input_size, dev)
    return {
        "input_size": list(input_size),
        "device": str(dev),
        "params": model.param_counts(),
        "gflops": count_gflops(model, images, sizes),
        "memory": peak_memory(model, images, sizes),
    }


def profile_models(
    models: dict[str, Detector],
    input_size: tuple[int, int] = (256, 256),
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    lean: bool = False,
) -> dict[str, dict[str, Any]]:
    """Profile several models on the same input, timing them round-robin (one run of each in turn) so that
    machine-load drift hits every model alike and their ratios are comparable. ``lean`` also times each model's
    :func:`detection.lean.make_lean` copy in the same rounds (``"lean_latency"``, ``"lean_backbone_latency"``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = torch.device(device)
    results = {name: profile_static(m, input_size, device=dev) for name, m in models.items()}
    images, sizes = _input(input_size, dev)
    variants = {(name, "reference"): m for name, m in models.items()}
    if lean:
        from mimicdet.detection.lean import make_lean

        variants.update({(name, "lean"): make_lean(m) for name, m in models.items()})
    runs: dict[tuple[str, str, str], Callable[[], object]] = {}
    for (name, path), m in variants.items():
        runs[name, path, "predict"] = lambda m=m: m.predict(images, sizes)
        runs[name, path, "backbone"] = lambda m=m: m.backbone(images)
    samples = time_round_robin(runs, repeats=repeats, warmup=warmup, device=dev)
    for name in models:
        r = results[name]
        r["latency"] = latency_summary(samples[name, "reference", "predict"])
        r["backbone_latency"] = latency_summary(samples[name, "reference", "backbone"])
        if lean:
            r["lean_latency"] = latency_summary(samples[name, "lean", "predict"])
            r["lean_backbone_latency"] = latency_summary(samples[name, "lean", "backbone"])
        r["threads"] = torch.get_num_threads()
    return results


def profile_model(
    model: Detector,
    input_size: tuple[int, int] = (256, 256),
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """``{"input_size", "device", "params": {backbone, rpn, head, total}, "gflops": {total, backbone},
    "memory": {method, peak_mb, activation_mb[, cuda_max_allocated_mb]}, "latency": {median_ms, p90_ms, min_ms, n}, "backbone_latency": (same, backbone alone), "threads"}`` for one image of ``input_size = (h, w)``."""
    return profile_models({"model": model}, input_size, repeats=repeats, warmup=warmup, device=device)["model"]
