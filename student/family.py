"""train-family: a width family of students from one feature store, and its speed-accuracy curve.

Every width ``w`` (e.g. 1/2, 1/4, 1/8) is trained from the same store under ``RUN/w<tag>/stage1`` (backbone +
RPN, feature mimic) and, with ``stage = 2``, ``RUN/w<tag>/stage2`` (the full detector from stage 1, with
two-stage mimic: feature mimic plus logits matching). A stage whose ``model.pt`` exists is done and skipped, so
rerunning the same command resumes an interrupted family, and a rerun with more widths trains only the new ones.

Then every member (and the teacher, when given) is scored on the evaluation split: recall, VOC mAP and COCO AP
from :func:`detection.evaluate.evaluate_model` (cached per model file and data, since they do not change), and
cost (parameters, GFLOPs, ms per image at the split's typical input size) from
:func:`detection.profile.profile_models`, measured afresh in this process for all members together, timed
round-robin so that load drift hits every width alike and the speed-ups are comparable.

Outputs: ``RUN/family.json`` (one row per member), ``RUN/speed_accuracy.png`` (mAP for stage 2, recall@0.7 with
300 proposals for stage 1, against ms/image) and a table with each width's speed-up over the teacher (or over
the widest student without one). Times in milliseconds per image; accuracies as fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mimicdet.data.paths import write_json
from mimicdet.detection.anchors import DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS
from mimicdet.detection.run_folder import claim_run_folder
from mimicdet.student.recipe import DEFAULT_LOGITS_WEIGHT, stage2_iters

if TYPE_CHECKING:
    from mimicdet.student.train import StudentConfig

STAGE_METRIC = {1: "recall@300_iou0.7", 2: "mAP@0.5_11pt"}
METRIC_LABEL = {"recall@300_iou0.7": "recall@0.7 (300 proposals)", "mAP@0.5_11pt": "mAP@0.5"}
MIMICS = ("roi", "map", "none")
# Settings that change what a trained member is: a rerun must keep them, or its finished members would not
# be the ones asked for. Widths, stage, teacher, evaluation and budget may change between runs.
TRAINING_KEYS = ("store", "data", "split", "mimic", "head", "iters", "stage2_iters", "batch_size", "lr",
                 "mimic_weight", "logits_weight", "rois_per_image", "anchor_sizes", "aspect_ratios", "seed")
EVAL_METRICS = ("recall", "voc", "coco")


def parse_widths(text: str) -> tuple[float, ...]:
    """``"1/2,1/4,1/8"`` (or ``"0.5,0.25"``) -> ``(0.5, 0.25, 0.125)``, widest first; each in (0, 1], distinct."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ValueError(f"--widths: expected comma-separated widths like 1/2,1/4,1/8, got {text!r}")
    widths: dict[str, float] = {}
    for item in items:
        try:
            w = float(Fraction(item))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"--widths: {item!r} is not a width; expected fractions or decimals like 1/2,1/4,0.125, got {text!r}"
            ) from None
        if not 0 < w <= 1:
            raise ValueError(f"--widths: each width must be in (0, 1], got {item!r} in {text!r}")
        tag = width_tag(w)
        if tag in widths:
            raise ValueError(f"--widths: width {item!r} is given twice in {text!r}")
        widths[tag] = w
    return tuple(sorted(widths.values(), reverse=True))


def width_label(width: float) -> str:
    """0.25 -> ``"1/4"``; 1.0 -> ``"1"``; 0.3 -> ``"3/10"``."""
    return str(Fraction(width).limit_denominator(1000))


def width_tag(width: float) -> str:
    """Folder name of a width: 0.25 -> ``"w1-4"``."""
    return "w" + width_label(width).replace("/", "-")


