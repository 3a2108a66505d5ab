"""extract-teacher against its targets: throughput, bytes per image, store read rate, memory.

1. Throughput: ``run_extract`` (zarr, float16, batch 8, the defaults of ``mimic extract-teacher`` with the
   teacher on the CPU: decode and write in line; two more arms overlap them, with loader processes plus a
   writer thread, or a writer thread alone) against the bare teacher pass (``teacher_pass`` on batches decoded and
   preprocessed beforehand, in memory) over the same N images, in interleaved pairs (order alternates, so load
   drift hits both alike). Target: extract >= 0.9x bare. Reported: images/s, CPU ms per image (this process and
   its DataLoader workers) and the per-pair ratios; medians. When other jobs load the machine, the CPU-time
   ratio is the one to trust: the kernel shares cores per runnable thread, which favours extraction's extra
   threads in wall-clock terms. The fixed cost of a run (loading the teacher, forking
   workers, the last shard's write, which nothing can overlap) is measured as a one-batch extraction minus one
   bare batch and also reported as the steady-state ratio, N / (extract seconds - fixed seconds).
2. Storage: bytes per image and the ratio to raw float32 (``inspect_store``: the real map C*h*w plus the k
   proposals' rows) for zarr and HDF5, float16 and int8; per-array bytes (zarr); int8 reconstruction error
   against the teacher's float32 maps. Target: int8 >= 8x. A codec study on the same maps (numcodecs directly)
   shows what other codecs and an unsigned 8-bit code would give, and the order-0 entropy of the int8 codes.
3. Read rate, on the float16 zarr store of (2): the student's loader (``MimicImages`` + ``make_mimic_loader``,
   2 workers: image decode plus store read) and a bare ``StoreReader.read`` DataLoader (2 workers), against the
   student's training step rate (``StudentModel`` forward + backward + SGD step, width 1/4, stage 1, roi mimic,
   batch 8, 256x256, on batches held in memory, torch's default threads). Target: loader >= 5x what the student
   consumes. Two alternating rounds, medians.
4. Memory: ``mimic extract-teacher`` over N and 10N images (a fresh process each; 128x128 images, width-1/4
   teacher, 64 proposals, other options at their defaults), sampled every 0.1 s: peak RSS (VmHWM) of the main
   process, the largest DataLoader worker and the whole process tree; and the main RSS over the large run
   (a leak grows with images written: the peaks of its first and second halves are compared).

Images are the built-in synthetic dataset (256x256; 128x128 for memory). The teacher is a trained one when
given (``--teacher``) or found under ``runs/`` (``model.pt`` with teacher meta and the synthetic classes); else
an untrained width-1 detector whose batch-norm statistics are calibrated by train-mode passes on the raccoon
photos (so its maps have the scale and ReLU sparsity of a real network, not a trained one's distribution).

    .venv/bin/python benchmarks/extract.py            # 200 vs 2000 images for memory, 5 throughput pairs
    .venv/bin/python benchmarks/extract.py --quick    # about a third of that
    .venv/bin/python benchmarks/extract.py --sections storage,read
The default run takes about 5 minutes on an idle 2-core machine (w=1 teacher at ~10 img/s) and two to three
times that when other jobs share the cores.
writes benchmarks/results/extract.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from mimicdet.data import load_dataset  # noqa: E402
from mimicdet.store import inspect_store, open_store, quantise_int8  # noqa: E402
from mimicdet.data.loader import DetectionImages, collate  # noqa: E402
from mimicdet.data.synthetic import CLASSES, SyntheticConfig, ensure_dataset  # noqa: E402
from mimicdet.data.transforms import Preprocess  # noqa: E402
from mimicdet.detection.detector import DetectorConfig, build_detector, load_detector, save_detector  # noqa: E402
from mimicdet.pipeline.extract import ExtractConfig, run_extract, teacher_pass  # noqa: E402
from mimicdet.pipeline.teachers import TeacherSpec, open_teacher  # noqa: E402

RACCOON = Path(os.environ.get("MIMICDET_RACCOON", REPO / ".." / "shared" / "data" / "raccoon"))
RESULT = REPO / "benchmarks" / "results" / "extract.json"
BATCH = 8
SHARD = 32  # several shards per throughput run, so the writer overlaps the teacher
CPU = torch.device("cpu")
SECTIONS = ("throughput", "storage", "read", "memory")
MEMORY_PROPOSALS = 64  # the head on 300 proposals dominates a width-1/4 teacher's time at 128x128


@dataclass(frozen=True)
class Sizes:
    throughput_images: int
    pairs: int
    storage_images: int
    read_batches: int
    student_iters: int
    memory_images: int  # N; the large run is 10N
    memory_side: int = 128


# Throughput runs hold several shards and last long enough (8-10 s idle) that the fixed start-up cost of a run
# (about 0.3 s: loading and hashing the teacher, creating the store) weighs as it does in a real extraction.
DEFAULT = Sizes(throughput_images=128, pairs=5, storage_images=32, read_batches=24, student_iters=8, memory_images=200)
QUICK = Sizes(throughput_images=96, pairs=3, storage_images=16, read_batches=12, student_iters=4, memory_images=50)


# ---------------------------------------------------------------------------------------------- setup


def write_split(root: Path, name: str, n: int) -> str:
    """A VOC split file holding the first n train images, so every run reads a prefix of one dataset."""
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    if len(ids) < n:
        raise SystemExit(f"{root}: needs {n} train images, has {len(ids)}")
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids[:n]))
    return name


def synthetic(work: Path, n: int, side: int) -> Path:
    return ensure_dataset(
        SyntheticConfig(out=work / f"synthetic{side}", train=n, test=0, size=side, workers=1, progress=False),
        echo=lambda _: None,
    )


def find_trained_teacher() -> Path | None:
    """A `train-teacher` checkpoint under runs/ made for the synthetic classes (newest first)."""
    for path in sorted((REPO / "runs").glob("**/model.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            _, meta = load_detector(path)
        except Exception:  # noqa: BLE001 - not a detector checkpoint: keep looking
            continue
        if tuple(meta.get("classes", ())) == CLASSES and "preprocess" in meta and meta.get("role") != "student":
            return path
    return None


def calibrated_teacher(path: Path, *, width: float, side: int) -> Path:
    """Untrained detector with batch-norm statistics from train-mode passes on real photos (raccoon)."""
    torch.manual_seed(0)
    pre = Preprocess(min_size=side, max_size=side)
    model = build_detector(DetectorConfig(num_classes=len(CLASSES) + 1, width=width))
    photos = DetectionImages(load_dataset(RACCOON, "train"), pre)
    with torch.no_grad():
        model.backbone.train()
        for k in range(3):
            model.backbone(collate([photos[(i, False)] for i in range(8 * k, 8 * k + 8)]).images)
    model.eval()
    save_detector(path, model, {"role": "teacher", "classes": list(CLASSES), "preprocess": pre.to_dict(),
                                "note": "untrained; batch-norm statistics calibrated on raccoon photos"})
    return path


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (DataLoader workers, once they exit)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed(fn) -> tuple[float, float]:
    c, t = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c


def median(xs) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------------- 1. throughput


def throughput(teacher_path: Path, data: Path, work: Path, sizes: Sizes) -> dict:
    n = sizes.throughput_images
    split, one = write_split(data, f"first{n}", n), write_split(data, "first8", BATCH)
    teacher = open_teacher(TeacherSpec(str(teacher_path)), CPU)
    pre = teacher.preprocess
    images = DetectionImages(load_dataset(data, split, classes=list(CLASSES)), pre)
    batches = [collate([images[(i, False)] for i in range(s, min(s + BATCH, n))]) for s in range(0, n, BATCH)]

    def bare(count: int = len(batches)) -> None:
        for b in batches[:count]:
            teacher_pass(teacher, b.images, b.image_sizes, top_k=300, device=CPU)

    import mimicdet.pipeline.extract as pe

    forward = {"s": 0.0}

    def timed_pass(*args, **kwargs):
        t = time.perf_counter()
        try:
            return teacher_pass(*args, **kwargs)
        finally:
            forward["s"] += time.perf_counter() - t

    def extract(split_name: str, **overlap) -> None:
        forward["s"] = 0.0
        pe.teacher_pass = timed_pass  # the teacher's forward inside the run, timed in the same run
        try:
            _run(split_name, **overlap)
        finally:
            pe.teacher_pass = teacher_pass

    def _run(split_name: str, **overlap) -> None:
        run_extract(ExtractConfig(teacher=teacher_path, data=data, split=split_name,
                                  out=str(work / f"tp-store-{split_name}"), shard_size=SHARD, batch_size=BATCH,
                                  mode="overwrite", progress=False, device="cpu", **overlap))

    arms = {
        "bare": bare,
        "extract": lambda: extract(split),  # the defaults of `mimic extract-teacher` on a CPU: decode/write in line
        "extract_overlapped": lambda: extract(split, loader_workers=2, writer_thread=True),  # the GPU default
        "extract_writer_thread": lambda: extract(split, writer_thread=True),  # decode in line, write behind
    }
    bare(2)  # warm-up: first-call allocations
    pairs = []
    for rep in range(sizes.pairs):
        order = list(arms) if rep % 2 == 0 else list(arms)[::-1]  # alternate, so load drift hits all alike
        pairs.append(_throughput_round(arms, order, forward, fixed=(lambda: extract(one), lambda: bare(1)), n=n))
        _print_round(rep, pairs[-1])
    return _throughput_report(pairs, arms, n)


_ARM_TAGS = {"extract": "", "extract_overlapped": "overlapped_", "extract_writer_thread": "writer_thread_"}


def _throughput_round(arms: dict, order: list[str], forward: dict, *, fixed: tuple, n: int) -> dict:
    """Every arm once in ``order``; ratios to the bare forward within the round."""
    row: dict = {"load_avg_start": list(os.getloadavg())}
    for what in order:
        wall, cpu = timed(arms[what])
        row[what] = {"s": wall, "images_per_s": n / wall, "cpu_ms_per_image": 1e3 * cpu / n}
        if what != "bare":
            row[what]["forward_s"] = forward["s"]
            row[what]["forward_share"] = forward["s"] / wall
    fixed_ext, _ = timed(fixed[0])
    fixed_bare, _ = timed(fixed[1])
    row["fixed_s"] = fixed_ext - fixed_bare
    for arm, tag in _ARM_TAGS.items():
        row[f"{tag}ratio"] = row[arm]["images_per_s"] / row["bare"]["images_per_s"]
        row[f"{tag}cpu_ratio"] = row["bare"]["cpu_ms_per_image"] / row[arm]["cpu_ms_per_image"]
    row["steady_ratio"] = (n / max(row["extract"]["s"] - row["fixed_s"], 1e-9)) / row["bare"]["images_per_s"]
    row["load_avg_1min"] = os.getloadavg()[0]
    return row


def _print_round(rep: int, row: dict) -> None:
    print(f"  round {rep}: bare {row['bare']['images_per_s']:.2f} img/s, extract "
          f"{row['extract']['images_per_s']:.2f} img/s (ratio {row['ratio']:.3f}, cpu {row['cpu_ratio']:.3f}, "
          f"steady {row['steady_ratio']:.3f}, fixed {row['fixed_s']:.2f} s), overlapped "
          f"{row['extract_overlapped']['images_per_s']:.2f} img/s (ratio {row['overlapped_ratio']:.3f}), "
          f"writer thread {row['extract_writer_thread']['images_per_s']:.2f} img/s "
          f"(ratio {row['writer_thread_ratio']:.3f}), "
          f"load {row['load_avg_1min']:.1f}", flush=True)


def _throughput_report(pairs: list[dict], arms: dict, n: int) -> dict:
    keys = ["ratio", "cpu_ratio", "overlapped_ratio", "overlapped_cpu_ratio", "writer_thread_ratio",
            "writer_thread_cpu_ratio", "steady_ratio", "fixed_s"]
    med = {f"{arm}_{k}": median(p[arm][k] for p in pairs) for arm in arms for k in ("images_per_s", "cpu_ms_per_image")}
    med |= {f"{arm}_forward_share": median(p[arm]["forward_share"] for p in pairs) for arm in arms if arm != "bare"}
    med |= {k: median(p[k] for p in pairs) for k in keys}
    return {
        "images": n, "batch_size": BATCH, "shard_size": SHARD, "dtype": "float16", "backend": "zarr",
        "arms": {"bare": "teacher_pass on batches decoded beforehand, in memory",
                 "extract": "run_extract with the CLI defaults (teacher on the CPU: loader_workers 0, writes in line)",
                 "extract_overlapped": "run_extract with loader_workers=2 and a writer thread (the default off the CPU)",
                 "extract_writer_thread": "run_extract decoding in line, shards compressed and written by a thread"},
        "rounds": pairs, "median": med,
        "target": ">= 0.9",
        "note": "Rounds run the three arms back to back in alternating order; the ratios are per round, then the "
                "median. The machine is shared: load_avg_* are os.getloadavg() at the start of each round and after "
                "it. cpu_ratio is bare CPU seconds per image / extraction's (DataLoader workers included). "
                "steady_ratio leaves out the fixed cost of a run (loading the teacher, creating the store), "
                "measured as a one-batch extraction minus one bare batch. forward_share is the time the run spent "
                "inside teacher_pass over the run's wall time, both measured in the same run: with decoding and "
                "writing in line nothing else runs during the forward, so it is the bare-forward ratio free of "
                "load drift between runs (not so for the overlapped arm, whose workers slow the forward itself).",
    }


# ---------------------------------------------------------------------------------------------- 2. storage


def array_bytes(url: Path, images: int) -> dict[str, float]:
    """Bytes per image of each zarr array, from the completion markers (one object per array and shard)."""
    total: dict[str, int] = {}
    for marker in (url / "_complete").glob("*.json"):
        for key, info in json.loads(marker.read_text())["objects"].items():
            name = key.split("/c/")[0]
            total[name] = total.get(name, 0) + info["size"]
    return {k: v / images for k, v in sorted(total.items())}


def teacher_maps(teacher_path: Path, data: Path, split: str) -> list[np.ndarray]:
    """The teacher's float32 maps, batched as extraction batches them: the reference for storage errors."""
    teacher = open_teacher(TeacherSpec(str(teacher_path)), CPU)
    images = DetectionImages(load_dataset(data, split, classes=list(CLASSES)), teacher.preprocess)
    maps: list[np.ndarray] = []
    for s in range(0, len(images), BATCH):
        b = collate([images[(i, False)] for i in range(s, min(s + BATCH, len(images)))])
        maps += [o["features"].numpy().copy() for o in teacher_pass(teacher, b.images, b.image_sizes, top_k=300,
                                                                   device=CPU)]
    return maps


