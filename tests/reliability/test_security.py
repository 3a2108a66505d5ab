"""Untrusted files: every checkpoint is loaded weights-only, so a pickle carrying code is refused at every entry
point before it runs; checkpoints with missing or foreign keys are refused by name; annotation file names cannot
leave the dataset root (at the CLI too)."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.reliability.helpers import REPO, STUDENT, assert_refused, cli, train_args, tree

PROJECT_CODE = [REPO / "cli.py", *(p for d in ("data", "detection", "pipeline", "store", "student", "benchmarks")
                                   for p in sorted((REPO / d).rglob("*.py")))]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: stands in for any code an attacker would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                         and kw["weights_only"].value is True):
            found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "yaml.load", "eval", "exec", "marshal.loads"):
            found.append(f"{path.name}:{node.lineno} {name}")
        if name in ("np.load", "numpy.load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value:
            found.append(f"{path.name}:{node.lineno} np.load(allow_pickle=True)")
    return found


def test_no_checkpoint_or_file_is_loaded_with_pickle_code_execution():
    assert len(PROJECT_CODE) > 20
    assert [c for p in PROJECT_CODE for c in _unsafe_calls(p)] == []


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose 'model' entry runs code when unpickled, and the marker that code creates."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(str(marker)), "detector_config": {"width": 0.125}, "meta": {}}, path)
    return path, marker


def test_the_payload_is_live(evil):
    """Control: without weights_only the file does run its code, so the refusals below mean something."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def _entry_points(world: Path, evil: Path, tmp: Path) -> dict[str, list]:
    return {
        "extract-teacher --teacher": ["extract-teacher", "--teacher", evil, "--data", world / "voc", "--out",
                                      tmp / "out"],
        "train-student --init": ["train-student", "--store", world / "store", "--data", world / "voc", "--out",
                                 tmp / "out", "--stage", "2", "--init", evil, *STUDENT],
        "evaluate --model": ["evaluate", "--model", evil, "--data", world / "voc", "--split", "test",
                             "--out", tmp / "out"],
        "export": ["export", evil, "--format", "torchscript", "--out", tmp / "out"],
    }


@pytest.mark.parametrize("entry", ["extract-teacher --teacher", "train-student --init", "evaluate --model", "export"])
def test_a_malicious_checkpoint_is_refused_without_running(world, evil, tmp_path, entry):
    path, marker = evil
    args = _entry_points(world, path, tmp_path)[entry]
    assert_refused(cli(*args), 1, rf"{path}: not a readable detector checkpoint \(UnpicklingError: Weights only load "
                                  r"failed")
    assert not marker.exists(), "the payload ran"
    assert tree(tmp_path / "out") is None


def test_a_malicious_resume_checkpoint_in_the_run_folder_is_refused(world, evil, tmp_path):
    path, marker = evil
    out = tmp_path / "run"
    args = train_args(world, world / "store", out)
    args[args.index("--iters") + 1] = "2"
    assert cli(*args).exit_code == 0
    shutil.copy(path, out / "checkpoint.pt")
    text = assert_refused(cli(*args), 1, rf"{out / 'checkpoint.pt'}: not a readable training checkpoint "
                                         r"\(UnpicklingError: Weights only load failed: .*GLOBAL posix\.mkdir")
    assert not marker.exists(), "the payload ran"
    assert "weights_only` set to `False`" not in text  # no advice to load it unsafely


def test_a_malicious_init_from_for_the_teacher_is_refused(world, tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "googlenet.pth"
    torch.save({"conv1.conv.weight": Payload(str(marker))}, path)
    assert_refused(cli("train-teacher", "--data", world / "voc", "--out", tmp_path / "t", "--init-from", path,
                       "--iters", "1", "--workers", "0"),
                   1, rf"{path}: not a readable state dict \(UnpicklingError")
    assert not marker.exists()


@pytest.mark.parametrize("filename", ["../../../etc/passwd", "/etc/hostname", "sub/../../Annotations/train-0000.xml"])
def test_an_annotation_cannot_point_outside_the_dataset_at_the_cli(world, tmp_path, filename):
    data = Path(shutil.copytree(world / "voc", tmp_path / "voc"))
    xml = data / "Annotations" / "train-0003.xml"
    xml.write_text(xml.read_text().replace("<filename>train-0003.png</filename>", f"<filename>{filename}</filename>"))
    for args in (["extract-teacher", "--teacher", world / "teacher.pt", "--data", data, "--out", tmp_path / "out"],
                 ["evaluate", "--model", world / "teacher.pt", "--data", data, "--split", "train"]):
        assert_refused(cli(*args), 1, rf"train-0003\.xml: <filename> '{filename}' must name a file inside "
                                      rf".*JPEGImages")
    assert tree(tmp_path / "out") is None