@dataclass(frozen=True)
class FamilyConfig:
    store: str
    data: Path
    out: Path
    widths: tuple[float, ...] = (0.5, 0.25, 0.125)
    split: str = "train"
    stage: int = 2  # 1: stage 1 only; 2: stage 1, then stage 2 with two-stage mimic
    mimic: str = "roi"
    head: str = "fast-rcnn"
    iters: int = 1000  # stage 1
    stage2_iters: int | None = None  # None: half of iters
    batch_size: int = 8
    lr: float = 0.02
    mimic_weight: float = 1.0
    logits_weight: float = DEFAULT_LOGITS_WEIGHT  # stage 2, mimic students (0 for mimic "none")
    rois_per_image: int = 64
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    seed: int = 0
    teacher: Path | None = None  # evaluated too: the reference point and speed-up baseline
    eval_split: str = "test"
    eval_max_images: int | None = None
    profile_repeats: int = 20
    budget_ms: float | None = None
    device: str = "auto"
    workers: int = 2
    progress: bool | None = None  # None: progress bars only on a terminal
    storage_options: dict = field(default_factory=dict)  # fsspec options for an s3:// store
    cache_dir: str | None = None  # its local shard cache (StudentConfig.cache_dir)
    cache_size: int | None = None

    def __post_init__(self) -> None:
        if not self.widths:
            raise ValueError("--widths: give at least one width, e.g. 1/2,1/4,1/8")
        for w in self.widths:
            if not (isinstance(w, (int, float)) and 0 < w <= 1):
                raise ValueError(f"--widths: each width must be in (0, 1], got {w!r}")
        if len({width_tag(w) for w in self.widths}) != len(self.widths):
            raise ValueError(f"--widths: a width is given twice in {[width_label(w) for w in self.widths]}")
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        if self.mimic not in MIMICS:
            raise ValueError(f"--mimic must be one of {', '.join(MIMICS)}, got {self.mimic!r}")
        if self.iters < 1 or (self.stage2_iters is not None and self.stage2_iters < 1):
            raise ValueError(f"--iters and --stage2-iters must be >= 1, got {self.iters}, {self.stage2_iters}")
        if self.profile_repeats < 1:
            raise ValueError(f"--profile-repeats must be >= 1, got {self.profile_repeats}")
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise ValueError(f"--budget-ms must be a positive number of milliseconds, got {self.budget_ms}")

    @property
    def metric(self) -> str:
        """The accuracy the curve, the speed-ups and the budget pick are judged by."""
        return STAGE_METRIC[self.stage]

    @property
    def second_iters(self) -> int:
        return self.stage2_iters if self.stage2_iters is not None else stage2_iters(self.iters)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


# ------------------------------------------------------------------------------------------------- training


def _check_run_folder(cfg: FamilyConfig) -> None:
    """A run folder holds one family recipe; widths, stage, teacher and evaluation may change between runs."""
    identity = cfg.to_dict()
    claim_run_folder(cfg.out, "family_config.json", identity, ignore=set(identity) - set(TRAINING_KEYS),
                     what="a family", advice="use another --out")


def _student_config(cfg: FamilyConfig, width: float, progress: bool) -> StudentConfig:
    """Stage 1 of the ``width`` member (its stage 2 follows with :meth:`StudentConfig.stage2`)."""
    from mimicdet.student.train import StudentConfig

    return StudentConfig(
        store=cfg.store, data=Path(cfg.data), out=cfg.out / width_tag(width) / "stage1", split=cfg.split,
        width=width, stage=1, iters=cfg.iters, mimic=cfg.mimic, head=cfg.head, batch_size=cfg.batch_size, lr=cfg.lr,
        mimic_weight=cfg.mimic_weight, rois_per_image=cfg.rois_per_image, anchor_sizes=tuple(cfg.anchor_sizes),
        aspect_ratios=tuple(cfg.aspect_ratios), seed=cfg.seed, device=cfg.device, workers=cfg.workers,
        progress=progress, storage_options=dict(cfg.storage_options), cache_dir=cfg.cache_dir,
        cache_size=cfg.cache_size,
    )


def _stages(cfg: FamilyConfig, width: float, progress: bool) -> list[StudentConfig]:
    first = _student_config(cfg, width, progress)
    if cfg.stage == 1:
        return [first]
    logits = 0.0 if cfg.mimic == "none" else cfg.logits_weight
    return [first, first.stage2(first.out.parent / "stage2", iters=cfg.second_iters, logits_weight=logits)]


