"""Where outputs may go, and how they are written.

An output location must never be, or contain, a file or folder it is made from, because replacing the output
(``--overwrite``) would then delete the input. Every output file is written atomically (:func:`atomic_path`):
readers see the old file or the new one, never a torn one, with the mode ``open()`` would have given it."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read once per call without changing it where Linux allows (``/proc/self/status``);
    elsewhere set to 0o077 and straight back under a lock, so a file another thread creates in between comes out
    more private, never more open."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def follow_umask(path: str | Path, *, directory: bool = False) -> None:
    """Give ``path``, made by ``tempfile.mkstemp`` (mode 0600) or, with ``directory``, ``tempfile.mkdtemp`` (0700),
    the mode ``open()`` or ``mkdir()`` would have given it: 0o666 (0o777) less the umask. Call it on the temporary
    name, before the rename that puts the artifact in place."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; when the block ends without an error it replaces ``path``
    (``fsync``: flushed to disk first, for files a crash must not lose), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        follow_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any, *, indent: int = 2) -> None:
    """``obj`` as JSON (plain types; others through ``str``) at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
