"""Shared fixtures. The op tests must exercise the compiled kernels, never a silent fallback,
so a failed build fails the session (CCNET_OPS_STRICT=1 unless set otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CCNET_OPS_STRICT", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])]


def pytest_collection_modifyitems(config, items):
    """Every test that needs the session's Ray (``ray_cluster``: data preparation, pipeline runs,
    faults, searches) is ``slow``, as are those marked so by hand (the cluster on one machine, the
    long op checks): ``pytest -m "not slow"`` is the everyday lane, ``pytest`` everything.

    The modules that use the session's Ray run last, in their usual order, so that it starts once
    and does not idle beside the tests that need the CPUs to themselves. A module moves whole:
    its module-scoped fixtures are set up once."""
    uses_ray = set()
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            uses_ray.add(getattr(item, "module", None))
    items.sort(key=lambda item: getattr(item, "module", None) in uses_ray)  # a stable sort: the order within each part stays


def sample_inputs(
    shape: tuple[int, int, int, int, int],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    layout: str = "contiguous",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (N, C', H, W) and v (N, C, H, W) for shape (N, C', C, H, W).

    layout: "contiguous", "transposed" (H and W swapped in memory), "channels_last" or
    "sliced" (every other element of a wider tensor).
    """
    N, Cq, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)

    def make(channels: int) -> torch.Tensor:
        if layout == "transposed":
            t = torch.randn(N, channels, W, H, generator=gen, dtype=torch.float64).transpose(2, 3)
        elif layout == "sliced":
            t = torch.randn(N, channels, H, 2 * W, generator=gen, dtype=torch.float64)[..., ::2]
        else:
            t = torch.randn(N, channels, H, W, generator=gen, dtype=torch.float64)
            if layout == "channels_last":
                t = t.contiguous(memory_format=torch.channels_last)
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return make(Cq), make(Cq), make(C)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the session, started as the pipeline starts it (``init_ray``:
    every server on 127.0.0.1, the dashboard too, the CCNET_* variables forwarded); yields its
    address. Every test that runs on Ray shares it: runs in this process use its driver, the
    ``python -m pipeline...`` processes a test starts join it with ``ray_address=`` (each such
    driver forwards its own CCNET_* variables to its workers).

    4 CPUs declared on this 2-core machine: training workers and Ray Data then both get slots.
    """
    import ray

    from pipeline.config import load_config
    from pipeline.run import init_ray

    if ray.is_initialized():  # a module that started Ray outside this fixture
        ray.shutdown()
    init_ray(load_config(None, ["num_cpus=4"]))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def tiny_overrides(tmp: Path) -> list[str]:
    """A pipeline small enough for a test: 32 + 8 synthetic 64 px images, batches of 4, 2 workers."""
    return [f"run_dir={tmp / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "data.synthetic_train=32", "data.synthetic_val=8", "data.synthetic_size=64", "data.shard_size=16",
            "train.batch_size=4", "train.crop=64", "train.log_every=5", "eval.overlays=1"]
