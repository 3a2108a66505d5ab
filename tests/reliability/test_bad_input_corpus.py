"""A corpus of malformed inputs, each run through the real CLI: malformed datasets (VOC, COCO), stores and teacher
checkpoints that do not belong, and malformed command lines. Every case asserts the exit code (1 for bad input,
2 for a bad command line), a message naming the file or option and what was expected, no traceback, and no
partial output: the --out store or run folder is not created, or is left exactly as it was."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torchvision

from mimicdet.store import create_store, open_store
from mimicdet.pipeline.extract import ExtractConfig, run_extract
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher
from tests.reliability.helpers import STUDENT, assert_refused, cli, tree


@dataclass
class Case:
    args: list
    code: int
    patterns: list[str]
    out: Path | None = None  # must not exist afterwards, or be unchanged when it existed before


def _voc(world: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(world / "voc", tmp / "voc"))


def _extract(world: Path, data: Path, tmp: Path, *extra) -> list:
    return ["extract-teacher", "--teacher", world / "teacher.pt", "--data", data, "--out", tmp / "out",
            "--proposals", "10", *extra]


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, count))


def _xml(data: Path, image_id: str = "train-0002") -> Path:
    return data / "Annotations" / f"{image_id}.xml"


def voc_case(mutate: Callable[[Path], None], *patterns: str, split: str = "train") -> Callable:
    def build(world: Path, tmp: Path) -> Case:
        data = _voc(world, tmp)
        mutate(data)
        return Case(_extract(world, data, tmp, "--split", split), 1, list(patterns), tmp / "out")

    return build


DATASET: dict[str, Callable[[Path, Path], Case]] = {
    "voc-broken-xml": voc_case(lambda d: _xml(d).write_text("<annotation><filename>train-0002.png</filename>"),
                               r"train-0002\.xml: malformed XML \(.*line 1"),
    "voc-missing-bndbox": voc_case(lambda d: _xml(d).write_text(re.sub(r"<bndbox>.*?</bndbox>", "",
                                                                       _xml(d).read_text(), count=1)),
                                   r"train-0002\.xml: object 0: missing <bndbox>"),
    "voc-non-numeric-coordinate": voc_case(lambda d: _xml(d).write_text(re.sub(r"<xmin>\d+</xmin>", "<xmin>ten</xmin>",
                                                                               _xml(d).read_text(), count=1)),
                                           r"train-0002\.xml: object 0 <bndbox>: <xmin> must be a number, got 'ten'"),
    "voc-missing-coordinate": voc_case(lambda d: _xml(d).write_text(re.sub(r"<ymax>\d+</ymax>", "",
                                                                           _xml(d).read_text(), count=1)),
                                       r"train-0002\.xml: object 0 <bndbox>: missing <ymax>"),
    "voc-missing-class-name": voc_case(lambda d: _xml(d).write_text(re.sub(r"<name>\w+</name>", "<name> </name>",
                                                                           _xml(d).read_text(), count=1)),
                                       r"train-0002\.xml: object 0: missing <name>"),
    "voc-bad-difficult": voc_case(lambda d: _edit(_xml(d), "<difficult>0</difficult>", "<difficult>yes</difficult>"),
                                  r"train-0002\.xml: object 0: <difficult> must be 0 or 1, got 'yes'"),
    "voc-non-numeric-size": voc_case(lambda d: _edit(_xml(d), "<width>64</width>", "<width>wide</width>"),
                                     r"train-0002\.xml: <size>: <width> must be a number, got 'wide'"),
    "voc-wrong-root-element": voc_case(lambda d: _xml(d).write_text("<annot><filename>x.png</filename></annot>"),
                                       r"train-0002\.xml: root element must be <annotation>, got <annot>"),
    "voc-missing-annotation": voc_case(lambda d: _xml(d).unlink(), r"train-0002\.xml: annotation file not found"),
    "voc-missing-image": voc_case(lambda d: (d / "JPEGImages" / "train-0002.png").unlink(),
                                  r"train-0002\.xml: <filename> 'train-0002\.png': image .*train-0002\.png not found"),
    "voc-zero-byte-image": voc_case(lambda d: (d / "JPEGImages" / "train-0002.png").write_bytes(b""),
                                    r"train-0002\.png: cannot read image header"),
    "voc-text-as-image": voc_case(lambda d: (d / "JPEGImages" / "train-0002.png").write_text("not a png"),
                                  r"train-0002\.png: cannot read image header"),
    # The header survives, so the dataset reads; the pixels fail at extraction, where no shard was complete yet.
    "voc-truncated-png": voc_case(
        lambda d: (d / "JPEGImages" / "train-0002.png").write_bytes(
            (d / "JPEGImages" / "train-0002.png").read_bytes()[:300]),
        r"train-0002\.png: cannot decode image \(image file is truncated", r"nothing was kept at"),
    "voc-unknown-class": voc_case(lambda d: _xml(d).write_text(re.sub(r"<name>\w+</name>", "<name>green</name>",
                                                                      _xml(d).read_text(), count=1)),
                                  r"train-0002\.xml: object 0: class 'green' is not one of \['blue', 'red'\]"),
    "voc-duplicate-ids-in-split": voc_case(
        lambda d: (d / "ImageSets/Main/train.txt").write_text("train-0000\ntrain-0001\ntrain-0000\n"),
        r"train\.txt: line 3: duplicate image id 'train-0000' \(first on line 1\)"),
    "voc-empty-split-file": voc_case(lambda d: (d / "ImageSets/Main/train.txt").write_text("\n"),
                                     r"train\.txt: split file lists no image ids"),
    "voc-missing-split-file": voc_case(lambda d: None, r"val\.txt: split file not found \(splits here: pool, test, "
                                                       r"train\)", split="val"),
    "voc-id-with-a-path": voc_case(lambda d: (d / "ImageSets/Main/train.txt").write_text("../train-0000\n"),
                                   r"train\.txt: line 1: image id '\.\./train-0000' must be a plain file stem"),
    "voc-filename-escapes-root": voc_case(lambda d: _edit(_xml(d), "train-0002.png", "../../teacher.pt"),
                                          r"train-0002\.xml: <filename> '\.\./\.\./teacher\.pt' must name a file "
                                          r"inside .*JPEGImages"),
    "voc-absolute-filename": voc_case(lambda d: _edit(_xml(d), "train-0002.png", "/etc/hostname"),
                                      r"train-0002\.xml: <filename> '/etc/hostname' must name a file inside"),
    "voc-missing-images-folder": voc_case(lambda d: shutil.rmtree(d / "JPEGImages"),
                                          r"voc: not a VOC dataset, missing folder\(s\) JPEGImages/"),
    "unrecognised-layout": voc_case(lambda d: (shutil.rmtree(d / "Annotations"), shutil.rmtree(d / "JPEGImages")),
                                    r"voc: cannot recognise the dataset layout; looked for VOC"),
}


# ------------------------------------------------------------------------------------------------ COCO


def _coco(world: Path, tmp: Path, edit: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
    """A COCO copy of the world's 8 train images: <root>/annotations/instances_train.json + <root>/train/."""
    root = tmp / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(world / "voc" / "JPEGImages", root / "train")
    doc = {
        "images": [{"id": k, "file_name": f"train-{k:04d}.png", "width": 64, "height": 64} for k in range(8)],
        "categories": [{"id": 1, "name": "blue"}, {"id": 2, "name": "red"}],
        "annotations": [{"id": k, "image_id": k, "category_id": 1 + k % 2, "bbox": [4, 4, 20, 20], "iscrowd": 0}
                        for k in range(8)],
    }
    if edit:
        edit(doc)
    (root / "annotations" / "instances_train.json").write_text(text if text is not None else json.dumps(doc))
    return root


