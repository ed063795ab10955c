"""Benchmark the compiled criss-cross attention against the pure-PyTorch reference.

    python -m ops.bench                          # CPU, float32; CUDA too when present
    python -m ops.bench --device cuda --dtype float32 --dtype bfloat16 --out benchmarks/results/x.md

Both implementations run side by side in one process, interleaved repeat by repeat, on the
same inputs; the table gives median times and the reference/compiled ratio (above 1: the
compiled op is faster), and on CUDA the peak memory of forward + backward.
Shapes: the paper's RCCA head on a 769 x 769 crop (C = 512, C' = 64, 97 x 97, N = 1 and 2)
and a smaller one.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import roofline
from .criss_cross import criss_cross_attention, load_compiled

SHAPES = {  # (N, C', C, H, W)
    "paper N=1": (1, 64, 512, 97, 97),
    "paper N=2": (2, 64, 512, 97, 97),
    "small": (2, 16, 128, 33, 33),
}
IMPLS = ("reference", "compiled")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(shape, device, dtype):
    N, Cq, C, H, W = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (0.3 * torch.randn(N, Cq, H, W, generator=gen, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(N, C, H, W, generator=gen, device=device, dtype=dtype)
    return q, k, v


def _step(impl: str, q, k, v, backward: bool) -> Callable[[], None]:
    if not backward:
        def forward():
            with torch.no_grad():
                criss_cross_attention(q, k, v, implementation=impl)
        return forward
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    grad = torch.randn_like(v)

    def forward_backward():
        out = criss_cross_attention(qg, kg, vg, implementation=impl)
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


def measure(device: torch.device, dtype: torch.dtype, shape, repeat: int, warmup: int) -> dict:
    q, k, v = _inputs(shape, device, dtype)
    row: dict = {}
    for backward, label in ((False, "fwd"), (True, "fwd+bwd")):
        steps = {impl: _step(impl, q, k, v, backward) for impl in IMPLS}
        times = _time(steps, device, repeat, warmup)
        row[label] = times
        if backward and device.type == "cuda":
            row["peak MB"] = {impl: _peak_mb(steps[impl], device) for impl in IMPLS}
    return row


def roofline_floor_ms(device: str, dtype: str, shape: tuple) -> float | None:
    """The fwd+bwd floor of ``ops.roofline`` on the visible GPU, if the model knows it."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    gpu = next((key for key in roofline.GPUS if key.split()[0] in name), None)
    if gpu is None:
        return None
    tf32 = dtype == "float32" and torch.backends.cuda.matmul.allow_tf32
    return roofline.floors(shape, dtype, tf32)[gpu] * 1e3


def table(rows: list[tuple[str, str, str, tuple, dict]]) -> str:
    head = ("| device | dtype | shape | (N, C', C, H, W) | fwd ref ms | fwd ours ms | fwd ratio "
            "| fwd+bwd ref ms | fwd+bwd ours ms | fwd+bwd ratio | peak MB ref | peak MB ours "
            "| fwd+bwd floor ms | ours / floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for device, dtype, name, shape, r in rows:
        f, fb = r["fwd"], r["fwd+bwd"]
        mem = r.get("peak MB", {})
        floor = roofline_floor_ms(device, dtype, shape)
        cells = [device, dtype, name, str(shape),
                 f"{f['reference']:.2f}", f"{f['compiled']:.2f}", f"{f['reference'] / f['compiled']:.2f}x",
                 f"{fb['reference']:.2f}", f"{fb['compiled']:.2f}", f"{fb['reference'] / fb['compiled']:.2f}x",
                 f"{mem['reference']:.0f}" if mem else "-", f"{mem['compiled']:.0f}" if mem else "-",
                 f"{floor:.3f}" if floor else "-", f"{fb['compiled'] / floor:.1f}x" if floor else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device(s) to measure (default: cpu, and cuda when present)")
    parser.add_argument("--dtype", action="append", choices=["float32", "float64", "float16", "bfloat16"],
                        help="dtype(s) (default: float32 on CPU; float32 and bfloat16 on CUDA)")
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="shape(s) (default: all)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default: 5 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--out", type=Path, help="also write the table, with device and date, to this file")
    args = parser.parse_args(argv)

    if load_compiled() is None:
        parser.error("the compiled kernels are unavailable; nothing to compare")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for dev in devices:
        device = torch.device(dev)
        dtypes = args.dtype or (["float32", "bfloat16"] if dev == "cuda" else ["float32"])
        repeat = args.repeat or (50 if dev == "cuda" else 5)
        for dtype in dtypes:
            for name in args.shape or list(SHAPES):
                result = measure(device, getattr(torch, dtype), SHAPES[name], repeat, args.warmup)
                rows.append((dev, dtype, name, SHAPES[name], result))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    header = "\n".join(
        ["Criss-cross attention, compiled vs reference (ratio = reference time / compiled time)",
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
