"""Evaluate a detector checkpoint on a dataset split (``mimic evaluate``); :func:`evaluate_model` for reuse.

The checkpoint's ``meta`` says how its input was made: ``preprocess`` (resize rule, mean/std, size divisor)
and ``input_scale`` (0.5 for a scale-mimic student that sees half-size images; 1.0 when absent). Images go
through exactly that preprocessing, ``predict`` gives boxes in input pixels, and each box is mapped back to
ORIGINAL image pixels with the image's own :class:`data.transforms.PrepParams` (divide by the per-axis resize
factor; padding sits right and bottom so it needs no offset), then clipped to the image.

Metrics (any of :data:`METRICS`): ``recall`` (proposal recall at IoU 0.5/0.7 for the top 100/300 and AR),
``voc`` (mAP at IoU 0.5, 11-point and area rules), ``coco`` (AP, AP50, AP75, APs/m/l via pycocotools),
``caltech`` (log-average miss rate). Cost from :func:`detection.profile.profile_model` at the dataset's
typical (median) padded input size: parameters per part, GFLOPs, ms per image. Boxes x1y1x2y2, pixels; times in
seconds unless named ``_ms``. ``detections_path`` (``mimic evaluate --detections``) also writes every detection as
COCO results, with the image ids of the COCO ground truth the ``coco`` metric builds (:func:`write_detections`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mimicdet.data.errors import DataError
from mimicdet.data.paths import write_json
from mimicdet.data.records import Dataset

METRICS = ("voc", "coco", "recall", "caltech")
DETECTIONS_KEY = "detections"  # the collector evaluate_model feeds for detections_path, beside the metrics
DEFAULT_METRICS = ("voc", "coco", "recall")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    model: Path
    data: Path
    split: str = "test"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    out: Path | None = None  # report JSON
    plots: Path | None = None  # folder for PNG plots
    max_images: int | None = None
    device: str = "auto"
    batch_size: int = 4
    workers: int = 0
    profile: bool = True
    progress: bool | None = None  # None: progress bar only on a terminal
    # Detection score threshold; None keeps the checkpoint's (0.05). mAP ranks detections, so a lower one (0.001)
    # shows the ranking of an under-confident classifier that 0.05 would cut off entirely.
    score_thresh: float | None = None
    detections: Path | None = None  # COCO results JSON of every detection (write_detections)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", check_metrics(self.metrics))
        if self.score_thresh is not None and not 0.0 <= self.score_thresh < 1.0:
            raise ValueError(f"score_thresh must be in [0, 1), got {self.score_thresh}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {self.batch_size}, {self.workers}")


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip() for m in metrics if m.strip()))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"metrics must be a non-empty subset of {', '.join(METRICS)}, got {list(metrics)}")
    return names


def checkpoint_preprocess(meta: dict) -> tuple[Any, float]:
    from mimicdet.data.transforms import Preprocess

    if "preprocess" not in meta:
        raise DataError(f"checkpoint meta has no field 'preprocess' (fields: {sorted(meta)}); cannot rebuild its input")
    scale = float(meta.get("input_scale", 1.0))
    if not scale > 0:
        raise DataError(f"checkpoint meta field 'input_scale' must be > 0, got {meta['input_scale']!r}")
    return Preprocess.from_dict(meta["preprocess"]), scale


def typical_input_size(dataset: Dataset, meta: dict) -> tuple[int, int]:
    """The padded network input ``(h, w)`` of the median image by input area (lower median), under the
    checkpoint's preprocessing: a shape that really occurs, not a mix of two images' sides."""
    from mimicdet.data.transforms import resize_params

    pre, scale = checkpoint_preprocess(meta)
    div = max(1, round(pre.size_divisor * scale))
    if not len(dataset):
        return pre.min_size, pre.min_size
    sizes = []
    for r in dataset.records:
        rp = resize_params(r.width, r.height, pre, scale=scale)
        sizes.append((-(-rp.out_height // div) * div, -(-rp.out_width // div) * div))
    sizes.sort(key=lambda hw: (hw[0] * hw[1], hw))
    return sizes[(len(sizes) - 1) // 2]


def to_original_pixels(det: dict[str, torch.Tensor], params, key: str, score_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Input-pixel boxes -> original-image boxes (clipped), with their scores, as float32 numpy."""
    boxes = params.unmap_boxes(det[key].detach().float().cpu().numpy())
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, params.orig_width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, params.orig_height)
    return boxes.astype(np.float32), det[score_key].detach().float().cpu().numpy().astype(np.float32)


