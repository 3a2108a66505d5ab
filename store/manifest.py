"""A feature store's JSON metadata and where it lives: the manifest, per-shard completion markers, and the
location (a local path or an fsspec URL) both backends read and write through.

Layout shared by both backends, under the store's root::

    manifest.json                 written once, atomically, by the coordinator at create time; carries the
                                  sha256 of its own content (``content_sha256``), so a later edit is refused
    _complete/shard-00012.json    written atomically after every array of shard 12 is written: image ids plus
                                  the size and crc32c of each object the shard consists of

Shapes in the manifest: N images, S images per shard, C channels, Hmax×Wmax the padded feature-map size
(stride-`stride` cells of the preprocessed input), K proposals per image, Kc classes including background.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import crc32c
import fsspec
from fsspec.implementations.local import LocalFileSystem
from mimicdet.data.errors import StoreError
from mimicdet.store.remote import call_remote

FORMAT = "mimicdet-feature-store"
# 2: per-proposal records (and the int8 scale) have a dtype, ``proposals.dtype``; int8 stores keep them in float16.
# 1: no such field, records float32. Both are read; new stores are written as 2.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = ("float16", "int8")
RECORD_DTYPES = ("float32", "float16")
BACKENDS = ("zarr", "hdf5")
MANIFEST_NAME = "manifest.json"
MARKER_DIR = "_complete"
TEMP_SUFFIX = ".partial"  # temp files written before an atomic rename (zarr's LocalStore uses the same suffix)
S3_ENDPOINT_ENV = "MIMICDET_S3_ENDPOINT"
CHECKSUM_FIELD = "content_sha256"  # sha256 of the manifest's canonical JSON without this field
# Format 1 was written both before and after checksums; from format 2 on every manifest has one.
FIRST_CHECKSUMMED_VERSION = 2

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- manifest


# Dataclass field -> dotted path in manifest.json; error messages and manifest diffs use the dotted path.
_JSON_PATH = {
    "teacher_arch": "teacher.arch",
    "teacher_width": "teacher.width",
    "teacher_head": "teacher.head",
    "teacher_sha256": "teacher.sha256",
    "classes": "teacher.classes",
    "dataset_name": "dataset.name",
    "dataset_split": "dataset.split",
    "dataset_digest": "dataset.digest",
    "image_ids": "dataset.image_ids",
    "preprocess": "preprocess",
    "flips": "flips",
    "feature_layer": "features.layer",
    "stride": "features.stride",
    "channels": "features.channels",
    "max_hw": "features.max_hw",
    "dtype": "features.dtype",
    "num_proposals": "proposals.k",
    "nms_threshold": "proposals.nms_threshold",
    "records_dtype": "proposals.dtype",
    "shard_size": "layout.shard_size",
    "backend": "layout.backend",
    "format_version": "format_version",
}
# Derived values written for readers of the JSON and checked on load.
_DERIVED = {
    "dataset.num_images": lambda m: m.num_images,
    "features.quantisation": lambda m: m.quantisation,
    "proposals.num_classes": lambda m: m.num_classes,
    "layout.num_shards": lambda m: m.num_shards,
    "layout.completion": lambda m: f"{MARKER_DIR}/shard-NNNNN.json",
}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a feature store holds and how it was made. Every field is validated on construction."""

    # teacher identity
    teacher_arch: str  # e.g. "inception-bn"
    teacher_width: float  # width multiplier w
    teacher_head: str  # e.g. "fast-rcnn" | "rfcn"
    teacher_sha256: str  # sha256 of the checkpoint file
    classes: tuple[str, ...]  # foreground class names; label k+1 <-> classes[k]
    # dataset identity
    dataset_name: str
    dataset_split: str
    dataset_digest: str  # data.records.Dataset.digest()
    image_ids: tuple[str, ...]  # dataset order; image i lives in shard i // shard_size
    # preprocessing: data.transforms.Preprocess.to_dict(), kept as an opaque JSON object
    preprocess: Mapping[str, Any]
    flips: tuple[bool, ...] = (False,)  # (False,) or (False, True): horizontally flipped copies extracted too
    # features
    feature_layer: str
    stride: int  # input pixels per feature cell
    channels: int  # C
    max_hw: tuple[int, int]  # Hmax, Wmax: every map is stored padded to this size
    dtype: str = "float16"  # "float16" | "int8" (symmetric per-channel scale, per image)
    # proposals and head outputs
    num_proposals: int  # K
    nms_threshold: float  # IoU threshold of the NMS that produced the proposals
    # dtype of proposals, scores, class_logits, box_deltas and the int8 scale. None: float16 for int8 stores (the
    # compact choice: 2x smaller records, ~1e-3 relative error, below the int8 map's), float32 otherwise.
    records_dtype: str | None = None
    # layout
    shard_size: int = 64  # S images per shard
    backend: str = "zarr"
    format_version: int = FORMAT_VERSION
    _source: str = field(default="manifest", repr=False, compare=False)  # named in error messages

    def __post_init__(self) -> None:
        for name in ("classes", "image_ids", "flips", "max_hw"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.preprocess, Mapping):
            # Canonical JSON form, so a dict with tuples compares equal to the one read back from disk.
            try:
                canonical = json.loads(json.dumps(dict(self.preprocess), sort_keys=True, allow_nan=False))
            except (TypeError, ValueError) as e:
                self._fail("preprocess", "a JSON-serialisable dict", f"{type(self.preprocess).__name__} ({e})")
            object.__setattr__(self, "preprocess", canonical)
        if isinstance(self.teacher_width, int) and not isinstance(self.teacher_width, bool):
            object.__setattr__(self, "teacher_width", float(self.teacher_width))
        if isinstance(self.nms_threshold, int) and not isinstance(self.nms_threshold, bool):
            object.__setattr__(self, "nms_threshold", float(self.nms_threshold))
        if self.records_dtype is None:
            compact = self.dtype == "int8" and self.format_version != 1
            object.__setattr__(self, "records_dtype", "float16" if compact else "float32")
        self._validate()

    # ------------------------------------------------------------------ derived
    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        """Classes including background: the width of class_logits."""
        return len(self.classes) + 1

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

    @property
    def quantisation(self) -> str:
        if self.dtype != "int8":
            return "none"
        if self.records_dtype == "float16":
            return "per-channel-symmetric, float16 scale rounded up"
        return "per-channel-symmetric"

    @property
    def has_flips(self) -> bool:
        return self.flips == (False, True)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Images [start, stop) of a shard."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"{self._source}: shard {shard} out of range [0, {self.num_shards})")
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Stored arrays per image: name -> (per-image shape, dtype). Flipped copies use the prefix "flip/"."""
        C, (H, W), K, Kc = self.channels, self.max_hw, self.num_proposals, self.num_classes
        r = str(self.records_dtype)
        base: dict[str, tuple[tuple[int, ...], str]] = {"features": ((C, H, W), self.dtype)}
        if self.dtype == "int8":
            base["scale"] = ((C,), r)
        base |= {
            "feature_hw": ((2,), "int32"),
            "proposals": ((K, 4), r),
            "scores": ((K,), r),
            "num_proposals": ((), "int32"),
            "class_logits": ((K, Kc), r),
            "box_deltas": ((K, 4 * Kc), r),
        }
        out = dict(base)
        if self.has_flips:
            out |= {f"flip/{k}": v for k, v in base.items()}
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            if f.name == "records_dtype" and self.format_version == 1:
                continue  # a version-1 manifest has no such field (its records are float32)
            value = getattr(self, f.name)
            _set_path(out, _JSON_PATH[f.name], list(value) if isinstance(value, tuple) else value)
        for path, fn in _DERIVED.items():
            _set_path(out, path, fn(self))
        return out

    def content_sha256(self) -> str:
        """The checksum stored in the manifest: sha256 of its canonical JSON (identifies a store by content)."""
        return _content_sha256(self.to_dict())

    def to_json(self) -> str:
        doc = self.to_dict()
        doc[CHECKSUM_FIELD] = _content_sha256(doc)
        return json.dumps(doc, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "manifest") -> Manifest:
        """Parse and validate; raises StoreError naming `source`, the field and what was expected."""
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{source}: manifest is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{source}: manifest must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise StoreError(f"{source}: field format: expected {FORMAT!r}, got {doc.get('format')!r}")
        version = doc.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{source}: field format_version: expected one of {list(READABLE_VERSIONS)} (this version of mimicdet "
                f"reads those), got {version!r}; extract the store again with this version"
            )
        kwargs: dict[str, Any] = {}
        for name, path in _JSON_PATH.items():
            if name == "records_dtype" and version == 1:
                continue  # version 1: float32 records, no field
            try:
                kwargs[name] = _get_path(doc, path)
            except KeyError:
                raise StoreError(f"{source}: field {path}: missing") from None
        for name in kwargs:
            # JSON arrays become tuples; anything else keeps its JSON type so _validate sees what was written.
            if isinstance(kwargs[name], list) and name in ("classes", "image_ids", "flips", "max_hw"):
                kwargs[name] = tuple(kwargs[name])
        manifest = cls(**kwargs, _source=source)
        for path, fn in _DERIVED.items():
            try:
                stored = _get_path(doc, path)
            except KeyError:
                raise StoreError(f"{source}: field {path}: missing") from None
            if stored != fn(manifest):
                raise StoreError(f"{source}: field {path}: expected {fn(manifest)!r} (derived), got {stored!r}")
        # Last, so a malformed field is named above; this catches edits that leave every field valid (a renamed
        # class or image id, another channel count) and would otherwise mislabel every stored record.
        checksum = doc.pop(CHECKSUM_FIELD, None)
        if checksum is None and version >= FIRST_CHECKSUMMED_VERSION:
            raise StoreError(
                f"{source}: field {CHECKSUM_FIELD}: missing; every format-{version} manifest carries it, so this one "
                "was edited after the store was written; restore it or extract the store again"
            )
        if checksum is not None and checksum != _content_sha256(doc):
            raise StoreError(
                f"{source}: field {CHECKSUM_FIELD}: the manifest's content does not match its checksum "
                f"(expected {checksum[:16]}..., the file gives {_content_sha256(doc)[:16]}...): it was edited after "
                "the store was written; restore it or extract the store again"
            )
        return manifest

    # ------------------------------------------------------------------ comparison
    def diff(self, other: Manifest) -> list[str]:
        """One line per field that differs, named by its manifest path: "dataset.digest: 'ab…' != 'cd…'"."""
        return [f"{path}: {a} != {b}" for path, a, b in self.diff_fields(other)]

    def diff_fields(self, other: Manifest) -> list[tuple[str, str, str]]:
        """(manifest path, this value, other value) for every differing field; dicts compared key by key."""
        out: list[tuple[str, str, str]] = []
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a == b:
                continue
            path = _JSON_PATH[f.name]
            if f.name == "preprocess":
                out.extend(_dict_diff(path, a, b))
            elif f.name == "image_ids":
                out.append((path, *_ids_diff(a, b)))
            else:
                out.append((path, _short(a), _short(b)))
        return out

    # ------------------------------------------------------------------ validation
    def _fail(self, name: str, expected: str, got: Any) -> None:
        raise StoreError(f"{self._source}: field {_JSON_PATH.get(name, name)}: expected {expected}, got {_short(got)}")

    def _validate(self) -> None:
        for name in ("teacher_arch", "teacher_head", "dataset_name", "dataset_split", "feature_layer"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                self._fail(name, "a non-empty string", v)
        for name in ("teacher_sha256", "dataset_digest"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _HEX64.match(v):
                self._fail(name, "a sha256 hex digest (64 lowercase hex characters)", v)
        if not (isinstance(self.teacher_width, float) and math.isfinite(self.teacher_width) and self.teacher_width > 0):
            self._fail("teacher_width", "a positive number", self.teacher_width)
        for name in ("classes", "image_ids"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(s, str) and s for s in v):
                self._fail(name, "a list of non-empty strings", v)
            if len(set(v)) != len(v):
                dup = next(s for i, s in enumerate(v) if s in v[:i])
                self._fail(name, "unique names", f"duplicate {dup!r}")
        if not self.classes:
            self._fail("classes", "at least one class", self.classes)
        if not isinstance(self.preprocess, dict):
            self._fail("preprocess", "a JSON object", self.preprocess)
        if self.flips not in ((False,), (False, True)):
            self._fail("flips", "[false] or [false, true]", self.flips)
        for name in ("stride", "channels", "num_proposals", "shard_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                self._fail(name, "a positive integer", v)
        if not (
            isinstance(self.max_hw, tuple) and len(self.max_hw) == 2 and all(_is_int(x) and x > 0 for x in self.max_hw)
        ):
            self._fail("max_hw", "[Hmax, Wmax] positive integers", self.max_hw)
        if self.dtype not in DTYPES:
            self._fail("dtype", " or ".join(map(repr, DTYPES)), self.dtype)
        if not (isinstance(self.nms_threshold, float) and 0.0 < self.nms_threshold <= 1.0):
            self._fail("nms_threshold", "an IoU threshold in (0, 1]", self.nms_threshold)
        if self.backend not in BACKENDS:
            self._fail("backend", " or ".join(map(repr, BACKENDS)), self.backend)
        if self.format_version not in READABLE_VERSIONS:
            self._fail("format_version", " or ".join(map(str, READABLE_VERSIONS)), self.format_version)
        if self.records_dtype not in RECORD_DTYPES:
            self._fail("records_dtype", " or ".join(map(repr, RECORD_DTYPES)), self.records_dtype)
        if self.format_version == 1 and self.records_dtype != "float32":
            self._fail("records_dtype", "'float32' (format version 1)", self.records_dtype)


def _content_sha256(doc: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _set_path(doc: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
    doc[leaf] = value


def _get_path(doc: dict, path: str) -> Any:
    for p in path.split("."):
        if not isinstance(doc, dict) or p not in doc:
            raise KeyError(path)
        doc = doc[p]
    return doc


def _dict_diff(path: str, a: Any, b: Any) -> list[tuple[str, str, str]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, str, str]] = []
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append((f"{path}.{k}", "missing", _short(b[k])))
            elif k not in b:
                out.append((f"{path}.{k}", _short(a[k]), "missing"))
            elif a[k] != b[k]:
                out.extend(_dict_diff(f"{path}.{k}", a[k], b[k]))
        return out
    return [(path, _short(a), _short(b))]


def _ids_diff(a: Sequence[str], b: Sequence[str]) -> tuple[str, str]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"{len(a)} ids ([{i}] = {x!r})", f"{len(b)} ids ([{i}] = {y!r})"
    return f"{len(a)} ids", f"{len(b)} ids"


def compare(store: Manifest, requested: Manifest) -> list[str]:
    """Mismatches phrased as "store preprocess.min_size 256 != requested 320", one per field."""
    return [f"store {path} {a} != requested {b}" for path, a, b in store.diff_fields(requested)]


# ---------------------------------------------------------------------------------------------- markers


def marker_key(shard: int) -> str:
    return f"{MARKER_DIR}/shard-{shard:05d}.json"


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    crc32c: int

    @staticmethod
    def of(data: bytes | memoryview) -> ObjectInfo:
        return ObjectInfo(len(data), crc32c.crc32c(data))


def marker_json(shard: int, image_ids: Sequence[str], objects: Mapping[str, ObjectInfo]) -> bytes:
    doc = {
        "shard": shard,
        "image_ids": list(image_ids),
        "objects": {k: {"size": v.size, "crc32c": f"{v.crc32c:08x}"} for k, v in sorted(objects.items())},
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


@dataclass(frozen=True)
class Marker:
    shard: int
    image_ids: tuple[str, ...]
    objects: dict[str, ObjectInfo]


def parse_marker(data: bytes, *, source: str) -> Marker:
    """Raises StoreError naming `source` when the marker is not what marker_json writes."""
    try:
        doc = json.loads(data)
        objects = {str(k): ObjectInfo(int(v["size"]), int(v["crc32c"], 16)) for k, v in dict(doc["objects"]).items()}
        return Marker(int(doc["shard"]), tuple(str(i) for i in doc["image_ids"]), objects)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"{source}: malformed completion marker ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------- location


def resolve_storage_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Explicit options win; otherwise an s3:// URL picks up the endpoint from $MIMICDET_S3_ENDPOINT."""
    if storage_options is not None:
        return dict(storage_options)
    endpoint = os.environ.get(S3_ENDPOINT_ENV)
    if endpoint and url.startswith(("s3://", "s3a://")):
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


