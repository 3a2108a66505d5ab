"""`mimic profile`: checkpoints timed side by side, in PyTorch (lean and as trained) and in ONNX Runtime."""

import json

from click.testing import CliRunner

from mimicdet.cli import main
from tests.pipeline_fixtures import make_tiny_teacher


def test_profile_times_every_model_on_every_backend(tmp_path):
    wide = make_tiny_teacher(tmp_path / "wide" / "model.pt", width=0.25)
    narrow = make_tiny_teacher(tmp_path / "narrow" / "model.pt", width=0.125)
    out = tmp_path / "profile.json"
    r = CliRunner().invoke(main, ["profile", str(wide), str(narrow), "--size", "64x96", "--batch", "2",
                                  "--backend", "torch", "--backend", "torch-reference", "--backend", "onnxruntime",
                                  "--repeats", "2", "--threads", "1", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    rows = {(row["model"], row["backend"]): row for row in result["rows"]}
    assert set(rows) == {(m, b) for m in ("wide/model", "narrow/model")
                         for b in ("torch", "torch-reference", "onnxruntime")}
    assert result["size"] == [64, 96] and result["batch"] == 2 and result["threads"] == 1
    for (model, backend), row in rows.items():
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["speedup"] == (1.0 if model == "wide/model" else
                                  rows["wide/model", backend]["median_ms"] / row["median_ms"])
    assert rows["narrow/model", "torch"]["gflops"] < rows["wide/model", "torch"]["gflops"]
    assert "| narrow/model | onnxruntime | 0.125 |" in r.output and "64x96 px, batch 2" in r.output


def test_profile_refuses_a_bad_size(tmp_path):
    model = make_tiny_teacher(tmp_path / "model.pt")
    r = CliRunner().invoke(main, ["profile", str(model), "--size", "64by64"])
    assert r.exit_code == 2 and "expected HEIGHTxWIDTH" in r.output
