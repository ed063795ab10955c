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
    CCNET_OPS_CXX     the host C++ compiler for the op (default: $CXX, else c++); like every
                      ``CCNET_*`` variable, the pipeline forwards it to its Ray workers
    CCNET_OPS_CPU_ARCH  the ``-march`` of the C++ kernels (default: ``native``, the host's own
                      instruction set); e.g. ``x86-64-v3`` for kernels that any AVX2 CPU runs
    TORCH_CUDA_ARCH_LIST  CUDA architectures (default: ``DEFAULT_CUDA_ARCHS``, never the visible GPU's,
                      so an ahead-of-time build on any node and the run on a GPU node share one key)

Several processes on one node (the training workers of a GPU node) build under one file lock:
the first compiles, the others wait and load its library. Each prints what it did and how long
it took.
"""

from __future__ import annotations

import dataclasses
import functools
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
# A100, A10/A40/RTX 30xx, H100/H200; "+PTX" embeds compute_90 PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"
CXX_FLAGS = ["-O3", "-fopenmp"]  # and -march=cpu_arch()
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
    compiled: bool  # False: loaded from the cache

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
    """The CUDA architectures to build for: TORCH_CUDA_ARCH_LIST, else DEFAULT_CUDA_ARCHS.

    Never derived from the visible GPU: the ahead-of-time build (``cluster.yaml`` runs it on
    every node, GPU or not) and the run on a GPU node must compute the same build key.
    """
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


def arch_covers(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs code built for ``archs``: an exact SASS
    target of its major version at or below it, or PTX at or below it (JIT-compiled)."""
    import re

    major, minor = capability
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        match = re.fullmatch(r"(\d+)(?:\.(\d+))?([a-z]?)(\+PTX)?", entry.strip())
        if not match:
            continue
        target, suffix, ptx = (int(match[1]), int(match[2] or 0)), match[3], bool(match[4])
        if suffix:  # "9.0a", "10.0f": architecture-specific code runs on that very architecture
            if target == (major, minor):
                return True
        elif (ptx and target <= (major, minor)) or (target[0] == major and target[1] <= minor):
            return True
    return False


def cpu_arch() -> str:
    """The instruction set the C++ kernels are compiled for: CCNET_OPS_CPU_ARCH, else native."""
    arch = os.environ.get("CCNET_OPS_CPU_ARCH") or "native"
    if not arch.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"CCNET_OPS_CPU_ARCH={arch!r} is not a -march name (like native, x86-64-v3 or znver4)")
    return arch


def cxx_flags() -> list[str]:
    return [*CXX_FLAGS, f"-march={cpu_arch()}"]


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
    cuda_files = sorted(p for p in (CSRC / "cuda").rglob("*") if p.is_file()) if with_cuda else []
    for path in cpp_sources() + sorted(CSRC.glob("*.h")) + cuda_files:
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    parts = [torch.__version__, str(torch.version.cuda), sys.version, _cpu_signature(), cxx(), *cxx_flags(),
             *runtime_ldflags()]
    if with_cuda:
        home = cuda_home()
        parts += [str(home.resolve() if home else None), cuda_arch_list(), *CUDA_FLAGS]  # one toolkit, however reached
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def runtime_ldflags() -> list[str]:
    """The C++ runtime this process runs, named to the linker.

    Some toolchains (seen: g++ 13.3 on Ubuntu 24.04 with a PyTorch 2.11 wheel) link libstdc++
    statically into an extension. Its iostreams then meet locale facets from the process's shared
    libstdc++, and formatting an error message ends in a segfault instead of the error. Naming the
    loaded shared library makes the linker resolve every C++ runtime symbol there.
    """
    return list(_loaded_cpp_runtime())  # a fresh list: cpp_extension appends to the one it is given


@functools.cache
def _loaded_cpp_runtime() -> tuple[str, ...]:
    """The libstdc++ mapped into this process (read once: it stays loaded)."""
    if sys.platform != "linux":
        return ()
    loaded = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)  # the path may hold spaces
            if len(fields) == 6 and "/libstdc++.so" in fields[5]:
                loaded.add(fields[5].removesuffix(" (deleted)"))
    return tuple(sorted(loaded)[:1])  # one in practice; sorted, so that the build key is stable


