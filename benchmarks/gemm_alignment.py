"""Does the odd leading dimension of the criss-cross GEMMs cost tensor-core speed?

At the paper's shape the maps are (N, C, 97, 97): every channel holds H * W = 9409 elements and
every row 97, so a GEMM that reads a map in place has odd strides, and cuBLAS cannot take its
aligned (16-byte) tensor-core kernels. This times the four contractions of one image as PyTorch
batched GEMMs (cuBLAS strided-batched) in three layouts, side by side (interleaved, median of
``--calls`` back-to-back calls per sample):

- ``as is``: maps of (C, 97, 97), outputs and attention contiguous (channel stride 9409, batch
  stride and leading dimensions 97);
- ``channel``: the channel stride padded to a multiple of ``--align`` (9416), rows as they are;
- ``aligned``: every row padded to a multiple of ``--align`` elements (97 -> 104) and the channel
  stride with it (97 * 104): operands, attention and outputs all aligned.

It prints the time of each and the full name of the kernel cuBLAS chose. The layouts are the
contractions' shapes, not the op's exact calls (the op reads the attention and writes the
energies in its slot map, leading dimension H * W).

    python -m benchmarks.gemm_alignment --dtype bfloat16 --dtype float32

Contractions of one image (q, k: C' channels; v: C channels; the column ones on H/W-transposed
copies, as the op makes them):
    row energy         (H batches)  (W x C') @ (C' x W)
    column energy      (W batches)  (H x C') @ (C' x H)
    row aggregation    (H batches)  (C x W)  @ (W x W)
    column aggregation (W batches)  (C x H)  @ (H x H)
"""

from __future__ import annotations

import argparse

import torch

from ops.bench import _time


def strided(shape: tuple[int, int, int], row: int, plane: int, dtype: torch.dtype) -> torch.Tensor:
    """A (a, b, c) tensor with strides (plane, row, 1): its rows ``row`` >= c elements apart, its
    planes ``plane`` >= b * row apart; the padding is never read."""
    a, b, c = shape
    return torch.randn(a * plane, device="cuda", dtype=dtype).as_strided(shape, (plane, row, 1))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def layouts(h: int, w: int, align: int) -> dict[str, tuple[int, int]]:
    """(row length, plane size) of an (h, w) map in each layout."""
    return {"as is": (w, h * w), "channel": (w, round_up(h * w, align)),
            "aligned": (round_up(w, align), h * round_up(w, align))}


def contractions(cq: int, c: int, h: int, w: int, layout: str, align: int, dtype: torch.dtype):
    """The operands and output of the four products of one image in ``layout``."""
    row, plane = layouts(h, w, align)[layout]
    row_t, plane_t = layouts(w, h, align)[layout]
    q, k, v = (strided((ch, h, w), row, plane, dtype) for ch in (cq, cq, c))
    qt, kt, vt = (strided((ch, w, h), row_t, plane_t, dtype) for ch in (cq, cq, c))  # H/W-transposed copies
    # the attention and the energies: rows as long as the maps' (padded only when "aligned")
    attn_row, e_row = (strided((h, w, w), row, w * row, dtype) for _ in range(2))
    attn_col, e_col = (strided((w, h, h), row_t, h * row_t, dtype) for _ in range(2))
    o_row = strided((h, c, w), row, c * row, dtype)       # (H, C, W)
    o_col = strided((w, c, h), row_t, c * row_t, dtype)   # (W, C, H)
    return {  # name: (a, b, out); the call is torch.bmm(a, b, out=out)
        "row energy": (q.permute(1, 2, 0), k.permute(1, 0, 2), e_row),
        "column energy": (qt.permute(1, 2, 0), kt.permute(1, 0, 2), e_col),
        "row aggregation": (v.permute(1, 0, 2), attn_row.transpose(1, 2), o_row),
        "column aggregation": (vt.permute(1, 0, 2), attn_col.transpose(1, 2), o_col),
    }


def call(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor):
    return lambda: torch.bmm(a, b, out=out)


def kernel_name(fn) -> str:
    """The name of the (first) CUDA kernel ``fn`` launches, in full."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return " + ".join(names) if names else "?"


def time_ms(fns: dict, warmup: int, repeat: int, calls: int) -> dict:
    """Median time of one call of each closure: ``calls`` back-to-back calls per sample (the GPU
    stays busy), the closures interleaved (``ops.bench``'s timing)."""
    batches = {name: (lambda fn=fn: [fn() for _ in range(calls)]) for name, fn in fns.items()}
    return {name: ms / calls for name, ms in _time(batches, torch.device("cuda"), repeat, warmup).items()}


LAYOUTS = ("as is", "channel", "aligned")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="64,512,97,97", help="C',C,H,W")
    parser.add_argument("--align", type=int, default=8, help="pad to a multiple of this many elements")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed sample")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    # as our op's calls: no reduced-precision reduction in fp16/bf16; float32 as PyTorch's TF32 flag says
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    cq, c, h, w = map(int, args.shape.split(","))
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; shape C'={cq} C={c} H={h} W={w}; "
          f"(row, channel stride) of an (H, W) map: " + ", ".join(
              f"{name} {layouts(h, w, args.align)[name]}" for name in LAYOUTS)
          + f"; TF32 for float32: {torch.backends.cuda.matmul.allow_tf32}")
    print("\n| dtype | contraction | as is ms | channel ms | aligned ms | as is / channel | as is / aligned |")
    print("|---|---|---|---|---|---|---|")
    kernels = []
    for dtype_name in args.dtype or ["bfloat16", "float32"]:
        dtype = getattr(torch, dtype_name)
        operands = {name: contractions(cq, c, h, w, name, args.align, dtype) for name in LAYOUTS}
        for layout, group in operands.items():  # each call computes its product, in place in its out
            for name, (a, b, out) in group.items():
                torch.bmm(a, b, out=out)
                expected = torch.bmm(a.double(), b.double())
                assert torch.allclose(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()), \
                    (layout, name)
        per_layout = {layout: {name: call(*ops) for name, ops in group.items()} for layout, group in operands.items()}
        fns = {(layout, name): fn for layout, group in per_layout.items() for name, fn in group.items()}
        times = time_ms(fns, args.warmup, args.repeat, args.calls)
        totals = dict.fromkeys(LAYOUTS, 0.0)
        for name in per_layout["as is"]:
            t = {layout: times[(layout, name)] for layout in LAYOUTS}
            for layout in LAYOUTS:
                totals[layout] += t[layout]
            print(f"| {dtype_name} | {name} | {t['as is']:.4f} | {t['channel']:.4f} | {t['aligned']:.4f} | "
                  f"{t['as is'] / t['channel']:.2f}x | {t['as is'] / t['aligned']:.2f}x |")
            kernels += [f"- {dtype_name}, {name}, {layout}: `{kernel_name(per_layout[layout][name])}`" for layout in LAYOUTS]
        print(f"| {dtype_name} | all four | {totals['as is']:.4f} | {totals['channel']:.4f} | {totals['aligned']:.4f} | "
              f"{totals['as is'] / totals['channel']:.2f}x | {totals['as is'] / totals['aligned']:.2f}x |")
    print("\nKernels (the first CUDA kernel of each call; more than one: a copy was made):\n")
    print("\n".join(kernels))


if __name__ == "__main__":
    main()
