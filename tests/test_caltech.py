import io
import warnings

import numpy as np
import pytest
from PIL import Image

from mimicdet.data import load_dataset
from mimicdet.data.caltech import read_caltech
from mimicdet.data.errors import DataError
from mimicdet.data.images import image_size, load_image
from mimicdet.data.seq import read_seq_frame, read_seq_header
from mimicdet.data.validate import DataWarning
from tests import caltech_fixtures as cf


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return cf.make_original(tmp_path_factory.mktemp("caltech_original"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return cf.make_converted(tmp_path_factory.mktemp("caltech_converted"))


def _read(root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the fixture has one box sticking out on purpose
        return read_caltech(root, **kw)


def test_seq_header_and_frames_round_trip(original):
    seq = original / "set00" / "V000.seq"
    header = read_seq_header(seq)
    assert (header.width, header.height, header.num_frames, header.ext) == (64, 48, 6, "jpg")
    for i in range(cf.FRAMES):
        assert read_seq_frame(seq, i) == cf.jpeg_bytes(cf.frame_pixels("set00", i))


def test_seq_reader_finds_frames_whatever_the_timestamp_length(tmp_path):
    jpegs = [cf.jpeg_bytes(cf.frame_pixels("set00", i)) for i in range(4)]
    seq = tmp_path / "V000.seq"
    seq.write_bytes(cf.seq_bytes(jpegs, 64, 48, gaps=[4, 8, 16, 8]))
    assert [read_seq_frame(seq, i) for i in range(4)] == jpegs


def test_frame_paths_decode_the_right_frame(original):
    seq = original / "set00" / "V000.seq"
    for i in (0, 2, 5):
        expected = np.asarray(Image.open(io.BytesIO(cf.jpeg_bytes(cf.frame_pixels("set00", i)))).convert("RGB"))
        np.testing.assert_array_equal(load_image(f"{seq}#{i}"), expected)
    assert image_size(f"{seq}#3") == (64, 48)


def test_train_protocol_original_layout(original):
    ds = _read(original, split="train", every=3)
    assert ds.classes == ("person",)
    assert [r.image_id for r in ds.records] == ["set00_V000_I00002", "set00_V000_I00005"]  # frames every-1, 2*every-1
    a, b = ds.records
    assert str(a.path).endswith("set00/V000.seq#2")
    np.testing.assert_array_equal(a.boxes, [[10, 5, 30, 45], [30, 10, 40, 20]])
    assert a.labels.tolist() == [1, 1] and a.ignore.tolist() == [False, True]  # "people" is an ignore box
    np.testing.assert_allclose(a.extras["visibility"], [0.5, 1.0])  # posv covers half of pos; zero posv -> 1
    np.testing.assert_allclose(a.extras["height"], [40, 10])
    # "person?" and "person-fa" are ignore boxes; the first sticks out and is clipped, its height stays 30
    assert b.ignore.tolist() == [True, True]
    np.testing.assert_array_equal(b.boxes[0], [50, 20, 64, 48])
    np.testing.assert_allclose(b.extras["height"], [30, 6])


def test_test_protocol_uses_sets_06_to_10_and_keeps_empty_frames(original):
    ds = _read(original, split="test", every=3)
    assert [r.image_id for r in ds.records] == ["set06_V000_I00002", "set06_V000_I00005"]
    assert len(ds.records[1].boxes) == 0
    np.testing.assert_allclose(ds.records[0].boxes, [[1.5, 0.5, 9.5, 30.5]])
    np.testing.assert_allclose(ds.records[0].extras["visibility"], [1.0])


def test_default_every_is_30(original):
    with pytest.raises(DataError, match="no frames found"):  # 6-frame videos have no frame 29
        _read(original, split="train")


def test_converted_layout_matches_the_original(original, converted):
    for split in ("train", "test"):
        a, b = _read(original, split=split, every=3), _read(converted, split=split, every=3)
        assert a.digest() == b.digest()
        for ra, rb in zip(a.records, b.records):
            np.testing.assert_array_equal(ra.boxes, rb.boxes)
            np.testing.assert_array_equal(ra.labels, rb.labels)
            np.testing.assert_array_equal(ra.ignore, rb.ignore)
            for k in ("visibility", "height"):
                np.testing.assert_array_equal(ra.extras[k], rb.extras[k])
            np.testing.assert_array_equal(load_image(ra.path), load_image(rb.path))


def test_every_frame_and_warning_for_clipped_box(original):
    with pytest.warns(DataWarning, match=r"V000\.vbb frame 5: box 0 extends outside the 64x48 image; clipped"):
        ds = read_caltech(original, split="train", every=1)
    assert len(ds) == 6
    assert [len(r.boxes) for r in ds.records] == [0, 0, 2, 0, 1, 2]


def test_load_dataset_detects_both_layouts(original, converted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert len(load_dataset(original, "train", every=3)) == 2
        assert len(load_dataset(converted, "test", every=3, layout="converted")) == 2


def test_unknown_caltech_label_is_an_error(tmp_path):
    cf.make_original(tmp_path)
    cyclist = dict(cf.SPEC["set00"]["V000"][2][0], lbl="cyclist")
    cf.write_vbb(tmp_path / "annotations" / "set00" / "V000.vbb", cf.FRAMES, {2: [cyclist]})
    with pytest.raises(DataError, match=r"V000\.vbb frame 2 object 0: label 'cyclist'"):
        read_caltech(tmp_path, split="train", every=3)
