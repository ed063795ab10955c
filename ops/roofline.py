"""The roofline of the CUDA criss-cross attention: per kernel, the bytes it must move and the
FLOPs it must do, and the floor on a GPU from its HBM bandwidth and its peak for the dtype.

    python -m ops.roofline                                   # the paper's shape, bf16
    python -m ops.roofline --shape 2,64,512,97,97 --dtype float32

The kernels are those ``ops.criss_cross_attention`` launches on CUDA (``cc_attention`` forward,
``cc_attention_backward``; see ops/csrc/cuda/cc_kernels.cuh), in order. Bytes count each input
read once and each output written once (a kernel can move no less); GEMM FLOPs are 2 x M x N x K
per product. The GEMMs run on the tensor cores for fp16/bf16 (float32 accumulation), on FP32 FMA
for float32 (TF32 when PyTorch allows it: ``--tf32``), and their partial sums for aggregate and
scatter are float32 (the ``combine`` kernel adds the row and column halves and rounds once). A
kernel's floor is max(bytes / bandwidth, FLOPs / peak); the total floor is the sum of the
kernels' floors (they run one after another on one stream).
"""

from __future__ import annotations

import argparse
import dataclasses

SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# Output channels per block of a line pass of the fused mode (cc_fused.cuh: chunk_channels), and the
# pixels of a line per tile (kSpan).
LINE_CHUNK = {"float64": 32, "float32": 64, "float16": 64, "bfloat16": 64}
LINE_SPAN = 32

