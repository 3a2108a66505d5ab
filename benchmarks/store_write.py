"""CPU cost of writing one feature-store shard: the zarr backend's own shard encoder against zarr's ``setitem``.

Both paths write the same objects (byte for byte; tests/test_featurestore.py checks it), so the difference is
pure overhead: zarr pushes every chunk (one image of one array: 7 arrays x 32 images per shard) through its
asynchronous codec pipeline. Also reported: the packing step (validation, float32 -> float16 of the maps) and
the bare numcodecs encode of the same chunks, the floor of either path.

Records are shaped like a w=1 teacher's at 256x256 input (832 x 16 x 16 post-ReLU maps, half zeros; 300
proposals, 5 classes), random but fixed. CPU seconds of this process (time.process_time), median of rounds.

    .venv/bin/python benchmarks/store_write.py [--rounds 7] [--out benchmarks/results/store_write.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from mimicdet.store import ImageFeatures, Manifest, create_store
from mimicdet.store.format import pack_shard  # noqa: E402

SHARD, C, H, W, K, KC = 32, 832, 16, 16, 300, 5


def manifest() -> Manifest:
    return Manifest(
        teacher_arch="inception-bn", teacher_width=1.0, teacher_head="fast-rcnn", teacher_sha256="0" * 64,
        classes=("a", "b", "c", "d"), dataset_name="bench", dataset_split="train", dataset_digest="0" * 64,
        image_ids=tuple(f"img{i:03d}" for i in range(SHARD)),
        preprocess={"min_size": 256, "max_size": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        feature_layer="inception4e", stride=16, channels=C, max_hw=(H, W), num_proposals=K, nms_threshold=0.7,
        shard_size=SHARD,
    )


def records(m: Manifest) -> list[ImageFeatures]:
    rng = np.random.default_rng(0)
    out = []
    for image_id in m.image_ids:
        xy = rng.uniform(0, 200, (K, 2))
        out.append(ImageFeatures(
            image_id=image_id,
            features=np.maximum(rng.normal(0, 1, (C, H, W)), 0).astype(np.float32),
            proposals=np.concatenate([xy, xy + rng.uniform(1, 50, (K, 2))], 1).astype(np.float32),
            scores=np.sort(rng.uniform(size=K))[::-1].astype(np.float32),
            class_logits=rng.normal(size=(K, KC)).astype(np.float32),
            box_deltas=rng.normal(size=(K, 4 * KC)).astype(np.float32),
        ))
    return out


def cpu_ms_per_image(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return 1e3 * statistics.median(times) / SHARD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "store_write.json")
    args = parser.parse_args()
    m = manifest()
    items = records(m)
    arrays = pack_shard(m, items, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        own = create_store(str(Path(tmp) / "own"), m)
        via_zarr = create_store(str(Path(tmp) / "zarr"), m)
        own.write_shard(0, items)  # warm-up: opens the arrays, picks the encoder
        via_zarr.write_shard(0, items)
        via_zarr._backend._encoders = False  # as if the layout check said no: zarr's setitem writes the shard
        via_zarr.write_shard(0, items)
        assert own._backend._encoders, "the shard encoder should be used for this layout"
        assert via_zarr._backend._encoders is False, "the zarr arm must go through setitem"
        for key in own._backend.shard_keys(0):
            assert (Path(tmp) / "own" / key).read_bytes() == (Path(tmp) / "zarr" / key).read_bytes(), key
        result = {
            "what": "StoreWriter.write_shard CPU ms per image, shard of 32, float16 maps 832x16x16, zarr backend",
            "own_encoder_ms": cpu_ms_per_image(lambda: own.write_shard(0, items), args.rounds),
            "zarr_setitem_ms": cpu_ms_per_image(lambda: via_zarr.write_shard(0, items), args.rounds),
            "pack_ms": cpu_ms_per_image(lambda: pack_shard(m, items, "bench"), args.rounds),
            "bare_codecs_ms": cpu_ms_per_image(
                lambda: [own._backend._encoders[name].encode(a[j]) for name, a in arrays.items() for j in range(SHARD)],
                args.rounds),
        }
    result["speedup"] = result["zarr_setitem_ms"] / result["own_encoder_ms"]
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    result["rounds"] = args.rounds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"write_shard: own encoder {result['own_encoder_ms']:.2f} ms/image, zarr setitem "
          f"{result['zarr_setitem_ms']:.2f} ms/image ({result['speedup']:.1f}x); of which packing "
          f"{result['pack_ms']:.2f}; bare codecs {result['bare_codecs_ms']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
