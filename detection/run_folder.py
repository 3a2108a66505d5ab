"""A run folder holds one run: claim it, know it again, resume it, replace it.

Every command that writes a folder of results (train-teacher, train-student, train-family, demo) keeps an
identity file there: the settings that make the run what it is. Running the same command again resumes; running a
different one is refused with the first differences named, unless ``--overwrite`` replaces the run (only its own
files: a folder may hold other things). The trainer's files are named here so every caller clears the same set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from mimicdet.data.paths import write_json

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.jsonl"
MODEL_NAME = "model.pt"
TENSORBOARD_NAME = "tensorboard"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, EVAL_NAME, MODEL_NAME)

OVERWRITE_ADVICE = "pass --overwrite to replace it or choose another --out"


def clear_run_files(out: Path, names: Sequence[str] = ()) -> None:
    """Removes what a training run writes in ``out`` (RUN_FILES, TensorBoard logs and ``names``), never anything
    else the folder may hold: ``--overwrite`` replaces a run, not a folder."""
    for name in (*RUN_FILES, *names):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TENSORBOARD_NAME, ignore_errors=True)


def differences(old: Any, new: Any, ignore: Iterable[str] = (), prefix: str = "") -> list[str]:
    """``"key.sub: old -> new"`` for every leaf that differs between two JSON-like values; top-level keys in
    ``ignore`` do not count."""
    if isinstance(old, dict) and isinstance(new, dict):
        skip = set(ignore)
        out: list[str] = []
        for k in sorted((set(old) | set(new)) - skip):
            out += differences(old.get(k), new.get(k), prefix=f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def claim_run_folder(
    folder: Path,
    identity_name: str,
    identity: dict,
    *,
    ignore: Iterable[str] = (),
    overwrite: bool = False,
    what: str = "a run",
    advice: str = OVERWRITE_ADVICE,
) -> None:
    """Makes ``folder`` this run's: refuses one whose ``identity_name`` file differs from ``identity`` outside the
    ``ignore`` keys (which may change between runs, such as the iteration count or the device), and one that holds
    a trainer's files without an identity; otherwise writes ``identity`` there (atomically). ``overwrite`` first
    clears the run's files instead of refusing."""
    folder = Path(folder)
    path = folder / identity_name
    identity = json.loads(json.dumps(identity, default=str))  # compare as it is stored
    if overwrite:
        clear_run_files(folder, [identity_name])
    elif path.exists():
        diffs = differences(json.loads(path.read_text()), identity, ignore)
        if diffs:
            shown = "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
            raise FileExistsError(f"{folder} holds {what} made with other settings ({shown}); {advice}")
    elif any((folder / name).exists() for name in (CHECKPOINT_NAME, MODEL_NAME)):
        raise FileExistsError(f"{folder} holds a checkpoint but no {identity_name}; {advice}")
    write_json(path, identity, indent=1)
