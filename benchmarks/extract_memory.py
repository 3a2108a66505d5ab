"""Peak memory of extract-teacher against the number of images: it must stay flat (shards stream through a
bounded queue; nothing per image is kept after its shard is written).

Tiny real inputs so the large run takes minutes on 2 CPU cores: 64x64 VOC images of coloured squares and an
untrained width-1/8 teacher (the fixtures of the test suite), shards of 64 images, 20 proposals, 2 DataLoader
workers, as `mimic extract-teacher` runs by default. Each size runs in a fresh process; peak resident memory
(``ru_maxrss``) is read for that process and, separately, for its DataLoader workers (the largest one).

    .venv/bin/python benchmarks/extract_memory.py                  # 500 and 5000 images
    .venv/bin/python benchmarks/extract_memory.py --sizes 50,500   # what the test suite runs
writes benchmarks/results/extract_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.pipeline_fixtures: the suite's tiny real inputs

SIZE, SHARD, PROPOSALS = 64, 64, 20


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, data: Path, teacher: Path, out: Path) -> dict:
    """One extraction of the split ``first{n}`` in this (fresh) process."""
    import torch

    from mimicdet.pipeline.extract import ExtractConfig, run_extract

    torch.set_num_threads(1)
    after_imports = _rss_mib()
    t0 = time.perf_counter()
    summary = run_extract(ExtractConfig(teacher=teacher, data=data, split=f"first{n}", out=str(out),
                                        shard_size=SHARD, proposals=PROPOSALS, batch_size=8, device="cpu",
                                        progress=False))
    seconds = time.perf_counter() - t0
    return {
        "images": summary["images"],
        "shards": summary["shards"],
        "seconds": round(seconds, 2),
        "images_per_s": round(summary["images"] / seconds, 1),
        "rss_after_imports_mib": round(after_imports, 1),
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def prepare(work: Path, sizes: list[int]) -> tuple[Path, Path]:
    from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher  # the suite's tiny real inputs

    data, teacher = work / "voc", work / "teacher.pt"
    make_squares_voc(data, {"train": max(sizes)}, size=SIZE)
    ids = (data / "ImageSets" / "Main" / "train.txt").read_text().split()
    for n in sizes:
        (data / "ImageSets" / "Main" / f"first{n}.txt").write_text("".join(f"{i}\n" for i in ids[:n]))
    make_tiny_teacher(teacher, width=0.125, size=SIZE)
    return data, teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="500,5000", help="comma-separated image counts, smallest first")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and stores (default: temp, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extract_memory.json")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.data, args.teacher, args.store)))
        return

    sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(sizes) < 2 or sizes[0] < 1:
        raise SystemExit(f"--sizes needs at least two positive counts, got {args.sizes!r}")
    work = args.work or Path(tempfile.mkdtemp(prefix="extract_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    runs = []
    try:
        t0 = time.perf_counter()
        data, teacher = prepare(work, sizes)
        prepare_s = time.perf_counter() - t0
        for n in sizes:
            store = work / f"store{n}"
            shutil.rmtree(store, ignore_errors=True)
            r = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--data", str(data), "--teacher", str(teacher),
                 "--store", str(store)],
                capture_output=True, text=True, env=env, check=False,
            )
            if r.returncode != 0:
                raise SystemExit(f"extraction of {n} images failed:\n{r.stderr[-3000:]}")
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    small, large = runs[0], runs[-1]
    result = {
        "what": "peak resident memory of extract-teacher (local, 2 DataLoader workers) against image count",
        "setup": {"image_side_px": SIZE, "teacher_width": 0.125, "shard_size": SHARD, "proposals": PROPOSALS,
                  "batch_size": 8, "torch_threads": 1, "dataset_prepare_s": round(prepare_s, 1)},
        "runs": runs,
        "main_growth": round(large["peak_rss_main_mib"] / small["peak_rss_main_mib"] - 1, 4),
        "worker_growth": round(large["peak_rss_largest_worker_mib"] / small["peak_rss_largest_worker_mib"] - 1, 4),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"peak RSS main {small['peak_rss_main_mib']} MiB at {small['images']} images -> "
          f"{large['peak_rss_main_mib']} MiB at {large['images']} ({100 * result['main_growth']:+.1f}%); "
          f"largest worker {small['peak_rss_largest_worker_mib']} -> {large['peak_rss_largest_worker_mib']} MiB "
          f"({100 * result['worker_growth']:+.1f}%) -> {args.out}")


if __name__ == "__main__":
    main()
