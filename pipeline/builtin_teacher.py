"""The teacher shipped for the built-in dataset: the well-trained model a user of the paper already has.

In the paper the teacher is given, not trained in the experiment. Training a teacher that is worth mimicking
takes longer on two CPU cores than the whole demo may, and a briefly trained one has nothing to teach: students
given 750 iterations pass a 400-iteration teacher by themselves (docs/experiments/builtin-teacher.md). So the
repository ships one teacher, made by the recorded command below (``make teacher`` reruns it), and the demo
uses it when its data and teacher budget are the ones it was made with. Its sha256 is checked on every use.

Files in ``pipeline/builtin_teacher/``: ``model.pt`` (the checkpoint ``train-teacher`` wrote), ``run.json`` (its
training configuration, as in any teacher run folder) and ``model.pt.sha256``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mimicdet.data.errors import DataError
from mimicdet.detection.anchors import DEFAULT_ANCHOR_SIZES
from mimicdet.detection.checkpoints import file_sha256

ASSET = Path(__file__).resolve().parent / "builtin_teacher"


@dataclass(frozen=True)
class BuiltinTeacher:
    """The recorded command: the built-in data it trains on and its training budget."""

    # make-data synthetic (the demo's default budget; the teacher reads only the pool split)
    size: int = 192
    train: int = 150
    test: int = 300
    pool: int = 1000
    val: int = 300
    min_object: float = 24.0
    # train-teacher
    split: str = "pool"
    width: float = 0.5
    iters: int = 2500
    batch_size: int = 8
    lr: float = 0.04
    min_size: int = 192
    max_size: int = 320
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    seed: int = 0
    workers: int = 1
    # its learning curve on val (also part of the recorded run: the command is rerun exactly)
    eval_every: int = 500
    eval_images: int = 150

    def commands(self, work: Path) -> list[list[str]]:
        """The two ``mimic`` commands that make the teacher under ``work`` (``work/data``, ``work/teacher``)."""
        data, run = work / "data", work / "teacher"
        return [
            ["mimic", "make-data", "synthetic", "--out", str(data), "--train", str(self.train), "--test",
             str(self.test), "--pool", str(self.pool), "--val", str(self.val), "--size", str(self.size),
             "--min-object", f"{self.min_object:g}"],
            ["mimic", "train-teacher", "--data", str(data), "--split", self.split, "--out", str(run), "--width",
             f"{self.width:g}", "--iters", str(self.iters), "--batch-size", str(self.batch_size), "--lr",
             f"{self.lr:g}", "--min-size", str(self.min_size), "--max-size", str(self.max_size), "--anchor-sizes",
             ",".join(map(str, self.anchor_sizes)), "--seed", str(self.seed), "--workers", str(self.workers),
             "--eval-every", str(self.eval_every), "--eval-split", "val", "--eval-max-images", str(self.eval_images)],
        ]


RECIPE = BuiltinTeacher()


def shipped_teacher(asset: Path = ASSET) -> tuple[Path, dict] | None:
    """``(model.pt, run.json contents)`` of the shipped teacher after checking its sha256; None when the
    checkout has none. A file that does not match its recorded sha256 is refused (a damaged or replaced
    teacher would silently change every student)."""
    model, run, digest = asset / "model.pt", asset / "run.json", asset / "model.pt.sha256"
    if not model.exists():
        return None
    for path in (run, digest):
        if not path.exists():
            raise DataError(f"{path}: missing beside {model}; rerun `make teacher`")
    want = digest.read_text().split()[0]
    got = file_sha256(model)
    if got != want:
        raise DataError(f"{model}: sha256 {got[:16]}... does not match {digest} ({want[:16]}...); the file is damaged "
                        "or was replaced: restore it from the repository or rerun `make teacher`")
    return model, json.loads(run.read_text())


def install(run_dir: Path, asset: Path = ASSET) -> str:
    """Copy a finished teacher run's ``model.pt`` and ``run.json`` into ``asset`` and record the sha256."""
    model = run_dir / "model.pt"
    if not model.exists():
        raise DataError(f"{model}: no finished teacher there")
    asset.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "run.json", asset / "run.json")
    shutil.copyfile(model, asset / "model.pt")
    digest = file_sha256(asset / "model.pt")
    (asset / "model.pt.sha256").write_text(f"{digest}  model.pt\n")
    return digest


def main(argv: list[str] | None = None) -> int:
    """``make teacher``: rerun the recorded commands under WORK (default runs/builtin-teacher), then install."""
    import subprocess
    import sys

    args = sys.argv[1:] if argv is None else argv
    work = Path(args[0] if args else "runs/builtin-teacher")
    for cmd in RECIPE.commands(work):
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    digest = install(work / "teacher")
    print(f"installed {ASSET}/model.pt (sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
