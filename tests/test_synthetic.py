"""The built-in dataset: determinism, disjoint sources, object sizes, box/content agreement, the VOC round trip,
atomic writes and the CLI. Tiny sizes throughout; rendering in-process costs a few ms per image."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mimicdet.cli import main
from mimicdet.data.records import Dataset, ImageRecord
from mimicdet.data.summary import describe_voc, SIZE_BUCKETS, draw_preview, format_summary, summarize
from mimicdet.data.synthetic import CLASSES, JPEG_QUALITY, SPLITS, SyntheticConfig, ensure_dataset, load_sources, render_image
from mimicdet.data.voc import read_voc

from tests.voc_fixtures import RACCOON
REPO = Path(__file__).resolve().parents[1]


def _tiny(out: Path, **kw) -> SyntheticConfig:
    args = dict(out=out, train=12, test=4, pool=4, val=4, size=128, seed=3, workers=1, progress=False)
    return SyntheticConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    lines: list[str] = []
    root = ensure_dataset(_tiny(tmp_path_factory.mktemp("synth") / "tiny"), echo=lines.append)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _instances(xml: Path) -> tuple[list[str], list[str], str]:
    root = ET.parse(xml).getroot()
    targets = [o.findtext("instance") for o in root.findall("object")]
    distractors = [o.findtext("instance") for o in root.findall("distractor")]
    return targets, distractors, root.findtext("source/background")


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path):
    # 64 images so that workers=2 really starts two processes.
    a = ensure_dataset(_tiny(tmp_path / "a", train=40, test=16, pool=8, val=0, workers=1), echo=lambda s: None)
    b = ensure_dataset(_tiny(tmp_path / "b", train=40, test=16, pool=8, val=0, workers=2), echo=lambda s: None)
    fa, fb = _files(a), _files(b)
    assert len([k for k in fa if k.startswith("JPEGImages")]) == 64
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    c = ensure_dataset(_tiny(tmp_path / "c", train=1, test=0, pool=0, seed=4), echo=lambda s: None)
    assert _files(c)["Annotations/train_000000.xml"] != fa["Annotations/train_000000.xml"]


def test_splits_use_disjoint_source_instances(tiny):
    sources = load_sources()
    allowed = {}
    for split in SPLITS:
        src = sources[split]
        ids = {f"mnist:{i}" for d in range(10) for i in src.digit_ids[d]}
        ids |= {f"lfw:{i}" for i in src.face_ids} | {f"lfw:{i}" for i in src.nonface_ids}
        allowed[split] = (ids, {band_id for band_id, _ in src.bands})
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            assert not allowed[s][0] & allowed[t][0], (s, t)
            assert not allowed[s][1] & allowed[t][1], (s, t)
    # The three bands of a photo tile it exactly: disjoint pixels.
    bands = sorted((b for s in SPLITS for b in sources[s].bands if b[0].startswith("coffee#")), key=lambda b: b[0])
    import skimage.data

    assert np.array_equal(np.concatenate([np.asarray(im) for _, im in bands], axis=1), skimage.data.coffee())

    used = {s: set() for s in SPLITS}
    for split in SPLITS:
        for image_id in (tiny / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            targets, distractors, background = _instances(tiny / "Annotations" / f"{image_id}.xml")
            assert all(targets) and len(targets) >= 1
            assert set(targets + distractors) - {x for x in distractors if "#" in x} <= allowed[split][0]
            assert {x for x in distractors if "#" in x} <= allowed[split][1]
            assert {b for b in background.split("+") if b != "field"} <= allowed[split][1]
            used[split] |= set(targets + distractors)
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            assert not used[s] & used[t], (s, t)


@pytest.fixture(scope="module")
def sample():
    src = load_sources()["train"]
    return [render_image("train", i, seed=0, size=256, sources=src) for i in range(150)]


def test_object_sizes_cover_small_to_large(sample):
    boxes = np.array([p.box for r in sample for p in r.targets], float)
    sizes = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert len(sizes) > 300
    assert (sizes < 32).mean() >= 0.30
    assert (sizes < 16).mean() >= 0.05 and (sizes >= 64).mean() >= 0.15
    assert sizes.min() >= 8 and sizes.max() <= 140
    names = [p.name for r in sample for p in r.targets]
    assert set(names) == set(CLASSES)
    assert min(names.count(c) for c in CLASSES) > 0.15 * len(names)


def test_boxes_lie_inside_the_image_and_tightly_around_the_pasted_object(sample):
    checked = 0
    for r in sample:
        diff = np.abs(r.clean.astype(int) - r.background.astype(int)).max(axis=2)
        changed, touched = diff > 8, diff > 2  # touched: also the faint edge of a mask (alpha ~0.1)
        for p in r.targets:
            x1, y1, x2, y2 = p.box
            assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
            inside = changed[y1:y2, x1:x2]
            assert inside.mean() > 0.1, (p, inside.mean())
            if p.visible == 1.0:
                # Every edge of the box touches the object: the box is not loose.
                edge = touched[y1:y2, x1:x2]
                assert edge[0].any() and edge[-1].any() and edge[:, 0].any() and edge[:, -1].any(), p
                checked += 1
        # Away from every pasted layer the image is the background (5 px: the widest blur kernel's radius).
        covered = np.zeros((256, 256), bool)
        for p in r.targets + r.distractors:
            x1, y1, x2, y2 = p.box
            covered[max(y1 - 5, 0):y2 + 5, max(x1 - 5, 0):x2 + 5] = True
        assert not changed[~covered].any()
    assert checked > 300


def test_voc_reader_reads_back_what_was_rendered(tiny):
    sources = load_sources()
    for split, n in (("train", 12), ("test", 4), ("pool", 4)):
        ds = read_voc(tiny, split)
        assert ds.classes == CLASSES and len(ds) == n
        for k, rec in enumerate(ds.records):
            r = render_image(split, k, seed=3, size=128, sources=sources[split])
            assert rec.image_id == f"{split}_{k:06d}" and (rec.width, rec.height) == (128, 128)
            np.testing.assert_array_equal(rec.boxes, np.array([p.box for p in r.targets], np.float32).reshape(-1, 4))
            assert [CLASSES[label - 1] for label in rec.labels] == [p.name for p in r.targets]
            encoded = io.BytesIO()
            Image.fromarray(r.image).save(encoded, format="JPEG", quality=JPEG_QUALITY)
            assert rec.path.read_bytes() == encoded.getvalue()


def test_existing_dataset_is_reused_and_other_parameters_are_refused(tiny, tmp_path):
    lines: list[str] = []
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*.xml")}
    ensure_dataset(_tiny(tiny), echo=lines.append)
    assert lines[0].startswith(f"reusing {tiny}")
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*.xml")} == before
    with pytest.raises(FileExistsError, match=r"train=12 \(asked 13\)"):
        ensure_dataset(_tiny(tiny, train=13), echo=lines.append)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        ensure_dataset(_tiny(foreign, overwrite=True), echo=lines.append)
    assert (foreign / "x.txt").exists()


def test_interrupted_generation_leaves_nothing_behind(tmp_path):
    def start(name: str) -> subprocess.Popen:
        code = (f"from data.synthetic import SyntheticConfig, ensure_dataset; ensure_dataset(SyntheticConfig("
                f"out={str(tmp_path / name)!r}, train=20000, test=0, workers=1, progress=False))")
        # A runner started in the background (nohup, `&`) ignores SIGINT and children inherit that; Python then
        # never installs its Ctrl-C handler. Restore the default so the child behaves like one at a terminal.
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    procs = {"interrupted": start("interrupted"), "killed": start("killed")}
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not all(list(tmp_path.glob(f"{n}.tmp-*/JPEGImages/*.jpg")) for n in procs):
            time.sleep(0.2)
        assert all(list(tmp_path.glob(f"{n}.tmp-*/JPEGImages/*.jpg")) for n in procs), "generation did not start"
        os.kill(procs["interrupted"].pid, signal.SIGINT)
        os.kill(procs["killed"].pid, signal.SIGKILL)
        assert procs["interrupted"].wait(timeout=60) != 0 and procs["killed"].wait(timeout=60) != 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    # Ctrl-C cleans up at once; a killed writer's folder is removed by the next run into the same place.
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("killed.tmp-*")).name]
    ensure_dataset(_tiny(tmp_path / "killed", train=1, test=0, pool=0), echo=lambda s: None)
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]


def test_cli_make_data_prints_summary_draws_previews_and_refuses_a_mismatch(tmp_path):
    out = tmp_path / "d"
    args = ["make-data", "synthetic", "--out", str(out), "--train", "6", "--test", "2", "--size", "128",
            "--seed", "1", "--workers", "1"]
    result = CliRunner().invoke(main, args + ["--preview", "2"])
    assert result.exit_code == 0, result.output
    assert "d/train: 6 images (128x128" in result.output and "d/test: 2 images" in result.output
    assert "below 32 px" in result.output and "boxes per class: face" in result.output
    previews = sorted(p.name for p in (out / "preview").iterdir())
    assert previews == ["train_000000.png", "train_000001.png"]
    assert Image.open(out / "preview" / previews[0]).size == (512, 512)
    assert (out / "ImageSets" / "Main" / "train.txt").read_text().split()[-1] == "train_000005"
    assert not (out / "ImageSets" / "Main" / "pool.txt").exists()

    refused = CliRunner().invoke(main, args[:5] + ["7"] + args[6:])
    assert refused.exit_code == 1
    assert "other parameters: train=6 (asked 7)" in refused.output and "Traceback" not in refused.output

    replaced = CliRunner().invoke(main, args[:5] + ["7"] + args[6:] + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert len((out / "ImageSets" / "Main" / "train.txt").read_text().split()) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no tmp or old folders left


def test_describe_voc_summarises_a_given_dataset():
    """What `mimic demo --data DIR` prints first about the user's dataset."""
    text = describe_voc(RACCOON)
    assert "raccoon/train:" in text and "raccoon/test:" in text
    assert "boxes per class: raccoon" in text


