"""`mimic` console script (also `python cli.py ...`): parses options into config dataclasses and calls one
function per command. No logic lives here."""

from __future__ import annotations

import os
import sys

import click
from mimicdet.data.errors import DataError, StoreError

DEBUG_ENV = "MIMICDET_DEBUG"  # set (or pass --verbose) to see the traceback of a handled error


def _is_remote_storage_error(e: BaseException) -> bool:
    """botocore/aiobotocore errors (no credentials, endpoint down, throttling) without importing them."""
    return any(c.__module__.split(".")[0] in ("botocore", "aiobotocore") for c in type(e).__mro__)


def error_message(e: BaseException) -> str:
    """One line for an error in the user's input, paths or environment: the thing it concerns and the cause."""
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)) and e.filename:
        hint = "; check its permissions" if isinstance(e, PermissionError) else ""
        return f"{e.filename}: {e.strerror or type(e).__name__}{hint}"
    if _is_remote_storage_error(e):
        return f"remote storage: {type(e).__name__}: {' '.join(str(e).split())}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


class _Group(click.Group):
    """Turns the errors raised for bad input, paths or environment into one-line messages (exit code 1, no
    traceback); Ctrl-C ends with exit code 130 and the command that resumes. ``--verbose`` or MIMICDET_DEBUG=1
    keeps the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DataError, StoreError, ValueError, OSError) as e:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(error_message(e)) from None
        except KeyboardInterrupt:
            if os.environ.get(DEBUG_ENV):
                raise
            click.echo(f"\ninterrupted; {interrupt_hint(ctx)}", err=True)
            ctx.exit(130)
        except Exception as e:
            if not _is_remote_storage_error(e) or os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(error_message(e)) from None


def interrupt_hint(ctx: click.Context) -> str:
    """What a Ctrl-C leaves and how to go on: every long command resumes when rerun as it was typed."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    sub = ctx.invoked_subcommand or ""
    if sub == "extract-teacher":
        args += [] if "--resume" in args else ["--resume"]
        return f"complete shards are kept; finish with: mimic {shlex.join(args)}"
    if sub in ("train-teacher", "train-student", "train-family", "demo"):
        return f"the run resumes from its last checkpoint with: mimic {shlex.join(args)}"
    return "nothing was written"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--verbose", "-v", is_flag=True, help=f"Show the full traceback of an error (same as {DEBUG_ENV}=1).")
def main(verbose: bool) -> None:
    """mimicdet: train very efficient detectors by mimicking a big teacher (Li, Jin, Yan, CVPR 2017).

    Offline pipeline: train-teacher -> extract-teacher (feature store) -> train-student -> evaluate.
    """
    if verbose:
        os.environ[DEBUG_ENV] = "1"
    if not os.environ.get(DEBUG_ENV):
        import warnings

        # Warnings are messages to the user: one line each, without the source location.
        warnings.showwarning = lambda message, *_args, **_kw: click.echo(f"warning: {message}", err=True)


