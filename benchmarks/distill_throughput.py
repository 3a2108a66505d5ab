"""Offline mimic training against online distillation: student steps/s, data wait, and the mimic loss's share.

Setting (the defaults of ``mimic train-student``): the built-in dataset at 256x256, a w = 1 teacher
(Fast R-CNN head, random weights with batch norm calibrated on the dataset's images, ``Preprocess(256, 256)``),
a w = 1/4 stage-1 student, batch 8, RoI mimic (roialign sampler, 64 regions per image drawn from the
teacher's 300 stored proposals), SGD as in ``run_train_student``. Shapes: N = 8 images of 3x256x256, teacher
map 832x16x16, student map 208x16x16 (stride 16).

Three measurements, all in this one process:

1. **Offline vs online steps/s.** ``offline``: the real ``run_train_student`` on a store written by the real
   ``run_extract`` (2 DataLoader worker processes, progress bar off, metrics logged every step).
   ``online``: the same student, loss and optimiser step (a ``Trainer.run_step`` on a ``StudentModel``), but
   the teacher's outputs come from ``teacher_outputs`` run under ``torch.inference_mode`` on every batch (images
   from a 2-worker DataLoader of ``DetectionImages``); the same images in the same order. The arms alternate
   (offline, online, offline, ...), ``--repeats`` times each, ``--steps`` steps per run; per run the first
   ``--warmup`` steps (loader start-up) are left out of the steady-state rate; the medians over runs are quoted.
   ``teacher_outputs`` also runs the teacher's box head, which stage 1 does not need: its calls are timed, and
   the speed-up against an online arm without them is reported too. Before the timed runs, one student's
   losses on batch 0 built both ways are compared (``same_loss_check``: the arms feed the same loss).
2. **Data wait.** The offline trainer's ``data_fraction``: ``Trainer.train``'s summary (every step, so it
   includes the workers' start-up) and the steady state from ``metrics.jsonl`` rows (``data_time`` /
   ``s_per_iter``, steps after the warm-up). On a CPU-bound machine the workers' reads also slow the step they
   overlap, so the offline s/step is also set against the online arm's student step (same step, loader idle).
3. **Mimic share of the step**, two ways on the same store batches (pre-read, so no data wait), interleaved:
   ``direct``: the mimic term alone, timed on the real step's tensors: region draw (``StudentModel._regions``)
   plus ``roi_mimic_loss`` forward and backward down to the student map and ``r`` (the student map enters as a
   detached leaf: autograd sums the mimic and RPN gradients on the map before the backbone's backward, so the
   backbone's backward costs the same with or without the mimic term), over the ``Trainer.run_step`` time of the
   roi student on the same batch; ``difference``: ``run_step`` with ``mimic="roi"`` minus ``mimic="none"``
   (two students from the same seed), over the roi step. The target is judged on ``direct``.

Threads default to 1 in this process (DataLoader workers always use 1): on a shared 2-core machine more
OpenMP threads time out of lockstep with other jobs; both arms run with the same setting.

    python benchmarks/distill_throughput.py [--quick] [--steps 20] [--repeats 3] [--threads 1] [--work DIR]

Writes ``benchmarks/results/distill_throughput.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torchvision


from mimicdet.data import load_dataset  # noqa: E402
from mimicdet.store import StoreReader, inspect_store, open_store  # noqa: E402
from mimicdet.data.loader import DetectionImages, IterationSampler, collate, make_loader  # noqa: E402
from mimicdet.data.synthetic import SyntheticConfig, ensure_dataset  # noqa: E402
from mimicdet.data.transforms import Preprocess  # noqa: E402
from mimicdet.detection.detector import Detector, DetectorConfig, build_detector, save_detector  # noqa: E402
from mimicdet.detection.trainer import Trainer  # noqa: E402
from mimicdet.pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from mimicdet.pipeline.teachers import TeacherSpec, open_teacher  # noqa: E402
from mimicdet.student.mimic import roi_mimic_loss  # noqa: E402
from mimicdet.detection.environment import cpu_model  # noqa: E402
from mimicdet.store.training import open_source  # noqa: E402
from mimicdet.student.stream import MimicBatch, MimicImages, MixedSampler, pad_maps, make_mimic_loader  # noqa: E402
from mimicdet.student.train import (  # noqa: E402
    StudentConfig, StudentModel, build_student, run_train_student, student_model, train_config,
)

SIZE, BATCH, WIDTH, ROIS, PROPOSALS = 256, 8, 0.25, 64, 300
TARGETS = {"speedup_min": 5.0, "data_fraction_max": 0.05, "mimic_fraction_max": 0.30}


# ------------------------------------------------------------------------------------------- setup


def make_teacher(path: Path, data: Path, *, seed: int = 0, calib_batches: int = 4, size: int = SIZE) -> Path:
    """A w = 1 teacher (random weights) whose batch norm statistics are the dataset's, saved as a checkpoint;
    it resizes images to ``size`` px."""
    dataset = load_dataset(data, "train")
    pre = Preprocess(min_size=size, max_size=size)
    torch.manual_seed(seed)
    model = build_detector(DetectorConfig(num_classes=dataset.num_classes, width=1.0, head="fast-rcnn"))
    # Calibrate BN on real images with a cumulative average (momentum None), so the stored running stats are
    # exactly the calibration batches' and activations keep a trained network's scale layer after layer.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    images = DetectionImages(dataset, pre)
    model.backbone.train()
    with torch.no_grad():
        for b in range(calib_batches):
            keys = [((b * BATCH + k) % len(dataset), False) for k in range(BATCH)]
            model.backbone(collate([images[key] for key in keys]).images)
    for m in bns:
        m.momentum = 0.1
    model.eval()
    save_detector(path, model, {"role": "teacher", "classes": list(dataset.classes), "preprocess": pre.to_dict()})
    return path


def student_trainer(cfg: StudentConfig, classes: tuple[str, ...], store: StoreReader, out: Path) -> Trainer:
    """The student, ``r`` and optimiser as ``run_train_student`` builds them, in a hook-less Trainer."""
    torch.manual_seed(cfg.seed)
    model = student_model(cfg, build_student(cfg, classes), [store])
    trainer = Trainer(
        model=model,
        config=train_config(cfg),
        loss_fn=lambda m, b: m(b.to(trainer.device)),
        batches=lambda start: iter(()),
        out_dir=out,
        hooks=[],
        loss_weights={"loss_mimic": cfg.mimic_weight, "loss_logits": cfg.logits_weight},
    )
    trainer.model.train()
    return trainer


@contextlib.contextmanager
def timed_method(obj: object, name: str) -> Iterator[list[float]]:
    """Seconds of every call of ``obj.name`` while the context is open (an instance attribute shadows the
    method, then is removed)."""
    method = getattr(obj, name)
    times: list[float] = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = method(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)
    try:
        yield times
    finally:
        delattr(obj, name)


def online_mimic_batch(batch, outs: list[dict[str, torch.Tensor]], iteration: int) -> MimicBatch:
    """A MimicBatch from a live teacher's outputs, laid out as ``collate_mimic`` lays out store records.
    Outputs made under inference_mode are cloned into ordinary tensors so autograd may use them."""
    maps = [o["features"].float() for o in outs]
    return MimicBatch(
        batch=batch,
        num_labelled=sum(bool(x) for x in batch.labelled),
        iteration=iteration,
        teacher_features=[pad_maps(maps)],
        teacher_hw=[[(int(m.shape[1]), int(m.shape[2])) for m in maps]],
        teacher_proposals=[o["proposals"].clone() for o in outs],
        teacher_logits=[o["class_logits"].clone() for o in outs],
        teacher_deltas=[o["box_deltas"].clone() for o in outs],
    )


# -------------------------------------------------------------------------------------------- arms


def offline_run(cfg: StudentConfig, warmup: int) -> dict:
    """One ``run_train_student``; per-step timings from its metrics.jsonl (logged every step)."""
    t0 = time.perf_counter()
    summary = run_train_student(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    data = [r["data_time"] for r in rows]
    total = [r["s_per_iter"] for r in rows]
    steady_data, steady_total = data[warmup:], total[warmup:]
    return {
        "wall_s": wall,
        "trainer_summary": {
            k: summary[k] for k in ("steps", "data_time_s", "step_time_s", "s_per_iter", "data_fraction")
        },
        "per_step_data_s": data,
        "per_step_total_s": total,
        "steady_steps_per_s": len(steady_total) / sum(steady_total),
        "steady_data_fraction": sum(steady_data) / sum(steady_total),
        "steady_ms": {"data_wait": 1e3 * statistics.mean(steady_data),
                      "student_step": 1e3 * statistics.mean(t - d for t, d in zip(steady_total, steady_data))},
    }


def online_run(cfg: StudentConfig, teacher: Detector, dataset, pre: Preprocess, store: StoreReader, warmup: int) -> dict:
    """Online distillation: the teacher runs on every batch, then the same student step as offline."""
    t_start = time.perf_counter()
    trainer = student_trainer(cfg, dataset.classes, store, cfg.out)
    loader = make_loader(
        DetectionImages(dataset, pre, scale=cfg.input_scale),
        IterationSampler(len(dataset), cfg.batch_size, seed=cfg.seed),
        num_workers=cfg.workers,
    )
    batches = iter(loader)
    data_s, teacher_s, step_s = [], [], []
    with timed_method(teacher.head, "raw_outputs") as head_s:
        for i in range(cfg.iters):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            with torch.inference_mode():
                outs = teacher.teacher_outputs(batch.images, batch.image_sizes, top_k=PROPOSALS)
            mb = online_mimic_batch(batch, outs, i)
            t2 = time.perf_counter()
            trainer.run_step(mb)
            t3 = time.perf_counter()
            data_s.append(t1 - t0)
            teacher_s.append(t2 - t1)
            step_s.append(t3 - t2)
    wall = time.perf_counter() - t_start
    del batches, loader
    total = [a + b + c for a, b, c in zip(data_s, teacher_s, step_s)]
    steady = total[warmup:]
    return {
        "wall_s": wall,
        "per_step_data_s": data_s,
        "per_step_teacher_s": teacher_s,
        "per_step_teacher_head_s": head_s,
        "per_step_student_s": step_s,
        "per_step_total_s": total,
        "steady_steps_per_s": len(steady) / sum(steady),
        # An online stage-1 distiller needs only the teacher's map and proposals, not its head's outputs.
        "steady_steps_per_s_without_teacher_head": len(steady) / (sum(steady) - sum(head_s[warmup:])),
        "steady_ms": {
            "data_wait": 1e3 * statistics.mean(data_s[warmup:]),
            "teacher": 1e3 * statistics.mean(teacher_s[warmup:]),
            "teacher_head": 1e3 * statistics.mean(head_s[warmup:]),
            "student_step": 1e3 * statistics.mean(step_s[warmup:]),
        },
        "final_losses": trainer.storage["losses"],
    }


def mimic_share(cfg: StudentConfig, store_url: str, num_batches: int, repeats: int) -> dict:
    """roi step vs none step vs the mimic term alone, interleaved on the same pre-read store batches."""
    classes = open_store(store_url).manifest.classes
    dataset = load_dataset(cfg.data, cfg.split, classes=list(classes))
    store = open_source(store_url, dataset)
    manifest = store.manifest
    pre = Preprocess.from_dict(dict(manifest.preprocess))
    images = MimicImages([(dataset, store)], [DetectionImages(dataset, pre)])
    sampler = MixedSampler(len(dataset), 0, cfg.batch_size, unlabelled_fraction=0.0, seed=cfg.seed)
    loader = iter(make_mimic_loader(images, sampler, num_workers=0))
    batches = [next(loader) for _ in range(num_batches + 1)]  # the first one warms both students up
    work = cfg.out
    trainers = {
        mode: student_trainer(replace(cfg, mimic=mode, out=work / mode), dataset.classes, store, work / mode)
        for mode in ("roi", "none")
    }
    for t in trainers.values():
        t.run_step(batches[0])
    roi_model: StudentModel = trainers["roi"].model

    def direct(mb: MimicBatch) -> tuple[float, float]:
        """Seconds of (region draw + roi_mimic_loss forward, its backward) on the roi student's current map."""
        with torch.no_grad():
            student_map = roi_model.detector.features(mb.batch.images)
        leaf = student_map.detach().requires_grad_(True)
        t0 = time.perf_counter()
        rois = roi_model._regions(mb)
        teacher_map = mb.teacher_features[0]
        h, w = min(leaf.shape[-2], teacher_map.shape[-2]), min(leaf.shape[-1], teacher_map.shape[-1])
        valid = [(min(th, h), min(tw, w)) for th, tw in mb.teacher_hw[0]]
        loss = cfg.mimic_weight * roi_mimic_loss(
            leaf[..., :h, :w], teacher_map[..., :h, :w], rois, roi_model.transforms[0],
            spatial_scale=1.0 / manifest.stride, sampler=cfg.sampler, valid_hw=valid,
        )
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        roi_model.transforms[0].zero_grad(set_to_none=True)  # run_step zeroes grads before its own backward anyway
        return t1 - t0, t2 - t1

    raw: dict[str, list[float]] = {"roi_step": [], "none_step": [], "mimic_forward": [], "mimic_backward": []}
    for rep in range(repeats):
        for k, mb in enumerate(batches[1:]):
            order = ("roi", "none") if (rep + k) % 2 == 0 else ("none", "roi")  # alternate who goes first
            for mode in order:
                t0 = time.perf_counter()
                trainers[mode].run_step(mb)
                raw[f"{mode}_step"].append(time.perf_counter() - t0)
            fwd, bwd = direct(mb)
            raw["mimic_forward"].append(fwd)
            raw["mimic_backward"].append(bwd)
    med = {k: statistics.median(v) for k, v in raw.items()}
    mimic = [f + b for f, b in zip(raw["mimic_forward"], raw["mimic_backward"])]
    per_batch_direct = [m / s for m, s in zip(mimic, raw["roi_step"])]
    per_batch_diff = [(r - n) / r for r, n in zip(raw["roi_step"], raw["none_step"])]
    return {
        "batches": num_batches,
        "repeats": repeats,
        "median_ms": {k: 1e3 * v for k, v in med.items()} | {"mimic_forward_backward": 1e3 * statistics.median(mimic)},
        "fraction_direct": statistics.median(mimic) / med["roi_step"],
        "fraction_direct_per_batch_median": statistics.median(per_batch_direct),
        "fraction_difference": (med["roi_step"] - med["none_step"]) / med["roi_step"],
        "fraction_difference_per_batch_median": statistics.median(per_batch_diff),
        "raw_s": raw,
    }


