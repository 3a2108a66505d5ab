"""Per-image inference cost of the family against batch size: where the width's FLOPs turn into speed.

Usage: ``python benchmarks/batch_latency.py [--device cuda] [--size 1000x1500] [--batches 1,4,16] [--amp]``

At batch 1 a GPU runs these small networks bound by kernel launches and host work, not arithmetic, and every
width costs about the same; larger batches give the card enough work per kernel for the FLOPs to show. For
each batch size and width (w = 1, 1/2, 1/4, 1/8, untrained, eval mode), times the backbone alone and the whole
``Detector.predict`` (RPN, NMS, Fast R-CNN head on 300 proposals per image), round-robin over the widths,
device synchronised around each run. Reports median ms per image and the speed-up against w = 1 in the same
batch size. Writes ``--out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import write_report  # noqa: E402
from mimicdet.detection.detector import DetectorConfig, build_detector  # noqa: E402
from mimicdet.detection.device import select_device  # noqa: E402
from mimicdet.detection.profile import time_backbone_ms, time_predict_ms  # noqa: E402

WIDTHS = (1.0, 0.5, 0.25, 0.125)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:K]")
    ap.add_argument("--size", default="1000x1500", help="HxW input in px")
    ap.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per width and batch size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="CUDA only: fp16 autocast")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batch_latency.json")
    args = ap.parse_args(argv)
    device = select_device(args.device)
    if args.amp and device.type != "cuda":
        raise SystemExit("--amp needs a CUDA device")
    h, w = (int(v) for v in args.size.lower().split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick cuDNN's fastest kernels once
    torch.manual_seed(0)
    models = {str(Fraction(wd).limit_denominator()): build_detector(DetectorConfig(num_classes=2, width=wd))
              .to(device).eval() for wd in WIDTHS}
    precision = torch.autocast("cuda", dtype=torch.float16) if args.amp else contextlib.nullcontext()
    results: dict[str, dict] = {}
    with torch.inference_mode(), precision:
        for b in batches:
            images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
            sizes = [(h, w)] * b
            samples = {name: {"backbone": [], "predict": []} for name in models}
            for i in range(args.warmup + args.repeats):
                for name, m in models.items():
                    bb, pr = time_backbone_ms(m, images), time_predict_ms(m, images, sizes)
                    if i >= args.warmup:
                        samples[name]["backbone"].append(bb / b)
                        samples[name]["predict"].append(pr / b)
            row = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
            results[str(b)] = row
            print(f"batch {b}: " + ", ".join(f"w={n} {r['predict']:.2f} ms/img" for n, r in row.items()), flush=True)
            del images
    lines = [f"**{h}x{w}**, {device}{' fp16 autocast' if args.amp else ''}, median ms per image "
             f"(n = {args.repeats}), speed-up against w = 1 in brackets", "",
             "| batch | " + " | ".join(f"w={n} backbone | w={n} detector" for n in models) + " |",
             "|---|" + "---|---|" * len(models)]
    for b, row in results.items():
        ref = row["1"]
        cells = [f"{r['backbone']:.2f} ({ref['backbone'] / r['backbone']:.1f}x) | "
                 f"{r['predict']:.2f} ({ref['predict'] / r['predict']:.1f}x)" for r in row.values()]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    print("\n" + "\n".join(lines))
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "input_px": [h, w], "amp": args.amp, "repeats": args.repeats,
              "ms_per_image": results}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