def storage(teacher_path: Path, data: Path, work: Path, sizes: Sizes) -> dict:
    n = sizes.storage_images
    split = write_split(data, f"first{n}", n)
    reference = teacher_maps(teacher_path, data, split)
    stores = []
    for backend in ("zarr", "hdf5"):
        for dtype in ("float16", "int8"):
            url = work / f"store-{backend}-{dtype}"
            wall, _ = timed(lambda: run_extract(ExtractConfig(
                teacher=teacher_path, data=data, split=split, out=str(url), backend=backend, dtype=dtype,
                shard_size=16, batch_size=BATCH, mode="overwrite", progress=False, device="cpu")))
            info = inspect_store(url)
            reader = open_store(url)
            got = [reader.read(i).features for i in range(n)]
            err = [g - r for g, r in zip(got, reference)]
            row = {
                "backend": backend, "dtype": dtype, "records_dtype": reader.manifest.records_dtype, "images": n,
                "bytes_per_image": info["bytes_per_image"],
                "raw_float32_bytes_per_image": info["raw_float32_bytes"] / n,
                "compression_ratio_vs_float32": info["compression_ratio"],
                "max_abs_error": float(max(np.abs(e).max() for e in err)),
                "relative_rms_error": float(np.sqrt(sum((e**2).sum() for e in err) / sum((r**2).sum() for r in reference))),
                "extract_s": wall,
            }
            if backend == "zarr":
                row["bytes_per_image_by_array"] = array_bytes(url, n)
            stores.append(row)
            print(f"  {backend} {dtype}: {row['bytes_per_image'] / 1024:.1f} KiB/image, "
                  f"{row['compression_ratio_vs_float32']:.2f}x, max |err| {row['max_abs_error']:.4f}", flush=True)
    maps = np.stack(reference)
    study = codec_study(maps[: min(8, n)])
    return {"split": split, "stores": stores, "map": {"shape": list(maps.shape[1:]), "zero_fraction": float((maps == 0).mean()),
                                      "negative_fraction": float((maps < 0).mean())},
            "codec_study": study, "int8_8x_budget": budget_for_8x(stores, study, maps[0].size), "target": "int8 >= 8x"}


