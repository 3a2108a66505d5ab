"""Stage-1 recall@0.7 by box size for every stage-1 student of a demo run folder, from the per-box hits its
evaluation kept: where on the size range the teacher leads, and where mimic moves the students.

    python benchmarks/recall_by_size.py RUN SPLIT     # e.g. runs/val val: reads RUN/eval-val/*.json and RUN/data

Sizes are sqrt(w*h) of the non-ignored boxes in the split's own pixels (the built-in images are not resized).
Writes RUN/recall_by_size-SPLIT.json and prints the table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


from mimicdet.data import load_dataset  # noqa: E402
from mimicdet.data.summary import SIZE_BUCKETS, SIZE_EDGES  # noqa: E402


def main(run: Path, split: str) -> dict:
    eval_dir = run / ("eval" if split == "test" else f"eval-{split}")
    dataset = load_dataset(run / "data", split)
    boxes = np.concatenate([r.boxes[~r.ignore].astype(np.float64) for r in dataset.records])
    sizes = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    bucket = np.digitize(sizes, SIZE_EDGES)
    counts = [int((bucket == k).sum()) for k in range(len(SIZE_BUCKETS))]
    rows: dict[str, list[float | None]] = {}
    names = ["teacher"] + sorted(p.stem for p in eval_dir.glob("*-stage1.json"))
    for name in names:
        hits = np.array(json.loads((eval_dir / f"{name}.json").read_text())["recall"]["hits"]["top300_iou0.7"], bool)
        if len(hits) != len(sizes):
            raise ValueError(f"{eval_dir / name}.json: {len(hits)} boxes, the {split} split has {len(sizes)}")
        rows[name] = [100 * float(hits[bucket == k].mean()) if counts[k] else None for k in range(len(counts))]
        rows[name].append(100 * float(hits.mean()))
    print("boxes per bucket:", dict(zip(SIZE_BUCKETS, counts)))
    print(f"{'model':45s}", " ".join(f"{b:>6s}" for b in (*SIZE_BUCKETS, "all")))
    for name, vals in rows.items():
        print(f"{name:45s}", " ".join("     -" if v is None else f"{v:6.1f}" for v in vals))
    print("minus the scratch student of the same seed:")
    for name, vals in rows.items():
        base = re.sub(r"-s(\d+)-.+-stage1$", r"-s\1-none-stage1", name)
        if name != base and base in rows:
            diff = ["     -" if a is None else f"{a - b:+6.1f}" for a, b in zip(vals, rows[base])]
            print(f"{name:45s}", " ".join(diff))
    out = {"run": str(run), "split": split, "buckets": list(SIZE_BUCKETS), "boxes": counts, "recall_at_0.7": rows}
    (run / f"recall_by_size-{split}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
