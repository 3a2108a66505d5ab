"""Progress bars for long work: tqdm on a terminal; when output goes to a file or a pipe, one plain line at most
every LOG_INTERVAL_S seconds (a bar's carriage-return redraws would fill a log with ~200 bytes per step)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw (``\\r`` + bar) into a line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*, disable: bool = False, stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(**kwargs)`` writing to ``stream`` (stderr): a live bar on a terminal, periodic lines elsewhere."""
    stream = stream or sys.stderr
    if disable or stream.isatty():
        return tqdm(file=stream, disable=disable, **kwargs)
    return tqdm(file=_Lines(stream), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, ascii=True,
                dynamic_ncols=False, ncols=100, **kwargs)