# Option parsers shared by several commands.
def _csv(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            items = tuple(kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            items = ()
        if not items:
            what = {int: "integers", float: "numbers"}.get(kind, f"{kind.__name__} values")
            raise click.BadParameter(f"expected comma-separated {what}, got {value!r}")
        return items
    return parse


def _fraction(ctx, param, value):
    """'1/4' or '0.25' -> 0.25."""
    try:
        if "/" in str(value):
            a, b = str(value).split("/")
            v = float(a) / float(b)
        else:
            v = float(value)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected a width like 1/4 or 0.25, got {value!r}") from None
    if not 0 < v <= 1:
        raise click.BadParameter(f"width must be in (0, 1], got {value!r}")
    return v


def _parsed_by(module: str, name: str, option: str):
    """A callback parsing with ``module.name`` (imported on use); its ValueError becomes a bad parameter. None (the
    option's default) stays None."""
    def parse(ctx, param, value):
        if value is None:
            return None
        import importlib

        try:
            return getattr(importlib.import_module(module), name)(value)
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix(f"{option}: ")) from None
    return parse


# '1/2,1/4' -> (0.5, 0.25); '20GB' or '512MiB' -> bytes.
_widths = _parsed_by("mimicdet.student.family", "parse_widths", "--widths")
_cache_size = _parsed_by("mimicdet.store.cache", "parse_size", "--cache-size")


def _subset_of(allowed: tuple[str, ...]):
    """Comma-separated names, each one of ``allowed``; order kept (it is the run order)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        names = tuple(v.strip() for v in str(value).split(",") if v.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise click.BadParameter(f"expected comma-separated names from {', '.join(allowed)}, got {value!r}")
        return names
    return parse


def _teacher_spec(ctx, param, value):
    """A teacher checkpoint that exists, or ``torchvision:NAME`` of a known architecture."""
    from pathlib import Path

    if value.startswith("torchvision:"):
        from mimicdet.detection.torchvision_detector import parse_arch

        try:
            parse_arch(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return value
    if not Path(value).is_file():
        raise click.BadParameter(f"{value} is not a file (a model.pt from train-teacher, or torchvision:NAME)")
    return value


def _storage_options():
    import os

    endpoint = os.environ.get("MIMICDET_S3_ENDPOINT")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}




def _cache_options(command):
    """--cache-dir and --cache-size: the local copy of a remote (s3://) store's shards."""
    command = click.option("--cache-size", default=None, callback=_cache_size,
                           help="Most disk space the shard cache may use, e.g. 20GB or 512MiB; least recently used "
                                "shards go first [default: 50GB].")(command)
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                        help="Folder of the local shard cache of s3:// stores: each shard is fetched once, checked "
                             "and reused across epochs and runs [default: $XDG_CACHE_HOME/mimicdet/stores, else "
                             "~/.cache/mimicdet/stores].")(command)



# Each command: a short block that builds a config and calls one function. Keep blocks independent.

# --- make-data / demo (built-in synthetic dataset) ---
@main.group("make-data")
def make_data() -> None:
    """Write a dataset to disk (VOC layout)."""


@make_data.command("synthetic")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write.")
@click.option("--train", default=2000, show_default=True, type=click.IntRange(min=0), help="Train images.")
@click.option("--test", default=500, show_default=True, type=click.IntRange(min=0), help="Test images.")
@click.option("--pool", default=0, show_default=True, type=click.IntRange(min=0), help="Extra (teacher) images.")
@click.option("--val", default=0, show_default=True, type=click.IntRange(min=0),
              help="Validation images, for choosing settings (keep test for the final report).")
@click.option("--min-object", default=12.0, show_default=True, type=click.FloatRange(12, 90),
              help="Smallest pasted object, sqrt(w*h) px (objects are log-uniform from here to 120 px).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=64), help="Image side, px.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the generator: the same seed and sizes give byte-identical files.")
@click.option("--preview", default=0, show_default=True, type=click.IntRange(min=0),
              help="Draw this many train images with boxes under OUT/preview/.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="0: one per core.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset at OUT made with other parameters.")
def make_data_synthetic(out, train, test, pool, val, min_object, size, seed, preview, workers, overwrite) -> None:
    """Built-in dataset: MNIST digits and LFW faces pasted on photo backgrounds (deterministic)."""
    from pathlib import Path

    from mimicdet.data.synthetic import SyntheticConfig, ensure_dataset

    ensure_dataset(SyntheticConfig(out=Path(out), train=train, test=test, pool=pool, val=val, min_object=min_object,
                                   size=size, seed=seed,
                                   preview=preview, workers=workers, overwrite=overwrite), echo=click.echo)


@main.command("demo")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="A VOC dataset (train/test splits, optional pool) instead of the built-in one.")
@click.option("--quick", "mode", flag_value="quick", help="Smoke run of every stage (a few minutes).")
@click.option("--study", "mode", flag_value="study",
              help="Full study: three settings, scratch/RoI/map/scale mimic, widths 1/4 and 1/2, two seeds (hours).")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder; every stage resumes from what is already there (a folder made with another budget is refused).")
@click.option("--labelled", type=click.IntRange(min=1), default=None,
              help="Labelled images the students get (default: the mode's budget, 150; 40 with --data).")
@click.option("--pool", type=click.IntRange(min=1), default=None,
              help="Built-in dataset only: images in the teacher's pool, which are also the students' unlabelled "
                   "images (default 1000).")
@click.option("--teacher-arch", default=None,
              help="The teacher's detector: inception (this tool's, default) or torchvision:NAME, e.g. "
                   "torchvision:fasterrcnn_mobilenet_v3_large_fpn, trained in the run (a foreign teacher's store "
                   "teaches the same Inception students).")
@click.option("--teacher-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Override the teacher's learning rate (default 0.04).")
@click.option("--teacher-iters", type=click.IntRange(min=1), default=None,
              help="Override the teacher budget (default: built-in data, the shipped w=1/2 teacher of 2500 "
                   "iterations, used as given; with --data, a w=1 teacher trained 400 iterations). Another budget "
                   "trains the teacher in the run.")
@click.option("--student-iters", type=click.IntRange(min=1), default=None,
              help="Override the stage-1 budget, stage 2 gets half (default: 750 on the built-in data, 250 with "
                   "--data).")
@click.option("--anchor-sizes", default=None, callback=_csv(int),
              help="Anchor sizes in input px (default 16,32,64,128; 32,64,128,256 with --data).")
@click.option("--extras/--no-extras", default=None,
              help="Also train stage-1 RoI-mimic students from two teachers (w=1 and w=1/2) and from an int8 store "
                   "(on by default in --study).")
@click.option("--control-teacher/--no-control-teacher", default=None,
              help="Also train a control teacher (same width and budget) on the students' labelled images only, and "
                   "RoI-mimic students of it: the real teacher's students minus the control's is what the teacher "
                   "transfers; the control's minus scratch is regularisation (limited settings only).")
@click.option("--seeds", default=None, callback=_csv(int),
              help="Student seeds, e.g. 0,1 (default: 0; the study: 0,1). Rerunning with more seeds reuses the rest.")
@click.option("--widths", default=None, callback=_widths,
              help="Student widths, e.g. 1/4,1/2 (default: 1/4; the study: 1/4,1/2).")
@click.option("--settings", default=None, callback=_subset_of(("same-data", "limited", "limited+pool")),
              help="Settings to run, in this order (default: limited+pool; the study: same-data,limited,limited+pool).")
@click.option("--strategies", default=None, callback=_subset_of(("none", "roi", "map", "scale", "assistant", "roi-norm", "roi-lab2")),
              help="Stage-1 strategies, each followed by its stage 2 (default: none,roi-norm; with --data: none,roi,roi-norm; "
                   "the study: none,roi,map,scale). roi: the paper's eq. 5. "
                   "assistant: RoI mimic of a w=1/2 teacher trained like the teacher (a teacher assistant); roi-norm: "
                   "RoI mimic of per-channel standardised teacher features (--mimic-norm channel); roi-lab2: the RoI "
                   "student, then a stage 2 on labelled images only (no unlabelled half in its batches).")
@click.option("--min-size", type=click.IntRange(min=32), default=None,
              help="Input shorter side, px, for teacher and students (default 192; real photos with small objects "
                   "want about their native size).")
@click.option("--max-size", type=click.IntRange(min=32), default=None,
              help="Input longer side cap, px (default 320).")
@click.option("--min-object", type=click.FloatRange(12, 90), default=None,
              help="Built-in dataset only: smallest pasted object, sqrt(w*h) px (default 24).")
@click.option("--report-split", type=click.Choice(["test", "val"]), default="test",
              help="Split the table scores: test for the final report; val (built-in data, or a --data folder with "
                   "a val split) to choose settings without reading test (eval-val/, plots-val/, report-val.json).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="Data loader processes.")
def demo(data, mode, out, labelled, pool, teacher_arch, teacher_iters, teacher_lr, student_iters, anchor_sizes, extras, control_teacher, seeds,
         widths, settings, strategies, min_size, max_size, min_object, report_split, device, workers) -> None:
    """Reproduce the paper's comparison end to end: data, teacher, extraction, students, evaluation, table.

    Plain `mimic demo` is the headline run: a 1/4-width student from scratch against RoI mimic of the teacher
    the repository ships for the built-in data (stage 1, then stage 2 with two-stage mimic), with limited labels
    plus an unlabelled pool. Writes OUT/report.json and OUT/plots/*.png and prints the table."""
    from dataclasses import replace
    from pathlib import Path

    from mimicdet.pipeline.demo import DemoConfig, budget_for, run_demo

    if pool is not None and data is not None:
        raise click.BadParameter("--pool sizes the built-in dataset; a --data folder brings its own splits",
                                 param_hint="--pool")
    budget = budget_for(mode or "default", real_data=data is not None)
    if control_teacher and (settings or budget.settings) == ("same-data",):
        raise click.BadParameter("a control teacher needs a limited-label setting (limited or limited+pool): in "
                                 "same-data it would be the teacher itself", param_hint="--control-teacher")
    overrides = {"labelled": labelled, "pool": pool, "teacher_arch": teacher_arch, "teacher_iters": teacher_iters,
                 "teacher_lr": teacher_lr, "anchor_sizes": anchor_sizes,
                 "seeds": seeds, "extras": extras, "control_teacher": control_teacher, "widths": widths,
                 "settings": settings, "strategies": strategies, "min_size": min_size, "max_size": max_size,
                 "min_object": min_object}
    if student_iters:
        from mimicdet.student.recipe import stage2_iters

        overrides |= {"student_iters": student_iters, "stage2_iters": stage2_iters(student_iters)}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    run_demo(DemoConfig(out=Path(out), data=Path(data) if data else None, mode=mode or "default", budget=budget,
                        device=device, workers=workers, report_split=report_split), echo=click.echo)
# --- end make-data / demo ---

# --- inspect-store / verify-store (feature store) ---
@main.command("inspect-store")
@click.argument("store")
def inspect_store_command(store) -> None:
    """Print a feature store's manifest, size on disk, compression ratio and completion.

    STORE is a path or an fsspec URL (s3://bucket/prefix; $MIMICDET_S3_ENDPOINT sets the endpoint)."""
    from mimicdet.store import describe_store

    click.echo(describe_store(store))


@main.command("verify-store")
@click.argument("store")
@click.option("--data", "data_root", type=click.Path(exists=True), default=None,
              help="Dataset the store should have been made from (checks ids, digest, classes).")
@click.option("--split", default=None, help="Split of --data (required with --data).")
def verify_store_command(store, data_root, split) -> None:
    """Check every shard checksum and completion marker, decode every chunk, look for NaN/Inf; exit 1 on any problem."""
    from mimicdet.data import load_dataset
    from mimicdet.store import verify_store

    if (data_root is None) != (split is None):
        raise click.BadParameter("give --data and --split together", param_hint="--data/--split")
    report = verify_store(store, dataset=load_dataset(data_root, split) if data_root else None)
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)
# --- end inspect-store / verify-store ---

# --- extract-teacher / train-student (offline mimic pipeline) ---
@main.command("extract-teacher")
@click.option("--teacher", required=True, callback=_teacher_spec,
              help="Teacher checkpoint (model.pt from train-teacher), or torchvision:NAME with --weights "
                   "(fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn).")
@click.option("--weights", default=None,
              help="torchvision:NAME only: its state dict file (torchvision's layout), or the name of torchvision's "
                   "published weights (e.g. COCO_V1) when torchvision's cache holds them. Nothing is downloaded.")
@click.option("--feature-stride", default=None, type=click.IntRange(min=1),
              help="Stride of the stored feature map, which the student's must match [default: a checkpoint's own; "
                   "16 for torchvision:NAME]. Picks the FPN level of a torchvision teacher (16: P4; a MobileNetV3 "
                   "FPN's stride-32 level is served upsampled x2).")
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False), default=None,
              help="torchvision:NAME only: JSON {\"teacher class\": \"dataset class\"}, so the store's logits are the "
                   "dataset's (stage-2 logits match). Without it the store holds features and proposals only.")
