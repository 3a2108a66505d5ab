"""Record a small fixed run of every command and what it produced, to compare two versions of the code.

    python benchmarks/oracle.py --out runs/oracle-before   # writes runs/oracle-before/oracle.json
    python benchmarks/oracle.py --out runs/oracle-after --compare runs/oracle-before/oracle.json

Runs only the public CLI (``mimic ...``), so the same script drives any version whose commands are unchanged:
make-data, train-teacher, extract-teacher, train-student stage 1 and 2, evaluate, demo --quick. Records per
checkpoint a sha256 over its weights (names, dtypes, shapes, bytes), per store the manifest's content sha256, and
every metric the evaluations report. The trainers are deterministic on one CPU, so on the same machine two
versions that behave the same give the same record to the digit; ``--compare`` prints each difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MIMIC = [sys.executable, "-c", "import sys; from importlib.metadata import entry_points; "
         "sys.argv[0] = 'mimic'; sys.exit(entry_points(group='console_scripts')['mimic'].load()())"]


def weights_sha256(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def metrics_of(report: Path) -> dict:
    """The numbers of an evaluation report, without timings (ms/image varies run to run)."""
    r = json.loads(report.read_text())
    keep = {}
    for key, value in r.items():
        if key in ("profile", "environment", "timings_s", "ms_per_image", "timing"):
            continue
        if isinstance(value, (int, float, str)) or value is None:
            keep[key] = value
        elif isinstance(value, dict):
            keep[key] = {k: v for k, v in value.items() if isinstance(v, (int, float)) and "ms" not in k}
    return keep


def run(args: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ mimic {' '.join(args)}\n")
        f.flush()
        subprocess.run([*MIMIC, *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def record(out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "log.txt"
    data, teacher, stores, s1, s2 = (out / p for p in ("data", "teacher", "stores", "s1", "s2"))
    seconds = {}
    seconds["make-data"] = run(["make-data", "synthetic", "--out", str(data), "--train", "24", "--test", "12",
                                "--pool", "24", "--val", "12", "--size", "96", "--seed", "3"], log)
    seconds["train-teacher"] = run(["train-teacher", "--data", str(data), "--split", "pool", "--out", str(teacher),
                                    "--width", "0.25", "--iters", "30", "--batch-size", "4", "--lr", "0.02",
                                    "--min-size", "96", "--max-size", "128", "--workers", "0", "--seed", "0"], log)
    for split in ("train", "pool"):
        seconds[f"extract {split}"] = run(["extract-teacher", "--teacher", str(teacher / "model.pt"), "--data",
                                           str(data), "--split", split, "--out", str(stores / split),
                                           "--proposals", "32", "--shard-size", "8", "--workers", "0"], log)
    common = ["--data", str(data), "--width", "0.125", "--batch-size", "4", "--workers", "0", "--seed", "1",
              "--unlabeled", str(stores / "pool"), "--unlabeled-data", str(data), "--unlabeled-split", "pool",
              "--rois-per-image", "16"]
    seconds["train-student s1"] = run(["train-student", "--store", str(stores / "train"), "--out", str(s1),
                                       "--iters", "20", "--mimic", "roi", "--mimic-norm", "channel", *common], log)
    seconds["train-student s2"] = run(["train-student", "--store", str(stores / "train"), "--out", str(s2),
                                       "--stage", "2", "--init", str(s1 / "model.pt"), "--iters", "10",
                                       "--mimic", "roi", *common], log)
    models = {"teacher": teacher / "model.pt", "s1": s1 / "model.pt", "s2": s2 / "model.pt"}
    evals = {}
    for name, model in models.items():
        report = out / f"eval-{name}.json"
        seconds[f"evaluate {name}"] = run(["evaluate", "--model", str(model), "--data", str(data), "--split",
                                           "test", "--out", str(report), "--no-profile"], log)
        evals[name] = metrics_of(report)
    seconds["demo --quick"] = run(["demo", "--quick", "--out", str(out / "demo"), "--workers", "0"], log)
    demo = json.loads((out / "demo" / "report.json").read_text())
    demo_rows = {row["eval_name"]: {k: v for k, v in row.items()
                                    if k in ("recall@300_iou0.5", "recall@300_iou0.7", "AR@300", "mAP", "coco_AP",
                                             "params", "gflops", "vs_scratch", "vs_scratch_map")}
                 for row in demo["rows"]}
    demo_models = {}
    for row in demo["rows"]:
        demo_models[row["eval_name"]] = weights_sha256(Path(row["model_path"]))
    store_sha = {s: json.loads((stores / s / "manifest.json").read_text()).get("content_sha256")
                 for s in ("train", "pool")}
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "weights_sha256": {k: weights_sha256(v) for k, v in models.items()} | {f"demo {k}": v
                                                                             for k, v in demo_models.items()},
        "store_content_sha256": store_sha,
        "evaluate": evals,
        "demo": demo_rows,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in ("seconds", "timing"):  # wall-clock, not behaviour
                continue
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: {a!r} before, {b!r} now"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path, help="an earlier oracle.json to compare with")
    a = p.parse_args()
    result = record(a.out)
    (a.out / "oracle.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {a.out / 'oracle.json'}")
    if a.compare:
        diffs = differences(json.loads(a.compare.read_text()), result)
        print("\n".join(diffs) if diffs else "identical to the record (timings aside)")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
