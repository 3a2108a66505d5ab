"""Tiny real inputs for pipeline tests: a VOC folder of coloured squares on noise, and a tiny teacher checkpoint."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mimicdet.data.transforms import Preprocess
from mimicdet.detection.detector import DetectorConfig, build_detector, save_detector

CLASSES = ("blue", "red")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def make_squares_voc(root: Path, splits: dict[str, int], *, size: int = 64, seed: int = 0) -> Path:
    """VOC layout; each image holds 1-2 solid squares (10-28 px) of class red or blue on grey noise."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        ids = []
        for k in range(n):
            image_id = f"{split}-{k:04d}"
            img = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
            objects = []
            for _ in range(int(rng.integers(1, 3))):
                name = CLASSES[int(rng.integers(0, len(CLASSES)))]
                s = int(rng.integers(10, 29))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                img[y : y + s, x : x + s] = COLOURS[name]
                objects.append(
                    f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                    f"<ymin>{y + 1}</ymin><xmax>{x + s}</xmax><ymax>{y + s}</ymax></bndbox></object>"
                )
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.png")
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.png</filename><size><width>{size}</width>"
                f"<height>{size}</height><depth>3</depth></size>{''.join(objects)}</annotation>"
            )
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_tiny_teacher(path: Path, *, width: float = 0.125, size: int = 64, seed: int = 0, head: str = "fast-rcnn") -> Path:
    """An untrained (seeded) tiny detector saved as a teacher checkpoint with the meta extract-teacher reads."""
    torch.manual_seed(seed)
    config = DetectorConfig(num_classes=len(CLASSES) + 1, width=width, head=head, anchor_sizes=(16, 32))
    model = build_detector(config)
    # Calibrate batch-norm statistics on a few random batches, so activations have the scale of a trained
    # network's (a fresh BN in eval mode passes raw conv outputs through and they grow layer by layer).
    with torch.no_grad():
        model.backbone.train()
        for _ in range(3):
            model.backbone(torch.randn(4, 3, size, size))
    model.eval()
    pre = Preprocess(min_size=size, max_size=size)
    save_detector(path, model, {"role": "teacher", "classes": list(CLASSES), "preprocess": pre.to_dict()})
    return path


def completed_markers(store: Path) -> int:
    """How many shards of a store being written carry their completion marker (0 before the store exists)."""
    try:
        return sum(1 for p in (store / "_complete").iterdir() if p.suffix == ".json")
    except FileNotFoundError:
        return 0


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120,
               poll: float = 0.005) -> None:
    """Poll `condition` until it holds, the process ends or `timeout` seconds pass (the caller checks which)."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            return
        time.sleep(poll)