@click.option("--min-size", type=click.IntRange(min=32), default=None,
              help="torchvision:NAME only: shorter input side [default: torchvision's 800].")
@click.option("--max-size", type=click.IntRange(min=32), default=None,
              help="torchvision:NAME only: cap on the longer side [default: torchvision's 1333].")
@click.option("--data", required=True, type=click.Path(exists=True), help="Dataset root (VOC, COCO, Caltech) or a plain folder of images (no labels needed).")
@click.option("--split", default="train", show_default=True, help="Split of --data to extract.")
@click.option("--out", required=True, help="Store location: a path or an fsspec URL (s3://bucket/prefix).")
@click.option("--format", "backend", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True, help="Store backend: zarr (one sharded array per record kind) or hdf5 (one file per shard).")
@click.option("--dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True, help="Feature map storage type (int8: per-channel scale).")
@click.option("--proposals", default=300, show_default=True, type=click.IntRange(min=1), help="Top-K teacher proposals stored per image.")
@click.option("--flip", is_flag=True, help="Also store the horizontally flipped pass (students training with flips mimic these).")
@click.option("--shard-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per shard file.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per teacher forward pass.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="Dask LocalCluster worker processes (0: extract in this process).")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler (tcp://host:8786).")
@click.option("--resume", is_flag=True, help="Finish an interrupted extraction (refused if the teacher or dataset changed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:K]")
def extract_teacher_command(teacher, weights, feature_stride, class_map, min_size, max_size, data, split, out, backend,
                            dtype, proposals, flip, shard_size, batch_size, workers, scheduler, resume, overwrite,
                            device) -> None:
    """Run the teacher once over a dataset into a compressed, sharded, resumable feature store."""
    from pathlib import Path

    from mimicdet.pipeline.extract import ExtractConfig, run_extract

    if resume and overwrite:
        raise click.BadParameter("--resume and --overwrite exclude each other", param_hint="--resume/--overwrite")
    if workers and scheduler:
        raise click.BadParameter("--workers starts a local cluster; --scheduler joins one: give one", param_hint="--workers/--scheduler")
    foreign = {"--weights": weights, "--class-map": class_map, "--min-size": min_size, "--max-size": max_size}
    given = [name for name, value in foreign.items() if value is not None]
    if given and not teacher.startswith("torchvision:"):
        raise click.BadParameter(f"{', '.join(given)} go with --teacher torchvision:NAME; {teacher} holds its own "
                                 "weights, classes and sizes", param_hint=given[0])
    summary = run_extract(ExtractConfig(
        teacher=teacher, weights=weights, feature_stride=feature_stride, class_map=Path(class_map) if class_map else None,
        min_size=min_size, max_size=max_size, data=Path(data), split=split, out=out, backend=backend, dtype=dtype,
        proposals=proposals, flip=flip, shard_size=shard_size, batch_size=batch_size, workers=workers,
        scheduler=scheduler, mode="resume" if resume else "overwrite" if overwrite else "create", device=device,
        storage_options=_storage_options()))
    click.echo(f"wrote {summary['shards_written']} shard(s), {summary['shards_already_complete']} already complete: "
               f"{summary['images']} images, flips {summary['flips']}, {summary['dtype']} -> {summary['store']}")


@main.command("train-student")
@click.option("--store", required=True, multiple=True,
              help="Feature store of the labelled split (from extract-teacher). Repeat for several teachers over the "
                   "same images and preprocessing: the student mimics each through its own transform r_k; the first "
                   "store is the primary (its proposals are the mimic regions, its head outputs the logits target).")
@click.option("--teacher-weight", "teacher_weights", multiple=True, type=click.FloatRange(min=0),
              help="Weight w_k of each --store's mimic loss, in --store order (L_m = sum_k w_k L_m^k; default 1 each). "
                   "Give one per --store or none.")
@click.option("--data", required=True, type=click.Path(exists=True), help="Dataset root holding the labelled images.")
@click.option("--split", default="train", show_default=True, help="Split of --data with the labelled images the store was extracted from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (rerun the same command to resume).")
@click.option("--width", default="1/4", show_default=True, callback=_fraction, help="Student width multiplier (1/2, 1/4, 1/8 ...).")
@click.option("--stage", type=click.IntRange(1, 2), default=1, show_default=True, help="1: backbone + RPN; 2: full detector.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None, help="Stage 2: the stage-1 student's model.pt.")
@click.option("--head", type=click.Choice(["fast-rcnn", "rfcn"]), default="fast-rcnn", show_default=True, help="Stage-2 head.")
@click.option("--mimic", type=click.Choice(["roi", "map", "logits", "none"]), default="roi", show_default=True,
              help="roi: paper's RoI feature mimic; map: whole-map L2; logits: head logits only (stage 2); none: from scratch.")
@click.option("--sampler", type=click.Choice(["roialign", "native"]), default="roialign", show_default=True, help="How regions sample the maps.")
@click.option("--mimic-norm", type=click.Choice(["none", "channel"]), default="none",
              help="none: the paper's eq. 5 on the raw teacher map; channel: standardise each teacher channel (mean and std over the store) first, so a few large channels do not dominate the L2.")
@click.option("--mimic-weight", default=1.0, show_default=True, type=float, help="λ1, weight of the feature mimic loss.")
@click.option("--logits-weight", default=None, type=float, help="Weight of logits matching (default 0.3 in stage 2 for roi/logits, else 0; chosen on held-out images: docs/experiments/logits-weight.md).")
@click.option("--logits-balance/--no-logits-balance", default=True, show_default=True,
              help="Weigh the proposals the teacher calls foreground and the background ones half each in the logits "
                   "match (a teacher's top proposals are mostly background; the plain mean made a student's head "
                   "call its objects background).")
@click.option("--scale-mimic", is_flag=True, help="Student sees a half-size image and upsamples its map x2.")
@click.option("--rois-per-image", default=64, show_default=True, type=click.IntRange(min=1), help="Teacher proposals per image the mimic loss samples (drawn from the 2x best-scoring).")
@click.option("--flip", is_flag=True, help="Random horizontal flips (needs a store extracted with --flip).")
@click.option("--iters", default=1000, show_default=True, type=click.IntRange(min=1), help="Training iterations (stage 2 usually gets half of stage 1's).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per iteration (labelled plus unlabelled).")
@click.option("--lr", default=0.02, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate of SGD (warm-up, then the schedule).")
@click.option("--anchor-sizes", default=None, callback=_csv(int), help="RPN anchor sizes in input pixels [default: 16,32,64,128; stage 2: the --init checkpoint's].")
@click.option("--aspect-ratios", default=None, callback=_csv(float), help="Anchor height/width ratios [default: 0.5,1,2; stage 2: the --init checkpoint's].")
@click.option("--unlabeled", multiple=True,
              help="Store of extra images without labels (mimic loss only). With several --store teachers, repeat it: "
                   "each teacher's store of those images, in --store order.")
@click.option("--unlabeled-data", type=click.Path(exists=True), default=None, help="Where the --unlabeled images are.")
@click.option("--unlabeled-split", default="train", show_default=True, help="Split of --unlabeled-data that the --unlabeled store holds.")
@click.option("--unlabeled-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Share of each batch drawn from --unlabeled.")
@click.option("--subset", default=None, type=click.IntRange(min=1), help="Use only N labelled images (seeded choice).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initial weights, sampling and flips (a rerun with the same seed is bit-identical on one machine).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--eval-every", default=0, show_default=True, type=click.IntRange(min=0), help="Score recall on --eval-split every N iterations (0: never).")
@click.option("--eval-split", default=None, help="Split for periodic recall evaluation.")
@click.option("--checkpoint-every", default=200, show_default=True, type=click.IntRange(min=1),
              help="Write the resumable OUT/checkpoint.pt every N iterations.")
@click.option("--skip-corrupt", is_flag=True,
              help="Verify the store's shards first and train without damaged images (reports how many).")
@click.option("--overwrite", is_flag=True, help="Replace a run at --out made with another configuration (only the run's own files are removed).")
@_cache_options
def train_student_command(store, teacher_weights, data, split, out, width, stage, init, head, mimic, sampler, mimic_weight,
                          mimic_norm, logits_weight, logits_balance, scale_mimic, rois_per_image, flip, iters, batch_size, lr, anchor_sizes,
                          aspect_ratios, unlabeled, unlabeled_data, unlabeled_split, unlabeled_fraction, subset, seed,
                          device, workers, eval_every, eval_split, checkpoint_every, skip_corrupt, overwrite, cache_dir,
                          cache_size) -> None:
    """Train a student detector from a teacher's feature store (the teacher is never loaded), or from several
    teachers' stores (repeat --store, weigh them with --teacher-weight)."""
    from pathlib import Path

    from mimicdet.student.train import StudentConfig, run_train_student

    summary = run_train_student(StudentConfig(
        store=store, teacher_weights=teacher_weights or None, data=Path(data), split=split, out=Path(out), width=width,
        stage=stage, init=Path(init) if init else None, head=head, mimic=mimic, sampler=sampler,
        mimic_weight=mimic_weight, mimic_norm=mimic_norm, logits_weight=logits_weight, logits_balance=logits_balance,
        scale_mimic=scale_mimic,
        rois_per_image=rois_per_image, flip=flip, iters=iters,
        batch_size=batch_size, lr=lr, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios,
        unlabeled=unlabeled or None,
        unlabeled_data=Path(unlabeled_data) if unlabeled_data else None, unlabeled_split=unlabeled_split,
        unlabeled_fraction=unlabeled_fraction, subset=subset, seed=seed, device=device, workers=workers,
        eval_every=eval_every, eval_split=eval_split, checkpoint_every=checkpoint_every, skip_corrupt=skip_corrupt,
        overwrite=overwrite, storage_options=_storage_options(), cache_dir=cache_dir, cache_size=cache_size))
    skipped = summary["skipped_images"]
    if skipped:
        click.echo(f"skipped {len(skipped)} damaged image(s): "
                   + ", ".join(f"{k['image_id']!r} ({k['problem']})" for k in skipped[:10])
                   + (" ..." if len(skipped) > 10 else ""))
    if summary["steps"]:
        click.echo(f"student at iteration {summary['iteration']}: {summary['model']} "
                   f"({summary['s_per_iter']:.3f} s/iter, {100 * summary['data_fraction']:.1f}% waiting for data)")
    else:
        click.echo(f"student at iteration {summary['iteration']}: {summary['model']} (already trained; nothing to resume)")
# --- end extract-teacher / train-student ---

# --- train-teacher / evaluate / predict ---
@main.command("train-teacher")
@click.option("--data", required=True, type=click.Path(exists=True), help="Dataset root (VOC, COCO, Caltech).")
@click.option("--split", default="train", show_default=True, help="Split of --data to train on.")
@click.option("--subset", default=None, type=click.IntRange(min=1),
              help="Train on N images of --split only, drawn by --subset-seed as train-student --subset draws them "
                   "(a control teacher that knows only a student's labelled images).")
@click.option("--subset-seed", default=0, show_default=True, type=int, help="Seed of the --subset draw.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumes when it exists).")
@click.option("--arch", default="inception", show_default=True,
              help="inception: this tool's detector; torchvision:NAME: torchvision's Faster R-CNN (fasterrcnn_resnet50_fpn, "
                   "fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn), which ignores --width, --head and "
                   "the anchor options; its --init-from is a file in torchvision's layout (a detector or an ImageNet "
                   "backbone).")
@click.option("--width", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Backbone width multiplier.")
@click.option("--head", default="fast-rcnn", show_default=True, type=click.Choice(["fast-rcnn", "rfcn"]), help="Detection head: fast-rcnn (RoIAlign + MLP) or rfcn (position-sensitive RoI pooling).")
@click.option("--iters", default=None, type=click.IntRange(min=1),
              help="Training iterations [default: sized to finish in 10 min on 2 CPU cores].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per iteration.")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="Base learning rate.")
@click.option("--min-size", default=256, show_default=True, type=click.IntRange(min=1), help="Shorter side, px.")
@click.option("--max-size", default=512, show_default=True, type=click.IntRange(min=1), help="Longer side cap, px.")
@click.option("--anchor-preset", default="default", show_default=True, type=click.Choice(["default", "pedestrian"]),
              help="Anchor sizes and aspect ratios; --anchor-sizes / --aspect-ratios override its parts.")
@click.option("--anchor-sizes", default=None, callback=_csv(int), help="e.g. 16,32,64,128 (input px).")
@click.option("--aspect-ratios", default=None, callback=_csv(float), help="height/width, e.g. 0.5,1,2.")
@click.option("--rpn-channels", default=None, type=click.IntRange(min=1), help="Channels of the RPN's 3x3 conv (default: the backbone's output channels).")
@click.option("--init-from", default=None, type=click.Path(exists=True, dir_okay=False),
              help="torchvision GoogLeNet state dict (width 1 only; inputs are then normalised as (x-0.5)/0.5).")
@click.option("--flip", is_flag=True, help="Random horizontal flips.")
@click.option("--eval-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="Evaluate on --eval-split every N iterations (0: never).")
@click.option("--eval-split", default="test", show_default=True, help="Split scored during training (with --eval-every).")
@click.option("--eval-max-images", default=200, show_default=True, type=click.IntRange(min=1), help="Score at most N images of --eval-split each time (0: all).")
@click.option("--checkpoint-every", default=50, show_default=True, type=click.IntRange(min=1), help="Write the resumable OUT/checkpoint.pt every N iterations.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initial weights, sampling and flips.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="Data loader processes.")
@click.option("--overwrite", is_flag=True, help="Replace a run at --out made with another configuration.")
def train_teacher_command(data, split, subset, subset_seed, out, arch, width, head, iters, batch_size, lr, min_size,
                          max_size, anchor_preset, anchor_sizes, aspect_ratios, rpn_channels, init_from, flip,
                          eval_every, eval_split, eval_max_images, checkpoint_every, seed, device, workers,
                          overwrite) -> None:
    """Train a teacher detector; writes OUT/model.pt (and a resumable OUT/checkpoint.pt)."""
    from pathlib import Path

    from mimicdet.pipeline.teacher import (
        DEFAULT_ITERS,
        DEFAULT_LR,
        TeacherConfig,
        format_summary,
        train_teacher,
    )

    try:
        config = TeacherConfig(
            data=Path(data), split=split, subset=subset, subset_seed=subset_seed, out=Path(out), arch=arch, width=width,
            head=head,
            iters=iters or DEFAULT_ITERS,
            batch_size=batch_size, lr=lr or DEFAULT_LR, min_size=min_size, max_size=max_size,
            anchor_preset=anchor_preset, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios,
            rpn_channels=rpn_channels, init_from=Path(init_from) if init_from else None, flip=flip,
            eval_every=eval_every, eval_split=eval_split, eval_max_images=eval_max_images,
            checkpoint_every=checkpoint_every, seed=seed, device=device, workers=workers, overwrite=overwrite,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(format_summary(train_teacher(config)))


@main.command("evaluate")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Teacher or student checkpoint (model.pt).")
@click.option("--data", required=True, type=click.Path(exists=True), help="Dataset root (VOC, COCO, Caltech or image folder layout).")
@click.option("--split", default="test", show_default=True, help="Split of --data to score.")
@click.option("--metrics", default="voc,coco,recall", show_default=True, help="Any of voc,coco,recall,caltech.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--plots", default=None, type=click.Path(file_okay=False), help="Write PNG plots into this folder.")
@click.option("--max-images", default=None, type=click.IntRange(min=1), help="Score only the first N images of the split (default: all).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes decoding images.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@click.option("--profile/--no-profile", default=True, show_default=True, help="Measure GFLOPs and ms/image.")
@click.option("--score-thresh", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Detection score threshold [default: the checkpoint's, 0.05]. mAP ranks detections: 0.001 "
                   "scores an under-confident classifier that 0.05 would cut off entirely.")
@click.option("--detections", default=None, type=click.Path(dir_okay=False),
              help="Also write the detections here as COCO results [{image_id, file_name, category_id, bbox: "
                   "[x, y, w, h], score}], original pixels. image_id: the dataset's ids when all are integers "
                   "(COCO data), else 1..N in split order (VOC, folders); category_id k+1 is the model's k-th "
                   "class (COCO data: categories in id order, renumbered 1..K); file_name is relative to --data.")
def evaluate_command(model_path, data, split, metrics, out, plots, max_images, batch_size, workers, device,
                     profile, score_thresh, detections) -> None:
    """Evaluate a checkpoint: proposal recall, VOC mAP, COCO AP, Caltech miss rate, parameters, GFLOPs, speed."""
    from pathlib import Path

    from mimicdet.detection.evaluate import EvalConfig, run_evaluate

    try:
        config = EvalConfig(
            model=Path(model_path), data=Path(data), split=split, metrics=tuple(metrics.split(",")),
            out=Path(out) if out else None, plots=Path(plots) if plots else None, max_images=max_images,
            device=device, batch_size=batch_size, workers=workers, profile=profile, score_thresh=score_thresh,
            detections=Path(detections) if detections else None,
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics") from None
    run_evaluate(config)


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Teacher or student checkpoint (model.pt), or an ONNX file from `mimic export` (with its "
                   ".json sidecar; runs with --backend onnxruntime).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for detections.json (COCO results), images.json (image ids, file names, categories) "
                   "and, with --draw, drawn/.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnxruntime"]),
              help="torch: the checkpoint in PyTorch. onnxruntime: the ONNX file, or the checkpoint exported to a "
                   "temporary ONNX file first (CPU; needs pip install 'mimicdet[export]').")
@click.option("--score-thresh", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Keep detections scoring above this [default: the checkpoint's, 0.05].")
@click.option("--draw", is_flag=True, help="Also write a copy of each image with its labelled boxes into OUT/drawn/.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="cpu, cuda or auto (the GPU when there is one); torch backend only.")
def predict_command(images, model_path, out, backend, score_thresh, draw, device) -> None:
    """Detect objects in IMAGES (image files, or folders searched recursively) with a trained model.

    \b
    OUT/detections.json: COCO results [{"image_id", "file_name", "category_id", "bbox": [x, y, w, h], "score"}],
    boxes in original image pixels; category_id k+1 is the model's k-th class (see OUT/images.json, a COCO file
    without annotations: COCO("images.json").loadRes("detections.json") works). Image ids number the images
    found 1..N, inputs in the order given, folders sorted by path; file_name is relative to the folder common
    to all IMAGES. An unreadable file is skipped with a warning. Prints the median ms per image at the end."""
    from pathlib import Path

    from mimicdet.detection.predict import PredictConfig, is_onnx, run_predict

    if is_onnx(Path(model_path)) and backend != "onnxruntime":
        raise click.BadParameter("an .onnx model runs with --backend onnxruntime", param_hint="--backend")
    run_predict(PredictConfig(model=Path(model_path), inputs=tuple(Path(p) for p in images), out=Path(out),
                              backend=backend, score_thresh=score_thresh, draw=draw, device=device),
                echo=click.echo)
# --- end train-teacher / evaluate / predict ---

# --- export (deployable detectors) ---
@main.command("profile")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--size", default="600x1000", show_default=True, callback=lambda ctx, p, v: _hxw(v),
              help="Input height x width, px (e.g. 192x192 or 1000x1500).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Images per call.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "torch-reference", "onnxruntime"]),
              default=("torch",), show_default=True,
              help="torch: the lean inference copy `mimic predict` runs; torch-reference: the model as trained; "
                   "onnxruntime: the `mimic export` ONNX file. Repeat to compare.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Timed rounds.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads (torch and onnxruntime).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the table as JSON here.")
def profile_command(models, size, batch, backends, device, repeats, threads, out) -> None:
    """Time MODELS side by side on this machine: parameters, GFLOPs and ms/image per backend, each model's
    speed-up over the first. Models are timed in turn, round after round, so the ratios hold on a busy machine."""
    from pathlib import Path

    from mimicdet.data.paths import write_json
    from mimicdet.detection.speed import ProfileConfig, format_profile, run_profile

    result = run_profile(ProfileConfig(models=tuple(Path(m) for m in models), size=size, batch=batch,
                                       backends=tuple(backends), device=device, repeats=repeats, threads=threads))
    click.echo(format_profile(result))
    if out:
        write_json(out, result)


def _hxw(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HEIGHTxWIDTH in pixels, e.g. 600x1000, got {value!r}") from None
    return h, w


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript"]), help="File format.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write; FILE.json gets the sidecar.")
@click.option("--height", default=None, type=click.IntRange(min=1),
              help="Fix the input height, px (give --width too): the file then takes exactly this size, smaller "
                   "images zero-padded into it, larger ones refused [default: dynamic height, any size].")
@click.option("--width", default=None, type=click.IntRange(min=1),
              help="Fix the input width, px (give --height too) [default: dynamic width, any size].")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(16, 20), help="ONNX opset.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the written file on two seeded inputs (at two sizes when dynamic) and compare with PyTorch "
                   "before keeping it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE and FILE.json.")
def export_command(checkpoint, fmt, out, height, width, opset, verify, overwrite) -> None:
    """Export a detector checkpoint (teacher or student) as ONNX or TorchScript.

    \b
    The file holds all of predict() for one image [1,3,H,W] (normalised, zero-padded right/bottom), including
    RPN NMS, RoIAlign / PS-RoIAlign and class-wise NMS. Outputs: boxes [D,4], scores [D], labels [D] (int64),
    proposals [R,4], proposal_scores [R]; boxes in input pixels (head "none": detections = proposals).
    \b
    Input size: by default H and W are dynamic (any size), so the file takes every image of the checkpoint's
    dataset: shorter side min_size, longer side at most max_size (times the input scale), zero-padded to a
    multiple of the size divisor. It is checked against PyTorch at two sizes (e.g. landscape and portrait).
    With --height and --width together it is made and checked for exactly that one size instead: smaller
    images are padded into it, larger ones refused. The whole input counts as the image. FILE.json's "input"
    says exactly what the file accepts.
    \b
    Left to the caller: resize + normalise + pad the image (detection.export.prepare_input) and map boxes back to
    original pixels (detection.export.postprocess). Scale-mimic students take half-size input (see FILE.json)."""
    from pathlib import Path

    from mimicdet.detection.export import ExportConfig, run_export

    s = run_export(ExportConfig(checkpoint=Path(checkpoint), format=fmt, out=Path(out), height=height, width=width,
                                opset=opset, verify=verify, overwrite=overwrite))
    diff = s["verified_max_abs_diff"]
    checked = "not verified" if diff is None else f"max |diff| vs PyTorch {diff:.2g}"
    click.echo(f"wrote {s['format']} ({s['head']} head, input {'x'.join(map(str, s['input_shape']))}, "
               f"{s['bytes'] / 1e6:.1f} MB, {checked}) -> {s['out']} + {s['sidecar']}")
# --- end export ---

# --- train-family (a width family from one store) ---
@main.command("train-family")
@click.option("--store", required=True, help="Feature store (path or s3:// URL) every width mimics.")
@click.option("--data", required=True, type=click.Path(exists=True), help="Dataset root the store was extracted from.")
@click.option("--split", default="train", show_default=True, help="Split of --data with the labelled images the store was extracted from.")
@click.option("--widths", default="1/2,1/4,1/8", show_default=True, callback=_widths,
              help="Comma-separated width multipliers, each in (0, 1].")
@click.option("--stage", type=click.IntRange(1, 2), default=2, show_default=True,
              help="1: backbone + RPN only; 2: stage 1, then the full detector with two-stage mimic.")
@click.option("--mimic", type=click.Choice(["roi", "map", "none"]), default="roi", show_default=True,
              help="roi: RoI feature mimic; map: whole-map L2; none: from scratch (no teacher signal).")
@click.option("--head", type=click.Choice(["fast-rcnn", "rfcn"]), default="fast-rcnn", show_default=True, help="Stage-2 head.")
@click.option("--iters", default=1000, show_default=True, type=click.IntRange(min=1), help="Stage-1 iterations per width.")
@click.option("--stage2-iters", default=None, type=click.IntRange(min=1), help="Stage-2 iterations [default: half of --iters].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per iteration.")
@click.option("--lr", default=0.02, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate of SGD.")
@click.option("--mimic-weight", default=1.0, show_default=True, type=click.FloatRange(min=0), help="λ1, feature mimic weight.")
@click.option("--logits-weight", default=0.3, show_default=True, type=click.FloatRange(min=0),
              help="Stage-2 logits matching weight (two-stage mimic; 0 with --mimic none).")
@click.option("--rois-per-image", default=64, show_default=True, type=click.IntRange(min=1), help="Teacher proposals per image the mimic loss samples.")
@click.option("--anchor-sizes", default="16,32,64,128", show_default=True, callback=_csv(int), help="RPN anchor sizes in input pixels.")
@click.option("--aspect-ratios", default="0.5,1,2", show_default=True, callback=_csv(float), help="height/width ratios.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every member's initial weights and sampling.")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher model.pt: evaluated too, for the reference point and the speed-ups.")
@click.option("--eval-split", default="test", show_default=True, help="Split scored after training.")
@click.option("--eval-max-images", default=None, type=click.IntRange(min=1), help="Score at most N images of --eval-split (0: all).")
@click.option("--profile-repeats", default=20, show_default=True, type=click.IntRange(min=1),
              help="Timed predict() runs per model (round-robin over the family).")
@click.option("--budget-ms", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Time budget per image: name the widths that meet it.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder; finished widths are skipped when the command is run again.")
@_cache_options
def train_family_command(store, data, split, widths, stage, mimic, head, iters, stage2_iters, batch_size, lr,
                         mimic_weight, logits_weight, rois_per_image, anchor_sizes, aspect_ratios, seed, teacher,
                         eval_split, eval_max_images, profile_repeats, budget_ms, device, workers, out, cache_dir,
                         cache_size) -> None:
    """Train a width family of students from one store; write OUT/family.json, OUT/speed_accuracy.png and a
    table of each width's speed-up, so a width can be picked for a time budget."""
    from pathlib import Path

    from mimicdet.student.family import FamilyConfig, run_train_family

    run_train_family(FamilyConfig(
        store=store, data=Path(data), out=Path(out), widths=widths, split=split, stage=stage, mimic=mimic, head=head,
        iters=iters, stage2_iters=stage2_iters, batch_size=batch_size, lr=lr, mimic_weight=mimic_weight,
        logits_weight=logits_weight, rois_per_image=rois_per_image, anchor_sizes=anchor_sizes,
        aspect_ratios=aspect_ratios, seed=seed, teacher=Path(teacher) if teacher else None, eval_split=eval_split,
        eval_max_images=eval_max_images, profile_repeats=profile_repeats, budget_ms=budget_ms, device=device,
        workers=workers, storage_options=_storage_options(), cache_dir=cache_dir, cache_size=cache_size),
        echo=click.echo)
# --- end train-family ---

# --- end of commands ---

if __name__ == "__main__":
    sys.exit(main())