def _evaluators(metrics: Sequence[str], classes: Sequence[str], detection_ok: bool) -> dict[str, Any]:
    from mimicdet.detection.metrics import (
        CaltechEvaluator,
        COCOEvaluator,
        ProposalRecallEvaluator,
        VOCEvaluator,
    )

    out: dict[str, Any] = {}
    for m in metrics:
        if m == "recall":
            out[m] = ProposalRecallEvaluator()
        elif detection_ok and m == "voc":
            out[m] = VOCEvaluator(classes=classes)
        elif detection_ok and m == "coco":
            out[m] = COCOEvaluator(classes=classes)
        elif detection_ok and m == "caltech":
            out[m] = CaltechEvaluator()
    return out


def _predict_into(model: nn.Module, data: Dataset, pre, scale: float, evaluators: dict[str, Any], *,
                  device: torch.device, batch_size: int, workers: int, progress: bool | None,
                  name: str) -> tuple[float, float]:
    """Predicts every image of ``data`` and feeds the evaluators (boxes in original pixels); returns
    ``(total seconds, seconds inside predict)``."""
    from mimicdet.data.loader import DetectionImages, EvalSampler, make_loader
    from mimicdet.data.progress import progress_bar

    loader = make_loader(DetectionImages(data, pre, scale=scale), EvalSampler(len(data), batch_size),
                         num_workers=workers)
    t_start, predict_s = time.perf_counter(), 0.0
    with progress_bar(total=len(data), desc=f"evaluate {name}", unit="img", disable=progress is False) as bar, torch.inference_mode():
        for batch in loader:
            t0 = time.perf_counter()
            outputs = model.predict(batch.images.to(device), batch.image_sizes)
            predict_s += time.perf_counter() - t0
            for index, params, out in zip(batch.indices, batch.params, outputs):
                record = data.records[index]
                boxes, scores = to_original_pixels(out, params, "boxes", "scores")
                dets = {"boxes": boxes, "scores": scores, "labels": out["labels"].cpu().numpy().astype(np.int64)}
                pboxes, pscores = to_original_pixels(out, params, "proposals", "proposal_scores")
                for m, ev in evaluators.items():
                    ev.process(record, {"boxes": pboxes, "scores": pscores} if m == "recall" else dets)
            bar.update(len(batch))
    return time.perf_counter() - t_start, predict_s


def _what_can_be_scored(model: nn.Module, metrics: Sequence[str], classes: tuple[str, ...]) -> tuple[str, bool, list]:
    """(head, whether detections can be scored, notes). A head-less (stage-1) model's detections are its
    proposals, all labelled 1: meaningful only for one class."""
    head = getattr(getattr(model, "config", None), "head", "fast-rcnn")
    detection_ok = head != "none" or len(classes) == 1
    skipped = [m for m in metrics if m != "recall"] if not detection_ok else []
    notes = [f"{', '.join(skipped)} skipped: the model has no box head and the data has several classes"] if skipped else []
    return head, detection_ok, notes