def same_loss_check(cfg: StudentConfig, teacher: Detector, store_url: str) -> dict:
    """Both arms feed the student the same thing: losses of one fresh student on batch 0 built from the store
    (offline) and from the live teacher (online). The store holds fp16 maps, so ``loss_mimic`` differs slightly."""
    classes = open_store(store_url).manifest.classes
    dataset = load_dataset(cfg.data, cfg.split, classes=list(classes))
    store = open_source(store_url, dataset)
    manifest = store.manifest
    pre = Preprocess.from_dict(dict(manifest.preprocess))
    images = DetectionImages(dataset, pre)
    sampler = MixedSampler(len(dataset), 0, cfg.batch_size, unlabelled_fraction=0.0, seed=cfg.seed)
    offline_mb = next(iter(make_mimic_loader(MimicImages([(dataset, store)], [images]), sampler, num_workers=0)))
    keys = IterationSampler(len(dataset), cfg.batch_size, seed=cfg.seed).batch(0)
    batch = collate([images[k] for k in keys], size_divisor=images.size_divisor)
    with torch.inference_mode():
        outs = teacher.teacher_outputs(batch.images, batch.image_sizes, top_k=PROPOSALS)
    online_mb = online_mimic_batch(batch, outs, 0)
    model = student_trainer(cfg, dataset.classes, store, cfg.out).model
    with torch.no_grad():
        off = {k: float(v) for k, v in model(offline_mb).items()}
        on = {k: float(v) for k, v in model(online_mb).items()}
    return {
        "same_images": offline_mb.batch.image_ids == batch.image_ids,
        "offline_losses": off,
        "online_losses": on,
        "max_rel_diff": max(abs(off[k] - on[k]) / max(abs(off[k]), 1e-12) for k in off),
    }


