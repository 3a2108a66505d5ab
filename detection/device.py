"""Device and mixed-precision selection, and moving nested batches of tensors onto a device.

``"auto"`` picks CUDA when it is available, else the CPU. Mixed precision (fp16 autocast plus a gradient
scaler) is used only on CUDA: CPU autocast is slower than fp32 for these convolution-heavy models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(name: str = "auto") -> torch.device:
    """``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:K"`` -> a torch.device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)} or 'cuda:K', got {name!r}")


def amp_enabled(device: torch.device, requested: bool) -> bool:
    """Mixed precision only where it pays: CUDA."""
    return bool(requested) and device.type == "cuda"


def move_to(obj: Any, device: torch.device) -> Any:
    """Moves every tensor inside dicts, lists, tuples and dataclasses onto ``device``; other values pass."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move_to(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: move_to(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj
