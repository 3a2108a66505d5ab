"""Detector profiling: parameter counts, FLOPs against a hand count, latency summary, memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimicdet.detection.detector import DetectorConfig, build_detector
from mimicdet.detection.profile import latency_summary, profile_model, profile_models

torch.set_num_threads(1)


def _hand_flops(model: nn.Module, run) -> int:
    """2 x multiply-adds of every Conv2d and Linear call, counted from their real input/output shapes."""
    total = 0

    def conv(m: nn.Conv2d, inp, out) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, inp, out) -> None:
        nonlocal total
        total += 2 * out.numel() * m.in_features

    hooks = [
        mod.register_forward_hook(conv if isinstance(mod, nn.Conv2d) else linear)
        for mod in model.modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return total


@pytest.mark.parametrize("head", ["fast-rcnn", "none"])
def test_profile_counts_match_hand_counts(head: str) -> None:
    torch.manual_seed(0)
    m = build_detector(DetectorConfig(num_classes=2, width=0.125, head=head)).eval()
    r = profile_model(m, (64, 96), repeats=3, warmup=1)
    assert r["params"] == m.param_counts()
    assert r["input_size"] == [64, 96] and r["device"] == "cpu"

    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # the profiler's own input
    assert r["gflops"]["backbone"] * 1e9 == pytest.approx(_hand_flops(m.backbone, lambda: m.backbone(x)), rel=1e-9)
    assert r["gflops"]["total"] * 1e9 == pytest.approx(_hand_flops(m, lambda: m.predict(x, [(64, 96)])), rel=1e-9)
    assert r["gflops"]["total"] > r["gflops"]["backbone"] > 0

    lat = r["latency"]
    assert lat["n"] == 3 and 0 < lat["median_ms"] <= lat["p90_ms"]
    mem = r["memory"]
    # At least the parameters are live during the run.
    if mem["method"] == "MemTracker":
        assert mem["peak_mb"] * 2**20 >= 4 * m.param_counts()["total"]
        assert mem["activation_mb"] > 0


def test_wider_model_costs_more_and_round_robin_keeps_names() -> None:
    torch.manual_seed(0)
    models = {w: build_detector(DetectorConfig(num_classes=2, width=float(w))) for w in ("0.25", "0.125")}
    res = profile_models(models, (64, 64), repeats=2, warmup=0)
    assert list(res) == ["0.25", "0.125"]
    big, small = res["0.25"], res["0.125"]
    assert big["params"]["backbone"] > 3 * small["params"]["backbone"]
    assert big["gflops"]["backbone"] > 3 * small["gflops"]["backbone"]
    assert big["latency"]["n"] == small["latency"]["n"] == 2


def test_latency_summary_known_values() -> None:
    s = latency_summary([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert s == {"median_ms": 6.0, "p90_ms": 10.0, "min_ms": 1.0, "n": 11}
    assert latency_summary([2.0, 4.0])["p90_ms"] == pytest.approx(3.8)
    with pytest.raises(ValueError, match="at least one"):
        latency_summary([])
    with pytest.raises(ValueError, match="repeats"):
        profile_models({}, (32, 32), repeats=0)
