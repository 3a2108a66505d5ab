"""PNG plots of the metric curves, drawn with matplotlib's Agg canvas (no pyplot state, no display needed).

Every function takes the curves the evaluators return, writes one PNG atomically (temp name, then rename),
creating the parent folder, and returns its path.

Units: AP, mAP and other accuracies (recall, LAMR) come in as the fractions (0-1) the evaluators and JSON reports
store, and are SHOWN in percent, as on the console (:func:`detection.evaluate.format_report`): in legends
("AP 61.3%") and on the speed-accuracy plot's y axis, whose label states the unit ("mAP (%)"). Curves of
precision, recall and miss rate against each other keep their 0-1 axes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # legend label -> (x, y)


def _new_axes(size: tuple[float, float] = (6.0, 4.5)):
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


_LINESTYLES = ("-", "--", ":", "-.")
_LEGEND_INSIDE = 8  # more entries than this go beside the axes, where they cannot hide the curves


def _legend(ax, entries: int) -> None:
    if entries > _LEGEND_INSIDE:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    else:
        ax.legend(loc="best", fontsize=8)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(path)!r}")
    from mimicdet.data.paths import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plot_lines(
    series: Series,
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    markers: bool = False,
) -> Path:
    """One line per ``label -> (x, y)``; log axes clip non-positive values."""
    if not series:
        raise ValueError("plot_lines: series is empty; expected at least one label -> (x, y)")
    fig, ax = _new_axes()
    for label, (x, y) in series.items():
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"plot_lines: series {label!r} has x of shape {x.shape} but y of shape {y.shape}")
        style = _LINESTYLES[(len(ax.lines) // 10) % len(_LINESTYLES)]  # colours repeat every 10 lines
        ax.plot(x, y, label=label, marker="o" if markers else None, markersize=3, linestyle=style)
    if logx:
        ax.set_xscale("log", nonpositive="clip")
    if logy:
        ax.set_yscale("log", nonpositive="clip")
    if xlim:
        ax.set_xlim(*xlim)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, len(series))
    return _save(fig, path)


def plot_pr_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    ap: Mapping[str, float] | None = None,
    title: str = "precision-recall",
) -> Path:
    """Per-class PR curves from ``VOCEvaluator.evaluate()["curves"]``; ``ap`` (e.g. ``AP_area``, fractions) goes
    in the legend in percent."""
    series = {}
    for name, c in curves.items():
        label = f"{name} (AP {100 * ap[name]:.1f}%)" if ap and name in ap and np.isfinite(ap[name]) else name
        series[label] = (c["recall"], c["precision"])
    return plot_lines(series, path, xlabel="recall", ylabel="precision", title=title,
                      xlim=(0.0, 1.0), ylim=(0.0, 1.02))


def plot_mr_fppi(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    lamr: Mapping[str, float] | None = None,
    title: str = "miss rate vs FPPI",
) -> Path:
    """Log-log MR-FPPI, one line per model: ``{model: CaltechEvaluator.evaluate()["curves"]}``."""
    series = {}
    for name, c in curves.items():
        label = f"{name} (LAMR {100 * lamr[name]:.1f}%)" if lamr and name in lamr else name
        series[label] = (c["fppi"], c["miss_rate"])
    return plot_lines(series, path, xlabel="false positives per image", ylabel="miss rate", title=title,
                      logx=True, logy=True, xlim=(1e-3, 1e1), ylim=(1e-2, 1.05))


def plot_recall_iou(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str = "proposal recall vs IoU",
) -> Path:
    """Recall vs IoU: ``{model: ProposalRecallEvaluator.evaluate()["curves"]}``, one line per model and top-N."""
    series = {}
    for name, c in curves.items():
        for key, y in c.items():
            if key.startswith("recall@"):
                series[f"{name} top-{key.split('@', 1)[1]}"] = (c["iou"], y)
    return plot_lines(series, path, xlabel="IoU", ylabel="recall", title=title, xlim=(0.5, 1.0), ylim=(0.0, 1.02))


def plot_speed_accuracy(
    points: Sequence[tuple[str, float, float]],
    teacher_point: tuple[str, float, float] | None,
    path: str | os.PathLike,
    *,
    xlabel: str = "latency (ms / image)",
    ylabel: str = "mAP",
    title: str = "speed vs accuracy",
    logx: bool = False,
) -> Path:
    """Scatter of ``(label, speed, accuracy)`` points; the teacher, if given, drawn as a star with a guide line.

    Accuracy (mAP, recall) is a fraction in [0, 1], as reports store it, and is drawn in percent: ``ylabel``
    names the metric and gets `` (%)`` appended (``"mAP"`` -> ``"mAP (%)"``). A value above 1 is refused, since
    it is most likely a percentage already."""
    if not points and teacher_point is None:
        raise ValueError("plot_speed_accuracy: no points to draw")
    for label, _, y in [*points, *([teacher_point] if teacher_point is not None else [])]:
        if np.isfinite(y) and not 0.0 <= y <= 1.0:
            raise ValueError(
                f"plot_speed_accuracy: accuracy must be a fraction in [0, 1] (it is drawn in percent), got {y!r} "
                f"for {label!r}"
            )
    fig, ax = _new_axes()
    for label, x, y in points:
        ax.scatter([x], [100 * y], s=36)
        ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if teacher_point is not None:
        label, x, y = teacher_point
        y = 100 * y
        ax.scatter([x], [y], s=160, marker="*", color="black", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
        ax.axhline(y, color="black", linestyle=":", linewidth=1)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel if "%" in ylabel else f"{ylabel} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