# Data-sheet figures (dense, no sparsity): HBM bytes/s and FLOP/s per math path; "fp64" is the FP64
# tensor-core peak (cuBLAS's DGEMM), "fp64_fma" that of FMA on the CUDA cores.
GPUS = {
    "H100 SXM": {"bandwidth": 3.35e12, "tensor16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12,
                 "fp64_fma": 33.5e12},
    "H200 SXM": {"bandwidth": 4.8e12, "tensor16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12,
                 "fp64_fma": 33.5e12},
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    bytes: int
    flops: int
    gemm: bool


def math_path(dtype: str, tf32: bool = False) -> str:
    """Which peak a GEMM of this dtype runs at."""
    if dtype in ("float16", "bfloat16"):
        return "tensor16"
    if dtype == "float32":
        return "tf32" if tf32 else "fp32"
    return "fp64"


def kernels(N: int, Cq: int, C: int, H: int, W: int, dtype: str) -> list[Kernel]:
    """The kernels of one forward and one backward, with their bytes and FLOPs."""
    s, acc = SIZES[dtype], 8 if dtype == "float64" else 4
    P, L = H * W, H + W - 1
    slots, dense = N * L * P, N * W * H * H  # the slot map, the dense column matrices

    def transpose(name: str, channels: int) -> Kernel:
        return Kernel(f"transpose {name}", 2 * N * channels * P * s, 0, False)

    def energy(tag: str, channels: int) -> list[Kernel]:  # rows into the slot map, columns dense
        return [Kernel(f"{tag} rows GEMM", (2 * N * channels * P + N * W * P) * s, 2 * N * channels * H * W * W, True),
                Kernel(f"{tag} columns GEMM", (2 * N * channels * P + dense) * s, 2 * N * channels * W * H * H, True)]

    def mix(tag: str, channels: int) -> list[Kernel]:  # aggregate or scatter: two GEMMs, combine
        # the rows GEMM writes float32 partial sums (straight into the output for float32/64)
        return [Kernel(f"{tag} rows GEMM", (N * channels * P + N * W * P) * s + N * channels * P * acc,
                       2 * N * channels * H * W * W, True),
                Kernel(f"{tag} columns GEMM", (N * channels * P + dense) * s + N * channels * P * acc,
                       2 * N * channels * W * H * H, True),
                Kernel(f"{tag} combine", 2 * N * channels * P * acc + N * channels * P * s, N * channels * P, False)]

    # the column slots between the dense matrices and the slot map, one way or the other
    columns = N * (H - 1) * P

    def pack(what: str) -> Kernel:  # reads the dense matrices, writes the column slots
        return Kernel(f"pack {what}", (dense + columns) * s, 0, False)

    def unpack(what: str) -> Kernel:  # reads the column slots, writes the dense matrices
        return Kernel(f"unpack {what}", (columns + dense) * s, 0, False)

    forward = [transpose("q", Cq), transpose("k", Cq), *energy("energy", Cq), pack("energy"),
               Kernel("softmax", 2 * slots * s, 0, False), unpack("attention"),
               transpose("v", C), *mix("aggregate", C)]
    backward = [transpose("grad", C), unpack("attention"), *mix("dv (scatter)", C), transpose("v", C),
                *energy("d attention", C), pack("d attention"), Kernel("softmax backward", 3 * slots * s, 0, False),
                unpack("d energy"), transpose("k", Cq), *mix("dq (aggregate)", Cq), transpose("q", Cq),
                *mix("dk (scatter)", Cq)]
    return ([dataclasses.replace(k, name=f"fwd {k.name}") for k in forward]
            + [dataclasses.replace(k, name=f"bwd {k.name}") for k in backward])


def fused_kernels(N: int, Cq: int, C: int, H: int, W: int, dtype: str) -> list[Kernel]:
    """The fused mode (``ops.fused``) at its least: the forward reads q, k and v and writes the
    output and the per-pixel log-sum-exp (float32); the backward reads q, k, v, the output, its
    gradient and the log-sum-exp and writes dq, dk and dv. No map goes through HBM. Its GEMMs:
    the energies and the aggregation forward; the energies again, dP = dout V^T, dq, dk and dv
    backward."""
    s, P, L = SIZES[dtype], H * W, H + W - 1
    lse = N * P * (8 if dtype == "float64" else 4)
    q_k, values = 2 * N * Cq * P * s, N * C * P * s
    per_slot = 2 * N * P * L  # one multiply-add per (pixel, slot) and channel
    return [Kernel("fused forward", q_k + 2 * values + lse, per_slot * (Cq + C), True),
            Kernel("fused backward", 2 * q_k + 4 * values + lse, per_slot * (3 * Cq + 2 * C), True)]


def fused_line_kernels(N: int, Cq: int, C: int, H: int, W: int, dtype: str) -> list[Kernel]:
    """The fused mode as built on CUDA (``cc_attention_fused`` and its backward,
    ops/csrc/cuda/cc_fused.cuh), launch by launch: transposes for the column pass; forward, a
    statistics pass (energies only: each pixel's log-sum-exp) and a product pass per direction;
    backward, the per-pixel D and a line pass per direction and gradient; the column results
    transposed back. A line pass reads its maps and statistics once and writes its result once (the
    column pass in float32 / float64, the row pass in the dtype, adding the column pass's); its
    FLOPs are those of its tiles, whole tiles of ``LINE_SPAN`` x ``LINE_SPAN`` pixel pairs (on the
    tensor cores for fp16/bf16, FMA on the CUDA cores for float32 and float64: ``line_path``), with
    the energies (and dP) recomputed once per chunk of ``LINE_CHUNK`` output channels. A lower
    bound: the exponentials (one per pair and chunk in a product or gradient pass, 1.25 per pair in
    a statistics pass), shared-memory traffic and occupancy are not counted."""
    s, acc = SIZES[dtype], 8 if dtype == "float64" else 4
    P, chunk = H * W, LINE_CHUNK[dtype]

    def chunks(channels: int) -> int:
        return -(-channels // chunk)

    def maps(*channels: int) -> int:  # bytes of maps in the dtype
        return N * P * s * sum(channels)

    def parts(*channels: int) -> int:  # bytes of float32 (float64) maps and statistics
        return N * P * acc * sum(channels)

    def transpose(name: str, size: int) -> Kernel:
        return Kernel(f"transpose {name}", 2 * size, 0, False)

    def line(pass_: str, what: str, moved: int, pair_flops: int) -> Kernel:
        # every tile is computed whole: kSpan own against kSpan other pixels, those past the line too
        lines, length = (W, H) if pass_ == "columns" else (H, W)
        pairs = N * lines * (-(-length // LINE_SPAN) * LINE_SPAN) ** 2
        return Kernel(f"{pass_} {what}", moved, 2 * pairs * pair_flops, True)

    columns = H > 1
    forward_flops = chunks(C) * Cq + C
    forward = []
    if columns:  # the statistics: reads q and k; writes each pixel's (max, sum) over its column
        forward += [transpose("q", maps(Cq)), transpose("k", maps(Cq)), transpose("v", maps(C)),
                    line("columns", "stats", maps(Cq, Cq) + parts(2), Cq),
                    transpose("columns max", parts(1)), transpose("columns sum", parts(1))]
    # reads q, k and the column pass's (max, sum); writes the log-sum-exp
    forward.append(line("rows", "stats", maps(Cq, Cq) + parts(1) + (parts(2) if columns else 0), Cq))
    if columns:  # the output: reads q, k, v and the log-sum-exp; writes its product in float32
        forward += [transpose("lse", parts(1)),
                    line("columns", "forward", maps(Cq, Cq, C) + parts(1, C), forward_flops),
                    transpose("columns out", parts(C))]
    # reads q, k, v, the log-sum-exp and the column pass's product; writes out
    forward.append(line("rows", "forward", maps(Cq, Cq, C, C) + parts(1) + (parts(C) if columns else 0),
                        forward_flops))
    backward = [Kernel("D", maps(C, C) + parts(1), 2 * N * C * P, False)]
    grads = {  # per gradient: the maps and statistics it reads, its channels, its FLOPs per pair
        "dq": (maps(Cq, Cq, C, C) + parts(2), Cq, chunks(Cq) * (Cq + C) + Cq),
        "dk": (maps(Cq, Cq, C, C) + parts(2), Cq, chunks(Cq) * (Cq + C) + Cq),
        "dv": (maps(Cq, Cq, C) + parts(1), C, chunks(C) * Cq + C),
    }
    if columns:
        backward += [transpose("q", maps(Cq)), transpose("k", maps(Cq)), transpose("v", maps(C)),
                     transpose("dout", maps(C)), transpose("lse", parts(1)), transpose("D", parts(1))]
        for name, (read, channels, flops) in grads.items():
            backward += [line("columns", name, read + parts(channels), flops),
                         transpose(f"columns {name}", parts(channels))]
    for name, (read, channels, flops) in grads.items():
        backward.append(line("rows", name, read + maps(channels) + (parts(channels) if columns else 0), flops))
    return ([dataclasses.replace(k, name=f"fwd {k.name}") for k in forward]
            + [dataclasses.replace(k, name=f"bwd {k.name}") for k in backward])


def line_path(dtype: str) -> str:
    """Where the line passes' tiles run: the tensor cores for fp16/bf16 (WMMA, float32 sums), the
    CUDA cores for float32 (FMA) and float64."""
    return {"float16": "tensor16", "bfloat16": "tensor16", "float32": "fp32"}.get(dtype, "fp64_fma")


def floor_seconds(kernel: Kernel, gpu: dict, path: str) -> float:
    compute = kernel.flops / gpu[path] if kernel.gemm else 0.0  # the layout kernels' arithmetic is noise
    return max(kernel.bytes / gpu["bandwidth"], compute)


def _kernels(shape: tuple[int, int, int, int, int], dtype: str, fused: bool) -> list[Kernel]:
    return (fused_kernels if fused else kernels)(*shape, dtype)


def floors(shape: tuple[int, int, int, int, int], dtype: str, tf32: bool = False,
           fused: bool = False) -> dict[str, float]:
    """Total floor in seconds per GPU, forward + backward (of the fused mode with ``fused``)."""
    path = math_path(dtype, tf32)
    ks = _kernels(shape, dtype, fused)
    return {name: sum(floor_seconds(k, gpu, path) for k in ks) for name, gpu in GPUS.items()}


def hbm_floors(shape: tuple[int, int, int, int, int], dtype: str, fused: bool = False) -> dict[str, float]:
    """Seconds per GPU to move the bytes alone, forward + backward: the HBM floor."""
    ks = _kernels(shape, dtype, fused)
    return {name: sum(k.bytes for k in ks) / gpu["bandwidth"] for name, gpu in GPUS.items()}


def _kernel_rows(ks: list[Kernel], path: str, names: list[str]) -> list[str]:
    """The table's header and one row per kernel: MB moved, GFLOP, the floor on each GPU."""
    lines = ["| kernel | MB moved | GFLOP | " + " | ".join(f"{n} floor us" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for k in ks:
        cells = [f"{floor_seconds(k, GPUS[n], path) * 1e6:.2f}" for n in names]
        lines.append(f"| {k.name} | {k.bytes / 1e6:.2f} | {k.flops / 1e9:.3f} | " + " | ".join(cells) + " |")
    return lines


def _total_row(ks: list[Kernel], total: dict[str, float], names: list[str],
               hbm: dict[str, float] | None = None) -> str:
    """The table's total: MB, GFLOP and the floor on each GPU (with the HBM floor, if given)."""
    cells = [f"**{total[n] * 1e6:.1f}**" + (f" ({hbm[n] * 1e6:.1f})" if hbm else "") for n in names]
    label = "**total** (HBM alone)" if hbm else "**total**"
    return (f"| {label} | {sum(k.bytes for k in ks) / 1e6:.2f} | {sum(k.flops for k in ks) / 1e9:.3f} | "
            + " | ".join(cells) + " |")


def table(shape: tuple[int, int, int, int, int], dtype: str, tf32: bool = False) -> str:
    path = math_path(dtype, tf32)
    ks = kernels(*shape, dtype)
    names = list(GPUS)
    lines = [(f"criss-cross attention on CUDA, forward + backward: (N, C', C, H, W) = {shape}, {dtype} "
              f"(GEMMs on {path})"), "", *_kernel_rows(ks, path, names)]
    lines.append(_total_row(ks, floors(shape, dtype, tf32), names))
    fused = fused_kernels(*shape, dtype)
    lines += ["", "the fused mode (no attention map through HBM):", "", *_kernel_rows(fused, path, names)]
    lines.append(_total_row(fused, floors(shape, dtype, tf32, fused=True), names,
                            hbm=hbm_floors(shape, dtype, fused=True)))
    built, line = fused_line_kernels(*shape, dtype), line_path(dtype)
    lines += ["", (f"the fused mode as built (cc_attention_fused: tiles on {line}; energies "
                   f"recomputed per chunk of {LINE_CHUNK[dtype]} output channels):"), "",
              *_kernel_rows(built, line, names)]
    lines.append(_total_row(built, {n: sum(floor_seconds(k, GPUS[n], line) for k in built) for n in names}, names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ops.roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,64,512,97,97", help="N,C',C,H,W (default: the paper's RCCA head)")
    p.add_argument("--dtype", default="bfloat16", choices=list(SIZES))
    p.add_argument("--tf32", action="store_true", help="float32 GEMMs on TF32 tensor cores")
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 5 or min(shape) < 1:
        p.error(f"--shape needs five positive integers N,C',C,H,W, got {args.shape!r}")
    print(table(shape, args.dtype, args.tf32))


if __name__ == "__main__":
    main()