def coco_case(edit: Callable[[dict], None] | None, *patterns: str, text: str | None = None) -> Callable:
    def build(world: Path, tmp: Path) -> Case:
        return Case(_extract(world, _coco(world, tmp, edit, text), tmp), 1, list(patterns), tmp / "out")

    return build


J = r"instances_train\.json"
DATASET |= {
    "coco-malformed-json": coco_case(None, rf"{J}: malformed JSON at line 1 column \d+", text='{"images": [}'),
    "coco-no-images-key": coco_case(lambda d: d.pop("images"), rf"{J}: field 'images' must be a list, got NoneType"),
    "coco-annotation-without-bbox": coco_case(lambda d: d["annotations"][3].pop("bbox"),
                                              rf"{J}: annotations\[3\]: missing field 'bbox'"),
    "coco-bbox-of-three-numbers": coco_case(lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
                                            rf"{J}: annotations\[0\]: field 'bbox' must be 4 numbers \[x, y, w, h\], "
                                            r"got \[1, 2, 3\]"),
    "coco-bbox-with-a-string": coco_case(lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]),
                                         rf"{J}: annotations\[0\]: field 'bbox' must be 4 numbers"),
    "coco-unknown-category-id": coco_case(lambda d: d["annotations"][2].update(category_id=7),
                                          rf"{J}: annotations\[2\]: category_id 7 is not in 'categories' "
                                          r"\(ids \[1, 2\]\)"),
    "coco-duplicate-image-ids": coco_case(lambda d: d["images"][5].update(id=4),
                                          rf"{J}: images\[5\]: duplicate image id 4"),
    "coco-annotation-of-an-unlisted-image": coco_case(lambda d: d["annotations"][1].update(image_id=99),
                                                      rf"{J}: annotations\[1\]: image_id 99 is not in 'images'"),
    "coco-file-name-escapes-root": coco_case(lambda d: d["images"][0].update(file_name="../annotations/x.png"),
                                             rf"{J}: image 0: file_name '\.\./annotations/x\.png' must name a file "
                                             r"inside"),
    "coco-missing-image-file": coco_case(lambda d: d["images"][6].update(file_name="gone.png"),
                                         rf"{J}: image 6: file_name 'gone\.png': image .*gone\.png not found"),
    "coco-other-classes-than-the-teachers": coco_case(
        lambda d: d.update(categories=[{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]),
        rf"{J}: categories \(in id order\) are \['cat', 'dog'\], but classes \['blue', 'red'\] were asked for"),
}


