"""Final artifacts written atomically (temporary file, then rename) follow the umask like every other file:
tempfile.mkstemp creates 0600 and mkdtemp 0700, and a rename keeps that mode unless it is set first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mimicdet.data.paths import current_umask, follow_umask
from mimicdet.detection.detector import Detector, DetectorConfig, save_detector


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny headless detector (nothing to export but the RPN: quick)."""
    from tests.pipeline_fixtures import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("ckpt") / "teacher.pt", size=64, head="none")


def _write_artifacts(folder: Path, checkpoint: Path) -> list[Path]:
    from mimicdet.detection.export import ExportConfig, run_export
    from mimicdet.detection.metrics.plots import plot_lines

    folder.mkdir()
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=2, width=0.125, head="none"))
    save_detector(folder / "model.pt", model, {"role": "student"})
    out = folder / "m.pt"
    run_export(ExportConfig(checkpoint=checkpoint, format="torchscript", out=out, height=64, width=64, verify=False))
    x = np.linspace(0, 1, 5)
    plot = plot_lines({"a": (x, x)}, folder / "plots" / "p.png", xlabel="x", ylabel="y")
    plain = folder / "plain.txt"
    plain.write_text("written with open()\n")  # what every non-atomic file gets
    return [folder / "model.pt", out, Path(f"{out}.json"), plot, plain]


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_artifacts_follow_the_umask(tmp_path, checkpoint, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    for path in _write_artifacts(tmp_path / "run", checkpoint):
        assert _mode(path) == expected, (path.name, oct(_mode(path)))
    assert current_umask() == mask  # reading it changed nothing


def test_onnx_export_and_coco_results_follow_the_umask(tmp_path, checkpoint, umask):
    pytest.importorskip("onnxruntime")
    from mimicdet.detection.export import ExportConfig, run_export
    from mimicdet.detection.metrics.coco import COCOEvaluator

    umask(0o022)
    out = tmp_path / "m.onnx"
    run_export(ExportConfig(checkpoint=checkpoint, format="onnx", out=out, height=64, width=64, verify=False))
    assert _mode(out) == 0o644 and _mode(Path(f"{out}.json")) == 0o644
    results = COCOEvaluator(classes=["a"]).write_results(tmp_path / "coco" / "results.json")
    assert _mode(results) == 0o644


def test_follow_umask_on_a_mkdtemp_folder(tmp_path, umask):
    import tempfile

    umask(0o027)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    assert _mode(folder) == 0o700
    follow_umask(folder, directory=True)
    assert _mode(folder) == 0o750


def test_synthetic_dataset_folder_follows_the_umask(tmp_path, umask):
    """The synthetic dataset is built in a mkdtemp folder (0700) renamed into place."""
    from mimicdet.data.synthetic import SyntheticConfig, ensure_dataset

    umask(0o022)
    config = SyntheticConfig(out=tmp_path / "synth", train=1, test=0, pool=0, size=64, seed=4, workers=1,
                             progress=False)
    root = Path(ensure_dataset(config, echo=lambda s: None))
    assert _mode(root) == 0o755
    assert _mode(root / "JPEGImages") == 0o755
