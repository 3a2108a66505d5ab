"""The machine and package versions a result was measured with: one capture for reports and benchmarks."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def environment() -> dict[str, str]:
    """Versions that change the generated data or the numbers (image resampling, kernels)."""
    # The CPU matters too: the same packages on another CPU model (AVX-512 against AMX kernels) or thread count
    # train to different weights, so a run is repeatable to the digit only where all of these match.
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": str(torch.get_num_threads())}
    for name in ("torch", "torchvision", "numpy", "pillow", "scikit-image", "mlxtend", "zarr", "numcodecs"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
