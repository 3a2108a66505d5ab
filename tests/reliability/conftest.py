"""Fixtures of the reliability suite: one tiny real world per session (a VOC folder of coloured squares, an
untrained width-1/8 teacher and its feature stores), copied into a test's tmp_path before anything damages it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mimicdet.pipeline.extract import ExtractConfig, run_extract
from tests.pipeline_fixtures import make_squares_voc, make_tiny_teacher
from tests.reliability.helpers import SHARD


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """<root>/voc (train 8, pool 6, test 3 images), <root>/teacher.pt, <root>/store (train), <root>/pool (pool)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    make_squares_voc(root / "voc", {"train": 8, "pool": 6, "test": 3})
    make_tiny_teacher(root / "teacher.pt")
    common = dict(teacher=root / "teacher.pt", data=root / "voc", shard_size=SHARD, proposals=24, loader_workers=0,
                  progress=False)
    run_extract(ExtractConfig(out=str(root / "store"), split="train", **common))
    run_extract(ExtractConfig(out=str(root / "pool"), split="pool", **common))
    return root


@pytest.fixture
def store(world, tmp_path) -> Path:
    """A private copy of the train store, free to damage."""
    return Path(shutil.copytree(world / "store", tmp_path / "store"))
