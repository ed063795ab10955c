"""Benchmark the compiled criss-cross attention against pure-PyTorch formulations.

    python -m ops.bench                          # CPU, float32; CUDA too when present
    python -m ops.bench --device cuda --dtype float32 --dtype bfloat16 --out benchmarks/results/x.md

Three implementations run side by side in one process, interleaved repeat by repeat, on the
same inputs:

- ``ref``: ``ops.reference``, the formulation most code runs today (mmcv's, and the einsum form
  of the authors' pure-PyTorch branch): two einsum energies, -inf on the column energy's
  diagonal, one softmax over their concatenation, two einsum aggregations;
- ``bmm``: the layout of the authors' pure-PyTorch module (``ops.reference.criss_cross_attention_bmm``):
  every row and column a batch of ``torch.bmm`` over permuted copies, an -inf diagonal added
  (broadcast (H, H), where the authors' module materialises it per column), under this
  project's dtype contract;
- ``ours``: the compiled op, with the attention map (``fused=False``);
- ``fused``: the compiled op's fused mode (``fused=True``: the fused kernels on CUDA,
  ``ops.fused`` on the CPU), which never stores the map.

The table gives median times, the ref/ours ratio (above 1: the compiled op is faster), the peak
memory that forward + backward adds (CUDA: the caching allocator's peak over what was allocated
before; CPU: the peak resident set over the resident set before, in a fresh process whose
allocations from 64 KiB up are mapped and returned on free, so that freed memory is not reused
unseen), and on an H100/H200 the roofline floor of ``ops.roofline`` and ours over it.
Shapes: the paper's RCCA head on a 769 x 769 crop (C = 512, C' = 64, 97 x 97, N = 1 and 2),
a smaller one; with ``--shape``, also the head on a whole 1024 x 2048 Cityscapes image at
inference (``"cityscapes full"``: 128 x 256 at stride 8), and the shapes with 2, 3, 4 and 6
slots per channel (``"slots 2C"`` ...) where the fused mode's memory and time meet the map's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import reference, roofline
from .criss_cross import criss_cross_attention, load_compiled

SHAPES = {  # (N, C', C, H, W)
    "paper N=1": (1, 64, 512, 97, 97),
    "paper N=2": (2, 64, 512, 97, 97),
    "small": (2, 16, 128, 33, 33),
    "cityscapes full": (1, 64, 512, 128, 256),
    # where the fused mode starts to pay (ops.criss_cross.FUSED_SLOTS_PER_CHANNEL): a pixel's
    # H + W - 1 slots over the value's C channels
    "slots 2C": (1, 16, 128, 129, 129),
    "slots 3C": (1, 8, 64, 97, 97),
    "slots 4C": (1, 8, 64, 129, 129),
    "slots 6C": (1, 8, 64, 193, 193),
}
DEFAULT_SHAPES = ("paper N=1", "paper N=2", "small")
IMPLS = ("reference", "bmm", "compiled", "fused")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(shape, device, dtype):
    N, Cq, C, H, W = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (0.3 * torch.randn(N, Cq, H, W, generator=gen, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(N, C, H, W, generator=gen, device=device, dtype=dtype)
    return q, k, v


def _attention(impl: str) -> Callable:
    if impl == "bmm":
        return reference.criss_cross_attention_bmm
    if impl == "fused":
        return lambda q, k, v: criss_cross_attention(q, k, v, implementation="compiled", fused=True)
    return lambda q, k, v: criss_cross_attention(q, k, v, implementation=impl, fused=False)


def _step(impl: str, q, k, v, backward: bool) -> Callable[[], None]:
    attention = _attention(impl)
    if not backward:
        def forward():
            with torch.no_grad():
                attention(q, k, v)
        return forward
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    grad = torch.randn_like(v)

    def forward_backward():
        out = attention(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), grad)
    return forward_backward


def _time(steps: dict[str, Callable[[], None]], device, repeat: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per step, the implementations interleaved."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _peak_mb(step: Callable[[], None], device) -> float:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# glibc: allocations from 64 KiB up are mapped and unmapped on free, whatever came before (a fixed
# threshold), so the resident set follows what is allocated and a peak is not hidden by reuse
CPU_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_mb(step: Callable[[], None]) -> float | None:
    """MiB by which ``step`` raises this process's peak resident set over its resident set before
    (Linux: writing 5 to /proc/self/clear_refs resets the peak); None where the peak cannot be
    reset. Meaningful under ``CPU_PEAK_ENV``."""
    if sys.platform != "linux":
        return None
    gc.collect()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    if _status_kb("VmHWM") - _status_kb("VmRSS") > 1024:  # not reset: the reading would be stale
        return None
    step()
    return (_status_kb("VmHWM") - base) / 1024


def _cpu_peaks(shape_name: str, dtype: str) -> dict[str, float | None]:
    """Each implementation's CPU peak for forward + backward, measured in a fresh process; empty,
    with a warning, where it cannot be measured (the table then shows -)."""
    cmd = [sys.executable, "-m", "ops.bench", "--cpu-peak", "--shape", shape_name, "--dtype", dtype,
           "--threads", str(torch.get_num_threads())]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # glibc's malloc, not another
    try:
        proc = subprocess.run(cmd, env={**env, **CPU_PEAK_ENV, "CCNET_OPS_STRICT": "1"}, capture_output=True,
                              text=True, timeout=1800, check=False, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        print(f"warning: the CPU peak memory of {shape_name} {dtype} was not measured: {exc}", file=sys.stderr)
        return {}


def measure(device: torch.device, dtype: torch.dtype, shape, repeat: int, warmup: int,
            shape_name: str | None = None) -> dict:
    q, k, v = _inputs(shape, device, dtype)
    row: dict = {}
    for backward, label in ((False, "fwd"), (True, "fwd+bwd")):
        steps = {impl: _step(impl, q, k, v, backward) for impl in IMPLS}
        times = _time(steps, device, repeat, warmup)
        row[label] = times
        if backward and device.type == "cuda":
            row["peak MB"] = {impl: _peak_mb(steps[impl], device) for impl in IMPLS}
    if device.type == "cpu" and shape_name is not None and sys.platform == "linux":
        row["peak MB"] = _cpu_peaks(shape_name, str(dtype).removeprefix("torch."))
    return row


def roofline_floor_ms(device: str, dtype: str, shape: tuple, fused_hbm: bool = False) -> float | None:
    """The fwd+bwd floor of ``ops.roofline`` on the visible GPU, if the model knows it; with
    ``fused_hbm``, the fused mode's HBM floor (its bytes over the bandwidth)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    gpu = next((key for key in roofline.GPUS if key.split()[0] in name), None)
    if gpu is None:
        return None
    if fused_hbm:
        return roofline.hbm_floors(shape, dtype, fused=True)[gpu] * 1e3
    tf32 = dtype == "float32" and torch.backends.cuda.matmul.allow_tf32
    return roofline.floors(shape, dtype, tf32)[gpu] * 1e3


