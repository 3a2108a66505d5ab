"""Reference vs lean inference (``detection.lean.make_lean``) for the detector family, CPU, one process.

Usage:
``python benchmarks/lean_inference.py [--quick] [--sizes 192x192,1000x1500] [--widths 1,1/2,1/4]
[--trained 1=runs/val24/teacher/model.pt,1/4=...] [--recall-models A.pt,B.pt --recall-data DIR]
[--out benchmarks/results/lean_inference.json]``

Every model is the full detector (Fast R-CNN head, 300 proposals at test time), random-initialised with
``--num-classes`` classes unless ``--trained`` names checkpoints (``WIDTH=PATH``, timed beside the others).
For each input size, ``predict`` of every (width, path) pair is timed round-robin on the same seeded
``1 x 3 x H x W`` image, one call of each in turn, on ``--threads`` threads, so machine-load drift hits every
pair alike; medians (and minima) in ms. Reported ratios: lean over reference for each width, the widest over
each width (reference path and lean path), and the FLOP ratio (``detection.profile.count_gflops``). Each pair's
outputs are compared too (largest box difference in pixels, counts). Prints a markdown table; writes JSON.

``--recall-models``: proposal recall (IoU 0.5 / 0.7, AR) and VOC mAP of each checkpoint on ``--recall-split`` of
``--recall-data`` with each test-time proposal count of ``--proposal-counts`` (``detection.evaluate``, lean copy),
and once on the reference path at the checkpoint's own count, whose numbers the lean copy must repeat.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _results

from _results import add_timing_arguments, write_report  # noqa: E402
from mimicdet.detection.detector import Detector, DetectorConfig, build_detector, load_detector  # noqa: E402
from mimicdet.detection.export import OUTPUT_NAMES, match_outputs  # noqa: E402
from mimicdet.detection.lean import make_lean  # noqa: E402
from mimicdet.detection.profile import count_gflops, latency_summary, time_round_robin  # noqa: E402

# Boxes of 1000+ px carry float32 rounding of ~1e-5 relative (exp of the deltas), i.e. up to ~0.02 px.
MATCH_ATOL = 0.05
RECALL_KEYS = ("recall@300_iou0.5", "recall@300_iou0.7", "AR@300", "mAP@0.5_area")  # all proposals when <= 300

QUICK = {"sizes": "192x192,1000x1500", "repeats": 10, "big_repeats": 2, "warmup": 2}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: expected HxW[,HxW...] like 192x192, got {part!r}") from None
        sizes.append((h, w))
    return sizes


def parse_widths(text: str) -> list[str]:
    try:
        return [str(Fraction(v).limit_denominator()) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--widths: expected fractions like 1,1/2,1/4, got {text!r}") from None


def parse_trained(text: str | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for part in (text or "").split(","):
        if not part:
            continue
        width, sep, path = part.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--trained: expected WIDTH=EXISTING_FILE[,...], got {part!r}")
        out[f"trained {Fraction(width).limit_denominator()}"] = Path(path)
    return out


def build_models(widths: list[str], trained: dict[str, Path], num_classes: int) -> dict[str, Detector]:
    torch.manual_seed(0)
    models = {w: build_detector(DetectorConfig(num_classes=num_classes, width=float(Fraction(w)))) for w in widths}
    for name, path in trained.items():
        models[name] = load_detector(path)[0]
    return {name: m.eval() for name, m in models.items()}


def compare(ref: list[dict[str, torch.Tensor]], lean: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Whether the lean outputs match the reference row for row within ``MATCH_ATOL`` (px and score; ties in any
    order, as ``detection.export.match_outputs``), the largest difference, and the counts. A random-init RPN scores
    anchors nearly alike, so float rounding can reorder near-ties there: trained checkpoints and the tests
    (tests/test_lean.py) are what pin equality."""
    out: dict[str, Any] = {"matched": True, "max_diff": 0.0}
    for a, b in zip(ref, lean):
        out.update({f"{k}_counts": [len(a[k]), len(b[k])] for k in ("boxes", "proposals")})
        try:
            diff = match_outputs({k: a[k].numpy() for k in OUTPUT_NAMES}, {k: b[k].numpy() for k in OUTPUT_NAMES},
                                 atol=MATCH_ATOL)  # fmt: skip
            out["max_diff"] = max(out["max_diff"], diff)
        except ValueError as e:
            out.update(matched=False, mismatch=str(e))
    return out


