"""The run's storage root: where every step's output lives, for every node to read.

A location is a plain local path (one machine) or a URI that ``pyarrow.fs`` understands:
``s3://bucket/prefix``, ``gs://...``, or ``file:///mnt/shared`` for a file system every node
mounts. Steps hand each other locations on the root and judge completion there, so no step
reads a path that only one node's disk holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from data_prep.shards import atomic_write, resolve  # noqa: F401 (resolve: part of this module's API)

from .config import PipelineConfig


class StorageError(ValueError):
    """The run's storage cannot be written and read back, or no node but one can reach it."""


def root(cfg: PipelineConfig) -> str:
    """The run's storage root: ``storage`` when set, else the local ``run_dir``."""
    return cfg.storage.rstrip("/") if cfg.storage else str(Path(cfg.run_dir).resolve())


def join(location: str, *parts: str) -> str:
    """location/part/...; a URI's query (``?endpoint_override=...``) stays at the end."""
    if is_node_local(location):
        return "/".join([location.rstrip("/"), *parts])
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def is_node_local(location: str) -> bool:
    """A plain path: on a cluster, only the node that wrote it has it (``file://`` says 'shared')."""
    return "://" not in location


def is_local_fs(location: str) -> bool:
    return isinstance(resolve(location)[0], pafs.LocalFileSystem)


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The location of a path on a file system (Ray's checkpoints carry both, the path bare)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{ {'gcs': 'gs'}.get(fs.type_name, fs.type_name)}://{path.lstrip('/')}"


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(location: str) -> dict | None:
    """The JSON document at location, None when there is none."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return json.loads(read_bytes(location))


def write_json(location: str, obj) -> None:
    """Written whole or not at all: a temporary sibling, then a rename (on object stores, a copy of
    the complete temporary object), so a reader never sees part of it."""
    fs, path = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    atomic_write(fs, path, json.dumps(obj, indent=1, default=str).encode())


def delete(location: str) -> None:
    """The file or the folder at location, if there is one."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def make_dir(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def copy_tree(src: str, dst: str, *, src_fs: pafs.FileSystem | None = None) -> None:
    """Copies the folder src (a location, or a path on src_fs) to the location dst, replacing it."""
    if src_fs is None:
        src_fs, src = resolve(src)
    dst_fs, dst_path = resolve(dst)
    delete(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


@contextlib.contextmanager
def local_copy(location: str):
    """A local folder holding what the folder at location holds: itself when it is on this
    node's file system, else a temporary download, removed afterwards."""
    if is_local_fs(location):
        yield Path(resolve(location)[1])
        return
    tmp = tempfile.mkdtemp(prefix="ccnet-")
    try:
        fs, path = resolve(location)
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writable_dir(location: str):
    """A local folder to write into whose contents end up at location: itself when it is on this
    node's file system, else a temporary folder uploaded when the block ends without error."""
    if is_local_fs(location):
        path = Path(resolve(location)[1])
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="ccnet-")
    try:
        yield Path(tmp)
        fs, path = resolve(location)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe(location: str, what: str = "storage") -> None:
    """Writes a small object under location, reads it back and deletes it, before any work
    starts; a ``StorageError`` naming the URI and the file system's error otherwise (a bucket that
    does not exist, no credentials, an endpoint that does not answer, a path that is a file)."""
    payload = f"ccnet storage probe {uuid.uuid4().hex}".encode()
    try:
        fs, base = resolve(location)
        if isinstance(fs, pafs.LocalFileSystem):  # its nearest existing folder: nothing is left behind
            while not os.path.lexists(base) and os.path.dirname(base) != base:
                base = os.path.dirname(base)
        new_prefixes = []  # object stores: the folders the probe brings into being, deepest first
        prefix = base.rstrip("/")
        while "/" in prefix and fs.get_file_info(prefix).type == pafs.FileType.NotFound:
            new_prefixes.append(prefix)
            prefix = prefix.rsplit("/", 1)[0]
        path = f"{base.rstrip('/')}/.ccnet-probe-{uuid.uuid4().hex}"
        atomic_write(fs, path, payload)
        with fs.open_input_stream(path) as f:
            back = f.read()
        fs.delete_file(path)
        for prefix in new_prefixes:  # the empty folder markers an object store keeps: not left behind
            if fs.get_file_info(prefix).type != pafs.FileType.NotFound:
                fs.delete_dir(prefix)
    except Exception as exc:  # pyarrow raises OSError, FileNotFoundError, ValueError, ... per backend
        raise StorageError(f"{what} {location!r} cannot be written and read back: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else exc!r}. Check the URI, the bucket, the "
                           "credentials and the endpoint (AWS_ENDPOINT_URL), or choose another storage") from None
    if back != payload:
        raise StorageError(f"{what} {location!r} returned other bytes than were written to it")


def cluster_nodes() -> tuple[int, bool]:
    """(alive nodes, whether the work runs on nodes other than the driver's): the case too of an
    autoscaling cluster that starts with its head alone, a head that offers no CPUs to tasks."""
    import ray

    # asked in a task of its own: a driver's global-state client can hang when other threads of the
    # same process (Ray Data's, Ray Train's) use it at the same time, as in a long test session
    look = ray.remote(num_cpus=0, max_retries=1)(_nodes_seen_from).options(scheduling_strategy="DEFAULT")
    return ray.get(look.remote(ray.get_runtime_context().get_node_id()))


def _nodes_seen_from(here: str) -> tuple[int, bool]:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head_only_drives = any(n["NodeID"] == here and not n.get("Resources", {}).get("CPU") for n in nodes)
    return len(nodes), len(nodes) > 1 or head_only_drives


def check_reachable(location: str, what: str = "storage", nodes: tuple[int, bool] | None = None) -> None:
    """Several nodes need locations they all reach: an object store or a shared file system.
    ``nodes``: ``cluster_nodes()``, when the caller has it already."""
    count, elsewhere = nodes or cluster_nodes()
    if elsewhere and is_node_local(location):
        raise StorageError(
            f"{what}={location!r} is a local path, but the Ray cluster has {count} node(s) and runs tasks on "
            "nodes other than this one (or will, as it scales up): what one node writes there"
            " or reads from there is missing on the others. Set it to an object store "
            "(s3://bucket/prefix, gs://...) or to file:///path for a file system every node mounts.")