def train_members(cfg: FamilyConfig, echo: Callable[[str], None] = print) -> dict[float, dict]:
    """Trains whatever is missing; returns ``{width: {"model": final model.pt, "trained": "now" | "earlier"}}``."""
    from mimicdet.student.train import run_train_student

    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    members = {}
    for width in cfg.widths:
        trained = "earlier"
        for scfg in _stages(cfg, width, progress):
            name = f"{width_tag(width)} stage {scfg.stage}"
            if (scfg.out / "model.pt").exists():
                echo(f"[family] {name}: done earlier ({scfg.out / 'model.pt'})")
                continue
            echo(f"[family] {name}: training {scfg.iters} iterations ...")
            summary = run_train_student(scfg)
            trained = "now"
            echo(f"[family] {name}: " + (f"{summary['s_per_iter']:.3f} s/iter" if summary["steps"] else "already trained")
                 + f" -> {summary['model']}")
        members[width] = {"model": scfg.out / "model.pt", "trained": trained}
    return members


# ----------------------------------------------------------------------------------------------- evaluation



def _accuracy(model, meta: dict, dataset, model_path: Path, cache: Path, cfg: FamilyConfig, name: str) -> dict:
    """``evaluate_model``'s summary (no profile), reused while the model file and the data are unchanged."""
    from mimicdet.detection.checkpoints import file_sha256
    from mimicdet.detection.evaluate import evaluate_model

    key = {"model_sha256": file_sha256(model_path), "dataset_digest": dataset.digest(),
           "split": cfg.eval_split, "max_images": cfg.eval_max_images, "metrics": list(EVAL_METRICS)}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["summary"]
    report = evaluate_model(model, meta, dataset, metrics=EVAL_METRICS, device=cfg.device, profile=False,
                            max_images=cfg.eval_max_images, progress=False, name=name)
    _write_json(cache, {"key": key, "summary": report["summary"]})
    return report["summary"]


def _eval_subset(dataset, max_images: int | None):
    keep = [i for i, r in enumerate(dataset.records) if r.labelled][:max_images]
    return dataset.subset(keep)


def _cost(models: dict[str, tuple[Any, dict]], data, cfg: FamilyConfig) -> dict[str, dict]:
    """Parameters, GFLOPs and latency of every model in one round-robin timing per input size (one size,
    unless members were preprocessed differently)."""
    from mimicdet.detection.device import select_device
    from mimicdet.detection.evaluate import typical_input_size
    from mimicdet.detection.profile import profile_models

    dev = select_device(cfg.device)
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for name, (model, meta) in models.items():
        groups.setdefault(typical_input_size(data, meta), {})[name] = model
    out = {}
    for size, group in groups.items():
        for name, prof in profile_models(group, size, repeats=cfg.profile_repeats, warmup=2, device=dev).items():
            out[name] = prof
    return out


def _row(name: str, width: float, stage: int, summary: dict, prof: dict, model_path: Path, meta: dict) -> dict:
    return {
        "name": name,
        "width": width,
        "width_label": width_label(width),
        "stage": stage,
        "model": str(model_path),
        "iterations": meta.get("iterations"),
        "recall@300_iou0.5": summary.get("recall@300_iou0.5"),
        "recall@300_iou0.7": summary.get("recall@300_iou0.7"),
        "AR@300": summary.get("AR@300"),
        "mAP@0.5_11pt": summary.get("mAP@0.5_11pt"),
        "coco_AP": summary.get("coco_AP"),
        "params": prof["params"]["total"],
        "gflops": prof["gflops"]["total"],
        "ms_per_image": prof["latency"]["median_ms"],
        "ms_p90": prof["latency"]["p90_ms"],
        "ms_min": prof["latency"]["min_ms"],
        "peak_mb": prof["memory"]["peak_mb"],
        "input_size": prof["input_size"],
    }