# ------------------------------------------------------------------------------ stores and teachers


def _train(world: Path, tmp: Path, *extra, store: Path | None = None, data: Path | None = None) -> list:
    return ["train-student", "--store", store or world / "store", "--data", data or world / "voc", "--out",
            tmp / "out", *STUDENT, *extra]


def _teacher_file(world: Path, tmp: Path, change: Callable[[dict], object]) -> Path:
    ckpt = torch.load(world / "teacher.pt", weights_only=True)
    payload = change(ckpt)
    torch.save(ckpt if payload is None else payload, tmp / "teacher.pt")
    return tmp / "teacher.pt"


def teacher_case(change: Callable[[dict], object], *patterns: str) -> Callable:
    def build(world: Path, tmp: Path) -> Case:
        path = _teacher_file(world, tmp, change)
        return Case(["extract-teacher", "--teacher", path, "--data", world / "voc", "--out", tmp / "out"], 1,
                    [re.escape(str(path)), *patterns], tmp / "out")

    return build


def _resnet() -> dict:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()  # random weights: nothing is downloaded


def _store_of_other_sizes(world: Path, tmp: Path) -> Case:
    data = make_squares_voc(tmp / "voc80", {"train": 8}, size=80)  # the same ids, other image sizes
    return Case(_train(world, tmp, data=data), 1, [r"store was made from another dataset: store dataset\.digest "
                                                   r"'\w+' != dataset '\w+'"], tmp / "out")


def _verify_against_other_dataset(world: Path, tmp: Path) -> Case:
    data = make_squares_voc(tmp / "voc80", {"train": 8}, size=80)
    return Case(["verify-store", world / "store", "--data", data, "--split", "train"], 1,
                [r"FAILED", r"store dataset\.name 'voc' != dataset 'voc80'", r"store dataset\.digest '\w+' != "
                 r"dataset '\w+'"])


