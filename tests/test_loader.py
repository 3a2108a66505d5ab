import pytest
import torch

from mimicdet.data.loader import DetectionImages, EvalSampler, IterationSampler, collate, make_loader
from mimicdet.data.transforms import Preprocess
from mimicdet.data.voc import read_voc
from tests.voc_fixtures import make_voc, obj_xml

PRE = Preprocess(min_size=32, max_size=64)
# Batch 0 of IterationSampler(5, 2, seed=0, flip=True): changing the sampling scheme breaks resuming old runs.
GOLDEN_BATCH_0 = [(2, False), (1, True)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    ann = {
        "a": [obj_xml("cat", (1, 1, 20, 10)), obj_xml("dog", (5, 5, 15, 15), difficult=1)],
        "b": [],
        "c": [obj_xml("dog", (21, 1, 40, 30))],
    }
    make_voc(root, ann, {"train": ["a", "b", "c"]}, width=40, height=30)
    return read_voc(root, "train")


def test_item_splits_ignore_boxes_and_scales_boxes(tiny):
    ds = DetectionImages(tiny, PRE)
    item = ds[(0, False)]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 43)  # 30 -> 32, 40 -> 42.67
    sx, sy = 43 / 40, 32 / 30
    torch.testing.assert_close(item["boxes"], torch.tensor([[0, 0, 20 * sx, 10 * sy]], dtype=torch.float32))
    assert item["labels"].tolist() == [1]  # cat; the difficult dog went to ignore_boxes
    torch.testing.assert_close(item["ignore_boxes"], torch.tensor([[4 * sx, 4 * sy, 15 * sx, 15 * sy]]))
    assert (item["index"], item["image_id"], item["flip"]) == (0, "a", False)
    flipped = ds[(0, True)]
    assert torch.equal(flipped["image"], item["image"].flip(-1))
    empty = ds[(1, False)]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_int_keys_draw_flips_from_seed(tiny):
    ds = DetectionImages(tiny, PRE, flip_prob=0.5, seed=3)
    assert [ds.key(i) for i in range(3)] == [DetectionImages(tiny, PRE, flip_prob=0.5, seed=3).key(i) for i in range(3)]
    assert all(not DetectionImages(tiny, PRE).key(i)[1] for i in range(3))
    assert ds[1]["flip"] == ds.key(1)[1]


def test_sampler_golden_and_epochs():
    s = IterationSampler(5, 2, seed=0, flip=True)
    batches = [s.batch(i) for i in range(5)]  # 10 positions = 2 epochs
    assert batches[0] == GOLDEN_BATCH_0
    indices = [i for b in batches for i, _ in b]
    assert sorted(indices[:5]) == sorted(indices[5:]) == [0, 1, 2, 3, 4]
    assert indices[:5] != indices[5:]  # a new permutation each epoch
    flips = [f for b in (s.batch(i) for i in range(50)) for _, f in b]
    assert 30 < sum(flips) < 70
    assert not any(f for b in (IterationSampler(5, 2, seed=0).batch(i) for i in range(10)) for _, f in b)


def test_resume_gives_the_same_batches():
    s = IterationSampler(7, 3, seed=11, flip=True)
    it = iter(s)
    first = [next(it) for _ in range(9)]
    resumed = IterationSampler.from_state(s.state(iteration=4))
    it2 = iter(resumed)
    assert [next(it2) for _ in range(5)] == first[4:]
    assert IterationSampler(7, 3, seed=12, flip=True).batch(0) != first[0]


def test_eval_sampler_is_sequential():
    s = EvalSampler(5, 2)
    assert list(s) == [[(0, False), (1, False)], [(2, False), (3, False)], [(4, False)]]
    assert len(s) == 3


def test_collate_pads_with_zeros_to_the_divisor():
    def item(h, w, k):
        return {
            "image": torch.full((3, h, w), float(k + 1)),
            "boxes": torch.zeros((k, 4)),
            "labels": torch.ones(k, dtype=torch.int64),
            "ignore_boxes": torch.zeros((0, 4)),
            "index": k,
            "image_id": str(k),
            "flip": False,
            "params": None,
            "labelled": True,
        }

    batch = collate([item(30, 50, 0), item(20, 70, 1)], size_divisor=32)
    assert batch.images.shape == (2, 3, 32, 96)
    assert batch.image_sizes == [(30, 50), (20, 70)]
    assert (batch.images[0, :, :30, :50] == 1).all() and batch.images[0, :, 30:].abs().sum() == 0
    assert batch.images[0, :, :, 50:].abs().sum() == 0 and (batch.images[1, :, :20, :70] == 2).all()
    assert [t["boxes"].shape[0] for t in batch.targets] == [0, 1] and batch.indices == [0, 1]


def test_half_scale_dataset_pads_to_half_the_divisor(tiny):
    half = DetectionImages(tiny, PRE, scale=0.5)
    assert half.size_divisor == 16
    batch = collate([half[(0, False)], half[(2, True)]])  # the divisor travels with the items
    assert batch.image_sizes == [(16, 22), (16, 22)] and batch.images.shape[-2:] == (16, 32)
    with pytest.raises(ValueError, match="whole number"):
        DetectionImages(tiny, PRE, scale=0.3)


def test_loader_workers_give_the_same_batches(tiny):
    torch.set_num_threads(1)
    ds = DetectionImages(tiny, PRE)
    serial = list(make_loader(ds, EvalSampler(len(ds), 2), num_workers=0))
    loader = make_loader(ds, IterationSampler(len(ds), 2, seed=0, flip=True), num_workers=2)
    assert loader.persistent_workers and not loader.pin_memory
    it = iter(loader)
    parallel = [next(it) for _ in range(3)]
    assert [b.images.shape[-2:] for b in serial] == [torch.Size([32, 64]), torch.Size([32, 64])]
    expected = IterationSampler(len(ds), 2, seed=0, flip=True)
    for k, batch in enumerate(parallel):
        keys = expected.batch(k)
        assert list(zip(batch.indices, batch.flips)) == keys
        direct = collate([ds[key] for key in keys], size_divisor=32)
        assert torch.equal(batch.images, direct.images)
    del it, loader