def evaluate_model(
    model: nn.Module,
    meta: dict,
    dataset: Dataset,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    workers: int = 0,
    max_images: int | None = None,
    plots_dir: Path | None = None,
    profile: bool = False,
    progress: bool | None = None,
    name: str = "model",
    keep_hits: bool = False,
    detections_path: Path | None = None,
) -> dict[str, Any]:
    """Runs ``model.predict`` over the labelled images of ``dataset`` and scores it.

    Returns ``{<metric>: evaluator result (curves as numpy) for each metric computed, "summary": flat headline
    numbers, "dataset", "model", "input", "timing", "plots": [paths], "notes", "profile" (with ``profile``:
    parameters, GFLOPs, ms/image at the typical input size; a few seconds)}``.
    ``meta`` is the checkpoint's meta (``classes``, ``preprocess``, optional ``input_scale``).
    ``keep_hits`` adds ``recall["hits"]``: per test box, whether the top-300 proposals recall it at IoU 0.5 / 0.7,
    and ``voc["per_image"]`` (``VOCEvaluator.per_image``), what ``significance.paired_bootstrap_map`` compares.
    ``detections_path``: also write every detection there as COCO results (:func:`write_detections`).
    """
    from mimicdet.detection.device import select_device

    metrics = check_metrics(metrics)
    pre, scale = checkpoint_preprocess(meta)
    classes = tuple(meta.get("classes", dataset.classes))
    data = _images_to_score(dataset, classes, max_images)

    dev = device if isinstance(device, torch.device) else select_device(device)
    head, detection_ok, notes = _what_can_be_scored(model, metrics, classes)
    evaluators = _evaluators(metrics, classes, detection_ok)
    collect = {}
    if detections_path is not None:  # a COCO evaluator of its own collects them, whatever the metrics
        from mimicdet.detection.metrics import COCOEvaluator

        collect[DETECTIONS_KEY] = COCOEvaluator(classes=classes)

    from mimicdet.detection.export import lean_or_same

    was_training = model.training
    model.to(dev).eval()
    # Scored on the lean inference copy, the detector `mimic predict` and `mimic export` deploy.
    deployed = lean_or_same(model).to(dev)
    try:
        total_s, predict_s = _predict_into(deployed, data, pre, scale, {**evaluators, **collect}, device=dev,
                                           batch_size=batch_size, workers=workers, progress=progress, name=name)
    finally:
        model.train(was_training)
    results = _results(evaluators, keep_hits=keep_hits)
    if detections_path is not None:
        write_detections(collect[DETECTIONS_KEY], Path(detections_path), root=dataset.root)

    report: dict[str, Any] = {
        **results,
        "dataset": {"name": dataset.name, "split": dataset.split, "num_images": len(data),
                    "digest": data.digest(), "classes": list(classes)},
        "model": {"name": name, "role": meta.get("role"), "head": head,
                  "width": getattr(getattr(model, "config", None), "width", None)},
        "input": {"preprocess": pre.to_dict(), "input_scale": scale},
        "timing": {"total_s": total_s, "predict_s": predict_s, "images_per_s": len(data) / total_s,
                   "device": str(dev), "batch_size": batch_size},
        "notes": notes,
        "plots": [],
    }
    _add_cost_and_plots(report, model, data, meta, dev, profile=profile, plots_dir=plots_dir, name=name)
    model.train(was_training)  # profiling leaves the model in eval mode
    return report


def _add_cost_and_plots(report: dict, model: nn.Module, data: Dataset, meta: dict, dev: torch.device, *,
                        profile: bool, plots_dir: Path | None, name: str) -> None:
    """Parameters, the profile (with ``profile``), the headline summary and the plots (with ``plots_dir``)."""
    if hasattr(model, "param_counts"):
        report["model"]["params"] = model.param_counts()
    if profile:
        from mimicdet.detection.profile import profile_model

        size = typical_input_size(data, meta)
        report["profile"] = profile_model(model, input_size=size, repeats=10, warmup=2, device=dev)
    report["summary"] = headline(report)
    if plots_dir is not None:
        report["plots"] = write_plots(report, Path(plots_dir), name=name)


def write_detections(collector: Any, path: Path, *, root: Path | None = None) -> None:
    """A ``COCOEvaluator``'s detections as COCO results ``[{image_id, file_name, category_id, bbox: [x, y, w, h],
    score}]`` at ``path``, atomically. ``image_id`` is the one its ground truth uses (``COCOEvaluator.ground_truth``:
    the records' ids when all are integers, as COCO data has, else 1..N in split order), so ``loadRes`` on a ground
    truth built the same way takes the file; ``file_name`` is the image path relative to ``root`` when inside it.
    ``category_id`` is the label (``k + 1`` for ``classes[k]``): a COCO file whose category ids are not 1..K in
    order needs them mapped back by name."""
    names = {}
    base = Path(root).absolute() if root is not None else None
    for im in collector.ground_truth().dataset["images"]:
        p = Path(im["file_name"]).absolute()
        names[im["id"]] = (p.relative_to(base) if base and p.is_relative_to(base) else p).as_posix()
    write_json(path, [{**r, "file_name": names[r["image_id"]]} for r in collector.results()], indent=None)