def table(rows: list[tuple[str, str, str, tuple, dict]]) -> str:
    head = ("| device | dtype | shape | (N, C', C, H, W) | fwd ref ms | fwd bmm ms | fwd ours ms | fwd fused ms "
            "| fwd ref/ours | fwd+bwd ref ms | fwd+bwd bmm ms | fwd+bwd ours ms | fwd+bwd fused ms | fwd+bwd ref/ours "
            "| peak MB ref | peak MB bmm | peak MB ours | peak MB fused | fwd+bwd floor ms | ours / floor "
            "| fused HBM floor ms | fused / HBM floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for device, dtype, name, shape, r in rows:
        f, fb = r["fwd"], r["fwd+bwd"]
        mem = r.get("peak MB", {})
        floor, hbm = roofline_floor_ms(device, dtype, shape), roofline_floor_ms(device, dtype, shape, fused_hbm=True)
        cells = [device, dtype, name, str(shape),
                 *(f"{f[impl]:.2f}" for impl in IMPLS), f"{f['reference'] / f['compiled']:.2f}x",
                 *(f"{fb[impl]:.2f}" for impl in IMPLS), f"{fb['reference'] / fb['compiled']:.2f}x",
                 *(f"{mem[impl]:.0f}" if mem.get(impl) is not None else "-" for impl in IMPLS),
                 f"{floor:.3f}" if floor else "-", f"{fb['compiled'] / floor:.1f}x" if floor else "-",
                 f"{hbm:.3f}" if hbm else "-", f"{fb['fused'] / hbm:.1f}x" if hbm else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name and its widest SIMD (the compiled kernels are built with -march=native,
    so for this CPU), from /proc/cpuinfo where there is one."""
    from .extension import _cpu_signature

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith(("model name", "Model"))), "")
    flags = _cpu_signature().split(":", 1)[-1].split()
    simd = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"),
                                           ("asimd", "NEON")) if flag in flags), None)
    return ", ".join(part for part in (platform.machine(), name, simd) if part)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device(s) to measure (default: cpu, and cuda when present)")
    parser.add_argument("--dtype", action="append", choices=["float32", "float64", "float16", "bfloat16"],
                        help="dtype(s) (default: float32 on CPU; float32 and bfloat16 on CUDA)")
    parser.add_argument("--shape", action="append", choices=list(SHAPES),
                        help=f"shape(s) (default: {', '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default: 5 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--out", type=Path, help="also write the table, with device and date, to this file")
    parser.add_argument("--cpu-peak", action="store_true", help=argparse.SUPPRESS)  # one shape, one dtype: JSON
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_peak:
        if not (args.shape and args.dtype) or load_compiled() is None:
            parser.error("--cpu-peak measures one --shape and one --dtype, with the compiled kernels")
        q, k, v = _inputs(SHAPES[args.shape[0]], torch.device("cpu"), getattr(torch, args.dtype[0]))
        peaks = {}
        for impl in IMPLS:
            step = _step(impl, q, k, v, backward=True)
            step()  # one-time allocations (thread pools, the op's first call) before the measurement
            peaks[impl] = cpu_peak_mb(step)
        print(json.dumps(peaks))
        return 0

    if load_compiled() is None:
        parser.error("the compiled kernels are unavailable; nothing to compare")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for dev in devices:
        device = torch.device(dev)
        dtypes = args.dtype or (["float32", "bfloat16"] if dev == "cuda" else ["float32"])
        repeat = args.repeat or (50 if dev == "cuda" else 5)
        for dtype in dtypes:
            for name in args.shape or DEFAULT_SHAPES:
                result = measure(device, getattr(torch, dtype), SHAPES[name], repeat, args.warmup, name)
                rows.append((dev, dtype, name, SHAPES[name], result))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    header = "\n".join(
        ["Criss-cross attention: ref = ops.reference (mmcv's einsum formulation), bmm = the authors' "
         "bmm formulation, ours = the compiled op with the attention map, fused = its fused mode, "
         "which never stores the map (ref/ours: reference time / compiled time)",
         f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
         + "; ".join(f"{d}: {device_name(torch.device(d))}" for d in devices),
         "command: python -m ops.bench " + " ".join(sys.argv[1:] if argv is None else argv),
         ""])
    text = header + "\n" + table(rows) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
