"""Pipeline throughput on one device: teacher extraction images/s and student training images/s.

Usage: ``python benchmarks/gpu_throughput.py [--device cuda] [--size 512] [--images 96] [--iters 30]``

1. Extraction: ``run_extract`` (the code of ``mimic extract-teacher``: zarr, float16, 300 proposals, batch 8, image
   decoding in loader processes, shards written by a writer thread off the CPU) over ``--images`` built-in
   synthetic images at ``--size`` px, with a w = 1 teacher (random weights, batch norm calibrated on the same
   images so its maps have a real network's scale). Run twice into fresh stores; the second run is reported
   (the first pays cuDNN's algorithm search and the CUDA context), both are in the JSON. images/s counts the
   whole call: loading the teacher, reading, the forward pass under AMP, encoding and writing the store.
2. Student training: ``run_train_student`` (w = 1/4, stage 1, RoI mimic, batch 8, AMP on CUDA) streaming that
   store for ``--iters`` steps, logged every step; images/s = batch / median seconds per step after ``--warmup``
   steps (data wait included, so a slow loader shows).

Writes ``--out`` (JSON) and prints a markdown table. On the CPU it runs too, for a smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


from _results import write_report  # noqa: E402
from mimicdet.store import inspect_store  # noqa: E402
from mimicdet.data.synthetic import SyntheticConfig, ensure_dataset  # noqa: E402
from mimicdet.detection.device import select_device  # noqa: E402
from distill_throughput import make_teacher  # noqa: E402
from mimicdet.pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from mimicdet.student.train import StudentConfig, run_train_student  # noqa: E402

BATCH, PROPOSALS, WIDTH, ROIS = 8, 300, 0.25, 64


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)"


def extraction(teacher: Path, data: Path, work: Path, device: str, images: int) -> dict:
    runs = []
    for k in range(2):
        store = work / f"store{k}"
        cfg = ExtractConfig(teacher=teacher, data=data, out=str(store), proposals=PROPOSALS, batch_size=BATCH,
                            mode="overwrite", progress=False, device=device)
        t0 = time.perf_counter()
        run_extract(cfg)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "images_per_s": images / wall})
        print(f"extraction run {k + 1}: {images} images in {wall:.1f} s ({images / wall:.1f} img/s)", flush=True)
    info = inspect_store(str(work / "store1"))
    return {"runs": runs, "images_per_s": runs[-1]["images_per_s"], "store": str(work / "store1"),
            "bytes_per_image": info.get("bytes_per_image")}


def training(store: str, data: Path, work: Path, device: str, iters: int, warmup: int) -> dict:
    cfg = StudentConfig(store=store, data=data, out=work / "student", width=WIDTH, stage=1, mimic="roi",
                        rois_per_image=ROIS, batch_size=BATCH, iters=iters, warmup_iters=min(100, iters),
                        progress=False, checkpoint_every=0, log_every=1, overwrite=True, device=device)
    summary = run_train_student(cfg)
    rows = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r["s_per_iter"] for r in rows[warmup:]]
    data_wait = [r["data_time"] for r in rows[warmup:]]
    s_per_step = statistics.median(steady)
    print(f"student training: {BATCH / s_per_step:.1f} img/s (median of {len(steady)} steps)", flush=True)
    return {"images_per_s": BATCH / s_per_step, "median_s_per_step": s_per_step,
            "median_data_wait_s": statistics.median(data_wait), "steps_timed": len(steady),
            "final_losses": summary.get("losses", {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:K]")
    ap.add_argument("--size", type=int, default=512, help="square input side in px (images and the teacher's resize)")
    ap.add_argument("--images", type=int, default=96, help="images extracted per run")
    ap.add_argument("--iters", type=int, default=30, help="student training steps")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the training rate")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and stores (default: temp, removed)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_throughput.json")
    args = ap.parse_args(argv)
    if not 0 <= args.warmup < args.iters:
        raise SystemExit(f"--warmup must be in [0, --iters), got {args.warmup} with --iters {args.iters}")
    device = select_device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data = ensure_dataset(SyntheticConfig(out=work / "data", train=args.images, test=8, size=args.size,
                                              progress=False), echo=lambda _: None)
        teacher = make_teacher(work / "teacher.pt", data, size=args.size)
        print(f"data and teacher ready in {time.perf_counter() - t0:.1f} s", flush=True)
        ext = extraction(teacher, data, work, str(device), args.images)
        train = training(ext["store"], data, work, str(device), args.iters, args.warmup)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "amp": device.type == "cuda",
        "input_px": [args.size, args.size],
        "batch_size": BATCH,
        "teacher_width": 1.0,
        "student_width": WIDTH,
        "proposals": PROPOSALS,
        "extraction": {k: v for k, v in ext.items() if k != "store"},
        "student_training": train,
    }
    print(f"\n| device | input | extraction img/s (w=1 teacher) | student training img/s (w=1/4, RoI mimic) |\n"
          f"|---|---|---|---|\n| {report['device']} | {args.size}x{args.size} | {ext['images_per_s']:.1f} "
          f"| {train['images_per_s']:.1f} |")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
