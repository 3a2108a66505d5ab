"""Loading checkpoint files safely: ``torch.load(weights_only=True)`` only, with one clean error.

torch's own message for a refused pickle spans many lines and suggests ``weights_only=False``, which is the
wrong advice for a file that may carry code; the error raised here names the file and the first line only.

Also the file mode of atomically written artifacts (:func:`follow_umask`): ``tempfile.mkstemp`` creates its file
with mode 0600 (``mkdtemp`` its folder with 0700), and the rename keeps that mode, so without it a ``model.pt``,
an export or a plot would be private while everything else a run writes follows the umask.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import torch

from mimicdet.data.errors import DataError


def load_weights_only(path: str | Path, *, what: str = "checkpoint", hint: str = "", map_location: Any = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, refused globals
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        reason = lines[0]
        if reason.startswith("Weights only load failed"):  # not torch's advice to load it unsafely
            blocked = [ln for ln in lines if "GLOBAL" in ln or "global" in ln]
            reason = "Weights only load failed: the file holds pickled objects, not plain tensors" + (
                f" ({blocked[0]})" if blocked else ""
            )
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {reason})" + (f"; {hint}" if hint else "")) from None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: how stores, exports and family reports name the checkpoint they came from."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