def _unlabelled_of_another_teacher(world: Path, tmp: Path) -> Case:
    other = make_tiny_teacher(tmp / "other.pt", seed=1)
    run_extract(ExtractConfig(teacher=other, data=world / "voc", split="pool", out=str(tmp / "pool2"), shard_size=4,
                              proposals=24, loader_workers=0, progress=False))
    return Case(_train(world, tmp, "--unlabeled", tmp / "pool2", "--unlabeled-data", world / "voc",
                       "--unlabeled-split", "pool", "--batch-size", "4"), 1,
                [re.escape(f"{tmp / 'pool2'}: made by teacher"), r"both stores must come from the same teacher"],
                tmp / "out")


def _incomplete_store(world: Path, tmp: Path) -> Case:
    store = Path(shutil.copytree(world / "store", tmp / "store"))
    (store / "_complete" / "shard-00001.json").unlink()
    return Case(_train(world, tmp, store=store), 1, [re.escape(f"{store}: store is incomplete (1/2 shards)"),
                                                     r"--resume"], tmp / "out")


def _not_a_store(world: Path, tmp: Path) -> Case:
    (tmp / "empty").mkdir()
    return Case(_train(world, tmp, store=tmp / "empty"), 1, [re.escape(f"{tmp / 'empty'}: not a feature store "
                                                                       "(no manifest.json)")], tmp / "out")


DATASET |= {
    "store-of-another-split": lambda w, t: Case(_train(w, t, store=w / "pool"), 1, [
        r"store has no record for 8 of 8 images of voc/train \(first: 'train-0000'\)"], t / "out"),
    "store-of-another-dataset": _store_of_other_sizes,
    "verify-store-against-another-dataset": _verify_against_other_dataset,
    "unlabelled-store-of-another-teacher": _unlabelled_of_another_teacher,
    "incomplete-store": _incomplete_store,
    "not-a-store": _not_a_store,
    "teacher-is-a-text-file": lambda w, t: Case(
        ["extract-teacher", "--teacher", _text(t / "teacher.pt"), "--data", w / "voc", "--out", t / "out"], 1,
        [r"teacher\.pt: not a readable detector checkpoint \(UnpicklingError"], t / "out"),
    "teacher-with-missing-keys": teacher_case(lambda c: [c["model"].pop(k) for k in list(c["model"])[:3]] and None,
                                              r"field 'model' does not fit its detector_config .*missing keys "
                                              r"\['backbone\.\w+"),
    "teacher-of-another-architecture": teacher_case(lambda c: c.update(model=_resnet()),
                                                    r"missing keys \[.*\] \(\d+\), unexpected keys "
                                                    r"\['bn1\.bias', 'bn1\.num_batches_tracked'"),
    "teacher-is-a-bare-state-dict": teacher_case(lambda c: _resnet(),
                                                 r"expected a dict with 'model' and 'detector_config', got "
                                                 r"\['bn1\.bias'"),
    "teacher-without-preprocessing": teacher_case(lambda c: c["meta"].pop("preprocess") and None,
                                                  r"checkpoint meta has no 'preprocess'; was it written by "
                                                  r"`mimic train-teacher`\?"),
}


def _text(path: Path) -> Path:
    path.write_text("model weights: see the wiki\n")
    return path


@pytest.mark.parametrize("name", DATASET)
def test_malformed_dataset_store_or_checkpoint(world, tmp_path, name):
    case = DATASET[name](world, tmp_path)
    before = tree(case.out) if case.out else None
    assert_refused(cli(*case.args), case.code, *case.patterns)
    if case.out:
        assert tree(case.out) == before, f"{case.out} was changed"


# ------------------------------------------------------------------------------------------ command lines


@pytest.fixture(scope="module")
def stride32(world, tmp_path_factory) -> Path:
    """The world's train store re-laid with features.stride 32 (as a stride-32 teacher would have made it)."""
    url = tmp_path_factory.mktemp("stride32") / "store"
    src = open_store(world / "store")
    writer = create_store(url, replace(src.manifest, stride=32))
    for s in range(src.manifest.num_shards):
        writer.write_shard(s, src.read_shard(s))
    return url