def time_size(models: dict[str, Detector], size: tuple[int, int], *, repeats: int, warmup: int) -> dict[str, Any]:
    """One input size: every model's reference and lean ``predict`` timed round-robin, outputs compared."""
    h, w = size
    images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    sizes = [(h, w)]
    lean = {name: make_lean(m) for name, m in models.items()}
    runs = {}
    for name in models:
        runs[name, "reference"] = lambda m=models[name]: m.predict(images, sizes)
        runs[name, "lean"] = lambda m=lean[name]: m.predict(images, sizes)
    samples = time_round_robin(runs, repeats=repeats, warmup=warmup)
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        for name, m in models.items():
            rows[name] = {
                "reference": latency_summary(samples[name, "reference"]),
                "lean": latency_summary(samples[name, "lean"]),
                "gflops": count_gflops(m, images, sizes),
                "outputs": compare(m.predict(images, sizes), lean[name].predict(images, sizes)),
            }
    return {"input_size": [h, w], "rows": rows, "ratios": ratios(rows)}


def ratios(rows: dict[str, Any]) -> dict[str, Any]:
    """Lean over reference per model; the widest random-init model over each, per path; FLOP ratios."""
    widest = next(iter(rows))
    ref = rows[widest]
    out: dict[str, Any] = {"widest": widest}
    for name, r in rows.items():
        out[name] = {
            "lean_speedup_median": r["reference"]["median_ms"] / r["lean"]["median_ms"],
            "lean_speedup_min": r["reference"]["min_ms"] / r["lean"]["min_ms"],
            "speedup_vs_widest_reference_median": ref["reference"]["median_ms"] / r["reference"]["median_ms"],
            "speedup_vs_widest_lean_median": ref["lean"]["median_ms"] / r["lean"]["median_ms"],
            "speedup_vs_widest_lean_min": ref["lean"]["min_ms"] / r["lean"]["min_ms"],
            "flop_ratio": ref["gflops"]["total"] / r["gflops"]["total"],
        }
    return out