def pick_within_budget(rows: list[dict], budget_ms: float, metric: str) -> dict:
    """Among the members at or under ``budget_ms`` ms/image: the most accurate by ``metric`` (ties and missing
    values: the wider) and the fastest. ``{"budget_ms", "metric", "best", "fastest", "fits"}``, names or None."""
    fits = [r for r in rows if r["ms_per_image"] <= budget_ms]
    acc = lambda r: -1.0 if r.get(metric) is None else r[metric]  # noqa: E731
    best = max(fits, key=lambda r: (acc(r), r["width"]), default=None)
    fastest = min(fits, key=lambda r: r["ms_per_image"], default=None)
    return {"budget_ms": budget_ms, "metric": metric, "fits": [r["name"] for r in fits],
            "best": best["name"] if best else None, "fastest": fastest["name"] if fastest else None}


def evaluate_family(cfg: FamilyConfig, members: dict[float, dict], echo: Callable[[str], None] = print) -> dict:
    """Scores every member (and the teacher) on ``cfg.eval_split``; returns the family report (not yet written)."""
    from mimicdet.data import load_dataset
    from mimicdet.detection.checkpoints import file_sha256
    from mimicdet.detection.detector import load_detector

    models: dict[str, tuple[Any, dict]] = {}
    paths: dict[str, Path] = {}
    if cfg.teacher is not None:
        models["teacher"] = load_detector(cfg.teacher)
        paths["teacher"] = Path(cfg.teacher)
    for width, m in members.items():
        models[width_tag(width)] = load_detector(m["model"])
        paths[width_tag(width)] = Path(m["model"])
    classes = models[width_tag(cfg.widths[0])][1].get("classes")
    dataset = load_dataset(cfg.data, cfg.eval_split, classes=classes)
    data = _eval_subset(dataset, cfg.eval_max_images)
    teacher_sha = None
    if cfg.teacher is not None:
        teacher_sha = file_sha256(paths["teacher"])
        store_sha = models[width_tag(cfg.widths[0])][1].get("teacher_sha256")
        if store_sha and teacher_sha != store_sha:
            warnings.warn(f"--teacher {cfg.teacher} (sha256 {teacher_sha[:12]}) is not the teacher that made "
                          f"{cfg.store} (sha256 {store_sha[:12]}); it is compared all the same", stacklevel=2)

    summaries = {}
    for name, (model, meta) in models.items():
        echo(f"[family] evaluate {name} on {cfg.eval_split} ({len(data)} images) ...")
        cache = cfg.out / ("teacher" if name == "teacher" else name) / f"eval-{cfg.eval_split}.json"
        summaries[name] = _accuracy(model, meta, dataset, paths[name], cache, cfg, name)
    echo(f"[family] timing {len(models)} models round-robin ({cfg.profile_repeats} runs each) ...")
    costs = _cost(models, data, cfg)

    teacher_row = None
    if cfg.teacher is not None:
        model, meta = models["teacher"]
        teacher_row = _row("teacher", model.config.width, 2 if model.config.head != "none" else 1,
                           summaries["teacher"], costs["teacher"], paths["teacher"], meta)
        teacher_row["sha256"] = teacher_sha
    rows = []
    for width, m in members.items():
        name = width_tag(width)
        row = _row(name, width, cfg.stage, summaries[name], costs[name], paths[name], models[name][1])
        row["trained"] = m["trained"]
        rows.append(row)
    ref = teacher_row or max(rows, key=lambda r: r["width"])
    for r in [teacher_row, *rows] if teacher_row else rows:
        r["speedup"] = ref["ms_per_image"] / r["ms_per_image"] if r["ms_per_image"] > 0 else None
    report = {
        "config": cfg.to_dict(),
        "metric": cfg.metric,
        "speedup_over": ref["name"],
        "eval": {"split": cfg.eval_split, "images": len(data), "digest": data.digest(),
                 "device": next(iter(costs.values()))["device"], "threads": next(iter(costs.values()))["threads"],
                 "timing": f"median of {cfg.profile_repeats} predict() runs per model, round-robin in one process"},
        "teacher": teacher_row,
        "rows": rows,
    }
    if cfg.budget_ms is not None:
        report["budget"] = pick_within_budget(rows, cfg.budget_ms, cfg.metric)
    return report


