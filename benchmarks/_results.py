"""Writing a benchmark's JSON report atomically (a temp file, then a rename), so a killed run leaves no torn file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
