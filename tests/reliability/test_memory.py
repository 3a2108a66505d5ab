"""Load: extraction memory stays flat with the number of images (benchmarks/extract_memory.py at 50 vs 500 images;
the benchmark itself measures 500 vs 5,000)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reliability.helpers import REPO, SUBPROCESS_ENV


@pytest.mark.slow
def test_peak_memory_of_extraction_does_not_grow_with_images(tmp_path):
    out = tmp_path / "extract_memory.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "extract_memory.py"), "--sizes", "50,500",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    small, large = result["runs"]
    assert (small["images"], large["images"]) == (50, 500) and large["shards"] == 8
    # Ten times the images, and the peak of the main process and of the largest loader worker grow < 30 %.
    assert result["main_growth"] < 0.30, result
    assert result["worker_growth"] < 0.30, result
