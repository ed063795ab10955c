"""The run's storage is probed before any work starts: write, read back, delete; an unreachable or
unwritable URI stops the run with the URI and the file system's error."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import tiny_overrides
from pipeline.config import load_config
from pipeline.storage import StorageError, probe as probe_storage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing answers there


def test_writable_storage_passes_and_keeps_nothing(tmp_path):
    (tmp_path / "uri").mkdir()
    probe_storage(str(tmp_path / "storage" / "ray"))  # created later by Ray: its nearest folder is probed
    probe_storage(f"file://{tmp_path / 'uri'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uri"] and not list((tmp_path / "uri").iterdir())


def test_unwritable_storage_stops_the_run_before_any_step(tmp_path):
    from pipeline.run import run

    (tmp_path / "a_file").write_text("not a directory")
    storage = str(tmp_path / "a_file" / "ray")
    cfg = load_config(None, tiny_overrides(tmp_path) + [f"storage={storage}"])
    with pytest.raises(StorageError, match=f"storage '{storage}' cannot be written and read back: "):
        run(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_unreachable_object_store_is_named_with_its_error():
    uri = f"s3://ccnet-missing/runs?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http&region=us-east-1"
    start = time.time()
    with pytest.raises(StorageError) as err:
        probe_storage(uri)
    assert uri in str(err.value) and "Could not connect" in str(err.value)
    assert time.time() - start < 60
