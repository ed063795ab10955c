"""The fused mode's line passes as ptxas builds them for an H100 (sm_90): every mode, dtype and
index type within the register budget that its ``__launch_bounds__`` sets
(``line_pass_min_blocks`` in ops/csrc/cuda/cc_fused.cuh), and none spilling to local memory.

nvcc compiles the CUDA source here, without a GPU (about half a minute), with the flags of the
op's own build: a spill that a change brings, or one the toolkit starts to make, fails here rather
than showing as a slow kernel on the first GPU that runs it.
"""
from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from ops import extension

HOME = extension.cuda_home()
NVCC = HOME / "bin" / "nvcc" if HOME else None
pytestmark = pytest.mark.skipif(NVCC is None or not NVCC.exists(), reason="needs nvcc (the CUDA toolkit)")

# line_pass_kernel<LineMode, TensorCores, scalar_t, index_t>, mangled: the mode's number (Stats,
# Forward, dq, dk, dv), the tile path, the dtype and the index type (i: int32, l: int64)
LINE_PASS = re.compile(r"line_pass_kernelILNS\w+?LineModeE(\d)ELb([01])E(f|d|N3c104HalfE|N3c108BFloat16E)([il])EEv")
DTYPES = {"f": "float32", "d": "float64", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}
MODES = ["Stats", "Forward", "GradQuery", "GradKey", "GradValue"]


def ptxas_report(tmp_path: Path) -> str:
    """nvcc's output for the CUDA source compiled for sm_90 alone, with ptxas's resource lines."""
    std = "c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "c++17"  # as the build's
    includes = [*cpp_extension.include_paths("cuda"), sysconfig.get_paths()["include"],
                *extension.cuda_library_includes(HOME)]
    cmd = [str(NVCC), "-c", str(extension.CSRC / "cuda" / "cc_attention_cuda.cu"), "-o", str(tmp_path / "op.o"),
           "-DTORCH_EXTENSION_NAME=ccnet_ops_resources", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{extension.CSRC}",
           *[arg for path in includes for arg in ("-isystem", str(path))], *cpp_extension.COMMON_NVCC_FLAGS,
           *extension.CUDA_FLAGS, f"-std={std}", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def line_passes(report: str) -> dict[tuple[str, bool, str, str], tuple[int, int]]:
    """(mode, tensor cores, dtype, index type) -> (registers, spilled bytes, stores and loads)."""
    passes, current, spilled = {}, None, 0
    for line in report.splitlines():
        if entry := re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line):
            kernel = LINE_PASS.search(entry.group(1))
            current = kernel and (MODES[int(kernel[1])], kernel[2] == "1", DTYPES[kernel[3]],
                                  "int32" if kernel[4] == "i" else "int64")
        elif current and (spills := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spilled = int(spills[1]) + int(spills[2])
        elif current and (used := re.search(r"Used (\d+) registers", line)):
            passes[current] = (int(used[1]), spilled)
            current = None
    return passes


def test_line_passes_fit_their_register_budget_without_spilling(tmp_path):
    passes = line_passes(ptxas_report(tmp_path))
    # the CUDA build has the tensor-core path of every mode, dtype and index type (fp16 and bf16 on
    # the CUDA cores are the emulation's)
    assert set(passes) == {(mode, True, dtype, index) for mode in MODES for dtype in DTYPES.values()
                           for index in ("int32", "int64")}, sorted(passes)
    for (mode, _, dtype, index), (registers, spilled) in passes.items():
        # 4 blocks of 256 threads an SM (65,536 registers): float32 sums and 32-bit indices; else 2
        budget = 64 if dtype != "float64" and index == "int32" else 128
        assert registers <= budget, f"{mode} {dtype} {index}: {registers} registers, over {budget}"
        assert spilled == 0, f"{mode} {dtype} {index}: {spilled} bytes spilled to local memory"