# -------------------------------------------------------------------------------------------- main


def machine_info(threads: int) -> dict:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads_main": threads,
        "torch_threads_loader_workers": 1,
        "device": "cpu",
    }


def pooled_ms(runs: list[dict], warmup: int, keys: dict[str, str]) -> dict[str, float]:
    """Mean ms per step of each named per-step series, over the steady steps of every run."""
    out = {name: 1e3 * statistics.mean(x for r in runs for x in r[key][warmup:]) for name, key in keys.items()}
    if "student_step" not in out:
        out["student_step"] = out["total"] - out["data_wait"]
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summarise(offline: list[dict], online: list[dict], share: dict, extract_wall: float, warmup: int) -> dict:
    """Headline numbers: medians over runs of the steady-state rates and fractions; per-step means pooled over
    all runs' steady steps for the breakdown (so its parts add up to its total)."""
    off_rate = median([o["steady_steps_per_s"] for o in offline])
    on_rate = median([o["steady_steps_per_s"] for o in online])
    online_step_s = 1.0 / on_rate
    offline_step_s = 1.0 / off_rate
    summary = {
        "offline_steps_per_s": off_rate,
        "online_steps_per_s": on_rate,
        "speedup": off_rate / on_rate,
        "speedup_vs_online_without_teacher_head": off_rate
        / median([o["steady_steps_per_s_without_teacher_head"] for o in online]),
        "speedup_per_pair": [o["steady_steps_per_s"] / n["steady_steps_per_s"] for o, n in zip(offline, online)],
        "offline_data_fraction_steady": median([o["steady_data_fraction"] for o in offline]),
        "offline_data_fraction_trainer": median([o["trainer_summary"]["data_fraction"] for o in offline]),
        "mimic_fraction_direct": share["fraction_direct"],
        "mimic_fraction_difference": share["fraction_difference"],
        "offline_ms": pooled_ms(offline, warmup, {"data_wait": "per_step_data_s", "total": "per_step_total_s"}),
        "online_steps_per_s_without_teacher_head": median(
            [o["steady_steps_per_s_without_teacher_head"] for o in online]
        ),
        "online_ms": pooled_ms(online, warmup, {"data_wait": "per_step_data_s", "teacher": "per_step_teacher_s",
                                                "teacher_head": "per_step_teacher_head_s",
                                                "student_step": "per_step_student_s", "total": "per_step_total_s"}),
        # Extraction runs once; each offline step saves (online - offline) seconds.
        "break_even_steps": extract_wall / max(online_step_s - offline_step_s, 1e-9),
    }
    # The data path's real cost on a saturated machine: the workers' CPU slows the step it overlaps. Offline
    # s/step against the same student step with a mostly idle loader (the online arm's), as a fraction.
    summary["offline_data_overhead_vs_online_student_step"] = (
        1.0 - summary["online_ms"]["student_step"] / summary["offline_ms"]["total"]
    )
    summary["targets_met"] = {
        "speedup": summary["speedup"] >= TARGETS["speedup_min"],
        "data_fraction": summary["offline_data_fraction_steady"] <= TARGETS["data_fraction_max"],
        "mimic_fraction": summary["mimic_fraction_direct"] <= TARGETS["mimic_fraction_max"],
    }
    return summary