def _run_folder_of_another_config(world: Path, tmp: Path) -> Case:
    r = cli(*_train(world, tmp, "--iters", "1"))
    assert r.exit_code == 0, r.output
    return Case(_train(world, tmp, "--iters", "1", "--mimic", "map"), 1,
                [rf"{tmp / 'out'} holds a run made with other settings \(mimic: 'roi' -> 'map'\); pass --overwrite"], tmp / "out")


def _resume_against_changed_data(world: Path, tmp: Path) -> Case:
    r = cli("extract-teacher", "--teacher", world / "teacher.pt", "--data", world / "voc", "--out", tmp / "out",
            "--proposals", "10", "--split", "test")
    assert r.exit_code == 0, r.output
    data = _voc(world, tmp)
    (data / "ImageSets/Main/test.txt").write_text("test-0000\ntest-0001\n")
    return Case(_extract(world, data, tmp, "--split", "test", "--resume"), 1,
                [r"cannot resume, the store was made with other settings: store dataset\.digest",
                 r"Use --overwrite"], tmp / "out")


COMMAND_LINES: dict[str, Callable[[Path, Path], Case]] = {
    "unknown --mimic": lambda w, t: Case(_train(w, t, "--mimic", "fitnet"), 2, [
        r"Invalid value for '--mimic': 'fitnet' is not one of 'roi', 'map', 'logits', 'none'"], t / "out"),
    "--width 0": lambda w, t: Case(_train(w, t, "--width", "0"), 2, [
        r"Invalid value for '--width': width must be in \(0, 1\], got '0'"], t / "out"),
    "--width 3": lambda w, t: Case(_train(w, t, "--width", "3"), 2, [
        r"Invalid value for '--width': width must be in \(0, 1\], got '3'"], t / "out"),
    "--width abc": lambda w, t: Case(_train(w, t, "--width", "abc"), 2, [
        r"Invalid value for '--width': expected a width like 1/4 or 0\.25, got 'abc'"], t / "out"),
    "--stage 3": lambda w, t: Case(_train(w, t, "--stage", "3"), 2, [
        r"Invalid value for '--stage': 3 is not in the range 1<=x<=2"], t / "out"),
    "--resume with --overwrite": lambda w, t: Case(_extract(w, w / "voc", t, "--resume", "--overwrite"), 2, [
        r"--resume/--overwrite.*--resume and --overwrite exclude each other"], t / "out"),
    "--mimic logits with --stage 1": lambda w, t: Case(_train(w, t, "--mimic", "logits"), 1, [
        r"--mimic logits needs --stage 2"], t / "out"),
    "--batch-size 0": lambda w, t: Case(_train(w, t, "--batch-size", "0"), 2, [
        r"Invalid value for '--batch-size': 0 is not in the range x>=1"], t / "out"),
    "missing --store": lambda w, t: Case(["train-student", "--data", w / "voc", "--out", t / "out"], 2, [
        r"Missing option '--store'"], t / "out"),
    "nonexistent --teacher": lambda w, t: Case(
        ["extract-teacher", "--teacher", t / "nope.pt", "--data", w / "voc", "--out", t / "out"], 2,
        [r"Invalid value for '--teacher': .*nope\.pt is not a file \(a model\.pt from train-teacher, or "
         r"torchvision:NAME\)"], t / "out"),
    "unknown torchvision teacher": lambda w, t: Case(
        ["extract-teacher", "--teacher", "torchvision:yolo", "--data", w / "voc", "--out", t / "out"], 2,
        [r"Invalid value for '--teacher': 'torchvision:yolo' is not a torchvision teacher; expected one of "
         r"torchvision:fasterrcnn_resnet50_fpn, "], t / "out"),
    "--unlabeled without --unlabeled-data": lambda w, t: Case(_train(w, t, "--unlabeled", w / "pool"), 1, [
        r"--unlabeled needs --unlabeled-data: the folder holding those images"], t / "out"),
    "store stride != student stride": lambda w, t: Case(_train(w, t, store=t / "stride32"), 1, [
        r"store features\.stride 32 != student stride 16 at input scale 1\.0 \(scale mimic needs --scale-mimic\)"],
        t / "out"),
    "--scale-mimic against a store whose stride mismatches": lambda w, t: Case(
        _train(w, t, "--scale-mimic", store=t / "stride32"), 1, [
            r"store features\.stride 32 != student stride 8 at input scale 0\.5"], t / "out"),
    "--lr 0": lambda w, t: Case(_train(w, t, "--lr", "0"), 2, [
        r"Invalid value for '--lr': 0\.0 is not in the range x>0"], t / "out"),
    "--init with --stage 1": lambda w, t: Case(_train(w, t, "--init", w / "teacher.pt"), 1, [
        r"--init .*teacher\.pt starts stage 2 from a stage-1 student; add --stage 2"], t / "out"),
    "--eval-every without --eval-split": lambda w, t: Case(_train(w, t, "--eval-every", "5"), 1, [
        r"--eval-every needs --eval-split"], t / "out"),
    "--eval-split of a missing split": lambda w, t: Case(_train(w, t, "--eval-every", "5", "--eval-split", "val"),
                                                         1, [r"val\.txt: split file not found"], t / "out"),
    "--mimic-weight -1": lambda w, t: Case(_train(w, t, "--mimic-weight", "-1"), 1, [
        r"--mimic-weight must be a number >= 0, got -1\.0"], t / "out"),
    "--subset larger than the split": lambda w, t: Case(_train(w, t, "--subset", "100"), 1, [
        r"--subset must be in \[1, 8\] for voc/train, got 100"], t / "out"),
    "--unlabeled-fraction 1": lambda w, t: Case(_train(w, t, "--unlabeled-fraction", "1"), 2, [
        r"Invalid value for '--unlabeled-fraction': 1\.0 is not in the range 0<=x<1"], t / "out"),
    "--unlabeled-fraction leaving no labelled image": lambda w, t: Case(
        _train(w, t, "--unlabeled", w / "pool", "--unlabeled-data", w / "voc", "--unlabeled-split", "pool",
               "--unlabeled-fraction", "0.9", "--batch-size", "1"), 1,
        [r"--unlabeled-fraction 0\.9 leaves no labelled image in a batch of 1"], t / "out"),
    "--anchor-sizes a,b": lambda w, t: Case(_train(w, t, "--anchor-sizes", "a,b"), 2, [
        r"Invalid value for '--anchor-sizes': expected comma-separated integers, got 'a,b'"], t / "out"),
    "--workers with --scheduler": lambda w, t: Case(
        _extract(w, w / "voc", t, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"), 2,
        [r"--workers starts a local cluster; --scheduler joins one: give one"], t / "out"),
    "--format parquet": lambda w, t: Case(_extract(w, w / "voc", t, "--format", "parquet"), 2, [
        r"Invalid value for '--format': 'parquet' is not one of 'zarr', 'hdf5'"], t / "out"),
    "--shard-size 0": lambda w, t: Case(_extract(w, w / "voc", t, "--shard-size", "0"), 2, [
        r"Invalid value for '--shard-size': 0 is not in the range x>=1"], t / "out"),
    "verify-store --data without --split": lambda w, t: Case(["verify-store", w / "store", "--data", w / "voc"], 2, [
        r"give --data and --split together"]),
    "a run folder of another configuration": _run_folder_of_another_config,
    "--resume against a changed dataset": _resume_against_changed_data,
}


@pytest.mark.parametrize("name", COMMAND_LINES)
def test_malformed_command_line(world, tmp_path, stride32, name):
    (tmp_path / "stride32").symlink_to(stride32)  # read by the stride cases
    case = COMMAND_LINES[name](world, tmp_path)
    before = tree(case.out) if case.out else None
    assert_refused(cli(*case.args), case.code, *case.patterns)
    if case.out:
        assert tree(case.out) == before, f"{case.out} was changed"


def test_the_corpus_is_as_large_as_promised():
    assert len(DATASET) >= 25 and len(COMMAND_LINES) >= 10
