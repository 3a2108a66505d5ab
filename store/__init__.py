"""The feature store: the on-disk contract between the teacher (writer) and the student (reader).

Per image, in dataset order, stored in shard ``i // shard_size``: the teacher's feature map (float16, or int8
with a per-channel scale), its real size, the top-K proposals with scores, and the teacher head's class logits
and box deltas on them; the same again under ``flip/`` for horizontally flipped copies. A shard counts once its
completion marker (object sizes and crc32c) is written, so writers of disjoint shards may run on different
machines. The full contract: docs/store-format.md.

Modules: ``manifest`` (what a store is), ``format`` (packing one shard), ``zarr_backend`` / ``hdf5_backend``
(the two layouts), ``backend`` (opening a location), ``writer``, ``reader``, ``verify``, ``inspect``, ``training``
(:func:`open_for_training`: every check before a student trains on stores), ``cache`` (the local copy of a remote
store's shards that readers go through) and ``remote`` (bounded retries and one-line errors of object storage).
Locations are local paths or fsspec URLs (``s3://bucket/prefix``; pass ``storage_options`` or set
``$MIMICDET_S3_ENDPOINT`` for an S3-compatible endpoint).
"""

from mimicdet.data.errors import StoreError
from mimicdet.store.format import ImageFeatures, quantise_int8
from mimicdet.store.inspect import describe_store, format_inspection, inspect_store
from mimicdet.store.manifest import FORMAT_VERSION, Manifest
from mimicdet.store.reader import StoreReader, open_store
from mimicdet.store.training import TrainingStores, open_for_training
from mimicdet.store.verify import VerifyReport, check_dataset, verify_store
from mimicdet.store.writer import StoreWriter, create_store, open_writer

__all__ = [
    "FORMAT_VERSION",
    "ImageFeatures",
    "Manifest",
    "StoreError",
    "StoreReader",
    "StoreWriter",
    "TrainingStores",
    "VerifyReport",
    "check_dataset",
    "create_store",
    "describe_store",
    "format_inspection",
    "inspect_store",
    "open_for_training",
    "open_store",
    "open_writer",
    "quantise_int8",
    "verify_store",
]