class Location:
    """The store's root on a filesystem: local paths use os-level atomic renames, remote ones fsspec.

    Pickles as (url, storage_options) and reconnects lazily, so it is safe to send to Dask workers and
    DataLoader processes.
    """

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = os.fspath(url)
        self.storage_options = resolve_storage_options(self.url, storage_options)
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root = ""
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def _connect(self) -> None:
        if self._fs is None or self._pid != os.getpid():
            self._fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            self._root = root.rstrip("/")
            self._pid = os.getpid()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        self._connect()
        assert self._fs is not None
        return self._fs

    @property
    def root(self) -> str:
        self._connect()
        return self._root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``; on object storage with bounded retries, its errors one line naming this store (store/remote.py)."""
        return fn() if self.is_local else call_remote(self.url, what, fn)

    def exists(self, key: str = "") -> bool:
        return self._call(f"looking for {key or 'the store'}", lambda: self.fs.exists(self.path(key)))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._call(f"reading {key}", lambda: self.fs.cat_file(self.path(key)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: {key} not found") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one (temp + rename locally; S3 PUT is atomic)."""
        if self.is_local:
            path = self.path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(self.path(key), data)

    def put_file(self, local_path: str, key: str) -> None:
        """Move a finished local file into the store atomically (rename locally, one PUT remotely)."""
        if self.is_local:
            dest = self.path(key)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(local_path, dest)
        else:
            self.fs.put_file(local_path, self.path(key))
            os.unlink(local_path)

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def list_sizes(self) -> dict[str, int]:
        """Every object under the root: key (relative, '/'-separated) -> size in bytes."""
        self.fs.invalidate_cache()
        try:
            found = self._call("listing the store", lambda: self.fs.find(self.root, detail=True))
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        out: dict[str, int] = {}
        for path, info in found.items():
            path = path.replace(os.sep, "/") if self.is_local else path
            key = path[len(prefix) :] if path.startswith(prefix) else path
            out[key] = int(info.get("size") or 0)
        return out

    def is_empty(self) -> bool:
        return not self.list_sizes()

    def remove_all(self) -> None:
        if self.exists():
            self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache()
