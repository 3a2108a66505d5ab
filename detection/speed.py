"""`mimic profile`: checkpoints side by side on the user's own hardware, in PyTorch and in ONNX Runtime.

Every model runs on the same random input of ``size`` (batch ``batch``), one call of each per round, so load
drift hits them alike and the speed-ups are ratios measured in one run (:func:`detection.profile.time_round_robin`).
Backends:

- ``torch``: the lean inference copy (:func:`detection.lean.make_lean`: batch norm folded, batched
  post-processing), as ``mimic predict`` runs it; ``torch-reference``: the model as trained.
- ``onnxruntime``: the model exported by ``mimic export`` at the fixed size (one image per call: a batch of N is
  N calls), on the CPU, or CUDA when onnxruntime has it and ``--device`` asks for it.

Times are milliseconds per image (median, 90th percentile, minimum); ``threads`` is torch's intra-op pool and
onnxruntime's intra-op threads alike.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

BACKENDS = ("torch", "torch-reference", "onnxruntime")


@dataclass(frozen=True)
class ProfileConfig:
    models: tuple[Path, ...]
    size: tuple[int, int] = (600, 1000)  # (height, width) px
    batch: int = 1
    backends: tuple[str, ...] = ("torch",)
    device: str = "auto"
    repeats: int = 20
    warmup: int = 3
    threads: int | None = None  # None: as torch has it

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"--backend must be among {', '.join(BACKENDS)}, got {', '.join(self.backends)}")
        if not self.models:
            raise ValueError("give at least one MODEL (a model.pt)")
        if self.batch < 1 or self.repeats < 1 or min(self.size) < 32:
            raise ValueError(f"need --batch >= 1, --repeats >= 1 and sides >= 32 px; got {self.batch}, "
                             f"{self.repeats}, {self.size}")


def _names(paths: tuple[Path, ...]) -> list[str]:
    """Short unique labels: the file's folder and stem where stems repeat (runs/*/model.pt)."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def _torch_runs(name: str, model: torch.nn.Module, images: torch.Tensor, backends: tuple[str, ...]) -> dict:
    from mimicdet.detection.export import lean_or_same

    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    runs = {}
    if "torch" in backends:
        lean = lean_or_same(model)
        runs[name, "torch"] = lambda: lean.predict(images, sizes)
    if "torch-reference" in backends:
        runs[name, "torch-reference"] = lambda: model.predict(images, sizes)
    return runs


def _onnx_run(path: Path, folder: Path, size: tuple[int, int], images: np.ndarray, device: torch.device) -> Callable:
    from mimicdet.detection.export import INPUT_NAME, ExportConfig, require_onnxruntime, run_export

    out = folder / f"{len(list(folder.iterdir()))}.onnx"
    run_export(ExportConfig(checkpoint=path, format="onnx", out=out, height=size[0], width=size[1], verify=False))
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    session = ort.InferenceSession(str(out), opts, providers=["CUDAExecutionProvider"] if cuda else
                                   ["CPUExecutionProvider"])
    singles = [images[i : i + 1] for i in range(len(images))]
    return lambda: [session.run(None, {INPUT_NAME: x}) for x in singles]


def run_profile(cfg: ProfileConfig) -> dict[str, Any]:
    """``{"rows": [...], "size", "batch", "device", "threads"}``: one row per (model, backend), the first model
    of each backend the baseline of its speed-ups."""
    from mimicdet.detection.detector import load_detector
    from mimicdet.detection.device import select_device
    from mimicdet.detection.profile import latency_summary, profile_static, time_round_robin

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = select_device(cfg.device)
    images = torch.randn(cfg.batch, 3, *cfg.size, generator=torch.Generator().manual_seed(0))
    models = {name: load_detector(path)[0].eval().to(dev) for name, path in zip(_names(cfg.models), cfg.models)}
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="mimic-profile-") as folder:
        for (name, model), path in zip(models.items(), cfg.models):
            runs |= _torch_runs(name, model, images.to(dev), cfg.backends)
            if "onnxruntime" in cfg.backends:
                runs[name, "onnxruntime"] = _onnx_run(path, Path(folder), cfg.size, images.numpy(), dev)
        samples = time_round_robin(runs, repeats=cfg.repeats, warmup=cfg.warmup, device=dev)
    static = {name: profile_static(m, cfg.size, device=dev) for name, m in models.items()}
    rows = []
    for (name, backend), ms in samples.items():
        per_image = latency_summary([t / cfg.batch for t in ms])
        rows.append({"model": name, "backend": backend, "width": models[name].config.width,
                     "params": static[name]["params"]["total"], "gflops": static[name]["gflops"]["total"],
                     **per_image})
    for backend in cfg.backends:
        mine = [r for r in rows if r["backend"] == backend]
        for r in mine:
            r["speedup"] = mine[0]["median_ms"] / r["median_ms"]
    return {"rows": rows, "size": list(cfg.size), "batch": cfg.batch, "device": str(dev),
            "threads": torch.get_num_threads(), "repeats": cfg.repeats}


def format_profile(result: dict[str, Any]) -> str:
    """Markdown table; speed-ups are over the first model, per backend."""
    h, w = result["size"]
    lines = ["| model | backend | width | params | GFLOPs | ms/image | p90 | min | speed-up |", "|" + "---|" * 9]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['backend']} | {r['width']:g} | {r['params'] / 1e6:.2f}M | "
                     f"{r['gflops']:.2f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    lines.append(f"({h}x{w} px, batch {result['batch']}, {result['device']}, {result['threads']} threads; median of "
                 f"{result['repeats']} rounds, models timed in turn)")
    return "\n".join(lines)
