import json
import math

import numpy as np
import pytest
import torch

from mimicdet.data.errors import DataError
from mimicdet.data.transforms import (
    Preprocess,
    PrepParams,
    apply_params,
    hflip,
    normalize,
    prepare,
    resize_params,
)

PRE = Preprocess()


@pytest.mark.parametrize(
    "size, scale, expected",
    [
        ((650, 417), 1.0, (399, 256)),  # shorter side to 256
        ((650, 417), 0.5, (200, 128)),  # ceil(399 / 2), 256 / 2
        ((2000, 500), 1.0, (512, 128)),  # longer side capped at 512
        ((2000, 500), 0.5, (256, 64)),
        ((100, 100), 1.0, (256, 256)),
        ((183, 275), 1.0, (256, 385)),  # portrait: 275 * 256 / 183 = 384.7
    ],
)
def test_resize_params_known_answers(size, scale, expected):
    rp = resize_params(*size, PRE, scale=scale)
    assert (rp.out_width, rp.out_height) == expected
    assert rp.scale == pytest.approx(min(256 / min(size), 512 / max(size)) * scale)


def test_half_scale_padded_input_is_exactly_half_the_teacher_input():
    rng = np.random.default_rng(0)
    for w, h in rng.integers(16, 3000, size=(300, 2)):
        t = resize_params(int(w), int(h), PRE)
        s = resize_params(int(w), int(h), PRE, scale=0.5)
        for full, half in ((t.out_width, s.out_width), (t.out_height, s.out_height)):
            assert math.ceil(full / 32) * 32 == 2 * (math.ceil(half / 16) * 16)


def test_normalize_golden():
    img = np.array([[[255, 0, 128]]], np.uint8)
    out = normalize(img, PRE)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 1)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(out.flatten().numpy(), expected, rtol=1e-6)


def test_hflip_boxes():
    img = np.zeros((4, 10, 3), np.uint8)
    img[:, 0] = 255
    out, boxes = hflip(img, np.array([[1, 0, 3, 2], [0, 1, 10, 4]], np.float32))
    np.testing.assert_array_equal(boxes, [[7, 0, 9, 2], [0, 1, 10, 4]])
    assert (out[:, 9] == 255).all() and (out[:, :9] == 0).all()


def _rectangle_image() -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((60, 100, 3), np.uint8)
    img[10:40, 20:50] = 255  # pixels x 20..49, y 10..39: the box [20, 10, 50, 40]
    return img, np.array([[20, 10, 50, 40]], np.float32)


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_follow_the_pixels(flip):
    img, box = _rectangle_image()
    pre = Preprocess(min_size=30, max_size=1000)
    tensor, boxes, params = prepare(img, box, pre, flip=flip)
    assert tensor.shape == (3, 30, 50) and (params.out_width, params.out_height) == (50, 30)
    pixels = tensor[0] * pre.std[0] + pre.mean[0]  # back to [0, 1]
    ys, xs = np.nonzero(pixels.numpy() > 100 / 255)
    bright = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    expected = [25, 5, 40, 20] if flip else [10, 5, 25, 20]
    np.testing.assert_array_equal(boxes, [expected])
    assert bright == expected


def test_prepare_is_bit_exact_and_reproducible_from_recorded_params():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (417, 650, 3), dtype=np.uint8)
    boxes = np.array([[80, 87, 522, 408]], np.float32)
    teacher, tb, params = prepare(img, boxes, PRE, flip=True)
    again, ab, _ = prepare(img.copy(), boxes, PRE, flip=True)
    assert torch.equal(teacher, again) and np.array_equal(tb, ab)
    # The student rebuilds the teacher's input from what the teacher recorded (e.g. in a store manifest).
    recorded = json.loads(json.dumps(params.to_dict()))
    student, sb = apply_params(img, boxes, PrepParams.from_dict(recorded), PRE)
    assert torch.equal(student, teacher) and np.array_equal(sb, tb)
    # Boxes map back to the original image.
    np.testing.assert_allclose(params.unmap_boxes(tb), boxes, atol=1e-4)


def test_half_scale_boxes_use_actual_factors():
    img = np.zeros((417, 650, 3), np.uint8)
    tensor, boxes, params = prepare(img, np.array([[0, 0, 650, 417]], np.float32), PRE, flip=False, scale=0.5)
    assert tensor.shape == (3, 128, 200) and params.scale == 0.5
    np.testing.assert_allclose(boxes, [[0, 0, 200, 128]], rtol=1e-6)


def test_preprocess_dict_round_trip_and_unknown_field():
    pre = Preprocess(min_size=128, max_size=256, size_divisor=16)
    d = json.loads(json.dumps(pre.to_dict()))
    assert Preprocess.from_dict(d) == pre
    with pytest.raises(DataError, match="unknown field"):
        Preprocess.from_dict({**d, "interp": "nearest"})
    with pytest.raises(ValueError, match="min_size"):
        Preprocess(min_size=600, max_size=500)


def test_prepare_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match=r"uint8\[H, W, 3\]"):
        prepare(np.zeros((4, 4), np.uint8), np.zeros((0, 4), np.float32), PRE, flip=False)