def test_summary_counts_a_hand_made_dataset(tmp_path):
    def rec(i, boxes, labels, ignore):
        return ImageRecord(f"im{i}", tmp_path / f"im{i}.png", 300, 200, np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(labels, np.int64), np.array(ignore, bool))

    ds = Dataset("hand", "train", ("cat", "dog"), (
        rec(0, [[0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 45, 45]], [1, 2, 2], [False, False, True]),
        rec(1, [[0, 0, 100, 100], [0, 0, 256, 64]], [1, 1], [False, False]),  # sqrt(256*64) = 128
        rec(2, [], [], []),
    ))
    s = summarize(ds)
    assert s["images"] == 3 and s["images_without_boxes"] == 1 and s["boxes"] == 5 and s["ignored_boxes"] == 1
    assert s["boxes_per_class"] == {"cat": 3, "dog": 2}
    assert s["size_histogram"] == dict(zip(SIZE_BUCKETS, [1, 1, 1, 1, 1]))
    assert s["fraction_small"] == pytest.approx(0.4) and s["median_size"] == pytest.approx(40.0)
    text = format_summary(s)
    assert text.splitlines()[0] == (
        "hand/train: 3 images (300x200, 1 without boxes), 5 boxes (1 ignored, at most 3 per image)")
    assert "below 32 px: 40.0%" in text

    Image.new("RGB", (300, 200), (255, 255, 255)).save(tmp_path / "im0.png")
    [path] = draw_preview(ds, tmp_path / "preview", 1, min_side=400)
    drawn = np.asarray(Image.open(path))
    assert drawn.shape == (400, 600, 3)  # enlarged x2 to reach 400 px
    assert (drawn[60:80, 10] != 255).any()  # left edge of the 40 px box at x=5 -> 10 in the x2 preview