def _images_to_score(dataset: Dataset, classes: tuple[str, ...], max_images: int | None) -> Dataset:
    """The labelled images (the first ``max_images``), after checking the model knows the dataset's classes."""
    if tuple(dataset.classes) != classes:
        raise DataError(
            f"dataset {dataset.name}/{dataset.split} has classes {list(dataset.classes)} but the model was "
            f"trained on {list(classes)}"
        )
    keep = [i for i, r in enumerate(dataset.records) if r.labelled]
    if max_images is not None:
        keep = keep[:max_images]
    if not keep:
        raise DataError(f"dataset {dataset.name}/{dataset.split}: no labelled images to evaluate on")
    return dataset.subset(keep)


def _results(evaluators: dict, *, keep_hits: bool) -> dict[str, Any]:
    """Each evaluator's result; ``keep_hits`` adds what paired significance tests between two models need: per
    test box whether it was recalled (fixed box order) and the VOC per-image detections."""
    results = {m: ev.evaluate() for m, ev in evaluators.items()}
    if keep_hits and "recall" in evaluators:
        ev = evaluators["recall"]
        results["recall"]["hits"] = {
            f"top{n}_iou{t}": ev.per_box_hits(top_n=n, iou_threshold=t).tolist() for n in (300,) for t in (0.5, 0.7)
        }
    if keep_hits and "voc" in evaluators:
        results["voc"]["per_image"] = evaluators["voc"].per_image()
    return results


