"""Training from object storage against local disk: the same store read from s3:// and from a folder, side by side.

The object store is a moto S3 server, a separate process on loopback that shares the machine's cores with the
run (as the issue's measurement did). Every figure comes from this one run.

1. Train: a w = 1 teacher's float16 store of the first 120 raccoon training photos (default preprocessing
   256/512, shards of 64: 2 shards), extracted locally and copied to the bucket byte for byte. A w = 1/4 stage-1
   student (RoI mimic, batch 8, 2 DataLoader workers: the defaults of ``mimic train-student``; the trainer on
   ``--threads`` torch threads, 1 by default) trains ``iters`` iterations from: ``local`` (the folder), ``s3_cold`` (s3:// with an empty shard cache: the first epoch fetches
   the shards), ``s3_warm`` (s3:// again with the cache ``s3_cold`` filled: a second run), and, in the full run,
   ``s3_uncached`` once (the reading path before the cache: zarr's decoder over s3fs). Per iteration
   ``data_time + step_time`` from the trainer's own log (``log_every=1``); an epoch is 120 / 8 = 15 iterations.
   Rounds run the arms in alternating order (``s3_warm`` always after ``s3_cold``); ratios are per round, then
   the median. Targets: s3 within 1.2x of local after the first epoch, within 2x in the first. The runs'
   per-iteration losses are compared: the records read must be the same, so the losses must be equal.
2. Memory: synthetic stores of 500 and 5,000 small images (64 channels, 8x8 maps, 64 proposals) on the bucket;
   a fresh process reads every image once in random order through a cached, prefetching reader (as training
   does); its peak RSS (``VmHWM``, sampled every 0.1 s) for both sizes. Target: flat.
3. Read CPU: ``StoreReader.read`` CPU ms per image in random order, this process only: local direct reader,
   remote through the cache (same direct reader), remote through zarr's decoder (the path before the cache).

    .venv/bin/python benchmarks/remote_store.py [--quick] [--sections train,memory,read] [--work DIR]

``--quick``: 3 rounds instead of 5, no ``s3_uncached`` arm (about 10 minutes on a loaded 2-core machine, against
20). Writes benchmarks/results/remote_store.json (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # this folder: _results, extract (memory sampling)

from _results import write_report  # noqa: E402
from extract import machine, peak_memory  # noqa: E402
from mimicdet.data import load_dataset  # noqa: E402
from mimicdet.data.loader import DetectionImages, collate  # noqa: E402
from mimicdet.data.transforms import Preprocess  # noqa: E402
from mimicdet.detection.detector import DetectorConfig, build_detector, save_detector  # noqa: E402
from mimicdet.pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from mimicdet.store import ImageFeatures, Manifest, create_store, inspect_store, open_store  # noqa: E402
from mimicdet.store.cache import RECORD_DIR  # noqa: E402
from mimicdet.student.train import StudentConfig, run_train_student  # noqa: E402

RACCOON = Path(os.environ.get("MIMICDET_RACCOON", REPO / ".." / "shared" / "data" / "raccoon"))
RESULT = REPO / "benchmarks" / "results" / "remote_store.json"
BUCKET = "bench"
BATCH = 8
SECTIONS = ("train", "memory", "read")
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Sizes:
    images: int = 120
    iters: int = 60
    rounds: int = 5  # other jobs load a shared machine unevenly from one run to the next: the median of 5
    uncached_arm: bool = True
    memory_images: tuple[int, int] = (500, 5000)
    read_images: int = 200


DEFAULT = Sizes()
QUICK = Sizes(rounds=3, uncached_arm=False)


# ---------------------------------------------------------------------------------------------- setup


def moto_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process on a free loopback port; returns (process, endpoint URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            import s3fs

            s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(BUCKET)
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moto server on {endpoint} did not start") from None
            time.sleep(0.2)


def raccoon_split(work: Path, n: int) -> tuple[Path, str]:
    """The raccoon photos (linked, not copied) with a split of the first n training images."""
    root = work / "raccoon"
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for sub in ("JPEGImages", "Annotations"):
        if not (root / sub).exists():
            (root / sub).symlink_to((RACCOON / sub).resolve())
    ids = (RACCOON / "ImageSets" / "Main" / "train.txt").read_text().split()[:n]
    name = f"first{n}"
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root, name


def w1_teacher(path: Path, data: Path, split: str) -> Path:
    """Untrained width-1 detector, batch-norm statistics calibrated by train-mode passes on the photos."""
    torch.manual_seed(0)
    pre = Preprocess()
    dataset = load_dataset(data, split)
    model = build_detector(DetectorConfig(num_classes=len(dataset.classes) + 1, width=1.0))
    photos = DetectionImages(dataset, pre)
    with torch.no_grad():
        model.backbone.train()
        for k in range(3):
            model.backbone(collate([photos[(i, False)] for i in range(8 * k, 8 * k + 8)]).images)
    model.eval()
    save_detector(path, model, {"role": "teacher", "classes": list(dataset.classes), "preprocess": pre.to_dict(),
                                "note": "untrained; batch-norm statistics calibrated on raccoon photos"})
    return path


def upload(local: Path, endpoint: str, key: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.put(str(local), f"{BUCKET}/{key}", recursive=True)
    if not fs.exists(f"{BUCKET}/{key}/manifest.json"):
        raise SystemExit(f"upload of {local} to s3://{BUCKET}/{key} did not land where expected")
    return f"s3://{BUCKET}/{key}"


def median(xs) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------------- 1. train


def train_run(store: str, data: Path, split: str, out: Path, sizes: Sizes, *, endpoint: str | None = None,
              cache_dir: Path | None = None) -> dict:
    """One ``run_train_student`` (stage 1, w = 1/4, the CLI's defaults) and its per-iteration log."""
    options = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    cfg = StudentConfig(store=store, data=data, split=split, out=out, width=0.25, stage=1, mimic="roi",
                        iters=sizes.iters, batch_size=BATCH, workers=2, device="cpu", log_every=1,
                        checkpoint_every=sizes.iters, progress=False, overwrite=True, storage_options=options,
                        cache_dir=str(cache_dir) if cache_dir else None)
    t = time.perf_counter()
    summary = run_train_student(cfg)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    per_iter = [r["s_per_iter"] for r in rows]
    epoch = math.ceil(sizes.images / BATCH)
    cached = len(list(cache_dir.glob(f"*/{RECORD_DIR}/shard-*.json"))) if cache_dir else None
    return {
        "wall_s": wall, "cached_shards_after": cached, "s_per_iter": summary["s_per_iter"],
        "data_fraction": summary["data_fraction"],
        "first_epoch_s_per_iter": float(np.mean(per_iter[:epoch])),
        "first_epoch_median_s_per_iter": median(per_iter[:epoch]),
        "after_first_epoch_s_per_iter": float(np.mean(per_iter[epoch:])),
        "after_first_epoch_median_s_per_iter": median(per_iter[epoch:]),
        "first_epoch_data_s": float(sum(r["data_time"] for r in rows[:epoch])),
        "total_loss": [r["total_loss"] for r in rows],
    }


def _uncached(fn):
    """``fn()`` with remote stores read as before the shard cache: zarr's decoder over s3fs."""
    import mimicdet.store.reader as reader

    saved = reader.cache_settings
    reader.cache_settings = lambda *a, **k: None
    try:
        return fn()
    finally:
        reader.cache_settings = saved


def train_round(rep: int, arms: dict, sizes: Sizes) -> dict:
    order = ["local", "s3_cold", "s3_warm"] if rep % 2 == 0 else ["s3_cold", "s3_warm", "local"]
    if sizes.uncached_arm and rep == 0:
        order.append("s3_uncached")
    row: dict = {"order": order, "load_avg_start": list(os.getloadavg())}
    for arm in order:
        row[arm] = arms[arm]()
        print(f"  round {rep} {arm}: {row[arm]['s_per_iter']:.3f} s/iter (first epoch "
              f"{row[arm]['first_epoch_s_per_iter']:.3f}, after {row[arm]['after_first_epoch_s_per_iter']:.3f})",
              flush=True)
    local = row["local"]
    row["cold_first_epoch_ratio"] = row["s3_cold"]["first_epoch_s_per_iter"] / local["first_epoch_s_per_iter"]
    row["cold_after_first_epoch_ratio"] = (row["s3_cold"]["after_first_epoch_s_per_iter"]
                                           / local["after_first_epoch_s_per_iter"])
    row["cold_after_first_epoch_median_ratio"] = (row["s3_cold"]["after_first_epoch_median_s_per_iter"]
                                                  / local["after_first_epoch_median_s_per_iter"])
    row["warm_ratio"] = row["s3_warm"]["s_per_iter"] / local["s_per_iter"]
    if "s3_uncached" in row:
        row["uncached_ratio"] = row["s3_uncached"]["s_per_iter"] / local["s_per_iter"]
    row["losses_identical"] = all(row[a]["total_loss"] == local["total_loss"] for a in order)
    row["load_avg_end"] = list(os.getloadavg())
    return row


@dataclass(frozen=True)
class Prepared:
    data: Path
    split: str
    local: Path  # the store on local disk
    url: str  # the same store on the bucket


def prepare(work: Path, endpoint: str, sizes: Sizes) -> Prepared:
    """The w = 1 teacher's store of the first ``images`` raccoon photos, locally and on the bucket."""
    data, split = raccoon_split(work, sizes.images)
    local = work / "store"
    if not ((local / "manifest.json").exists() and open_store(local).is_complete()):  # kept from a --work run
        teacher = w1_teacher(work / "teacher-w1.pt", data, split)
        t = time.perf_counter()
        run_extract(ExtractConfig(teacher=teacher, data=data, split=split, out=str(local), progress=False,
                                  device="cpu", mode="overwrite"))
        print(f"  extracted {sizes.images} images in {time.perf_counter() - t:.0f} s", flush=True)
    return Prepared(data, split, local, upload(local, endpoint, "train-store"))


def train(work: Path, endpoint: str, sizes: Sizes, p: Prepared) -> dict:
    data, split, local, url = p.data, p.split, p.local, p.url
    info = inspect_store(local)
    caches = iter(work / "caches" / f"round{k}" for k in range(sizes.rounds))
    cache = {}  # the cold arm's fresh cache folder, which the warm arm (a second run) reuses

    def cold() -> dict:
        cache["dir"] = next(caches)
        shutil.rmtree(cache["dir"], ignore_errors=True)  # left by an earlier run with the same --work
        return train_run(url, data, split, work / "run-s3", sizes, endpoint=endpoint, cache_dir=cache["dir"])

    arms = {
        "local": lambda: train_run(str(local), data, split, work / "run-local", sizes),
        "s3_cold": cold,
        "s3_warm": lambda: train_run(url, data, split, work / "run-s3", sizes, endpoint=endpoint,
                                     cache_dir=cache["dir"]),
        "s3_uncached": lambda: _uncached(lambda: train_run(url, data, split, work / "run-s3", sizes,
                                                           endpoint=endpoint)),
    }
    rounds = [train_round(rep, arms, sizes) for rep in range(sizes.rounds)]
    keys = ["cold_first_epoch_ratio", "cold_after_first_epoch_ratio", "cold_after_first_epoch_median_ratio",
            "warm_ratio"]
    med = {k: median(r[k] for r in rounds) for k in keys}
    for arm in ("local", "s3_cold", "s3_warm"):
        for k in ("s_per_iter", "first_epoch_s_per_iter", "after_first_epoch_s_per_iter"):
            med[f"{arm}_{k}"] = median(r[arm][k] for r in rounds)
    if sizes.uncached_arm:
        med["uncached_ratio"] = rounds[0]["uncached_ratio"]
        med["s3_uncached_s_per_iter"] = rounds[0]["s3_uncached"]["s_per_iter"]
    for r in rounds:
        for arm in r["order"]:
            del r[arm]["total_loss"]
    return {"images": sizes.images, "iters": sizes.iters, "batch_size": BATCH,
            "epoch_iters": math.ceil(sizes.images / BATCH),
            "store_bytes": info["shard_bytes"], "shards": info["manifest"]["layout"]["num_shards"],
            "student": "w=1/4 stage 1, roi mimic, 2 DataLoader workers, CPU",
            "rounds": rounds, "median": med,
            "losses_identical": all(r["losses_identical"] for r in rounds),
            "targets": {"cold_after_first_epoch_ratio": "<= 1.2", "cold_first_epoch_ratio": "<= 2"}}


# ---------------------------------------------------------------------------------------------- 2. memory

MEMORY_SHAPE = {"channels": 64, "max_hw": (8, 8), "num_proposals": 64}


def synthetic_manifest(n: int) -> Manifest:
    ids = tuple(f"img{i:05d}" for i in range(n))
    return Manifest(
        teacher_arch="inception-bn", teacher_width=1.0, teacher_head="fast-rcnn",
        teacher_sha256=hashlib.sha256(b"synthetic teacher").hexdigest(), classes=("a", "b"),
        dataset_name="synthetic", dataset_split=f"first{n}", dataset_digest=hashlib.sha256(str(n).encode()).hexdigest(),
        image_ids=ids, preprocess=Preprocess().to_dict(), feature_layer="inception4e", stride=16,
        nms_threshold=0.7, shard_size=64, **MEMORY_SHAPE,
    )


def synthetic_item(m: Manifest, i: int) -> ImageFeatures:
    rng = np.random.default_rng(i)
    k = m.num_proposals
    xy = rng.uniform(0, 100, (k, 2)).astype(np.float32)
    return ImageFeatures(
        image_id=m.image_ids[i], features=np.maximum(rng.normal(0, 1, (m.channels, *m.max_hw)), 0).astype(np.float32),
        proposals=np.concatenate([xy, xy + 20], 1), scores=rng.uniform(size=k).astype(np.float32),
        class_logits=rng.normal(size=(k, m.num_classes)).astype(np.float32),
        box_deltas=rng.normal(size=(k, 4 * m.num_classes)).astype(np.float32),
    )


def synthetic_store(endpoint: str, n: int) -> str:
    url = f"s3://{BUCKET}/synthetic-{n}"
    writer = create_store(url, synthetic_manifest(n), mode="overwrite",
                          storage_options={"client_kwargs": {"endpoint_url": endpoint}})
    for s in range(writer.manifest.num_shards):
        a, b = writer.shard_range(s)
        writer.write_shard(s, [synthetic_item(writer.manifest, i) for i in range(a, b)])
    return url


# The measured process: every image once, in random order, through a cached, prefetching reader. Only the store
# package is imported (and what it pulls in: torch, zarr, s3fs; about 550 MiB before any read). It reports its
# own VmHWM when done and leaves with os._exit: the interpreter's teardown adds a spike of 0-100 MiB that varies
# from run to run and has nothing to do with reading.
CHILD_READ = """
import os, sys, numpy as np
from mimicdet.store import open_store
url, endpoint, cache_dir = sys.argv[1:]
reader = open_store(url, storage_options={"client_kwargs": {"endpoint_url": endpoint}}, cache_dir=cache_dir,
                    prefetch=True)
total = 0.0
for i in np.random.default_rng(0).permutation(len(reader)):
    total += float(reader.read(int(i)).features[0, 0, 0])
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(f"read {len(reader)} images ({total:.3f}); VmHWM {hwm} kB", flush=True)
os._exit(0)
"""


def memory(work: Path, endpoint: str, sizes: Sizes) -> dict:
    runs = []
    for n in sizes.memory_images:
        t = time.perf_counter()
        url = synthetic_store(endpoint, n)
        write_s = time.perf_counter() - t
        cache = work / f"memory-cache-{n}"
        cmd = [sys.executable, "-c", CHILD_READ, url, endpoint, str(cache)]
        run = {"images": n, "write_s": write_s, **peak_memory(cmd, work / "memory.log")}
        run["child_vm_hwm_mib"] = int((work / "memory.log").read_text().split("VmHWM ")[1].split()[0]) / 1024
        run["images_per_s"] = n / run["seconds"]
        run["store_bytes"] = inspect_store(url, storage_options={"client_kwargs": {"endpoint_url": endpoint}})[
            "shard_bytes"]
        del run["main_rss_trace"]
        runs.append(run)
        print(f"  {n} images: peak RSS {run['peak_rss_main_mib']:.0f} MiB, {run['images_per_s']:.0f} img/s",
              flush=True)
    small, large = runs
    return {"what": "fresh process: open_store(prefetch=True), every image read once in random order",
            "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in MEMORY_SHAPE.items()},
            "runs": runs, "main_growth": large["peak_rss_main_mib"] / small["peak_rss_main_mib"] - 1,
            "child_hwm_growth": large["child_vm_hwm_mib"] / small["child_vm_hwm_mib"] - 1,
            "note": "peak_rss_main_mib: VmHWM sampled every 0.1 s from outside (benchmarks/extract.py's peak_memory); "
                    "child_vm_hwm_mib: the child's own VmHWM after its last read. About 550 MiB of either is the "
                    "imports (torch, zarr, s3fs) before any read.",
            "target": "flat"}


# ---------------------------------------------------------------------------------------------- 3. read CPU


def read_cpu(work: Path, endpoint: str, sizes: Sizes, p: Prepared) -> dict:
    """CPU ms per ``StoreReader.read`` in random order (this process): local, remote cached, remote via zarr."""
    local, url = p.local, p.url
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    readers = {
        "local_direct": lambda: open_store(local),
        "s3_cached_direct": lambda: open_store(url, storage_options=options, cache_dir=work / "read-cache"),
        "s3_zarr_decoder": lambda: _uncached(lambda: open_store(url, storage_options=options)),
    }
    out = {}
    for name, make in readers.items():
        reader = make()
        order = np.random.default_rng(1).integers(0, len(reader), sizes.read_images)
        for s in range(reader.manifest.num_shards):  # warm: the cache filled, indexes read
            reader.read(s * reader.manifest.shard_size)
        c, t = time.process_time(), time.perf_counter()
        for i in order:
            reader.read(int(i))
        out[f"{name}_cpu_ms"] = 1e3 * (time.process_time() - c) / len(order)
        out[f"{name}_wall_ms"] = 1e3 * (time.perf_counter() - t) / len(order)
        print(f"  {name}: {out[f'{name}_cpu_ms']:.2f} ms CPU per read", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- report


def table(r: dict) -> str:
    lines = ["| measure | figure | target |", "| --- | --- | --- |"]
    if "train" in r:
        t, m = r["train"], r["train"]["median"]
        per_round = lambda k: ", ".join(f"{row[k]:.2f}" for row in t["rounds"])  # noqa: E731
        lines += [
            f"| stage-1 s/iter after the first epoch, s3:// (cold cache) / local: per round (median) | "
            f"{per_round('cold_after_first_epoch_ratio')} ({m['cold_after_first_epoch_ratio']:.2f}x) | <= 1.2x |",
            f"| first epoch ({t['epoch_iters']} iterations, shards fetched meanwhile), s3:// / local | "
            f"{per_round('cold_first_epoch_ratio')} ({m['cold_first_epoch_ratio']:.2f}x) | <= 2x |",
            f"| a second run from s3:// (warm cache) / local, whole run | {per_round('warm_ratio')} "
            f"({m['warm_ratio']:.2f}x) | |",
            f"| s/iter after the first epoch, median over rounds: local / s3:// cold / s3:// warm | "
            f"{m['local_after_first_epoch_s_per_iter']:.3f} / {m['s3_cold_after_first_epoch_s_per_iter']:.3f} / "
            f"{m['s3_warm_after_first_epoch_s_per_iter']:.3f} | |",
        ]
        if "uncached_ratio" in m:
            r0 = t["rounds"][0]
            lines.append(f"| before the cache: s3:// through zarr's decoder, whole run (round 0) vs the same round's "
                         f"s3:// cold / local arms | {m['s3_uncached_s_per_iter']:.3f} vs "
                         f"{r0['s3_cold']['s_per_iter']:.3f}"
                         f" / {r0['local']['s_per_iter']:.3f} s/iter: "
                         f"{m['s3_uncached_s_per_iter'] / r0['s3_cold']['s_per_iter']:.2f}x / "
                         f"{m['uncached_ratio']:.2f}x | |")
        lines.append(f"| per-iteration losses equal in every arm | {t['losses_identical']} | True |")
    if "memory" in r:
        a, b = r["memory"]["runs"]
        lines.append(f"| peak RSS reading {a['images']} vs {b['images']} images from s3:// (fresh process; ~550 MiB "
                     f"of it imports) | {a['peak_rss_main_mib']:.0f} vs {b['peak_rss_main_mib']:.0f} MiB "
                     f"({100 * r['memory']['main_growth']:+.1f}%) | flat |")
    if "read" in r:
        x = r["read"]
        lines.append(f"| StoreReader.read CPU ms/image: local / s3:// cached / s3:// zarr decoder | "
                     f"{x['local_direct_cpu_ms']:.2f} / {x['s3_cached_direct_cpu_ms']:.2f} / "
                     f"{x['s3_zarr_decoder_cpu_ms']:.2f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 5, no s3_uncached arm")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and stores (default: temp, removed)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training process (DataLoader workers use 1): on a shared machine "
                             "more OpenMP threads time out of lockstep with other jobs; every arm uses the same")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(AWS_ENV)  # moto accepts any credentials; s3fs needs some (children inherit them)
    sizes = QUICK if args.quick else DEFAULT
    sections = [x.strip() for x in args.sections.split(",")]
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections: choose from {','.join(SECTIONS)}, got {args.sections!r}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_remote_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "sizes": sizes.__dict__,
                    "machine": machine(), "torch_threads": args.threads,
                    "object_store": "moto S3 server, own process, loopback, same cores"}
    server, endpoint = moto_server()
    started = time.perf_counter()
    try:
        prepared = prepare(work, endpoint, sizes) if {"train", "read"} & set(sections) else None
        if "train" in sections:
            print("1. train", flush=True)
            result["train"] = train(work, endpoint, sizes, prepared)
        if "memory" in sections:
            print("2. memory", flush=True)
            result["memory"] = memory(work, endpoint, sizes)
        if "read" in sections:
            print("3. read CPU", flush=True)
            result["read"] = read_cpu(work, endpoint, sizes, prepared)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    result["table"] = table(result)
    write_report(args.out, result)
    print(result["table"])


if __name__ == "__main__":
    main()
