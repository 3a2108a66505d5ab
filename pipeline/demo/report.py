"""The demo's report: table rows from evaluations, paired tests against scratch, latency side by side,
the printed table and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mimicdet.pipeline.demo.protocol import TEACHER_ROWS
from mimicdet.student.family import width_label, width_tag


def _w(width: float) -> str:
    """Width in run-folder names (0.25 -> "1-4"); the table prints it as a fraction."""
    return width_tag(width).removeprefix("w")


def _row(strategy: str, setting: str, seed, width: float, stage: int, ev: dict, run: Path | None = None) -> dict:
    s = ev.get("summary", {})
    label = "teacher" if strategy == "teacher" else f"{strategy} s{stage} w{_w(width)} {setting} seed{seed}"
    row = {
        "label": label,
        "eval_name": ev.get("model", {}).get("name"),
        "strategy": strategy,
        "setting": setting,
        "seed": seed,
        "width": width,
        "stage": stage,
        "recall@300_iou0.5": s.get("recall@300_iou0.5"),
        "recall@300_iou0.7": s.get("recall@300_iou0.7"),
        "AR@300": s.get("AR@300"),
        "mAP": s.get("mAP@0.5_11pt"),
        "coco_AP": s.get("coco_AP"),
        "params": s.get("params_total"),
        "gflops": s.get("gflops"),
        "ms_per_image": s.get("ms_per_image"),
        "hits": ev.get("recall", {}).get("hits", {}).get("top300_iou0.7"),
        "voc_per_image": ev.get("voc", {}).get("per_image"),
    }
    if run is not None and (run / "eval.jsonl").exists():
        pts = []
        for line in (run / "eval.jsonl").read_text().splitlines():
            d = json.loads(line)
            v = d.get("recall@300_iou0.7", d.get("metrics", {}).get("recall@300_iou0.7"))
            if v is not None:
                pts.append((d["iteration"], v))
        row["curve"] = pts
    return row


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def format_table(report: dict) -> str:
    head = ("model", "setting", "seed", "w", "stage", "R@0.5", "R@0.7", "mAP@0.5", "COCO AP", "params", "GFLOPs", "ms/img",
            "speed-up", "vs scratch (R@0.7, McNemar p)", "vs scratch (mAP, 95% CI, bootstrap p)")
    with_store = any(r.get("store_mb") for r in report["rows"])
    with_transfer = any("transfer" in r or "transfer_map" in r for r in report["rows"])
    if with_store:
        head = (*head, "store MB")
    if with_transfer:
        head = (*head, "teacher's mimic vs control's (R@0.7 McNemar; mAP, 95% CI, p)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        vs = r.get("vs_scratch")
        vs_s = f"b={vs['b']} c={vs['c']} p={vs['p_value']:.2g}" if vs else "-"
        vm = r.get("vs_scratch_map")
        vm_s = (f"{100 * vm['mean_diff']:+.1f} [{100 * vm['ci_low']:+.1f}, {100 * vm['ci_high']:+.1f}] "
                f"p={vm['p_value']:.2g}" if vm else "-")
        lines.append("| " + " | ".join([
            r["strategy"] if r["strategy"] != "none" else "scratch", str(r["setting"]), str(r["seed"]), width_label(r["width"]),
            str(r["stage"]), _pct(r["recall@300_iou0.5"]), _pct(r["recall@300_iou0.7"]),
            _pct(r["mAP"]) if r["stage"] == 2 else "-", _pct(r["coco_AP"]) if r["stage"] == 2 else "-",
            f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-",
            f"{r['gflops']:.2f}" if r.get("gflops") else "-",
            f"{r['ms_per_image']:.1f}" if r.get("ms_per_image") else "-",
            f"{r['speedup']:.1f}x" if r.get("speedup") else "-", vs_s, vm_s]
            + ([f"{r['store_mb']:.1f}" if r.get("store_mb") else "-"] if with_store else [])
            + ([_transfer_cell(r)] if with_transfer else [])) + " |")
    return "\n".join(lines)


def _transfer_cell(r: dict) -> str:
    """The real teacher's mimic student minus the control teacher's: b = boxes only the real teacher's recalls."""
    parts = []
    if vs := r.get("transfer"):
        parts.append(f"b={vs['b']} c={vs['c']} p={vs['p_value']:.2g}")
    if vm := r.get("transfer_map"):
        parts.append(f"{100 * vm['mean_diff']:+.1f} [{100 * vm['ci_low']:+.1f}, {100 * vm['ci_high']:+.1f}] "
                     f"p={vm['p_value']:.2g}")
    return "; ".join(parts) or "-"


