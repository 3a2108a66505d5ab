"""What a store holds, for people: manifest, size on disk, completion, compression."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mimicdet.store.backend import load_manifest, make_backend
from mimicdet.store.format import FLIP_PREFIX
from mimicdet.store.manifest import (
    Location,
    marker_key,
)


def inspect_store(url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Manifest, bytes on disk, raw float32 size of what is stored, compression ratio, bytes per image, the
    images each shard holds and completion. Raw float32 counts each image's real map (C·h·w) and its k proposals'
    rows. A shard is complete when its marker and every one of its objects exist (one listing: a marker is not
    parsed and no object is checked beyond its presence; `verify_store` checks sizes and checksums);
    ``missing_objects`` names, per shard with a marker, the objects it lacks."""
    location = Location(url, storage_options)
    manifest = load_manifest(location)
    backend = make_backend(location, manifest, writable=False)
    sizes = location.list_sizes()
    missing_objects: dict[int, list[str]] = {}
    done = []
    for shard in range(manifest.num_shards):
        if marker_key(shard) not in sizes:
            continue
        lacking = [k for k in backend.shard_keys(shard) if k not in sizes]
        if lacking:
            missing_objects[shard] = lacking
        else:
            done.append(shard)
    C, Kc = manifest.channels, manifest.num_classes
    data_bytes = raw = images = 0
    for shard in done:
        data_bytes += sum(sizes.get(k, 0) for k in backend.shard_keys(shard))
        for prefix in [""] + ([FLIP_PREFIX] if manifest.has_flips else []):
            hw = backend.read_shard_array(shard, prefix + "feature_hw").astype(np.int64)
            k = backend.read_shard_array(shard, prefix + "num_proposals").astype(np.int64)
            raw += 4 * int((C * hw[:, 0] * hw[:, 1]).sum() + (k * (4 + 1 + Kc + 4 * Kc)).sum())
        start, stop = manifest.shard_range(shard)
        images += stop - start
    backend.close()
    return {
        "url": location.url,
        "manifest": manifest.to_dict(),
        "bytes_on_disk": sum(sizes.values()),
        "shard_bytes": data_bytes,
        "raw_float32_bytes": raw,
        "compression_ratio": raw / data_bytes if data_bytes else None,
        "bytes_per_image": data_bytes / images if images else None,
        "images_done": images,
        "shard_images": [stop - start for start, stop in map(manifest.shard_range, range(manifest.num_shards))],
        "missing_objects": missing_objects,
        "completion": {
            "done": len(done),
            "total": manifest.num_shards,
            "pending": sorted(set(range(manifest.num_shards)) - set(done)),
        },
    }


def format_inspection(info: Mapping[str, Any]) -> str:
    m = info["manifest"]
    t, d, f, p, lay = m["teacher"], m["dataset"], m["features"], m["proposals"], m["layout"]
    c = info["completion"]
    pending = c["pending"]
    ratio = info["compression_ratio"]
    per_image = info["bytes_per_image"]
    damaged = sorted(info["missing_objects"].items())
    lines = [
        f"store       {info['url']}  ({lay['backend']}, format {m['format_version']})",
        f"teacher     {t['arch']} width {t['width']} head {t['head']}  sha256 {t['sha256'][:16]}...  "
        f"{len(t['classes'])} classes: {', '.join(t['classes'][:8])}{' ...' if len(t['classes']) > 8 else ''}",
        f"dataset     {d['name']}/{d['split']}: {d['num_images']} images  digest {d['digest'][:16]}...",
        f"preprocess  {json.dumps(m['preprocess'], sort_keys=True)}  flips {m['flips']}",
        f"features    {f['layer']} stride {f['stride']}  C={f['channels']}  max {f['max_hw'][0]}x{f['max_hw'][1]}  "
        f"{f['dtype']} (quantisation {f['quantisation']})",
        f"proposals   K={p['k']} nms {p['nms_threshold']}  {p['num_classes']} classes incl. background",
        f"shards      {c['done']}/{c['total']} complete ({_shard_images_text(info['shard_images'])})"
        + (f"; pending {pending[:10]}{' ...' if len(pending) > 10 else ''}" if pending else ""),
        *(
            f"damaged     shard {shard}: has its completion marker but lacks {_keys_text(keys)} "
            "(`mimic extract-teacher ... --resume` rewrites it)"
            for shard, keys in damaged[:10]
        ),
        *([f"damaged     ... and {len(damaged) - 10} more shards"] if len(damaged) > 10 else []),
        f"on disk     {_human(info['bytes_on_disk'])} total, "
        f"{_human(info['shard_bytes'])} in shards for {info['images_done']} images",
        f"raw float32 {_human(info['raw_float32_bytes'])}; compression {ratio:.2f}x; {_human(per_image)} per image"
        if ratio
        else "raw float32 (no complete shards yet)",
    ]
    return "\n".join(lines)


def _shard_images_text(counts: Sequence[int]) -> str:
    """Images per shard, as stored: "1 shard of 16 images", "2 shards of 4 images", "2 shards: 64 + 36 images"."""
    n = len(counts)
    images = lambda k: f"{k} image{'' if k == 1 else 's'}"  # noqa: E731
    if n == 0:
        return "no shards"
    if len(set(counts)) == 1:
        return f"{n} shard{'' if n == 1 else 's'} of {images(counts[0])}"
    if n <= 3:
        return f"{n} shards: {' + '.join(map(str, counts))} images"
    return f"{n} shards: {images(counts[0])} each, the last {counts[-1]}"


def _keys_text(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more objects" if len(keys) > 3 else "")


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_store(url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """`mimic inspect-store`: the inspection as readable text."""
    return format_inspection(inspect_store(url, storage_options=storage_options))
