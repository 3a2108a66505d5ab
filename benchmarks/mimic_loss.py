"""Forward+backward time of the region mimic loss: the plain form against the exact fast forms.

Batch 8, 128 regions per image (teacher-proposal-like boxes: log-uniform sides from 16 px to the image side,
clipped to the image), teacher Ct = 832 channels (fp16, as the store holds it), student Cs = 208 (w = 1/4),
maps 16x16 (256x256 input) and 38x63 (600x1000 input). Every form is timed interleaved with the others, median
over the repeats, and its loss value checked against the plain form. As a yardstick, the same loop times a
forward+backward of the w = 1/4 backbone on the 256x256 batch (the bulk of a student step).

roialign forms: ``reference`` (r on the full map, torchvision roi_align of r(V) and of U), ``kernel`` and
``pool_then_transform`` (the two exact forms inside ``roi_mimic_loss``; ``fast_path`` says which one the size
rule picks). native forms: ``reference`` (crop loop) and ``fast`` (weighted per-cell MSE). The ``crossover``
section times the two roialign forms over map sizes, which is what the size rule in student/mimic.py rests on.

Threads default to 1: on a shared 2-core machine, 2 OpenMP threads per process time out of lockstep with
other jobs and the medians swing by 5x; one thread gives repeatable ratios.

    python benchmarks/mimic_loss.py [--repeats 20] [--large-repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.mimic_reference: the plain form

from mimicdet.detection.backbone import InceptionBackbone  # noqa: E402
from mimicdet.student import mimic  # noqa: E402
from mimicdet.student.mimic import MimicTransform, roi_mimic_loss  # noqa: E402
from tests.mimic_reference import roi_mimic_loss_reference  # noqa: E402

BATCH, REGIONS, CT, CS, STRIDE = 8, 128, 832, 208, 16
CONFIGS = {"256x256": (16, 16), "600x1000": (38, 63)}
CROSSOVER_MAPS = [(24, 24), (32, 32)]  # 16x16 and 38x63 come from the main configs


def proposals(gen: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """Teacher-proposal-like boxes in input pixels, clipped to the image."""
    side = torch.exp(torch.empty(count, 2).uniform_(math.log(16.0), math.log(float(min(height, width))), generator=gen))
    centre = torch.rand(count, 2, generator=gen) * torch.tensor([width, height], dtype=torch.float32)
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def inputs(h: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, CS, h, w, generator=gen).requires_grad_(True)
    teacher = torch.randn(BATCH, CT, h, w, generator=gen).half()
    rois = [proposals(gen, REGIONS, h * STRIDE, w * STRIDE) for _ in range(BATCH)]
    torch.manual_seed(seed)
    transform = MimicTransform(student_channels=CS, teacher_channels=CT)
    return student, teacher, rois, transform


def loss_forms(student, teacher, rois, transform) -> dict[str, Callable[[], torch.Tensor]]:
    n, _, h, w = student.shape
    sizes = [(h, w)] * n
    common = dict(spatial_scale=1 / STRIDE, output_size=(7, 7), sampling_ratio=2, aligned=False)
    weight = lambda: transform.weight.flatten(1)  # noqa: E731
    return {
        "roialign/reference": lambda: roi_mimic_loss_reference(
            student, teacher, rois, transform, spatial_scale=1 / STRIDE, sampler="roialign"
        ),
        "roialign/kernel": lambda: mimic._roialign_kernel(
            student, teacher, rois, weight(), transform.bias, sizes, **common
        ) / (2.0 * n * REGIONS * CT * 49),
        "roialign/pool_then_transform": lambda: mimic._roialign_pool_then_transform(
            student, teacher, rois, weight(), transform.bias, sizes, **common
        ) / (2.0 * n * REGIONS * CT * 49),
        "native/reference": lambda: roi_mimic_loss_reference(
            student, teacher, rois, transform, spatial_scale=1 / STRIDE, sampler="native"
        ),
        "native/fast": lambda: roi_mimic_loss(
            student, teacher, rois, transform, spatial_scale=1 / STRIDE, sampler="native"
        ),
    }


def timed(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> tuple[float, float]:
    for p in params:
        p.grad = None
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    return time.perf_counter() - start, loss.item()


def interleaved(forms: dict[str, Callable[[], torch.Tensor]], params, repeats: int) -> dict[str, dict]:
    times: dict[str, list[float]] = {k: [] for k in forms}
    values: dict[str, float] = {}
    for name, fn in forms.items():  # warm-up, and the value each form computes
        values[name] = timed(fn, params)[1]
    for _ in range(repeats):
        for name, fn in forms.items():
            times[name].append(timed(fn, params)[0])
    return {
        k: {
            "median_ms": round(1e3 * statistics.median(v), 2),
            "all_ms": [round(1e3 * t, 2) for t in v],
            "loss": values[k],
        }
        for k, v in times.items()
    }


def backbone_step() -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    backbone = InceptionBackbone(width=0.25)
    images = torch.randn(BATCH, 3, 256, 256)
    return (lambda: backbone(images).square().mean()), list(backbone.parameters())


def config_entry(name: str, h: int, w: int, repeats: int) -> dict:
    """Every loss form on one map size, interleaved; the fast path's speed-up and (256x256) its share of a
    w=1/4 backbone training step."""
    student, teacher, rois, transform = inputs(h, w)
    forms = loss_forms(student, teacher, rois, transform)
    params = [student, *transform.parameters()]
    if name == "256x256":
        step, step_params = backbone_step()
        forms["yardstick/backbone_w0.25_step"] = step
        params += step_params
    stats = interleaved(forms, params, repeats)
    for sampler in ("roialign", "native"):
        ref = stats[f"{sampler}/reference"]["loss"]
        for k, v in stats.items():
            if k.startswith(sampler + "/"):
                v["rel_diff_vs_reference"] = abs(v["loss"] - ref) / abs(ref)
    uses_kernel = mimic._use_kernel(h, w, REGIONS, 49, CS)
    entry = {
        "map_hw": [h, w],
        "repeats": repeats,
        "fast_path": {"roialign": "kernel" if uses_kernel else "pool_then_transform", "native": "fast"},
        "forms": stats,
    }
    fast = {
        "roialign": stats["roialign/kernel" if uses_kernel else "roialign/pool_then_transform"]["median_ms"],
        "native": stats["native/fast"]["median_ms"],
    }
    entry["speedup_vs_reference"] = {
        s: round(stats[f"{s}/reference"]["median_ms"] / fast[s], 1) for s in ("roialign", "native")
    }
    if "yardstick/backbone_w0.25_step" in stats:
        step_ms = stats["yardstick/backbone_w0.25_step"]["median_ms"]
        entry["fraction_of_backbone_step"] = {
            "roialign/fast": round(fast["roialign"] / step_ms, 3),
            "native/fast": round(fast["native"] / step_ms, 3),
            "roialign/reference": round(stats["roialign/reference"]["median_ms"] / step_ms, 3),
        }
    return entry


def crossover(h: int, w: int, kernel_ms: float, pool_ms: float) -> dict:
    return {
        "kernel_ms": kernel_ms,
        "pool_then_transform_ms": pool_ms,
        "hw2_over_regions_bins_cs": round((h * w) ** 2 / (REGIONS * 49 * CS), 3),
        "rule_picks": "kernel" if mimic._use_kernel(h, w, REGIONS, 49, CS) else "pool_then_transform",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats for the 256x256 maps")
    parser.add_argument(
        "--large-repeats", type=int, default=5, help="timed repeats for the 600x1000 maps and the crossover"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mimic_loss.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "settings": {
            "batch": BATCH, "regions_per_image": REGIONS, "teacher_channels": CT, "student_channels": CS,
            "stride": STRIDE, "output_size": 7, "sampling_ratio": 2, "teacher_dtype": "float16",
        },
        "configs": {},
        "crossover": {},
    }
    for name, (h, w) in CONFIGS.items():
        entry = config_entry(name, h, w, args.repeats if name == "256x256" else args.large_repeats)
        result["configs"][name] = entry
        medians = {k: v["median_ms"] for k, v in entry["forms"].items()}
        print(name, json.dumps(medians), entry.get("fraction_of_backbone_step", ""))
        forms = entry["forms"]
        result["crossover"][f"{h}x{w}"] = crossover(h, w, forms["roialign/kernel"]["median_ms"],
                                                   forms["roialign/pool_then_transform"]["median_ms"])
    for h, w in CROSSOVER_MAPS:
        student, teacher, rois, transform = inputs(h, w, seed=1)
        forms = loss_forms(student, teacher, rois, transform)
        pair = {k: forms[k] for k in ("roialign/kernel", "roialign/pool_then_transform")}
        stats = interleaved(pair, [student, *transform.parameters()], args.large_repeats)
        result["crossover"][f"{h}x{w}"] = crossover(h, w, stats["roialign/kernel"]["median_ms"],
                                                   stats["roialign/pool_then_transform"]["median_ms"])
        print(f"crossover {h}x{w}", result["crossover"][f"{h}x{w}"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