def compare_with_scratch(rows: list[dict]) -> None:
    """Adds ``vs_scratch`` (McNemar over test boxes at IoU 0.7) and ``vs_scratch_map`` (paired bootstrap of
    the mAP difference) to each student row, against the scratch student of its group, and the transfer tests
    against a control teacher's twin."""
    from mimicdet.detection.metrics.significance import mcnemar, paired_bootstrap_map

    # Paired test over the same test boxes: each student against the scratch student of its group.
    by_key = {(r["setting"], r["width"], r["seed"], r["stage"], r["strategy"]): r for r in rows}
    for r in rows:
        if r["strategy"] in (*TEACHER_ROWS, "none", "scratch"):
            continue
        base = by_key.get((r["setting"], r["width"], r["seed"], r["stage"], "none" if r["stage"] == 1 else "scratch"))
        if base and r.get("hits") and base.get("hits"):
            r["vs_scratch"] = mcnemar(np.array(r["hits"], bool), np.array(base["hits"], bool))
        if base and r.get("voc_per_image") and base.get("voc_per_image"):
            # Detection quality: paired bootstrap over test images of the VOC07 mAP difference.
            r["vs_scratch_map"] = paired_bootstrap_map(r["voc_per_image"], base["voc_per_image"])
        # Transfer: the real teacher's mimic student against the control teacher's, same seed and budget.
        twin = by_key.get((r["setting"], r["width"], r["seed"], r["stage"], r.get("twin")))
        if twin and r.get("hits") and twin.get("hits"):
            r["transfer"] = mcnemar(np.array(twin["hits"], bool), np.array(r["hits"], bool))
        if twin and r.get("voc_per_image") and twin.get("voc_per_image"):
            r["transfer_map"] = paired_bootstrap_map(twin["voc_per_image"], r["voc_per_image"])


def side_by_side_latency(rows: list[dict], *, side: int, device: str) -> None:
    """ms/image of the teacher and every full-size-input student, timed round-robin in this one run, so
    the speed-ups are ratios measured side by side (half-size scale-mimic students keep their own figure)."""
    from mimicdet.detection.detector import load_detector
    from mimicdet.detection.device import select_device
    from mimicdet.detection.profile import profile_models

    models = {r["label"]: load_detector(r["model_path"])[0] for r in rows
              if r.get("model_path") and r.get("input_scale", 1.0) == 1.0}
    timed = profile_models(models, input_size=(side, side), repeats=10, warmup=2,
                           device=select_device(device))
    for r in rows:
        if r["label"] in timed:
            r["ms_per_image"] = timed[r["label"]]["latency"]["median_ms"]
            r["latency"] = f"side by side at {side}x{side}"


def write_plots(rows: list[dict], folder: Path, eval_dir: Path) -> None:
    """recall_iou.png, recall_vs_iterations.png and speed_accuracy.png of the demo's rows into ``folder``."""
    from mimicdet.detection.metrics import plots

    folder.mkdir(parents=True, exist_ok=True)
    curves = {}
    for r in rows:
        if r["stage"] == 1 or r["strategy"] in TEACHER_ROWS:
            ev = json.loads((eval_dir / f"{r['eval_name']}.json").read_text())
            rc = ev.get("recall_curves")
            if rc:
                curves[r["label"]] = {k: np.asarray(v, float) for k, v in rc.items()}
    if curves:
        plots.plot_recall_iou(curves, folder / "recall_iou.png")
    series = {}
    for r in rows:
        if r.get("curve"):
            its, vals = zip(*r["curve"])
            series[r["label"]] = (list(its), list(vals))
    if series:
        plots.plot_lines(series, folder / "recall_vs_iterations.png", xlabel="iteration",
                         ylabel="recall@0.7 (300 proposals)", title="Stage-1 recall during training")
    points = [(r["label"], r["ms_per_image"], r["mAP"]) for r in rows
              if r["stage"] == 2 and r["strategy"] not in TEACHER_ROWS and r.get("mAP") is not None]
    t = rows[0]
    if points:
        plots.plot_speed_accuracy(points=points, teacher_point=(t["label"], t["ms_per_image"], t["mAP"]),
                                  path=folder / "speed_accuracy.png")


def _environment() -> dict[str, str]:
    from mimicdet.detection.environment import environment  # imports torch: not at CLI start-up

    return environment()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
