"""`mimic` console script (also `python cli.py ...`): parses options into config dataclasses and calls one
function per command. No logic lives here."""

from __future__ import annotations

import sys

import click

from data.errors import DataError, StoreError


class _Group(click.Group):
    """Turns the errors we raise for bad input into clean one-line messages (exit code 1, no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DataError, StoreError, FileNotFoundError, FileExistsError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """mimicdet: train very efficient detectors by mimicking a big teacher (Li, Jin, Yan, CVPR 2017).

    Offline pipeline: train-teacher -> extract-teacher (feature store) -> train-student -> evaluate.
    """


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
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=64), help="Image side, px.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--preview", default=0, show_default=True, type=click.IntRange(min=0),
              help="Draw this many train images with boxes under OUT/preview/.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="0: one per core.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset at OUT made with other parameters.")
def make_data_synthetic(out, train, test, pool, size, seed, preview, workers, overwrite) -> None:
    """Built-in dataset: MNIST digits and LFW faces pasted on photo backgrounds (deterministic)."""
    from pathlib import Path

    from data.synthetic import SyntheticConfig, ensure_dataset

    ensure_dataset(SyntheticConfig(out=Path(out), train=train, test=test, pool=pool, size=size, seed=seed,
                                   preview=preview, workers=workers, overwrite=overwrite), echo=click.echo)


@main.command("demo")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="A VOC dataset to use instead of the built-in one.")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder; the built-in dataset goes to OUT/data.")
def demo(data, out) -> None:
    """End-to-end demo on the built-in dataset (for now: make and summarise the data)."""
    from pathlib import Path

    from data.summary import describe_voc
    from data.synthetic import SyntheticConfig, ensure_dataset

    if data is not None:
        click.echo(describe_voc(Path(data)))
    else:
        ensure_dataset(SyntheticConfig(out=Path(out) / "data"), echo=click.echo)
# --- end make-data / demo ---

# --- inspect-store / verify-store (feature store) ---
@main.command("inspect-store")
@click.argument("store")
def inspect_store_command(store) -> None:
    """Print a feature store's manifest, size on disk, compression ratio and completion.

    STORE is a path or an fsspec URL (s3://bucket/prefix; $MIMICDET_S3_ENDPOINT sets the endpoint)."""
    from data.featurestore import describe_store

    click.echo(describe_store(store))


@main.command("verify-store")
@click.argument("store")
@click.option("--data", "data_root", type=click.Path(exists=True), default=None,
              help="Dataset the store should have been made from (checks ids, digest, classes).")
@click.option("--split", default=None, help="Split of --data (required with --data).")
def verify_store_command(store, data_root, split) -> None:
    """Check every shard checksum and completion marker, decode every chunk, look for NaN/Inf; exit 1 on any problem."""
    from pathlib import Path

    from data.featurestore import VerifyStoreConfig, run_verify

    if (data_root is None) != (split is None):
        raise click.BadParameter("give --data and --split together", param_hint="--data/--split")
    report = run_verify(VerifyStoreConfig(store=store, data_root=Path(data_root) if data_root else None, split=split))
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)
# --- end inspect-store / verify-store ---

# --- end of commands ---

if __name__ == "__main__":
    sys.exit(main())
