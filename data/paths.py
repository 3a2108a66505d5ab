"""Where outputs may go: an output location must never be, or contain, a file or folder it is made from,
because replacing the output (``--overwrite``) would then delete the input."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL other than a local ``file://`` one."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    text = str(location)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def check_output_apart(option: str, out: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Raise ValueError when ``out`` equals or contains one of ``inputs`` (option name -> path; None skipped).
    URLs are compared as written; local paths after resolving links."""
    for name, given in inputs.items():
        if given is None:
            continue
        if is_url(out) or is_url(given):
            o, i = str(out).rstrip("/"), str(given).rstrip("/")
            same, inside = o == i, i.startswith(o + "/")
        else:
            o, i = local_path(out), local_path(given)
            same, inside = o == i, o in i.parents
        if same or inside:
            relation = "is" if same else "contains"
            raise ValueError(
                f"{option} {out} {relation} the {name} {given}: an output may not hold what it is made from "
                f"(replacing it would delete {given}); choose another {option}"
            )


def check_writable(option: str, path: str | Path, *, folder: bool = False) -> None:
    """Fail before any long computation when ``path`` (a file, or a folder with ``folder``) cannot be written:
    probe its nearest existing folder with a temporary file. Creates nothing that stays."""
    if is_url(path):
        return
    target = local_path(path)
    existing = target if folder else target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    if folder and existing == target and not target.is_dir():
        raise ValueError(f"{option} {path}: is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mimicdet-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write into {existing} ({e.strerror or e})") from None