def budget_for_8x(stores: list[dict], study: dict, map_values: int) -> dict:
    """What 8x leaves per image, against what the int8 maps need at their entropy (any coder of those codes
    spends at least that) and what the records take as stored (zarr int8 store)."""
    row = next(r for r in stores if r["backend"] == "zarr" and r["dtype"] == "int8")
    by_array = row["bytes_per_image_by_array"]
    budget = row["raw_float32_bytes_per_image"] / 8
    bounds = {name: map_values * study[f"int8_{name}_entropy_bits_per_value"] / 8
              for name in ("order0", "per_channel")}
    records = sum(v for k, v in by_array.items() if k != "features")
    return {"bytes_per_image_at_8x": budget,
            "int8_map_bytes_as_stored": by_array["features"],
            "int8_map_bytes_at_order0_entropy": bounds["order0"],
            "int8_map_bytes_at_per_channel_entropy": bounds["per_channel"],
            "record_bytes_as_stored": records,
            "reachable_at_int8_precision": min(bounds.values()) + records <= budget}


def quantise_uint8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What-if: unsigned per-channel code for non-negative (ReLU) maps, q = round(x / (max / 255))."""
    amax = x.reshape(len(x), -1).max(axis=1)
    scale = np.where(amax > 0, amax / 255.0, 1.0).astype(np.float32)
    return np.clip(np.rint(x / scale[:, None, None]), 0, 255).astype(np.uint8), scale


def codec_study(maps: np.ndarray) -> dict:
    """Feature-map bytes only (per image, one chunk per image as in the store) under other codecs."""
    from numcodecs import LZMA, Blosc, Zlib, Zstd

    codes = {
        "float16": [m.astype(np.float16) for m in maps],
        "int8": [quantise_int8(m)[0] for m in maps],
        "uint8 (what-if)": [quantise_uint8(m)[0] for m in maps],
    }
    codecs = {
        "zstd-1": Zstd(1), "zstd-3 (store)": Zstd(3), "zstd-9": Zstd(9), "zstd-19": Zstd(19),
        "blosc-zstd-3 byte shuffle": Blosc("zstd", 3, Blosc.SHUFFLE),
        "blosc-zstd-3 bit shuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
        "gzip-4 (hdf5)": Zlib(4), "lzma-6": LZMA(preset=6),
    }
    raw = maps[0].size * 4
    rows = []
    for kind, arrays in codes.items():
        for name, codec in codecs.items():
            t = time.process_time()
            encoded = [codec.encode(np.ascontiguousarray(a)) for a in arrays]
            enc_ms = 1e3 * (time.process_time() - t) / len(arrays)
            t = time.process_time()
            for e in encoded:
                codec.decode(e)
            dec_ms = 1e3 * (time.process_time() - t) / len(arrays)
            size = float(np.mean([len(e) for e in encoded]))
            rows.append({"code": kind, "codec": name, "feature_bytes_per_image": size, "ratio_vs_float32": raw / size,
                         "encode_ms": enc_ms, "decode_ms": dec_ms})
    errors = {}
    for kind, fn in (("int8", quantise_int8), ("uint8 (what-if)", quantise_uint8)):
        e = [fn(m)[0].astype(np.float32) * fn(m)[1][:, None, None] - m for m in maps]
        errors[kind] = {"max_abs": float(max(np.abs(x).max() for x in e)),
                        "relative_rms": float(np.sqrt(sum((x**2).sum() for x in e) / (maps**2).sum()))}
    q = np.stack(codes["int8"])
    bits = entropy_bits(q)
    # What-if: the zero mask (bit-packed) and the nonzero codes compressed apart (zstd-3 each)
    split = [len(Zstd(3).encode(np.packbits(c != 0).tobytes())) + len(Zstd(3).encode(c[c != 0].tobytes()))
             for c in codes["int8"]]
    rows.append({"code": "int8 zero mask + nonzero codes (what-if)", "codec": "zstd-3 each",
                 "feature_bytes_per_image": float(np.mean(split)), "ratio_vs_float32": raw / float(np.mean(split))})
    # A bound for coders that see each value's left neighbour: H(mask | left mask) + P(nonzero) H(nonzero codes).
    mask = q != 0
    left = np.concatenate([np.zeros_like(mask[..., :1]), mask[..., :-1]], axis=-1)
    h_mask = sum(float((left == a).mean()) * entropy_bits(mask[left == a]) for a in (False, True))
    context_bits = h_mask + float(mask.mean()) * entropy_bits(q[mask])
    # Each channel has its own scale, so its codes have their own distribution: H(code | channel), a bound for a
    # coder that keeps one model per channel.
    channel_bits = float(np.mean([entropy_bits(q[:, c]) for c in range(q.shape[1])]))
    return {"raw_float32_feature_bytes_per_image": raw, "images": len(maps), "rows": rows, "errors": errors,
            "zero_fraction": float(1 - mask.mean()),
            "int8_order0_entropy_bits_per_value": bits, "int8_order0_entropy_ratio_vs_float32": 32 / bits,
            "int8_per_channel_entropy_bits_per_value": channel_bits,
            "int8_per_channel_entropy_ratio_vs_float32": 32 / channel_bits,
            "int8_left_context_bound_bits_per_value": context_bits,
            "int8_left_context_bound_ratio_vs_float32": 32 / context_bits}


def entropy_bits(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------------------------------------- 3. read rate


def read_rate(data: Path, store_url: Path, split: str, sizes: Sizes) -> dict:
    from mimicdet.store.training import open_source
    from mimicdet.student.stream import MimicImages, MixedSampler, make_mimic_loader
    from mimicdet.student.train import StudentConfig, build_student, student_model

    dataset = load_dataset(data, split, classes=list(CLASSES))
    store = open_source(str(store_url), dataset)
    pre = Preprocess.from_dict(dict(store.manifest.preprocess))
    mimic = MimicImages([(dataset, store)], [DetectionImages(dataset, pre)])

    def mimic_loader(workers: int):
        return make_mimic_loader(mimic, MixedSampler(len(dataset), 0, BATCH, unlabelled_fraction=0.0, seed=0),
                                 num_workers=workers)

    cfg = StudentConfig(store=str(store_url), data=data, out=Path("unused"), split=split, width=0.25, stage=1,
                        mimic="roi", batch_size=BATCH)
    torch.manual_seed(0)
    model = student_model(cfg, build_student(cfg, dataset.classes), [store]).train()
    it = iter(mimic_loader(0))
    held = [next(it) for _ in range(2)]
    order = np.random.default_rng(0).integers(0, len(store), 4 * len(store))
    rounds = []
    for _ in range(3):  # back to back, so load drift hits all alike
        row = {"load_avg_1min_start": os.getloadavg()[0]}
        row |= {"student_images_per_s": _student_rate(model, held, sizes.student_iters),
                "mimic_loader_images_per_s": _steady_rate(mimic_loader(2), sizes.read_batches),
                "store_read_images_per_s": _store_rate(store, sizes.read_batches),
                "read_cpu_ms_per_image": _read_cpu_ms(store_url, order, direct=True),
                "read_cpu_ms_per_image_zarr_decoder": _read_cpu_ms(store_url, order, direct=False)}
        rounds.append(row)
        print(f"  round: student {row['student_images_per_s']:.1f} img/s, loader {row['mimic_loader_images_per_s']:.1f}"
              f", store read {row['store_read_images_per_s']:.1f}; read CPU {row['read_cpu_ms_per_image']:.2f} ms vs "
              f"{row['read_cpu_ms_per_image_zarr_decoder']:.2f} ms (zarr); load {row['load_avg_1min_start']:.1f}",
              flush=True)
    return {"store": {"backend": "zarr", "dtype": store.manifest.dtype, "channels": store.manifest.channels,
                      "max_hw": list(store.manifest.max_hw), "images": len(store)},
            "loader_workers": 2, "student": {"width": 0.25, "stage": 1, "mimic": "roi", "batch_size": BATCH,
                                            "side_px": pre.min_size, "step": "StudentModel forward+backward+SGD"},
            "rounds": rounds, "median": _read_rate_medians(rounds), "target": "loader >= 5x student"}


def _steady_rate(loader, batches: int) -> float:
    """Images/s over ``batches`` batches after the first (worker start-up is not steady state)."""
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - t)


class _Features(torch.utils.data.Dataset):
    """The stored feature maps alone, by store index."""

    def __init__(self, store) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.store.read(i).features)


def _store_rate(store, batches: int) -> float:
    # Random order with replacement, one endless pass: workers start once (as the trainer's persistent ones do)
    features = _Features(store)
    sampler = torch.utils.data.RandomSampler(features, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(features, batch_size=BATCH, sampler=sampler, num_workers=2,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    return _steady_rate(loader, batches)


def _student_rate(model: torch.nn.Module, held: list, iters: int) -> float:
    """Images/s of the student's training step (forward, backward, SGD) on batches read beforehand."""
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def step(mb) -> None:
        losses = model(mb)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

    step(held[0])  # warm-up
    t = time.perf_counter()
    for k in range(iters):
        step(held[k % len(held)])
    return iters * BATCH / (time.perf_counter() - t)


