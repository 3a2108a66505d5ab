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

# --- end of commands ---

if __name__ == "__main__":
    sys.exit(main())
