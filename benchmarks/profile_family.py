"""Profile the detector family (w = 1, 1/2, 1/4, 1/8, Fast R-CNN head) at one or more input sizes.

Usage:
``python benchmarks/profile_family.py [--sizes 256x256,1000x1500] [--out benchmarks/results/profile_family.json]``

Models are timed round-robin on the same input (one ``predict`` of each in turn), so machine-load drift hits
every width alike. Prints a markdown table (latency in ms, GFLOPs, parameters; speed-up and parameter ratio
against w = 1) and writes the full numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _results

from _results import add_timing_arguments, write_report  # noqa: E402
from mimicdet.detection.detector import DetectorConfig, build_detector  # noqa: E402
from mimicdet.detection.profile import profile_models  # noqa: E402

WIDTHS = (1.0, 0.5, 0.25, 0.125)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: expected HxW[,HxW...] like 256x256, got {part!r}") from None
        sizes.append((h, w))
    return sizes


def is_big(size: tuple[int, int]) -> bool:
    # w = 1 at 1000x1500 takes seconds per image on one CPU thread: fewer repeats there.
    return size[0] * size[1] > 512 * 512


def table(rows: dict[str, dict], size: tuple[int, int]) -> str:
    ref = rows["1"]
    lines = [
        f"**{size[0]}x{size[1]}**, {ref['device']}, {ref['threads']} thread(s), n = {ref['latency']['n']} runs each",
        "",
        "| w | median ms | p90 ms | min ms | speed-up (median / min) | backbone ms (median) | backbone speed-up "
        "| GFLOPs (all / backbone) | params backbone / rpn / head / total | param ratio (total / backbone) "
        "| peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        p, g, lat, bb = r["params"], r["gflops"], r["latency"], r["backbone_latency"]
        lines.append(
            f"| {name} | {lat['median_ms']:.1f} | {lat['p90_ms']:.1f} | {lat['min_ms']:.1f} | "
            f"{ref['latency']['median_ms'] / lat['median_ms']:.2f}x / {ref['latency']['min_ms'] / lat['min_ms']:.2f}x | "
            f"{bb['median_ms']:.1f} | {ref['backbone_latency']['median_ms'] / bb['median_ms']:.2f}x | "
            f"{g['total']:.2f} / {g['backbone']:.2f} | "
            f"{p['backbone'] / 1e6:.2f}M / {p['rpn'] / 1e6:.2f}M / {p['head'] / 1e6:.2f}M / {p['total'] / 1e6:.2f}M | "
            f"{ref['params']['total'] / p['total']:.1f}x / {ref['params']['backbone'] / p['backbone']:.1f}x | "
            f"{r['memory']['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(ap, sizes="256x256,1000x1500", repeats=20, big_repeats=5)
    ap.add_argument("--out", default="benchmarks/results/profile_family.json", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="CUDA only: time under fp16 autocast, as the trainers run")
    args = ap.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.amp and not on_cuda:
        raise SystemExit("--amp needs --device cuda (CPU autocast is slower than fp32 for these models)")
    if on_cuda:
        # One fixed input size per table: let cuDNN pick its fastest kernels once, as a deployed model would.
        torch.backends.cudnn.benchmark = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        str(Fraction(w).limit_denominator()): build_detector(DetectorConfig(num_classes=args.num_classes, width=w))
        for w in WIDTHS
    }
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(torch.device(args.device)) if on_cuda else None,
        },
        "amp": args.amp,
        "head": "fast-rcnn",
        "num_classes": args.num_classes,
        "results": {},
    }
    for size in parse_sizes(args.sizes):
        repeats, warmup = (args.big_repeats, 1) if is_big(size) else (args.repeats, args.warmup)
        precision = torch.autocast("cuda", dtype=torch.float16) if args.amp else contextlib.nullcontext()
        with precision:
            rows = profile_models(models, size, repeats=repeats, warmup=warmup, device=args.device)
        report["results"][f"{size[0]}x{size[1]}"] = rows
        print(table(rows, size), "\n", flush=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
