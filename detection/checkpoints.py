"""Loading checkpoint files safely: ``torch.load(weights_only=True)`` only, with one clean error.

torch's own message for a refused pickle spans many lines and suggests ``weights_only=False``, which is the
wrong advice for a file that may carry code; the error raised here names the file and the first line only.

Also the file mode of atomically written artifacts (:func:`follow_umask`): ``tempfile.mkstemp`` creates its file
with mode 0600 (``mkdtemp`` its folder with 0700), and the rename keeps that mode, so without it a ``model.pt``,
an export or a plot would be private while everything else a run writes follows the umask.
"""

from __future__ import annotations

import hashlib
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


