"""What the benchmarks share: the timing options of the detector-speed scripts, and writing a JSON report
atomically (a temp file, then a rename), so a killed run leaves no torn file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_timing_arguments(ap: argparse.ArgumentParser, *, sizes: str, repeats: int, big_repeats: int) -> None:
    """--sizes, --repeats, --big-repeats, --warmup, --num-classes and --threads of the detector-speed scripts."""
    ap.add_argument("--sizes", default=sizes, help="comma-separated HxW input sizes")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed rounds on inputs up to 512x512")
    ap.add_argument("--big-repeats", type=int, default=big_repeats, help="timed rounds on larger inputs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=2, help="including background (2: pedestrians)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
