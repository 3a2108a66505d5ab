"""Where does a mimic student lose the teacher's knowledge? Two probes on a trained teacher and student.

Usage:
``python benchmarks/transfer_probe.py --data DIR --teacher T/model.pt --student S_RUN [--labelled-split train]
[--iters 250] [--out benchmarks/results/transfer_probe.json]``

- ``ceiling``: the teacher's backbone frozen, a freshly initialised RPN trained on ``--labelled-split`` for
  ``--iters`` iterations (the student's labelled set and budget). Its proposal recall is what a student whose
  features equalled the teacher's could reach with the labels it has: if it is near the teacher's own, the
  teacher's knowledge lives in its features and feature mimic is the right channel.
- ``probe``: the teacher's own RPN run on the student's mimicked features ``r(v)`` (the student backbone followed
  by its trained transform layer, read from ``S_RUN/checkpoint.pt``). If ``r(v)`` carried the teacher's
  features, this would score like the teacher.

All recall figures: top-300 proposals on the test split, IoU 0.5 and 0.7, plus recall@0.7 by box size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


from mimicdet.data import load_dataset  # noqa: E402
from mimicdet.data.loader import DetectionImages, IterationSampler, make_loader  # noqa: E402
from mimicdet.data.transforms import Preprocess  # noqa: E402
from mimicdet.detection.checkpoints import load_weights_only  # noqa: E402
from mimicdet.detection.detector import build_detector, load_detector  # noqa: E402
from mimicdet.detection.evaluate import evaluate_model  # noqa: E402

SIZE_BINS = ((0, 16), (16, 32), (32, 64), (64, 10_000))  # sqrt(w*h) of a test box, px


def recall_report(model: nn.Module, meta: dict, test) -> dict:
    rep = evaluate_model(model, meta, test, metrics=("recall",), device="cpu", progress=False, keep_hits=True)
    hits = np.asarray(rep["recall"]["hits"]["top300_iou0.7"], bool)
    sizes = np.concatenate([np.sqrt((r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1]))[~r.ignore]
                            for r in test.records if r.labelled])
    by_size = {f"{lo}-{hi}px": float(hits[(sizes >= lo) & (sizes < hi)].mean()) if ((sizes >= lo) & (sizes < hi)).any()
               else None for lo, hi in SIZE_BINS} if len(sizes) == len(hits) else {}
    s = rep["summary"]
    return {"recall@300_iou0.5": s["recall@300_iou0.5"], "recall@300_iou0.7": s["recall@300_iou0.7"],
            "recall@300_iou0.7_by_size": by_size}


def ceiling(teacher_path: Path, data: Path, split: str, iters: int, lr: float, batch_size: int, test) -> dict:
    """Frozen teacher backbone, fresh RPN trained on ``split``; SGD + warm-up + cosine, as the trainers."""
    torch.manual_seed(0)
    teacher, meta = load_detector(teacher_path)
    teacher.rpn.load_state_dict(build_detector(teacher.config).rpn.state_dict())
    for p in teacher.backbone.parameters():
        p.requires_grad_(False)
    teacher.train()
    teacher.backbone.eval()  # batch-norm statistics stay the teacher's
    labelled = load_dataset(data, split, classes=meta["classes"])
    loader = iter(make_loader(DetectionImages(labelled, Preprocess.from_dict(meta["preprocess"]), seed=0),
                              IterationSampler(len(labelled), batch_size, seed=0), num_workers=0))
    opt = torch.optim.SGD([p for p in teacher.rpn.parameters()], lr=lr, momentum=0.9, weight_decay=1e-4)
    warm = max(1, iters // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / iters)))
    for _ in range(iters):
        b = next(loader)
        with torch.no_grad():
            f = teacher.backbone(b.images)
        _, _, losses = teacher.rpn(f, b.image_sizes, b.targets, need_proposals=False)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        sched.step()
    teacher.eval()
    return recall_report(teacher, meta, test)


class _MimickedBackbone(nn.Module):
    """Student backbone, then its transform layer r: the student's estimate of the teacher's map."""

    def __init__(self, student: nn.Module, transform: nn.Conv2d):
        super().__init__()
        self.student, self.transform = student, transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.student.features(x))


def probe(teacher_path: Path, student_run: Path, test) -> dict:
    teacher, meta = load_detector(teacher_path)
    student, _ = load_detector(student_run / "model.pt")
    state = load_weights_only(student_run / "checkpoint.pt", what="student checkpoint")["model"]
    w, b = state["transform.weight"], state["transform.bias"]
    r = nn.Conv2d(w.shape[1], w.shape[0], 1)
    with torch.no_grad():
        r.weight.copy_(w)
        r.bias.copy_(b)
    teacher.backbone = _MimickedBackbone(student, r)
    teacher.eval()
    return recall_report(teacher, meta, test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True, help="teacher model.pt")
    ap.add_argument("--student", type=Path, required=True, help="stage-1 RoI-mimic student run folder")
    ap.add_argument("--labelled-split", default="train")
    ap.add_argument("--iters", type=int, default=250)
    ap.add_argument("--lr", type=float, default=0.04)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    teacher, meta = load_detector(args.teacher)
    test = load_dataset(args.data, "test", classes=meta["classes"])
    student, student_meta = load_detector(args.student / "model.pt")
    result = {
        "teacher": recall_report(teacher, meta, test),
        "student": recall_report(student, student_meta, test),
        "ceiling_frozen_teacher_features": ceiling(args.teacher, args.data, args.labelled_split, args.iters,
                                                   args.lr, args.batch_size, test),
        "probe_teacher_rpn_on_student_r_v": probe(args.teacher, args.student, test),
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0,
        "loadavg": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for k in ("teacher", "student", "ceiling_frozen_teacher_features", "probe_teacher_rpn_on_student_r_v"):
        v = result[k]
        print(f"{k:36s} R@0.5 {100 * v['recall@300_iou0.5']:5.1f}  R@0.7 {100 * v['recall@300_iou0.7']:5.1f}  "
              + "  ".join(f"{s}: {100 * x:.1f}" for s, x in v["recall@300_iou0.7_by_size"].items() if x is not None))


if __name__ == "__main__":
    main()