RUNTIME_SYMBOL = "_ZNKSt6locale2id5_M_idEv"  # std::locale::id::_M_id() const: libstdc++'s own, never inlined


def carries_cpp_runtime(library: str | Path) -> bool:
    """Whether a shared library defines its own (static) libstdc++ rather than using the process's:
    where it resolves ``RUNTIME_SYMBOL`` first (its own definition, else its dependencies') is not
    the shared library's. One symbol, exported: a static copy hidden from the dynamic symbol table
    (``--exclude-libs``) is not seen."""
    runtime = runtime_ldflags()
    if not runtime:
        return False
    import ctypes

    def address(path: str) -> int | None:
        try:
            return ctypes.cast(getattr(ctypes.CDLL(path), RUNTIME_SYMBOL), ctypes.c_void_p).value
        except (AttributeError, OSError):  # not defined there; not loadable
            return None

    own = address(str(library))
    return own is not None and own != address(runtime[0])


def check_runtime(library: str | Path) -> None:
    """Raises BuildError when ``library`` carries its own libstdc++ (see ``runtime_ldflags``), after
    removing it, so that the next build compiles again instead of loading it from the cache."""
    if carries_cpp_runtime(library):
        Path(library).unlink(missing_ok=True)
        raise BuildError(f"{library} (now removed) links its own copy of libstdc++ although "
                         f"{runtime_ldflags()[0]} was named to the linker: its error messages would crash "
                         "the process. Check the compiler's default link flags (-static-libstdc++), or set "
                         "CCNET_OPS_CXX to another compiler")


def cxx() -> str:
    """The host C++ compiler: CCNET_OPS_CXX, else CXX (PyTorch's variable), else c++."""
    return os.environ.get("CCNET_OPS_CXX") or os.environ.get("CXX") or "c++"


def library_name(with_cuda: bool) -> str:
    """The library's name: its kind and build key (also its folder in the cache)."""
    return f"{LIBRARY}_{'cuda' if with_cuda else 'cpu'}_{build_key(with_cuda)}"


def build(*, cuda: bool | None = None, verbose: bool = False) -> BuildInfo:
    """Compiles (or loads from the cache) the kernels and registers them with PyTorch.

    Args:
        cuda: compile the CUDA sources too; None decides from CCNET_OPS_CUDA and the toolkit.
        verbose: show the compiler's output.
    """
    with_cuda = want_cuda(cuda)
    os.environ["CXX"] = cxx()  # read by cpp_extension when it writes the ninja file
    cuda_flags = list(CUDA_FLAGS)
    if with_cuda:
        home = cuda_home()
        os.environ["CUDA_HOME"] = str(home)  # read by cpp_extension on import
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        for include in cuda_library_includes(home):
            cuda_flags += ["-isystem", include]
        # nvcc compiles the architectures of TORCH_CUDA_ARCH_LIST in parallel, as many at once as
        # the node has cores (0: nvcc counts them; one command line on every node, so ninja
        # never rebuilds for a different core count, and the binary is the same: no cache key)
        cuda_flags += ["--threads=0"]
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = str(home)  # in case it was imported before, with a guess
    name = library_name(with_cuda)
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in cpp_sources() + (cuda_sources() if with_cuda else [])]
    from filelock import FileLock

    start = time.perf_counter()
    with FileLock(str(build_dir) + ".lock"):  # one compiler per node; the others wait, then load
        waited = time.perf_counter() - start
        cached = (build_dir / f"{name}.so").exists()
        try:
            library = cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cxx_flags(),
                extra_cuda_cflags=cuda_flags,
                extra_ldflags=runtime_ldflags(),
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler errors, missing toolchain, unloadable library
            raise BuildError(f"building {name} in {build_dir} failed: {exc}") from exc
        check_runtime(library)
    seconds = time.perf_counter() - start
    how = "loaded from the cache" if cached else "compiled"
    print(f"ops: {name} {how} in {seconds:.1f} s"
          + (f" ({waited:.1f} s waiting for another process's build)" if waited >= 0.5 else ""),
          file=sys.stderr, flush=True)
    return BuildInfo(Path(library), build_dir, with_cuda, seconds, not cached)
