"""The CUDA kernels run on the host, to prove them on a machine without a GPU.

``ops/csrc/cuda/cc_kernels.cuh`` holds the CUDA kernels and their host wrappers; nvcc builds them
into the real op (``cc_attention_cuda.cu``), and this module builds the same header with the host
compiler (``csrc/cuda/emulation/cc_emulation.cpp`` with the ``cuda_emulation.h`` shim), which runs
every thread of the real launch configuration one after another (the threads of a block as fibers,
switched at every ``__syncthreads``, for the kernels with tiles in shared memory). The ops take the
grid cap, so a test can make each thread run its grid-stride loop many times::

    emu = load_emulation()
    e = emu.cc_energy(q, k, 1)               # one block of 256 threads, any CPU dtype
    emu.cc_launch_config("pack", N, C, H, W, 1)   # [tiles or items, blocks, threads]

For tests only: slow (one thread at a time) and never used by ``ops.criss_cross_attention``.
Nothing is built at import time; the library is cached like the real one (``CCNET_OPS_CACHE``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from .extension import CSRC, BuildError, cache_root, check_runtime, cxx, runtime_ldflags

LIBRARY = "ccnet_ops_emu"
SOURCE = CSRC / "cuda" / "emulation" / "cc_emulation.cpp"
# No -std: cpp_extension passes the standard PyTorch's headers need (C++17 with torch 2.11,
# C++20 with 2.14), so the emulation's sources keep to C++17.
# -Wno-unknown-pragmas: g++ does not know the kernels' `#pragma unroll`.
CXX_FLAGS = ["-O2", "-Wall", "-Wno-unknown-pragmas"]


def _inputs() -> list[Path]:
    """Every file the emulation library is compiled from."""
    cuda = CSRC / "cuda"
    headers = [*CSRC.glob("*.h"), *cuda.glob("*.h"), *cuda.glob("*.cuh")]
    return sorted(headers + list((cuda / "emulation").glob("*.cpp")))


def _build_key() -> str:
    digest = hashlib.sha256()
    for path in _inputs():
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    digest.update("\0".join([torch.__version__, cxx(), *CXX_FLAGS, *runtime_ldflags()]).encode())
    return digest.hexdigest()[:16]


@functools.cache
def load_emulation(verbose: bool = False):
    """Builds (or loads from the cache) the emulated kernels; returns ``torch.ops.ccnet_ops_emu``.

    Raises:
        BuildError: the compiler's message when the build or the load fails.
    """
    from torch.utils import cpp_extension

    os.environ["CXX"] = cxx()  # as ops.extension.build: CCNET_OPS_CXX, else CXX, else c++
    name = f"{LIBRARY}_{_build_key()}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CXX_FLAGS,
            extra_ldflags=runtime_ldflags(),
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            with_cuda=False,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors, missing toolchain, unloadable library
        raise BuildError(f"building the CUDA emulation {name} in {build_dir} failed: {exc}") from exc
    check_runtime(build_dir / f"{name}.so")
    return getattr(torch.ops, LIBRARY)