# ---------------------------------------------------------------------------------------------------- report


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_family_table(report: dict) -> str:
    """Markdown table, teacher first, widest student next; plus the budget lines when a budget was given."""
    metric = report["metric"]
    head = ("model", "width", "stage", "R@0.7", "mAP@0.5", "COCO AP", "params", "GFLOPs", "ms/img",
            f"speed-up vs {report['speedup_over']}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ([report["teacher"]] if report["teacher"] else []) + report["rows"]:
        lines.append("| " + " | ".join([
            r["name"], r["width_label"], str(r["stage"]), _pct(r["recall@300_iou0.7"]), _pct(r["mAP@0.5_11pt"]),
            _pct(r["coco_AP"]), f"{r['params'] / 1e6:.2f}M", f"{r['gflops']:.2f}", f"{r['ms_per_image']:.1f}",
            "-" if r.get("speedup") is None else f"{r['speedup']:.1f}x",
        ]) + " |")
    ev = report["eval"]
    lines.append(f"(ms/img: {ev['timing']}, {ev['device']}, {ev['threads']} threads; "
                 f"accuracy on {ev['split']}, {ev['images']} images)")
    budget = report.get("budget")
    if budget:
        rows = {r["name"]: r for r in report["rows"]}
        label = METRIC_LABEL[metric]
        x = f"{budget['budget_ms']:g}"
        if budget["fastest"] is None:
            fastest = min(report["rows"], key=lambda r: r["ms_per_image"])
            lines.append(f"no width within {x} ms: the fastest, {fastest['width_label']}, takes "
                         f"{fastest['ms_per_image']:.1f} ms/image")
        else:
            for kind in ("best", "fastest"):
                r = rows[budget[kind]]
                what = "most accurate" if kind == "best" else "fastest"
                lines.append(f"{what} width within {x} ms: {r['width_label']} ({r['ms_per_image']:.1f} ms/image, "
                             f"{label} {_pct(r.get(metric))}%)")
    return "\n".join(lines)


def plot_family(report: dict, path: Path) -> Path | None:
    """Accuracy (the stage's metric) against ms/image, one point per width, the teacher as a star."""
    from mimicdet.detection.metrics.plots import plot_speed_accuracy

    metric = report["metric"]
    points = [(f"w {r['width_label']}", r["ms_per_image"], r[metric]) for r in report["rows"] if r.get(metric) is not None]
    t = report["teacher"]
    teacher_point = (f"teacher (w {t['width_label']})", t["ms_per_image"], t[metric]) if t and t.get(metric) is not None else None
    if not points and teacher_point is None:
        return None
    return plot_speed_accuracy(points=points, teacher_point=teacher_point, path=path, ylabel=METRIC_LABEL[metric],
                               title=f"width family, stage {report['config']['stage']}: speed vs accuracy")


def _write_json(path: Path, obj: Any) -> None:
    from mimicdet.detection.metrics import to_jsonable

    write_json(path, to_jsonable(obj), indent=1)


def run_train_family(cfg: FamilyConfig, echo: Callable[[str], None] = print) -> dict:
    """Train the family (resuming), evaluate it, write ``family.json`` and ``speed_accuracy.png``, echo the table."""
    for p, what in ((Path(cfg.data), "--data"), *(((Path(cfg.teacher), "--teacher"),) if cfg.teacher else ())):
        if not p.exists():
            raise FileNotFoundError(f"{what}: {p} does not exist")
    _check_run_folder(cfg)
    members = train_members(cfg, echo)
    report = evaluate_family(cfg, members, echo)
    plot = plot_family(report, cfg.out / "speed_accuracy.png")
    report["plot"] = str(plot) if plot else None
    _write_json(cfg.out / "family.json", report)
    echo(format_family_table(report))
    echo(f"[family] wrote {cfg.out / 'family.json'}" + (f" and {plot}" if plot else ""))
    return report
