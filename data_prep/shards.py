"""Parquet shards and their manifest: the contract between preparation and training.

One row per sample: ``key`` (stable, unique within a split), ``image`` (the encoded bytes as
found), ``image_format``, ``label`` (PNG of uint8 train ids, 255 = ignore), ``height``,
``width``. Beside the shards, ``manifest.json``: the dataset's name, classes, palette and ignore
index, how it was prepared, and per split the shard files with row counts and sha256 and the
rejected inputs with their reasons. Files are written to a temporary name and renamed, so a
partial file is never visible under its final name. Paths may be local or any URI that
``pyarrow.fs`` understands (``s3://bucket/prefix``, ``gs://...``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image", pa.binary()),
    ("image_format", pa.string()),
    ("label", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write data to path through a temporary sibling and a rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def encode_table(rows: list[dict]) -> bytes:
    """Parquet bytes of the rows (deterministic: same rows, same bytes)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    # image and label are PNG/JPEG bytes already: compressing, dictionary-encoding or taking
    # min/max statistics of them costs time and gains nothing
    pq.write_table(table, buf, compression="none", use_dictionary=["key", "image_format"],
                   write_statistics=["key", "height", "width"])
    return buf.getvalue()


def write_shard(fs: pafs.FileSystem, base: str, name: str, rows: list[dict]) -> dict:
    """Writes the shard atomically; returns its manifest record (file, rows, sha256)."""
    data = encode_table(rows)
    atomic_write(fs, f"{base}/{name}", data)
    return {"file": name, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def read_manifest(location: str) -> dict | None:
    fs, base = resolve(location)
    path = f"{base}/{MANIFEST}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_manifest(location: str, manifest: dict) -> None:
    fs, base = resolve(location)
    atomic_write(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())


class ShardChecksumError(ValueError):
    """A shard on disk does not match the manifest."""


def verify_shards(location: str, manifest: dict, splits: list[str] | None = None) -> None:
    """Raises ShardChecksumError naming the first shard that is missing or whose sha256 differs."""
    fs, base = resolve(location)
    for split in splits or list(manifest["splits"]):
        for shard in manifest["splits"][split]["shards"]:
            path = f"{base}/{shard['file']}"
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise ShardChecksumError(f"shard {path} listed in the manifest is missing")
            if sha256_of(fs, path) != shard["sha256"]:
                raise ShardChecksumError(f"shard {path} does not match the sha256 in {base}/{MANIFEST}: "
                                         "the file changed after preparation; prepare the data again")


def shard_paths(location: str, manifest: dict, split: str) -> tuple[pafs.FileSystem, list[str]]:
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not prepared; the manifest has {sorted(manifest['splits'])}")
    fs, base = resolve(location)
    return fs, [f"{base}/{s['file']}" for s in manifest["splits"][split]["shards"] if s["rows"]]
