"""Build and load the compiled criss-cross attention kernels (CLI: ``python -m ops.build``).

The C++ (and, where PyTorch has CUDA and nvcc is found, CUDA) sources under ``ops/csrc`` are
compiled just in time with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory,
keyed by a hash of everything that changes the binary: sources, flags, PyTorch, CUDA, the
CUDA architectures and the host CPU. A second process, or a second run, loads the cached
library in well under a second.

Build ahead of time (prints what was built and where)::

    python -m ops.build            # CUDA sources too when PyTorch has CUDA and nvcc is found
    python -m ops.build --cuda     # fail unless the CUDA sources are compiled as well

Environment:
    CCNET_OPS_CACHE   cache directory (default: ``~/.cache/ccnet_ops``)
    CCNET_OPS_STRICT  ``1``: a failed build is an error instead of a warning and a fallback
    CCNET_OPS_CUDA    ``0``: never compile the CUDA sources; ``1``: always (error if impossible)
    TORCH_CUDA_ARCH_LIST  CUDA architectures (default: the visible GPU's, else "8.0;9.0")
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
LIBRARY = "ccnet_ops"
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200 when no GPU is visible to pick from
CXX_FLAGS = ["-O3", "-fopenmp", "-march=native"]
CUDA_FLAGS = ["-O3"]


class BuildError(RuntimeError):
    """The compiled kernels could not be built or loaded."""


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What was built: the shared library, its build directory and the devices it serves."""

    library: Path
    build_dir: Path
    with_cuda: bool
    seconds: float

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cpu", "cuda") if self.with_cuda else ("cpu",)


def cache_root() -> Path:
    return Path(os.environ.get("CCNET_OPS_CACHE") or Path.home() / ".cache" / "ccnet_ops")


def strict() -> bool:
    return os.environ.get("CCNET_OPS_STRICT", "0") not in ("", "0", "false", "False")


def cpp_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME, else the real location of nvcc on PATH (not a wrapper's)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return Path(env)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    if real.parent.name == "bin" and (real.parent.parent / "include" / "cuda_runtime.h").exists():
        return real.parent.parent
    # a wrapper script (exec /opt/cuda-X/bin/nvcc "$@"): find the toolkit it runs
    for token in real.read_text(errors="ignore").split():
        if token.endswith("/bin/nvcc") and Path(token).exists():
            return Path(token).parent.parent
    return real.parent.parent


def cuda_library_includes(home: Path) -> list[str]:
    """Header folders of the CUDA libraries PyTorch's headers include (cuSPARSE, cuBLAS, ...)
    when the toolkit lacks them: the pip packages that came with PyTorch carry them."""
    if (home / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels PyTorch depends on
    except ImportError:
        return []
    return sorted(str(p.parent) for root in nvidia.__path__ for p in Path(root).glob("*/include/cusparse.h"))


def cuda_build_possible() -> tuple[bool, str]:
    """Whether the CUDA sources can be compiled here, and why not if they cannot."""
    if torch.version.cuda is None:
        return False, f"PyTorch {torch.__version__} is a CPU-only build"
    home = cuda_home()
    if home is None or not (home / "bin" / "nvcc").exists():
        return False, "no CUDA toolkit (nvcc) was found; put nvcc on PATH or set CUDA_HOME"
    return True, ""


def want_cuda(require: bool | None = None) -> bool:
    """Decides whether to compile the CUDA sources; ``require`` overrides CCNET_OPS_CUDA."""
    env = os.environ.get("CCNET_OPS_CUDA", "")
    if require is None and env in ("0", "1"):
        require = env == "1"
    possible, why = cuda_build_possible()
    if require and not possible:
        raise BuildError(f"the CUDA sources were required but cannot be compiled: {why}")
    return possible if require is None else require


def cuda_arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_CUDA_ARCHS


def _cpu_signature() -> str:
    """The host CPU's feature flags: binaries built with -march=native only run on their kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(with_cuda: bool) -> str:
    digest = hashlib.sha256()
    sources = cpp_sources() + sorted(CSRC.glob("*.h")) + (cuda_sources() if with_cuda else [])
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    parts = [torch.__version__, str(torch.version.cuda), sys.version, _cpu_signature(), *CXX_FLAGS]
    if with_cuda:
        parts += [str(cuda_home()), cuda_arch_list(), *CUDA_FLAGS]
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def build(*, cuda: bool | None = None, verbose: bool = False) -> BuildInfo:
    """Compiles (or loads from the cache) the kernels and registers them with PyTorch.

    Args:
        cuda: compile the CUDA sources too; None decides from CCNET_OPS_CUDA and the toolkit.
        verbose: show the compiler's output.
    """
    with_cuda = want_cuda(cuda)
    cuda_flags = list(CUDA_FLAGS)
    if with_cuda:
        home = cuda_home()
        os.environ["CUDA_HOME"] = str(home)  # read by cpp_extension on import
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        for include in cuda_library_includes(home):
            cuda_flags += ["-isystem", include]
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = str(home)  # in case it was imported before, with a guess
    key = build_key(with_cuda)
    name = f"{LIBRARY}_{'cuda' if with_cuda else 'cpu'}_{key}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in cpp_sources() + (cuda_sources() if with_cuda else [])]
    start = time.perf_counter()
    try:
        library = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=cuda_flags,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors, missing toolchain, unloadable library
        raise BuildError(f"building {name} in {build_dir} failed: {exc}") from exc
    return BuildInfo(Path(library), build_dir, with_cuda, time.perf_counter() - start)