def _read_cpu_ms(store_url: Path, order: np.ndarray, *, direct: bool) -> float:
    """CPU ms per StoreReader.read in random order, in this process: the direct path vs zarr's decoder."""
    from mimicdet.store.zarr_backend import ZarrBackend

    reader = open_store(store_url)
    if not direct:
        reader._backend = ZarrBackend(reader._backend.location, reader.manifest, writable=False)
    reader.read(0)
    c = time.process_time()
    for i in order:
        reader.read(int(i))
    return 1e3 * (time.process_time() - c) / len(order)


def _read_rate_medians(rounds: list[dict]) -> dict:
    med = {k: median(r[k] for r in rounds) for k in rounds[0]}
    med["mimic_loader_over_student_per_round"] = median(
        r["mimic_loader_images_per_s"] / r["student_images_per_s"] for r in rounds)
    med["mimic_loader_over_student"] = med["mimic_loader_images_per_s"] / med["student_images_per_s"]
    med["store_read_over_student"] = med["store_read_images_per_s"] / med["student_images_per_s"]
    med["student_s_per_iter"] = BATCH / med["student_images_per_s"]
    print(f"  student {med['student_images_per_s']:.1f} img/s; mimic loader {med['mimic_loader_images_per_s']:.1f} "
          f"img/s ({med['mimic_loader_over_student']:.1f}x); store read {med['store_read_images_per_s']:.1f} img/s "
          f"({med['store_read_over_student']:.1f}x)", flush=True)
    return med


