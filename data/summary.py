"""What a dataset holds, for any :class:`data.records.Dataset`: images, boxes per class, object sizes, and
preview images with the boxes drawn.

Object size is sqrt(w·h) of a box in pixels of the stored image, bucketed as <16, 16-32, 32-64, 64-128, >=128;
"small" means below 32 px (where the scale-mimic student's half-size input hurts most).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from mimicdet.data.records import Dataset

if TYPE_CHECKING:
    from mimicdet.data.transforms import Preprocess

SIZE_EDGES = (16, 32, 64, 128)
SIZE_BUCKETS = ("<16", "16-32", "32-64", "64-128", ">=128")
SMALL = 32
_PALETTE = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220),
            (255, 128, 0), (160, 160, 160))


def input_box_sizes(dataset: Dataset, pre: "Preprocess", *, scale: float = 1.0) -> np.ndarray:
    """float64[B]: sqrt(w*h) of every labelled box in the network's input pixels (after ``pre``'s resize and
    the input ``scale``), in record order."""
    from mimicdet.data.transforms import resize_params

    sizes = [np.zeros(0)]
    for r in dataset.records:
        if len(r.boxes):
            b = r.boxes.astype(np.float64)
            side = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
            sizes.append(side * resize_params(r.width, r.height, pre, scale=scale).scale)
    return np.concatenate(sizes)


def small_object_warning(dataset: Dataset, pre: "Preprocess", stride: int, *, scale: float = 1.0) -> str | None:
    """A one-line warning when most labelled boxes are under two feature cells (``2·stride`` input pixels) after
    resizing: there a region's pooled teacher features are mostly interpolation between one or two cells, and
    the detector itself struggles. None otherwise."""
    sizes = input_box_sizes(dataset, pre, scale=scale)
    if not len(sizes):
        return None
    share = float((sizes < 2 * stride).mean())
    if share <= 0.5:
        return None
    return (f"{100 * share:.0f}% of the {len(sizes)} labelled boxes of {dataset.name}/{dataset.split} are under "
            f"{2 * stride} px (two cells of the stride-{stride} map) at the network's input (median "
            f"{float(np.median(sizes)):.0f} px): feature mimic samples little more than one cell per object there; "
            "a larger input (the teacher's --min-size/--max-size) gives the objects more cells")


def box_sizes(dataset: Dataset) -> np.ndarray:
    """float64[B]: sqrt(w*h) px of every box of every record, in record order."""
    if not dataset.records:
        return np.zeros(0)
    boxes = np.concatenate([r.boxes for r in dataset.records]).astype(np.float64).reshape(-1, 4)
    return np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))


def summarize(dataset: Dataset) -> dict:
    """Counts as plain Python values (JSON-ready). Sizes count every box, ignored ones included."""
    records = dataset.records
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, np.int64)
    ignore = np.concatenate([r.ignore for r in records]) if records else np.zeros(0, bool)
    sizes = box_sizes(dataset)
    per_class = np.bincount(labels, minlength=dataset.num_classes)
    hist = np.bincount(np.digitize(sizes, SIZE_EDGES), minlength=len(SIZE_BUCKETS))
    per_image = [len(r.boxes) for r in records]
    return {
        "name": dataset.name,
        "split": dataset.split,
        "images": len(records),
        "unlabelled_images": sum(not r.labelled for r in records),
        "images_without_boxes": sum(n == 0 for n in per_image),
        "image_sizes": sorted({f"{r.width}x{r.height}" for r in records}) if len(records) else [],
        "boxes": int(len(labels)),
        "ignored_boxes": int(ignore.sum()),
        "max_boxes_per_image": max(per_image, default=0),
        "boxes_per_class": {c: int(per_class[k + 1]) for k, c in enumerate(dataset.classes)},
        "size_histogram": {b: int(n) for b, n in zip(SIZE_BUCKETS, hist)},
        "fraction_small": float((sizes < SMALL).mean()) if len(sizes) else 0.0,
        "median_size": float(np.median(sizes)) if len(sizes) else 0.0,
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines for one split."""
    s = summary
    sizes = s["image_sizes"]
    size_text = sizes[0] if len(sizes) == 1 else f"{len(sizes)} sizes"
    head = (f"{s['name']}/{s['split']}: {s['images']} images ({size_text}, {s['images_without_boxes']} without boxes"
            + (f", {s['unlabelled_images']} unlabelled" if s["unlabelled_images"] else "")
            + f"), {s['boxes']} boxes ({s['ignored_boxes']} ignored, at most {s['max_boxes_per_image']} per image)")
    classes = ", ".join(f"{c} {n}" for c, n in s["boxes_per_class"].items())
    total = max(s["boxes"], 1)
    hist = " | ".join(f"{b} {n} ({100 * n / total:.0f}%)" for b, n in s["size_histogram"].items())
    return "\n".join([
        head,
        f"  boxes per class: {classes}",
        f"  box size sqrt(w*h) px: {hist}",
        f"  below {SMALL} px: {100 * s['fraction_small']:.1f}%, median {s['median_size']:.1f} px",
    ])


def draw_preview(dataset: Dataset, out_dir: Path, n: int, *, min_side: int = 512) -> list[Path]:
    """Draw the first ``n`` images with their boxes and class names to ``out_dir/<image_id>.png``.

    Images smaller than ``min_side`` are enlarged (nearest) so the labels stay legible; ignored boxes are grey,
    their names end in "?".
    """
    from mimicdet.data.images import load_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in dataset.records[:n]:
        img = Image.fromarray(load_image(r.path))
        k = max(1, -(-min_side // max(min(img.size), 1)))
        if k > 1:
            img = img.resize((img.width * k, img.height * k), Image.NEAREST)
        draw = ImageDraw.Draw(img)
        for box, label, ignored in zip(r.boxes * k, r.labels, r.ignore):
            name = dataset.classes[label - 1] if 0 < label <= len(dataset.classes) else str(label)
            colour = (160, 160, 160) if ignored else _PALETTE[(label - 1) % len(_PALETTE)]
            x1, y1, x2, y2 = (float(v) for v in box)
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=2)
            tx, ty = x1, max(y1 - 11, 0)
            draw.rectangle((tx, ty, tx + 6 * len(name) + 3, ty + 10), fill=colour)
            draw.text((tx + 2, ty - 1), name + ("?" if ignored else ""), fill=(0, 0, 0))
        path = out_dir / f"{r.image_id}.png"
        img.save(path)
        paths.append(path)
    return paths


def describe_voc(root: Path, *, splits=None, classes=None, preview: int = 0) -> str:
    """Read every split of the VOC dataset at ``root`` (or the given ones) and return their summaries; with
    ``preview`` > 0, also draw that many images of the first split under ``root/preview/``."""
    from mimicdet.data.voc import read_voc, voc_splits

    root = Path(root)
    names = list(splits) if splits is not None else voc_splits(root)
    datasets = [read_voc(root, s, classes=classes) for s in names]
    lines = [format_summary(summarize(d)) for d in datasets]
    if preview and datasets:
        paths = draw_preview(datasets[0], root / "preview", preview)
        lines.append(f"preview: {len(paths)} images under {root / 'preview'}")
    return "\n".join(lines)