def headline(report: dict) -> dict[str, float | None]:
    """The flat numbers of a report: recalls, AR, mAPs, COCO APs, LAMR, parameters, GFLOPs, ms/image."""
    from mimicdet.detection.metrics import to_jsonable

    m = report
    out: dict[str, Any] = {}
    if "recall" in m:
        out.update({k: v for k, v in m["recall"].items() if k.startswith(("recall@", "AR@"))})
    if "voc" in m:
        out.update({"mAP@0.5_11pt": m["voc"]["mAP_11pt"], "mAP@0.5_area": m["voc"]["mAP_area"]})
    if "coco" in m:
        out.update({f"coco_{k}": m["coco"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
    if "caltech" in m:
        out["LAMR"] = m["caltech"]["LAMR"]
    if "params" in report.get("model", {}):
        out.update({f"params_{k}": v for k, v in report["model"]["params"].items()})
    if "profile" in report:
        out["gflops"] = report["profile"]["gflops"]["total"]
        out["ms_per_image"] = report["profile"]["latency"]["median_ms"]
    return to_jsonable(out)


def write_plots(report: dict, folder: Path, *, name: str = "model") -> list[str]:
    """PR curves (VOC), recall vs IoU (proposals) and MR-FPPI (Caltech) as PNGs under ``folder``."""
    from mimicdet.detection.metrics import plots

    folder.mkdir(parents=True, exist_ok=True)
    m = report
    paths = []
    if "voc" in m:
        paths.append(plots.plot_pr_curves(m["voc"]["curves"], folder / "pr_curves.png", ap=m["voc"]["AP_area"]))
    if "recall" in m:
        paths.append(plots.plot_recall_iou({name: m["recall"]["curves"]}, folder / "recall_iou.png"))
    if "caltech" in m:
        paths.append(plots.plot_mr_fppi({name: m["caltech"]["curves"]}, folder / "mr_fppi.png",
                                        lamr={name: m["caltech"]["LAMR"]}))
    return [str(p) for p in paths]


def report_json(report: dict) -> dict:
    """The report as strict JSON (curves left out: they are in the plots; NaN -> null)."""
    from mimicdet.detection.metrics import to_jsonable

    slim = {k: ({kk: vv for kk, vv in v.items() if kk != "curves"} if k in METRICS else v)
            for k, v in report.items()}
    return to_jsonable(slim)


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v}"


def format_report(report: dict) -> str:
    """A plain-text table of the headline numbers; recall, AP and miss rate in percent (the report stores
    fractions), as the plots show them; every such row says ``(%)``."""
    s = report["summary"]
    d = report["dataset"]
    lines = [f"{report['model']['name']} on {d['name']}/{d['split']} ({d['num_images']} images, "
             f"input scale {report['input']['input_scale']:g})"]
    rows: list[tuple[str, str]] = []
    for n in (100, 300):
        if f"AR@{n}" in s:
            rows.append((f"proposals top-{n}: recall@0.5 / @0.7 / AR (%)",
                         f"{_fmt(s[f'recall@{n}_iou0.5'])} / {_fmt(s[f'recall@{n}_iou0.7'])} / {_fmt(s[f'AR@{n}'])}"))
    if "mAP@0.5_area" in s:
        rows.append(("mAP@0.5 (%, VOC07 11-pt / area)", f"{_fmt(s['mAP@0.5_11pt'])} / {_fmt(s['mAP@0.5_area'])}"))
    if "coco_AP" in s:
        rows.append(("COCO AP / AP50 / AP75 (%)", f"{_fmt(s['coco_AP'])} / {_fmt(s['coco_AP50'])} / {_fmt(s['coco_AP75'])}"))
        rows.append(("COCO APs / APm / APl (%)", f"{_fmt(s['coco_APs'])} / {_fmt(s['coco_APm'])} / {_fmt(s['coco_APl'])}"))
    if "LAMR" in s:
        rows.append(("Caltech log-average miss rate (%)", _fmt(s["LAMR"])))
    if "params_total" in s:
        rows.append(("params backbone / rpn / head / total (M)",
                     " / ".join(f"{s[f'params_{k}'] / 1e6:.3f}" for k in ("backbone", "rpn", "head", "total"))))
    if "gflops" in s:
        p = report["profile"]
        rows.append((f"GFLOPs / ms per image at {p['input_size'][0]}x{p['input_size'][1]} ({p['device']})",
                     f"{s['gflops']:.2f} / {s['ms_per_image']:.1f}"))
    width = max(len(k) for k, _ in rows) if rows else 0
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def _model_name(path: Path) -> str:
    """``runs/teacher/model.pt`` -> ``teacher``; other files by their stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def run_evaluate(config: EvalConfig) -> dict:
    """``mimic evaluate``: load checkpoint and split, evaluate, print the table, write JSON and plots."""
    from mimicdet.data import load_dataset
    from mimicdet.data.paths import check_writable
    from mimicdet.detection.detector import load_detector

    if config.out is not None:
        check_writable("--out", config.out)
    if config.plots is not None:
        check_writable("--plots", config.plots, folder=True)
    if config.detections is not None:
        check_writable("--detections", config.detections)
    model, meta = load_detector(config.model)
    if config.score_thresh is not None and model.head is not None:
        model.head.score_thresh = float(config.score_thresh)  # torchvision RoIHeads reads it at postprocess
    classes = meta.get("classes")
    dataset = load_dataset(config.data, config.split, classes=classes)
    report = evaluate_model(
        model, meta, dataset, metrics=config.metrics, device=config.device, batch_size=config.batch_size,
        workers=config.workers, max_images=config.max_images, plots_dir=config.plots, profile=config.profile,
        progress=config.progress, name=_model_name(Path(config.model)), detections_path=config.detections,
    )
    report["model"]["path"] = str(config.model)
    if config.score_thresh is not None:
        report["model"]["score_thresh"] = float(config.score_thresh)
    print(format_report(report))
    if config.out is not None:
        out = Path(config.out)
        write_json(out, report_json(report))
        print(f"report: {out}")
    for p in report["plots"]:
        print(f"plot: {p}")
    if config.detections is not None:
        print(f"detections: {config.detections}")
    return report