def report_table(result: dict) -> str:
    s = result["summary"]
    t = TARGETS
    ok = lambda c: "yes" if c else "NO"  # noqa: E731
    off, on, sh = s["offline_ms"], s["online_ms"], result["mimic_share"]["median_ms"]
    lines = [
        f"Distillation throughput, {SIZE}x{SIZE}, w=1 teacher -> w=1/4 student, batch {BATCH}, RoI mimic "
        f"(roialign, {ROIS} rois/image), stage 1; {result['machine']['cpu_count']} CPUs, "
        f"{result['machine']['torch_threads_main']} torch thread(s); medians of {result['config']['repeats']} runs "
        f"x {result['config']['steps']} steps (first {result['config']['warmup']} left out)",
        "",
        "| measure | value | target | met |",
        "| --- | --- | --- | --- |",
        f"| offline student steps/s (run_train_student, steady) | {s['offline_steps_per_s']:.3f} | | |",
        f"| online steps/s (teacher forward every step) | {s['online_steps_per_s']:.3f} | | |",
        f"| offline / online speed-up | {s['speedup']:.1f}x | >= {t['speedup_min']:.0f}x | "
        f"{ok(s['speedup'] >= t['speedup_min'])} |",
        f"| offline / online speed-up, online teacher without its head (stage 1 needs map + proposals only) | "
        f"{s['speedup_vs_online_without_teacher_head']:.1f}x | | |",
        f"| offline data-wait fraction (steady) | {fmt_pct(s['offline_data_fraction_steady'])} | "
        f"<= {fmt_pct(t['data_fraction_max'])} | {ok(s['offline_data_fraction_steady'] <= t['data_fraction_max'])} |",
        f"| offline data-wait fraction (Trainer summary, incl. loader start-up) | "
        f"{fmt_pct(s['offline_data_fraction_trainer'])} | | |",
        f"| offline s/step above the online arm's student step (loader workers' CPU included) | "
        f"{fmt_pct(s['offline_data_overhead_vs_online_student_step'])} | | |",
        f"| mimic loss share of the step (direct: regions + loss fwd+bwd) | {fmt_pct(s['mimic_fraction_direct'])} | "
        f"<= {fmt_pct(t['mimic_fraction_max'])} | {ok(s['mimic_fraction_direct'] <= t['mimic_fraction_max'])} |",
        f"| mimic loss share (step roi - step none) / step roi | {fmt_pct(s['mimic_fraction_difference'])} | | |",
        "",
        "| ms per step (mean over the steady steps of all runs) | data wait | teacher (of which head) | student step "
        "| total |",
        "| --- | --- | --- | --- | --- |",
        f"| offline | {off['data_wait']:.0f} | - | {off['student_step']:.0f} | {off['total']:.0f} |",
        f"| online | {on['data_wait']:.0f} | {on['teacher']:.0f} ({on['teacher_head']:.0f}) | {on['student_step']:.0f} | "
        f"{on['total']:.0f} |",
        f"| mimic-share batches (pre-read) | - | - | roi {sh['roi_step']:.0f} / none {sh['none_step']:.0f} / "
        f"mimic alone {sh['mimic_forward_backward']:.0f} | |",
        "",
        f"Teacher extraction (run_extract, once): {result['extraction']['images']} images in "
        f"{result['extraction']['wall_s']:.1f} s ({1e3 * result['extraction']['s_per_image']:.0f} ms/image); "
        f"store {result['extraction']['bytes_per_image'] / 1024:.0f} KiB/image. Break-even after "
        f"{s['break_even_steps']:.0f} student steps.",
    ]
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 48 images, 6 steps, 2 repeats")
    parser.add_argument("--images", type=int, default=None, help="train images (default 200, quick 48)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 16, quick 6)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm, alternating (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps per run left out of the steady state (default 2, quick 1)")
    parser.add_argument("--mimic-batches", type=int, default=None,
                        help="batches for the mimic share (default 6, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (both arms)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for data, teacher, store, runs (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill_throughput.json")
    args = parser.parse_args()
    q = args.quick
    args.images = args.images or (48 if q else 200)
    args.steps = args.steps or (6 if q else 16)
    args.repeats = args.repeats or (2 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.mimic_batches = args.mimic_batches or (2 if q else 6)
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    return args


def _measure(args: argparse.Namespace, work: Path) -> dict:
    """Extraction once, then offline and online runs alternating, the mimic share and the same-loss check."""
    data = ensure_dataset(SyntheticConfig(out=work / "data", train=args.images, test=10, size=SIZE, progress=False),
                          echo=lambda _: None)
    teacher_path = make_teacher(work / "teacher.pt", data)
    store = work / "store"
    ecfg = ExtractConfig(teacher=teacher_path, data=data, out=str(store), proposals=PROPOSALS, batch_size=BATCH,
                         mode="overwrite", loader_workers=args.workers, progress=False, device="cpu")
    t0 = time.perf_counter()
    run_extract(ecfg)
    extract_wall = time.perf_counter() - t0
    print(f"extracted {args.images} images in {extract_wall:.1f} s", flush=True)
    base = StudentConfig(
        store=str(store), data=data, out=work / "runs", width=WIDTH, stage=1, mimic="roi", sampler="roialign",
        rois_per_image=ROIS, batch_size=BATCH, iters=args.steps, workers=args.workers, progress=False,
        checkpoint_every=0, log_every=1, overwrite=True, device="cpu",
    )
    # The online arm holds the teacher in memory, as an online distiller must.
    opened = open_teacher(TeacherSpec(str(teacher_path)), torch.device("cpu"))
    teacher, pre = opened.model, opened.preprocess
    reader = open_store(str(store))
    dataset = load_dataset(data, "train", classes=list(reader.manifest.classes))
    check = same_loss_check(replace(base, out=work / "check"), teacher, str(store))
    print(f"same batch, same loss: images {check['same_images']}, max rel. diff {check['max_rel_diff']:.2e}",
          flush=True)
    offline, online = [], []
    for r in range(args.repeats):
        offline.append(offline_run(replace(base, out=work / f"offline_{r}"), args.warmup))
        print(f"offline run {r}: {offline[-1]['steady_steps_per_s']:.3f} steps/s", flush=True)
        online.append(online_run(replace(base, out=work / f"online_{r}"), teacher, dataset, pre, reader, args.warmup))
        print(f"online run {r}: {online[-1]['steady_steps_per_s']:.3f} steps/s", flush=True)
    del teacher
    share = mimic_share(replace(base, out=work / "share"), str(store), args.mimic_batches,
                        repeats=1 if args.quick else 2)
    print(f"mimic share: direct {share['fraction_direct']:.3f}, difference {share['fraction_difference']:.3f}",
          flush=True)
    return {"base": base, "ecfg": ecfg, "extract_wall": extract_wall, "store_info": inspect_store(str(store)),
            "offline": offline, "online": online, "share": share, "check": check}


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    t_begin = time.perf_counter()
    load_begin = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="distill_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        m = _measure(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(m["offline"], m["online"], m["share"], m["extract_wall"], args.warmup)
    info = m["store_info"]
    result = {
        "machine": machine_info(args.threads),
        "load_average_1m": {"start": load_begin[0], "end": os.getloadavg()[0]},
        "config": {
            "quick": args.quick, "images": args.images, "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "mimic_batches": args.mimic_batches, "workers": args.workers, "image_size": SIZE,
            "teacher_width": 1.0, "teacher_head": "fast-rcnn", "teacher_top_k": PROPOSALS,
            "student": {k: v for k, v in m["base"].to_dict().items() if k not in ("store", "data", "out")},
            "extract": {k: v for k, v in asdict(m["ecfg"]).items() if k not in ("teacher", "data", "out")},
            "order": "offline_0, online_0, offline_1, online_1, ... in one process",
        },
        "targets": TARGETS,
        "summary": summary,
        "extraction": {
            "images": args.images, "wall_s": m["extract_wall"], "s_per_image": m["extract_wall"] / args.images,
            "bytes_per_image": info["bytes_per_image"], "compression_ratio": info["compression_ratio"],
        },
        "offline_runs": m["offline"],
        "online_runs": m["online"],
        "mimic_share": m["share"],
        "same_loss_check": m["check"],
        "total_wall_s": time.perf_counter() - t_begin,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print()
    print(report_table(result))
    print(f"\nwrote {args.out} ({result['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