def table(result: dict[str, Any], threads: int) -> str:
    h, w = result["input_size"]
    rows, rat = result["rows"], result["ratios"]
    n = next(iter(rows.values()))["reference"]["n"]
    lines = [
        f"**{h}x{w}**, CPU, {threads} thread(s), n = {n} rounds (round-robin), medians (minima) in ms",
        "",
        "| model | GFLOPs | reference ms | lean ms | lean speed-up | vs widest: reference | vs widest: lean "
        "| FLOP ratio | outputs match (max diff) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        q = rat[name]
        lines.append(
            f"| {name} | {r['gflops']['total']:.2f} "
            f"| {r['reference']['median_ms']:.1f} ({r['reference']['min_ms']:.1f}) "
            f"| {r['lean']['median_ms']:.1f} ({r['lean']['min_ms']:.1f}) | {q['lean_speedup_median']:.2f}x "
            f"| {q['speedup_vs_widest_reference_median']:.2f}x | {q['speedup_vs_widest_lean_median']:.2f}x "
            f"| {q['flop_ratio']:.2f}x | {'yes' if r['outputs']['matched'] else 'NO'} "
            f"({r['outputs']['max_diff']:.0e}) |"
        )
    return "\n".join(lines)


def with_proposals(model: Detector, count: int) -> Detector:
    """``model`` keeping ``count`` proposals per image at test time (torchvision's RPN reads the dict per call)."""
    model.rpn._post_nms_top_n = {**model.rpn._post_nms_top_n, "testing": count}
    return model


def proposal_recall(paths: list[Path], data: Path, split: str, counts: list[int]) -> dict[str, Any]:
    """Recall and mAP of each checkpoint at each proposal count (lean copy), and on the reference path at its own
    count; the change against the checkpoint's own count in points (percent)."""
    from mimicdet.data import load_dataset
    from mimicdet.detection.evaluate import evaluate_model

    out: dict[str, Any] = {}
    for path in paths:
        model, meta = load_detector(path)
        dataset = load_dataset(data, split, classes=meta.get("classes"))
        default = model.config.rpn_post_nms_top_n_test

        def score(m: Detector) -> dict[str, float]:
            report = evaluate_model(m, meta, dataset, metrics=("recall", "voc"), device="cpu", batch_size=8,
                                    progress=False, name=path.parent.name)  # fmt: skip
            return {**{k: report["summary"][k] for k in RECALL_KEYS}, "predict_s": report["timing"]["predict_s"]}

        row: dict[str, Any] = {"default": default, "width": model.config.width, "images": len(dataset)}
        row["reference"] = score(model)
        row["lean"] = {n: score(with_proposals(make_lean(model), n)) for n in counts}
        base = row["lean"][default] if default in counts else row["reference"]
        row["change_points"] = {
            n: {k: 100 * (r[k] - base[k]) for k in RECALL_KEYS} for n, r in row["lean"].items()
        }
        row["lean_equals_reference"] = default in counts and all(
            abs(row["lean"][default][k] - row["reference"][k]) < 1e-9 for k in RECALL_KEYS
        )
        out[str(path)] = row
    return out


def recall_table(recall: dict[str, Any]) -> str:
    lines = ["| checkpoint | proposals | recall@0.5 | recall@0.7 | AR | mAP@0.5 | change in recall@0.5 (points) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for path, row in recall.items():
        name = Path(path).parent.name
        for n, r in row["lean"].items():
            lines.append(
                f"| {name} | {n} | {100 * r['recall@300_iou0.5']:.1f} | {100 * r['recall@300_iou0.7']:.1f} "
                f"| {100 * r['AR@300']:.1f} | {100 * r['mAP@0.5_area']:.1f} "
                f"| {row['change_points'][n]['recall@300_iou0.5']:+.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(ap, sizes="192x192,1000x1500", repeats=30, big_repeats=7)
    ap.add_argument("--widths", default="1,1/2,1/4", help="random-init widths; the first is the reference width")
    ap.add_argument("--trained", default=None, help="WIDTH=CHECKPOINT[,...]: trained detectors timed beside")
    ap.add_argument("--out", default="benchmarks/results/lean_inference.json", type=Path)
    ap.add_argument("--quick", action="store_true", help=f"fewer rounds: {QUICK}")
    ap.add_argument("--recall-models", default=None, help="comma-separated checkpoints to score per proposal count")
    ap.add_argument("--recall-data", default="runs/demo-final/data", type=Path, help="dataset of --recall-models")
    ap.add_argument("--recall-split", default="test")
    ap.add_argument("--proposal-counts", default="300,100,50", help="test-time proposals per image to score")
    ap.add_argument("--skip-timing", action="store_true", help="only the recall part")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.big_repeats, args.warmup = (QUICK[k] for k in QUICK)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = build_models(parse_widths(args.widths), parse_trained(args.trained), args.num_classes)
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_start": os.getloadavg(),
        },
        "command": " ".join(["python", "benchmarks/lean_inference.py", *(argv if argv is not None else sys.argv[1:])]),
        "head": "fast-rcnn", "num_classes": args.num_classes, "post_nms_top_n_test": 300,
        "trained": {k: str(v) for k, v in parse_trained(args.trained).items()},
        "results": {},
    }  # fmt: skip
    for size in [] if args.skip_timing else parse_sizes(args.sizes):
        big = size[0] * size[1] > 512 * 512
        result = time_size(models, size, repeats=args.big_repeats if big else args.repeats,
                           warmup=1 if big else args.warmup)  # fmt: skip
        report["results"][f"{size[0]}x{size[1]}"] = result
        print(table(result, torch.get_num_threads()), "\n", flush=True)
    if args.recall_models:
        paths = [Path(p) for p in args.recall_models.split(",")]
        counts = [int(n) for n in args.proposal_counts.split(",")]
        report["recall"] = proposal_recall(paths, args.recall_data, args.recall_split, counts)
        print(recall_table(report["recall"]), flush=True)
    report["machine"]["load_average_end"] = os.getloadavg()
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
