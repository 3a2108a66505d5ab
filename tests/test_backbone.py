"""Width-n Inception backbone: channel widths, the ceil(x/16) size rule, GoogLeNet weight loading."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import googlenet

from mimicdet.data.errors import DataError
from mimicdet.detection.backbone import InceptionBackbone, feature_size, load_googlenet_weights, scaled

torch.set_num_threads(1)

TRUNK = ("conv1.", "conv2.", "conv3.", "inception3", "inception4")


def _googlenet_trunk_params() -> int:
    net = googlenet(weights=None, aux_logits=False, init_weights=False)
    return sum(p.numel() for k, p in net.named_parameters() if k.startswith(TRUNK))


@pytest.mark.parametrize("width, channels", [(1.0, 832), (0.5, 416), (0.25, 208), (0.125, 104)])
def test_out_channels_scale_with_width(width: float, channels: int) -> None:
    b = InceptionBackbone(width=width)
    assert b.out_channels == channels
    assert b.stride == 16
    y = b(torch.zeros(1, 3, 32, 48))
    assert y.shape == (1, channels, 2, 3)


def test_width_one_has_googlenet_trunk_parameters_and_names() -> None:
    b = InceptionBackbone(width=1.0)
    assert sum(p.numel() for p in b.parameters()) == _googlenet_trunk_params()
    ref = {k for k in googlenet(weights=None, aux_logits=True, init_weights=False).state_dict() if k.startswith(TRUNK)}
    assert set(b.state_dict()) == ref


def test_every_layer_scales_by_width() -> None:
    full, eighth = InceptionBackbone(width=1.0), InceptionBackbone(width=0.125)
    for (name, a), (_, b) in zip(full.named_modules(), eighth.named_modules()):
        if isinstance(a, torch.nn.Conv2d):
            assert b.out_channels == scaled(a.out_channels, 0.125) == a.out_channels // 8, name
    # Every GoogLeNet filter count is a multiple of 8, so w = 1/8 is exact and parameters shrink ~64x.
    ratio = sum(p.numel() for p in full.parameters()) / sum(p.numel() for p in eighth.parameters())
    assert 55 < ratio < 64


def test_scaled_rounds_and_keeps_at_least_one_filter() -> None:
    assert scaled(64, 0.5) == 32
    assert scaled(24, 0.3) == 7  # 7.2
    assert scaled(16, 0.01) == 1
    tiny = InceptionBackbone(width=0.01).eval()
    assert tiny(torch.zeros(1, 3, 16, 16)).shape[1] == tiny.out_channels


@pytest.mark.parametrize("h, w", [(1, 1), (15, 16), (17, 33), (250, 333), (64, 100)])
def test_feature_size_is_ceil_of_sixteenth(h: int, w: int) -> None:
    b = InceptionBackbone(width=0.125).eval()  # eval: batch norm cannot train on a 1x1 map
    expected = (math.ceil(h / 16), math.ceil(w / 16))
    assert feature_size(h, w) == b.feature_size(h, w) == expected
    assert tuple(b(torch.zeros(1, 3, h, w)).shape[2:]) == expected


def test_rejects_bad_width_and_input() -> None:
    with pytest.raises(ValueError, match="width"):
        InceptionBackbone(width=0)
    with pytest.raises(ValueError, match=r"Tensor\[N,3,H,W\]"):
        InceptionBackbone(width=0.125)(torch.zeros(1, 1, 16, 16))


def test_load_googlenet_weights_from_local_file(tmp_path) -> None:
    torch.manual_seed(0)
    ref = googlenet(weights=None, aux_logits=True, init_weights=True).eval()
    path = tmp_path / "googlenet.pth"
    torch.save(ref.state_dict(), path)
    b = InceptionBackbone(width=1.0).eval()
    load_googlenet_weights(b, path)
    for k, v in b.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    x = torch.randn(1, 3, 64, 64)
    # Same modules, same weights: the layers before the first pool agree exactly.
    assert torch.equal(b.conv3(b.conv2(b.conv1(x))), ref.conv3(ref.conv2(ref.conv1(x))))


def test_load_googlenet_weights_refuses_wrong_files(tmp_path) -> None:
    state = googlenet(weights=None, aux_logits=False, init_weights=False).state_dict()
    del state["inception4e.branch1.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(DataError, match=r"inception4e\.branch1\.conv\.weight.*extra\.weight"):
        load_googlenet_weights(InceptionBackbone(width=1.0), bad)
    with pytest.raises(ValueError, match="width 1"):
        load_googlenet_weights(InceptionBackbone(width=0.5), bad)
    with pytest.raises(FileNotFoundError):
        load_googlenet_weights(InceptionBackbone(width=1.0), tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pth"):
        load_googlenet_weights(InceptionBackbone(width=1.0), junk)