# ---------------------------------------------------------------------------------------------- 4. memory


def _vm_hwm_mib(pid: int) -> float:
    """Peak RSS of a process image (``VmHWM``; not ``ru_maxrss``, which Linux carries over from the forked
    parent across exec, so a child of this large benchmark process would report the parent's size)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory(cmd: list[str], log: Path) -> dict:
    """Run `cmd`, sampling every 0.1 s: the main process's VmHWM, each DataLoader worker's RSS, and the RSS
    summed over the process tree (pages shared after fork are counted once per process)."""
    import psutil  # a dependency of dask.distributed

    with open(log, "w") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
        main, worker, tree = 0.0, 0.0, 0.0
        trace: list[tuple[float, float]] = []  # (seconds, main RSS MiB) every 2 s
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                main = max(main, _vm_hwm_mib(proc.pid))
                now = time.perf_counter() - t
                if not trace or now - trace[-1][0] >= 2.0:
                    trace.append((round(now, 1), round(ps.memory_info().rss / 2**20, 1)))
                rss = [c.memory_info().rss / 2**20 for c in ps.children(recursive=True)]
                worker = max([worker, *rss])
                tree = max(tree, ps.memory_info().rss / 2**20 + sum(rss))
            except (psutil.Error, OSError):  # a process ended between listing and reading
                pass
            time.sleep(0.1)
        seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    half = len(trace) // 2
    return {"seconds": seconds, "peak_rss_main_mib": main, "peak_rss_largest_worker_mib": worker,
            "peak_rss_tree_mib": tree,
            # A leak grows with images written: compare the main RSS peaks of the run's two halves.
            "main_rss_max_first_half_mib": max((r for _, r in trace[:half]), default=None),
            "main_rss_max_second_half_mib": max((r for _, r in trace[half:]), default=None),
            "main_rss_trace": trace}


def memory(work: Path, sizes: Sizes) -> dict:
    side, small = sizes.memory_side, sizes.memory_images
    data = synthetic(work, 10 * small, side)
    teacher = calibrated_teacher(work / f"teacher-w025-{side}.pt", width=0.25, side=side)
    runs = []
    for n in (small, 10 * small):
        split = write_split(data, f"first{n}", n)
        cmd = [sys.executable, "-m", "mimicdet.cli", "extract-teacher", "--teacher", str(teacher), "--data", str(data),
               "--split", split, "--out", str(work / "mem-store"), "--overwrite", "--proposals", str(MEMORY_PROPOSALS)]
        run = {"images": n, **peak_memory(cmd, work / "mem.log")}
        run["images_per_s"] = n / run["seconds"]
        runs.append(run)
        print(f"  {n} images: peak RSS main {run['peak_rss_main_mib']:.0f} MiB, largest worker "
              f"{run['peak_rss_largest_worker_mib']:.0f} MiB, tree {run['peak_rss_tree_mib']:.0f} MiB, "
              f"{run['images_per_s']:.0f} img/s", flush=True)
    return {"command": " ".join(["mimic", *cmd[3:]]).replace(split, "firstN").replace(str(work), "WORK"),
            "side_px": side, "teacher_width": 0.25, "proposals": MEMORY_PROPOSALS,
            "shard_size": ExtractConfig.shard_size,
            "loader_workers": "default (0 with the teacher on the CPU)", "runs": runs,
            "main_growth": runs[1]["peak_rss_main_mib"] / runs[0]["peak_rss_main_mib"] - 1,
            "worker_growth": (runs[1]["peak_rss_largest_worker_mib"] / runs[0]["peak_rss_largest_worker_mib"] - 1
                              if runs[0]["peak_rss_largest_worker_mib"] else None),  # no workers on a CPU teacher
            "tree_growth": runs[1]["peak_rss_tree_mib"] / runs[0]["peak_rss_tree_mib"] - 1}


# ---------------------------------------------------------------------------------------------- report


def table(r: dict) -> str:
    lines = ["| measure | figure | target |", "| --- | --- | --- |"]
    if "throughput" in r:
        tp = r["throughput"]
        m = tp["median"]
        lines += [
            f"| extract vs bare teacher, {tp['images']} images (median of {len(tp['rounds'])} rounds) | "
            f"{m['extract_images_per_s']:.2f} vs {m['bare_images_per_s']:.2f} img/s: ratio {m['ratio']:.3f} "
            f"(steady state {m['steady_ratio']:.3f}; fixed cost {m['fixed_s']:.2f} s per run) | >= 0.9 |",
            f"| extract: share of the run's wall time inside the teacher forward (same run) | "
            f"{m['extract_forward_share']:.3f} | >= 0.9 |",
            f"| CPU per image, extract vs bare | {m['extract_cpu_ms_per_image']:.0f} vs "
            f"{m['bare_cpu_ms_per_image']:.0f} ms: ratio {m['cpu_ratio']:.3f} | >= 0.9 |",
            f"| 2 loader workers + writer thread (the default off the CPU) vs bare | "
            f"{m['extract_overlapped_images_per_s']:.2f} img/s: ratio {m['overlapped_ratio']:.3f} "
            f"(CPU ratio {m['overlapped_cpu_ratio']:.3f}) | |",
            f"| decode in line, writer thread vs bare | "
            f"{m['extract_writer_thread_images_per_s']:.2f} img/s: ratio {m['writer_thread_ratio']:.3f} "
            f"(CPU ratio {m['writer_thread_cpu_ratio']:.3f}) | |",
        ]
    if "storage" in r:
        for s in r["storage"]["stores"]:
            lines.append(f"| {s['backend']} {s['dtype']}: bytes/image, ratio vs float32 | "
                         f"{s['bytes_per_image'] / 1024:.1f} KiB, {s['compression_ratio_vs_float32']:.2f}x "
                         f"(max abs err {s['max_abs_error']:.4f}, rel RMS {s['relative_rms_error']:.4f}) | "
                         f"{'>= 8x' if s['dtype'] == 'int8' else ''} |")
        b = r["storage"]["int8_8x_budget"]
        lines.append(f"| int8 at 8x: bytes/image allowed vs maps at their entropy (order 0 / per channel) + "
                     f"records as stored | {b['bytes_per_image_at_8x'] / 1024:.1f} KiB vs "
                     f"{b['int8_map_bytes_at_order0_entropy'] / 1024:.1f} / "
                     f"{b['int8_map_bytes_at_per_channel_entropy'] / 1024:.1f} + "
                     f"{b['record_bytes_as_stored'] / 1024:.1f} KiB | |")
    if "read" in r:
        med = r["read"]["median"]
        lines += [
            f"| student loader (2 workers) vs student step | {med['mimic_loader_images_per_s']:.1f} vs "
            f"{med['student_images_per_s']:.1f} img/s = {med['mimic_loader_over_student']:.1f}x | >= 5x |",
            f"| bare store read (2 workers) vs student step | {med['store_read_images_per_s']:.1f} img/s = "
            f"{med['store_read_over_student']:.1f}x | >= 5x |",
            f"| StoreReader.read CPU per image, random order: direct path vs zarr's decoder | "
            f"{med['read_cpu_ms_per_image']:.2f} vs {med['read_cpu_ms_per_image_zarr_decoder']:.2f} ms | |",
        ]
    if "memory" in r:
        mem = r["memory"]
        a, b = mem["runs"]
        lines.append(f"| peak RSS {a['images']} vs {b['images']} images: main / largest worker / tree | "
                     f"{a['peak_rss_main_mib']:.0f} / {a['peak_rss_largest_worker_mib']:.0f} / "
                     f"{a['peak_rss_tree_mib']:.0f} vs {b['peak_rss_main_mib']:.0f} / "
                     f"{b['peak_rss_largest_worker_mib']:.0f} / {b['peak_rss_tree_mib']:.0f} MiB "
                     f"({100 * mem['main_growth']:+.1f}% / "
                     f"{'-' if mem['worker_growth'] is None else format(100 * mem['worker_growth'], '+.1f')}% / "
                     f"{100 * mem['tree_growth']:+.1f}%) | flat |")
        lines.append(f"| main RSS over the {b['images']}-image run, max of first vs second half | "
                     f"{b['main_rss_max_first_half_mib']:.0f} vs {b['main_rss_max_second_half_mib']:.0f} MiB | flat |")
    return "\n".join(lines)


def machine() -> dict:
    import numcodecs
    import zarr

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "load_avg_start": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller version (about 2 minutes)")
    parser.add_argument("--teacher", type=Path, default=None, help="trained teacher checkpoint (synthetic classes)")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and stores (default: temp, removed)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    args = parser.parse_args()

    sizes = QUICK if args.quick else DEFAULT
    sections = [x.strip() for x in args.sections.split(",")]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or ("read" in sections and "storage" not in sections):
        raise SystemExit(f"--sections: choose from {','.join(SECTIONS)} ('read' needs 'storage'), got {args.sections!r}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "sizes": sizes.__dict__,
                    "machine": machine()}
    started = time.perf_counter()
    try:
        data = synthetic(work, max(sizes.throughput_images, sizes.storage_images), 256)
        teacher = args.teacher or find_trained_teacher()
        result["teacher"] = {"path": str(teacher), "trained": True} if teacher else {
            "trained": False, "width": 1.0, "side_px": 256,
            "note": "untrained width-1 detector, batch-norm statistics calibrated on raccoon photos"}
        teacher = teacher or calibrated_teacher(work / "teacher-w1-256.pt", width=1.0, side=256)
        if "throughput" in sections:
            print("1. throughput", flush=True)
            result["throughput"] = throughput(teacher, data, work, sizes)
        if "storage" in sections:
            print("2. storage", flush=True)
            result["storage"] = storage(teacher, data, work, sizes)
        if "read" in sections:
            print("3. read rate", flush=True)
            result["read"] = read_rate(data, work / "store-zarr-float16", result["storage"]["split"], sizes)
        if "memory" in sections:
            print("4. memory", flush=True)
            result["memory"] = memory(work, sizes)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    result["table"] = table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    print(f"({result['seconds']:.0f} s) -> {args.out}")


if __name__ == "__main__":
    main()
