"""Extraction on a Dask cluster: one task per shard, each worker process loads the teacher once and writes
its own shards (disjoint objects, so no locking). A LocalCluster of ``--workers`` processes by default, or an
existing scheduler (``--scheduler tcp://host:8786``) whose workers can reach the data and the store location.

Lost workers: dask.distributed reschedules the tasks of a worker that died; a shard is only marked complete
after all of its arrays are written, so a half-finished shard is simply written again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from mimicdet.data.progress import progress_bar
from mimicdet.data.records import Dataset, ImageRecord
from mimicdet.data.transforms import Preprocess
from mimicdet.pipeline.teachers import PREFIX, TeacherSpec

# Set by LocalCluster workers we start; a task reads it to size torch's thread pool.
_THREADS_ENV = "MIMICDET_WORKER_THREADS"


@lru_cache(maxsize=2)
def _worker_teacher(spec: TeacherSpec, device: str):
    """The teacher, loaded once per worker process (tasks of the same run reuse it)."""
    from mimicdet.detection.device import select_device as resolve_device
    from mimicdet.pipeline.teachers import open_teacher

    threads = int(os.environ.get(_THREADS_ENV, "0"))
    if threads:
        torch.set_num_threads(threads)
    return open_teacher(spec, resolve_device(device))


def extract_shard_task(
    *,
    teacher: TeacherSpec,
    device: str,
    store: str,
    storage_options: dict,
    shard: int,
    records: Sequence[ImageRecord],
    preprocess: dict,
    flips: Sequence[bool],
    top_k: int,
    batch_size: int,
) -> int:
    """One Dask task: compute and write one shard. Returns the number of images written."""
    from mimicdet.store import open_writer
    from mimicdet.pipeline.extract import extract_shard

    model = _worker_teacher(teacher, device)
    per_flip = extract_shard(
        model,
        records,
        Preprocess.from_dict(preprocess),
        flips=flips,
        top_k=top_k,
        batch_size=batch_size,
        device=next(model.parameters()).device,
    )
    writer = open_writer(store, storage_options=storage_options or None)
    try:
        writer.write_shard(shard, per_flip[False], per_flip.get(True))
    finally:
        writer.close()
    return len(records)


def check_scheduler(address: str, *, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError naming ``address`` unless a Dask scheduler answers there within ``timeout_s``: checked
    before the store is created, so an unreachable scheduler leaves nothing behind."""
    from distributed import Client

    try:
        Client(address, timeout=timeout_s).close()
    except (OSError, TimeoutError, ValueError) as e:
        cause = " ".join(str(e).split()) or type(e).__name__
        raise ConnectionError(
            f"--scheduler {address}: no Dask scheduler answers there ({cause}); start one with `dask scheduler` "
            "or leave --scheduler out to extract on this machine"
        ) from None


def _resolved(spec: TeacherSpec) -> TeacherSpec:
    """File paths made absolute: workers may run in another folder."""
    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else p

    teacher = spec.teacher if spec.teacher.startswith(PREFIX) else absolute(spec.teacher)
    return replace(spec, teacher=teacher, weights=absolute(spec.weights), class_map=absolute(spec.class_map))


def extract_on_dask(cfg, spec: TeacherSpec, manifest, dataset: Dataset, shards: Sequence[int]) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.scheduler:
        client = Client(cfg.scheduler)
    else:
        threads = max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
        cluster = LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={_THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads)},
        )
        client = Client(cluster)
    try:
        futures = []
        for s in shards:
            start, stop = manifest.shard_range(s)
            futures.append(
                client.submit(
                    extract_shard_task,
                    teacher=_resolved(spec),
                    device=cfg.device,
                    store=str(cfg.out),
                    storage_options=dict(cfg.storage_options or {}),
                    shard=s,
                    records=list(dataset.records[start:stop]),
                    preprocess=dict(manifest.preprocess),
                    flips=list(manifest.flips),
                    top_k=manifest.num_proposals,
                    batch_size=cfg.batch_size,
                    key=f"extract-shard-{s}-{manifest.dataset_digest[:8]}",
                    retries=2,
                    pure=False,
                )
            )
        total = sum(manifest.shard_range(s)[1] - manifest.shard_range(s)[0] for s in shards) * len(manifest.flips)
        with progress_bar(total=total, desc="extract (dask)", unit="img", disable=not cfg.progress) as bar:
            for future in as_completed(futures):
                bar.update(future.result() * len(manifest.flips))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
