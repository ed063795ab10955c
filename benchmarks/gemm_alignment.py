"""Does the odd leading dimension of the criss-cross GEMMs cost tensor-core speed?

At the paper's shape the maps are (N, C, 97, 97): every channel holds H * W = 9409 elements, so a
GEMM that reads a map in place has an odd leading dimension, and cuBLAS cannot take its aligned
(16-byte) tensor-core kernels. This times the four contractions of one image as PyTorch batched
GEMMs (cuBLAS strided-batched: the calls of our CUDA path) on views whose channel stride is
H * W, and on the same views of maps whose channel stride is padded to a multiple of 8 elements,
side by side (interleaved, median), and names the kernel cuBLAS chose for each. The outputs are
contiguous in both variants: only the operands' leading dimension differs.

    python -m benchmarks.gemm_alignment --dtype bfloat16 --dtype float32

Contractions of one image (q, k: C' channels; v: C channels; the column ones on H/W-transposed
copies, as the op makes them):
    row energy       (H batches)  (W x C') @ (C' x W)
    column energy    (W batches)  (H x C') @ (C' x H)
    row aggregation  (H batches)  (C x W)  @ (W x W)
    column aggregation (W batches) (C x H) @ (H x H)
"""

from __future__ import annotations

import argparse
import statistics

import torch


def padded(channels: int, h: int, w: int, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """A (channels, h, w) map whose channel stride is ``stride`` (>= h * w) elements."""
    storage = torch.randn(channels * stride, device="cuda", dtype=dtype)
    return storage.as_strided((channels, h, w), (stride, w, 1))


def contractions(cq: int, c: int, h: int, w: int, stride_hw: int, stride_wh: int, dtype: torch.dtype):
    """The four products of one image, as closures over maps with the given channel strides."""
    q, k, v = (padded(ch, h, w, stride_hw, dtype) for ch in (cq, cq, c))
    qt, kt, vt = (padded(ch, w, h, stride_wh, dtype) for ch in (cq, cq, c))  # H/W-transposed copies
    attn_row = torch.randn(h, w, w, device="cuda", dtype=dtype)
    attn_col = torch.randn(w, h, h, device="cuda", dtype=dtype)
    return {
        "row energy": lambda: torch.bmm(q.permute(1, 2, 0), k.permute(1, 0, 2)),           # (H, W, W)
        "column energy": lambda: torch.bmm(qt.permute(1, 2, 0), kt.permute(1, 0, 2)),      # (W, H, H)
        "row aggregation": lambda: torch.bmm(v.permute(1, 0, 2), attn_row.transpose(1, 2)),    # (H, C, W)
        "column aggregation": lambda: torch.bmm(vt.permute(1, 0, 2), attn_col.transpose(1, 2)),  # (W, C, H)
    }


def kernel_name(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names[0][:60] if names else "?"


def time_ms(fns: dict, warmup: int, repeat: int) -> dict[str, float]:
    """Median time of each closure, the closures interleaved round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="64,512,97,97", help="C',C,H,W")
    parser.add_argument("--align", type=int, default=8, help="pad the channel stride to a multiple of this")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    # as our op's calls: no reduced-precision reduction in fp16/bf16; float32 as PyTorch's TF32 flag says
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    cq, c, h, w = map(int, args.shape.split(","))
    hw = h * w
    pad = -(-hw // args.align) * args.align
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; shape C'={cq} C={c} H={h} W={w}; "
          f"channel stride {hw} against {pad}; TF32 for float32: {torch.backends.cuda.matmul.allow_tf32}")
    print("\n| dtype | contraction | ld ms | padded ld ms | ld / padded | kernel (ld) | kernel (padded) |")
    print("|---|---|---|---|---|---|---|")
    for dtype_name in args.dtype or ["bfloat16", "float32"]:
        dtype = getattr(torch, dtype_name)
        odd = contractions(cq, c, h, w, hw, hw, dtype)
        even = contractions(cq, c, h, w, pad, pad, dtype)
        for name in odd:
            assert odd[name]().shape == even[name]().shape
        fns = {**{("odd", n): f for n, f in odd.items()}, **{("even", n): f for n, f in even.items()}}
        times = time_ms(fns, args.warmup, args.repeat)
        total_odd = total_even = 0.0
        for name in odd:
            t_odd, t_even = times[("odd", name)], times[("even", name)]
            total_odd, total_even = total_odd + t_odd, total_even + t_even
            print(f"| {dtype_name} | {name} | {t_odd:.4f} | {t_even:.4f} | {t_odd / t_even:.2f}x | "
                  f"{kernel_name(odd[name])} | {kernel_name(even[name])} |")
        print(f"| {dtype_name} | all four | {total_odd:.4f} | {total_even:.4f} | {total_odd / total_even:.2f}x | | |")


if __name__ == "__main__":
    main()
