"""Width-``w`` Inception backbone (GoogLeNet with batch norm), cut after inception4e.

Shapes: images ``Tensor[N, 3, H, W]`` (normalised, padded) -> features ``Tensor[N, C, h, w]`` with
``C = 832·w`` (the sum of inception4e's scaled branches) and stride 16.

Every member of the family has the same depth and module names as torchvision's ``GoogLeNet``
(conv1, maxpool1, conv2, conv3, maxpool2, inception3a, inception3b, maxpool3, inception4a..4e) and every
layer has ``max(1, round(c·w))`` filters, built from torchvision's own ``BasicConv2d`` and ``Inception``.

Size rule: every one of the four stride-2 layers maps a side ``x`` to ``ceil(x / 2)`` (conv1 is 7x7/2 with
padding 3; the three max-pools are 3x3/2 with padding 1), so a side ``x`` gives exactly ``ceil(x / 16)``
(see :func:`feature_size`). torchvision's GoogLeNet pools use ``ceil_mode`` without padding instead, which gives
``floor(ceil(x/2)/8)`` (62 rather than 63 for x = 1000); the pools hold no weights, so ImageNet weights still
load. Feature cell ``(i, j)`` is centred on input pixel ``(16·i, 16·j)``, the convention of torchvision's
``AnchorGenerator`` and of ``roi_align(aligned=False)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.googlenet import BasicConv2d, Inception

from mimicdet.data.errors import DataError

# torchvision GoogLeNet's Inception arguments (in_channels omitted):
# ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj.
_INCEPTION_SPECS: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
}
# Module order of the forward pass; maxpools sit between the stages.
_LAYERS = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
)  # fmt: skip
# Keys of torchvision's GoogLeNet state dict that lie beyond (or beside) the stride-16 cut.
_IGNORED_PREFIXES = ("aux1.", "aux2.", "fc.", "inception5a.", "inception5b.")

STRIDE = 16


def scaled(channels: int, width: float) -> int:
    """Filters of a layer that has ``channels`` filters at width 1."""
    return max(1, round(channels * width))


def feature_size(h: int, w: int) -> tuple[int, int]:
    """Feature-map size ``(ceil(h/16), ceil(w/16))`` of an ``h x w`` input (any width multiplier)."""
    return math.ceil(h / STRIDE), math.ceil(w / STRIDE)


def _pool() -> nn.MaxPool2d:
    # padding=1 (not ceil_mode) so each pool maps x -> ceil(x/2) for every x, including odd sides.
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class InceptionBackbone(nn.Module):
    """GoogLeNet-BN trunk up to inception4e with every layer ``width`` times as wide.

    ``forward``: ``Tensor[N, 3, H, W] -> Tensor[N, out_channels, ceil(H/16), ceil(W/16)]`` (contiguous NCHW;
    the layers run in channels-last memory format).
    Kaiming-normal initialisation; :func:`load_googlenet_weights` loads ImageNet weights for ``width = 1``.
    """

    stride: int = STRIDE

    def __init__(self, *, width: float) -> None:
        super().__init__()
        if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a positive number, got {width!r}")
        self.width = float(width)
        c = lambda n: scaled(n, self.width)  # noqa: E731
        self.conv1 = BasicConv2d(3, c(64), kernel_size=7, stride=2, padding=3)
        self.maxpool1 = _pool()
        self.conv2 = BasicConv2d(c(64), c(64), kernel_size=1)
        self.conv3 = BasicConv2d(c(64), c(192), kernel_size=3, padding=1)
        self.maxpool2 = _pool()
        in_ch = c(192)
        for name, spec in _INCEPTION_SPECS.items():
            if name == "inception4a":
                self.maxpool3 = _pool()
            ch1, ch3r, ch3, ch5r, ch5, pp = (c(n) for n in spec)
            setattr(self, name, Inception(in_ch, ch1, ch3r, ch3, ch5r, ch5, pp))
            # Next input = what this block really concatenates (robust to rounding).
            in_ch = ch1 + ch3 + ch5 + pp
        self.out_channels: int = in_ch
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        """``(ceil(h/16), ceil(w/16))``: the map size of an ``h x w`` input."""
        return feature_size(h, w)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"backbone input must be Tensor[N,3,H,W], got shape {list(x.shape)}")
        # Channels-last inside: torch's CPU max-pool is ~30x slower on NCHW, and the whole trunk runs
        # 1.6-3x faster at inference. Callers still get a plain contiguous NCHW map.
        x = x.contiguous(memory_format=torch.channels_last)
        for name in _LAYERS:
            x = getattr(self, name)(x)
        return x.contiguous()


def load_googlenet_weights(backbone: InceptionBackbone, path: str | Path) -> None:
    """Load torchvision's GoogLeNet ImageNet state dict from the local file ``path`` into a width-1 backbone.

    Keys of the auxiliary classifiers, inception5a/5b and fc are ignored; any other missing, unexpected or
    mis-shaped key raises ``DataError`` (a ``ValueError``) naming it. Nothing is downloaded.

    Note: torchvision's GoogLeNet weights were trained with ``transform_input=True``, i.e. on inputs
    normalised as ``(x - 0.5) / 0.5``; feed this backbone images normalised that way when using them.
    """
    if backbone.width != 1.0:
        raise ValueError(f"GoogLeNet ImageNet weights fit only width 1, backbone has width {backbone.width}")
    from mimicdet.detection.checkpoints import load_weights_only

    path = Path(path)
    state = load_weights_only(path, what="state dict")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DataError(
            f"{path}: not a torchvision GoogLeNet state dict for the backbone; "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    bad = [
        f"{k}: file {list(state[k].shape)} != backbone {list(v.shape)}"
        for k, v in own.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise DataError(f"{path}: shape mismatch: {'; '.join(bad[:5])}")
    backbone.load_state_dict(state, strict=True)
