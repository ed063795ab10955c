"""The CUDA path, run on the host: correct on a machine without a GPU.

``ops/csrc/cuda/cc_kernels.cuh`` (with ``cc_gemm.h``) is compiled twice: by nvcc into the CUDA op,
and by the host compiler with a shim for the CUDA built-ins into ``torch.ops.ccnet_ops_emu``
(``ops.emulation``), which runs every thread of the same launch, kThreads per block on
num_blocks blocks, one after another (the threads of a block as fibers, switched at every
``__syncthreads``, for the kernels with tiles in shared memory), and runs every GEMM plan (the arguments the CUDA build
passes to cublasGemmStridedBatchedEx: ops, sizes, leading dimensions, batch strides) with
cuBLAS's column-major semantics. So these tests run the layout kernels, the GEMM planning and the
host wrappers the GPU runs (cuBLAS itself excepted), and prove that:

* energy, aggregate and scatter (the adjoint of aggregate in the value, checked against
  autograd of the reference) match ``ops.reference`` in float64, float32, float16 and bfloat16,
  the reduced precisions against float64 maths on the same rounded inputs;
* over launch configurations that reach the edges: the grid capped at 1, 2 or 3 blocks so each
  thread (each block, for the tiled kernels) runs its grid-stride loop many times, item counts
  not a multiple of the block, tiles whole and cut by the map's edge, H = 1 (no column slots),
  W = 1, 1 x 1, H != W, and non-contiguous inputs;
* every output element is written (outputs are allocated NaN-filled), the result does not depend
  on the grid, and the reduced precisions accumulate in float32;
* the fused mode's kernels (``cc_fused.cuh``: cc_attention_fused and its backward, no attention
  map; fp16 and bf16 through the emulated WMMA fragments) give autograd of the reference and the
  per-pixel log-sum-exp, on the same launch edges and on lines of several tiles and channels in
  several chunks, whatever the grid;
* the wrappers reject bad arguments with an error that names the op, and a failed build of the
  emulation is a BuildError that carries the compiler's message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

from ops import emulation, extension, reference
from ops.emulation import load_emulation

OPS = ["cc_energy", "cc_aggregate", "cc_scatter"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) against float64 maths on the same inputs; the reduced precisions as in test_ops.py
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
REAL_CAP = 1 << 20  # kMaxBlocks: the grid cap of the CUDA build
THREADS = 256  # kThreads of cc_kernels.cuh (checked below)
ITEM_KERNELS = ["combine", "softmax"]  # a thread per item, grid-stride over items
TILE_KERNELS = ["pack", "unpack", "transpose"]  # a block per tile in shared memory, grid-stride over tiles
TILE = 32  # kTile of cc_kernels.cuh: tiles of 32 x 32 elements


@dataclasses.dataclass(frozen=True)
class Case:
    """A feature map (N, C, H, W) (C: query channels for the energy) and the grid cap."""

    name: str
    N: int
    C: int
    H: int
    W: int
    max_blocks: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)


CASES = [
    Case("real grid", 2, 19, 7, 9, REAL_CAP),
    Case("one block, H == W", 2, 19, 9, 9, 1),
    Case("two blocks, H > W", 2, 19, 9, 5, 2),
    Case("H = 1", 2, 5, 1, 9, REAL_CAP),
    Case("W = 1", 2, 3, 9, 1, 1),
    Case("1 x 1 map", 1, 1, 1, 1, 1),
    Case("items a multiple of the block", 1, 4, 16, 16, 3),  # 1024 combine items, 256 softmax pixels
    Case("many items per thread", 2, 40, 24, 20, 3),  # 46080 combine items on 768 threads; 96 tiles
    Case("many pixels per thread", 1, 2, 8, 200, 1),  # 1600 pixels (softmax) on 256 threads
    Case("whole and cut tiles", 1, 3, 32, 70, 2),  # H one whole tile; W two and a cut one; 2 blocks loop
    Case("two tiles each way", 1, 2, 40, 35, 2),  # k and y cross a tile: the diagonal in either tile
]
LAYOUTS = ["transposed", "channels_last", "sliced"]


@pytest.fixture(scope="module")
def emu():
    """The emulated kernels (a failed build is an error here, never a skip)."""
    return load_emulation()


@contextlib.contextmanager
def nan_filled_allocations():
    """at::empty fills new tensors with NaN (PyTorch's deterministic mode), so an output element
    that no thread writes shows up as NaN instead of as whatever the memory held."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all(), "this PyTorch no longer NaN-fills new tensors"
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def make_inputs(op: str, shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0):
    """The op's two inputs, random and rounded to dtype: query and key (N, C, H, W), or
    attention (N, H + W - 1, H, W) and value / output gradient (N, C, H, W)."""
    N, C, H, W = shape
    first = (N, C, H, W) if op == "cc_energy" else (N, H + W - 1, H, W)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in (first, (N, C, H, W))]


def expected(op: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The op's result in float64 from the (rounded) inputs, computed by the reference."""
    x, y = x.double(), y.double()
    if op == "cc_energy":
        return reference.energy(x, y)
    if op == "cc_aggregate":
        return reference.aggregate(x, y)
    # scatter(w, g) is the adjoint of aggregate(w, .): the gradient of <aggregate(w, v), g> in v
    v = torch.zeros_like(y, requires_grad=True)
    return torch.autograd.grad(reference.aggregate(x, v), v, y)[0]


def run(emu, op: str, x: torch.Tensor, y: torch.Tensor, max_blocks: int) -> torch.Tensor:
    with nan_filled_allocations():
        out = getattr(emu, op)(x, y, max_blocks)
    assert not out.isnan().any(), f"{op}: {int(out.isnan().sum())} output elements no thread wrote"
    return out


def assert_matches(actual: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype and actual.shape == wanted.shape and actual.is_contiguous()
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), wanted, atol=atol, rtol=rtol)


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in a non-contiguous memory layout, which the wrapper must make contiguous."""
    if layout == "transposed":  # H and W swapped in memory
        out = t.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
    else:  # every other element of a wider tensor
        wide = t.new_zeros(*t.shape[:3], 2 * t.shape[3])
        wide[..., ::2] = t
        out = wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


# --- against the reference -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_kernel_matches_reference(emu, op, dtype, case):
    x, y = make_inputs(op, case.shape, dtype)
    assert_matches(run(emu, op, x, y, case.max_blocks), expected(op, x, y), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(emu, op, layout):
    case = CASES[2]  # two blocks, H > W
    x, y = make_inputs(op, case.shape, torch.float64, seed=1)
    out = run(emu, op, as_layout(x, layout), as_layout(y, layout), case.max_blocks)
    assert_matches(out, expected(op, x, y), torch.float64)


@pytest.mark.parametrize("op", OPS)
def test_result_does_not_depend_on_the_grid(emu, op):
    """One owner thread per output, whichever thread it is: bitwise the same on any grid."""
    x, y = make_inputs(op, CASES[-1].shape, torch.float32, seed=2)
    results = [run(emu, op, x, y, cap) for cap in (1, 2, 3, 7, REAL_CAP)]
    assert all(torch.equal(r, results[-1]) for r in results)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_reduced_precision_accumulates_in_float32(emu, op, dtype):
    """big + 16 ones, big first: exact in float32, but in the input dtype each `+ 1` is half an
    ulp of big, rounds to even and is lost (big = 2^8 for bfloat16, 2^11 for float16)."""
    big = 2 / torch.finfo(dtype).eps  # its ulp is 2
    # a 1 x 17 map: query and key of 17 channels, or attention of 17 slots and 1 channel
    first = torch.ones(1, 17, 1, 17, dtype=dtype)  # query or attention: all ones
    second = torch.ones(1, 17 if op == "cc_energy" else 1, 1, 17, dtype=dtype)
    if op == "cc_energy":
        second[:, 0] = big  # key channel 0: the first term of every energy
    else:
        second[..., 0] = big  # value / gradient at pixel 0, slot 0: the first term of every sum
    out = run(emu, op, first, second, 1)
    assert (out.double() == big + 16).all(), f"{op} {dtype}: {out.unique().tolist()} != {big + 16}"


# --- the whole attention in one op each way (cc_attention, cc_attention_backward) -------------

def attention_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """query, key (N, C, H, W) at a scale that keeps the softmax away from one-hot, value and the
    output's gradient (N, C + 2, H, W), rounded to dtype."""
    N, C, H, W = case.shape
    gen = torch.Generator().manual_seed(seed)
    shapes = [(N, C, H, W), (N, C, H, W), (N, C + 2, H, W), (N, C + 2, H, W)]
    scale = [0.5, 0.5, 1.0, 1.0]
    return [(s * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype) for s, shape in zip(scale, shapes)]


def contract_expected(q, k, v, g):
    """What the dtype contract says the fused op returns, in float64 from the rounded inputs and
    rounded to the dtype where the contract stores: the energies, the attention map (softmax in
    float64 here), the output; dA, dE = A (dA - sum A dA), dq, dk, dv."""
    dtype = q.dtype
    r = lambda t: t.to(dtype).double()  # stored in the inputs' dtype
    q, k, v, g = (t.double() for t in (q, k, v, g))
    attn = r(torch.softmax(r(reference.energy(q, k)), dim=1))
    out = r(reference.aggregate(attn, v))
    d_attn = r(reference.energy(g, v))
    d_energy = r(attn * (d_attn - (attn * d_attn).sum(1, keepdim=True)))
    adjoint = lambda w, f: expected("cc_scatter", w, f)
    return attn, out, r(reference.aggregate(d_energy, k)), r(adjoint(d_energy, q)), r(adjoint(attn, g))


def assert_within_ulps(actual: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype, what: str, ulps: float) -> None:
    """Equal up to `ulps` units in the last place of dtype, relative to the tensor's largest value."""
    assert actual.dtype == dtype and actual.shape == wanted.shape and actual.is_contiguous(), what
    eps = torch.finfo(dtype).eps
    scale = float(wanted.abs().max().clamp(min=1e-30))
    torch.testing.assert_close(actual.double(), wanted, atol=ulps * eps * scale, rtol=ulps * eps,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_the_contract(emu, dtype, case):
    """Forward and backward in one op each: the attention map, the output and dq, dk, dv within a
    few units in the last place of what the dtype contract prescribes (every rounding point of it
    reproduced in float64), on every launch edge of the cases."""
    q, k, v, g = attention_inputs(case, dtype)
    attn_e, out_e, dq_e, dk_e, dv_e = contract_expected(q, k, v, g)
    # float32 accumulation against float64 maths: a few float32 ulps on top of the dtype's rounding
    ulps = 8 if dtype in (torch.float16, torch.bfloat16) else 64
    with nan_filled_allocations():
        out, attn = emu.cc_attention(q, k, v, case.max_blocks)
        dq, dk, dv = emu.cc_attention_backward(g, q, k, v, attn, case.max_blocks)
    for name, t in (("attn", attn), ("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} elements no thread wrote"
    for name, a, e in (("attn", attn, attn_e), ("out", out, out_e), ("dq", dq, dq_e), ("dk", dk, dk_e),
                       ("dv", dv, dv_e)):
        assert_within_ulps(a, e, dtype, name, ulps)


def test_attention_matches_the_reference_and_autograd(emu):
    """In float64 the fused op is the reference, forward and backward (autograd of the reference)."""
    case = CASES[2]
    q, k, v, g = attention_inputs(case, torch.float64, seed=3)
    out, attn = emu.cc_attention(q, k, v, case.max_blocks)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = reference.criss_cross_attention(*leaves)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    for got, want in zip(emu.cc_attention_backward(g, q, k, v, attn, case.max_blocks),
                         torch.autograd.grad(out_ref, leaves, g)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_takes_non_contiguous_inputs(emu, layout):
    case = CASES[2]
    q, k, v, g = attention_inputs(case, torch.float64, seed=1)
    out, attn = emu.cc_attention(*(as_layout(t, layout) for t in (q, k, v)), case.max_blocks)
    grads = emu.cc_attention_backward(*(as_layout(t, layout) for t in (g, q, k, v, attn)), case.max_blocks)
    out_c, attn_c = emu.cc_attention(q, k, v, case.max_blocks)
    assert torch.equal(out, out_c) and torch.equal(attn, attn_c)
    assert all(torch.equal(a, b) for a, b in zip(grads, emu.cc_attention_backward(g, q, k, v, attn_c,
                                                                                  case.max_blocks)))


def test_attention_does_not_depend_on_the_grid(emu):
    case = CASES[-1]
    q, k, v, g = attention_inputs(case, torch.float32, seed=2)
    results = []
    for cap in (1, 2, 3, 7, REAL_CAP):
        out, attn = emu.cc_attention(q, k, v, cap)
        results.append([out, attn, *emu.cc_attention_backward(g, q, k, v, attn, cap)])
    assert all(torch.equal(a, b) for r in results for a, b in zip(r, results[-1]))


# --- the fused mode in kernels of ours (cc_attention_fused and its backward): no attention map ---

FUSED_CASES = CASES + [
    # query and key of 70 channels (three 32-channel steps of an energy tile), value of 72 (two
    # float32 chunks of 64 output channels, three float64 ones of 32); both passes over two tiles
    # of 32 pixels, the second cut; the grid capped at 3 blocks for 160 and 140 items
    Case("channels in chunks, lines in tiles", 1, 70, 40, 35, 3),
]
SPAN, CHUNK = 32, 64  # kSpan and the float32 chunk of output channels of cc_fused.cuh
DELTA_GROUPS = THREADS // SPAN  # kDeltaGroups: the warps of delta_kernel, each summing every 8th channel


def fused_expected(q, k, v, g):
    """out, dq, dk, dv by autograd of the reference in float64 on the (rounded) inputs, and each
    pixel's log-sum-exp over its H + W - 1 energies."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]  # detached: q, k, v stay as given
    out = reference.criss_cross_attention(*leaves)
    grads = torch.autograd.grad(out, leaves, g.double())
    lse = torch.logsumexp(reference.energy(q.double(), k.double()), dim=1)
    return out.detach(), *grads, lse


def run_fused(emu, q, k, v, g, max_blocks):
    with nan_filled_allocations():
        out, lse = emu.cc_attention_fused(q, k, v, max_blocks)
        grads = emu.cc_attention_fused_backward(g, q, k, v, out, lse, max_blocks)
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} elements no thread wrote"
    return out, *grads, lse


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.name)
def test_fused_attention_matches_the_reference(emu, case):
    """float64: the output, dq, dk and dv are autograd of the reference, and the kept statistic is
    the log-sum-exp of each pixel's energies, on every launch edge of the cases."""
    q, k, v, g = attention_inputs(case, torch.float64, seed=4)
    got = run_fused(emu, q, k, v, g, case.max_blocks)
    for name, a, e in zip(("out", "dq", "dk", "dv", "lse"), got, fused_expected(q, k, v, g)):
        assert a.dtype == torch.float64 and a.shape == e.shape, name
        torch.testing.assert_close(a, e, atol=1e-12 * float(e.abs().max().clamp(min=1)), rtol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], FUSED_CASES[-1]], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_attention_keeps_the_dtype_contract(emu, dtype, case):
    """float32, float16, bfloat16: results in the inputs' dtype (the statistic in float32) within
    the compiled op's tolerances of the float64 reference on the same rounded inputs."""
    q, k, v, g = attention_inputs(case, dtype, seed=5)
    atol, rtol = TOLERANCE[dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv", "lse"), run_fused(emu, q, k, v, g, case.max_blocks),
                          fused_expected(q, k, v, g)):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        torch.testing.assert_close(a.double(), e, atol=atol * float(e.abs().max().clamp(min=1)), rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", [CASES[1], CASES[4], FUSED_CASES[-1]], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_attention_on_both_tile_paths(emu, dtype, case):
    """fp16 and bf16 run on the tensor-core tiles (WMMA) where the GPU has them (sm_80 on) and on
    the CUDA-core tiles below: both within the op's tolerances of the float64 reference, and the
    same bits on both here (the emulated fragments sum in float32 in order along k, as the CUDA
    cores do, and the product's fragments run over the whole line as the CUDA cores' sums do, so a
    difference is a tile or a weight computed differently)."""
    q, k, v, g = attention_inputs(case, dtype, seed=9)
    atol, rtol = TOLERANCE[dtype]
    with nan_filled_allocations():
        paths = []
        for tensor_cores in (True, False):
            out, lse = emu.cc_attention_fused(q, k, v, case.max_blocks, tensor_cores)
            paths.append((out, *emu.cc_attention_fused_backward(g, q, k, v, out, lse, case.max_blocks, tensor_cores),
                          lse))
    for got in paths:
        for name, a, e in zip(("out", "dq", "dk", "dv", "lse"), got, fused_expected(q, k, v, g)):
            torch.testing.assert_close(a.double(), e, atol=atol * float(e.abs().max().clamp(min=1)), rtol=rtol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    wmma, cores = paths
    for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), wmma, cores):
        assert torch.equal(a, b), name


def test_fused_attention_when_a_pass_has_no_finite_energy(emu):
    """float16 energies beyond its range are -inf: here every column energy of pixel (0, 0) (300 x
    -300), not its row's. The column pass then adds nothing (not 0 / 0), and the output and
    gradients are the reference's, where that weight is exp(-90000)."""
    q = torch.tensor([[[[300.0, 0.0], [0.0, 0.0]]]]).half()
    k = torch.tensor([[[[0.0, 0.0], [-300.0, 0.0]]]]).half()
    v, g = (torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(s)).half() for s in (4, 5))
    for name, a, e in zip(("out", "dq", "dk", "dv", "lse"), run_fused(emu, q, k, v, g, 1), fused_expected(q, k, v, g)):
        torch.testing.assert_close(a.double(), e, atol=1e-2 * float(e.abs().max().clamp(min=1)), rtol=1e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_attention_does_not_depend_on_the_grid(emu, dtype):
    """The same bits whatever the grid: every output element has one owner and a fixed order of sums
    (fp16 and bf16 on the tensor-core tiles)."""
    case = FUSED_CASES[-1]
    q, k, v, g = attention_inputs(case, dtype, seed=6)
    results = [run_fused(emu, q, k, v, g, cap) for cap in (1, 2, 7, REAL_CAP)]
    assert all(torch.equal(a, b) for r in results for a, b in zip(r, results[-1]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_attention_takes_non_contiguous_inputs(emu, layout):
    case = CASES[2]
    q, k, v, g = attention_inputs(case, torch.float64, seed=7)
    out, lse = emu.cc_attention_fused(*(as_layout(t, layout) for t in (q, k, v)), case.max_blocks)
    grads = emu.cc_attention_fused_backward(*(as_layout(t, layout) for t in (g, q, k, v, out)), lse.mT.contiguous().mT,
                                            case.max_blocks)
    wanted = run_fused(emu, q, k, v, g, case.max_blocks)
    assert all(torch.equal(a, b) for a, b in zip((out, *grads, lse), wanted))


def test_fused_cases_reach_the_launch_edges(emu):
    """A block per (image, line, tile of 32 pixels, chunk of 64 float32 output channels) in each
    pass; the cases give lines of several tiles, the last cut, several chunks, and grids that
    loop; and the line passes run at H = 1 and W = 1."""
    assert emu.cc_launch_config("line rows", 2, 72, 40, 35, 3) == [2 * 40 * 2 * 2, 3, THREADS]
    assert emu.cc_launch_config("line columns", 2, 72, 40, 35, 3) == [2 * 35 * 2 * 2, 3, THREADS]
    assert emu.cc_launch_config("line rows", 2, 64, 1, 32, REAL_CAP) == [2, 2, THREADS]
    # the forward's statistics passes: a block per (image, line, tile of 32 pixels), no chunks
    assert emu.cc_launch_config("stats rows", 2, 72, 40, 35, 3) == [2 * 40 * 2, 3, THREADS]
    assert emu.cc_launch_config("stats columns", 2, 72, 40, 35, 3) == [2 * 35 * 2, 3, THREADS]
    for kernel in ("stats rows", "stats columns"):
        launches = [emu.cc_launch_config(kernel, c.N, c.C + 2, c.H, c.W, c.max_blocks) for c in FUSED_CASES]
        assert any(items >= 5 * blocks for items, blocks, _ in launches), kernel
    for kernel, along in (("line rows", "W"), ("line columns", "H")):
        launches = {c.name: emu.cc_launch_config(kernel, c.N, c.C + 2, c.H, c.W, c.max_blocks) for c in FUSED_CASES}
        assert any(items >= 5 * blocks for items, blocks, _ in launches.values()), kernel
        assert any(getattr(c, along) > SPAN and getattr(c, along) % SPAN and c.C + 2 > CHUNK for c in FUSED_CASES)
    assert any(c.H == 1 for c in FUSED_CASES) and any(c.W == 1 for c in FUSED_CASES)
    assert any(c.C > SPAN for c in FUSED_CASES)  # energies over more than one 32-channel step
    # the backward's D: a block per tile of 32 pixels of all images, its 8 warps each summing every
    # 8th of the C + 2 output channels
    assert emu.cc_launch_config("delta", 2, 72, 40, 35, 3) == [-(-2 * 40 * 35 // SPAN), 3, THREADS]
    delta = {c.name: emu.cc_launch_config("delta", c.N, c.C + 2, c.H, c.W, c.max_blocks) for c in FUSED_CASES}
    assert any(tiles >= 5 * blocks for tiles, blocks, _ in delta.values())  # blocks loop over tiles
    assert any(c.N > 1 and c.H * c.W % SPAN for c in FUSED_CASES)  # a tile holds pixels of two images
    assert any((c.C + 2) % DELTA_GROUPS for c in FUSED_CASES)  # warps with one channel fewer
    assert any(c.C + 2 < DELTA_GROUPS for c in FUSED_CASES)  # warps with no channel


# --- the launch configurations the cases reach ------------------------------------------------

def test_cases_reach_the_launch_edges(emu):
    """What the module docstring claims the cases cover, from the wrappers' own grid maths."""
    kernels = ITEM_KERNELS + TILE_KERNELS
    config = {(k, c.name): emu.cc_launch_config(k, *c.shape, c.max_blocks) for k in kernels for c in CASES}
    assert {threads for _, _, threads in config.values()} == {THREADS}
    for kernel in ITEM_KERNELS:
        launches = [config[kernel, c.name] for c in CASES]
        # grid capped: blocks below what the items need, and each thread loops 5+ times
        assert any(blocks < math.ceil(items / THREADS) and items >= 5 * blocks * THREADS
                   for items, blocks, _ in launches)
        assert any(items % THREADS for items, _, _ in launches)
        assert any(items % THREADS == 0 and items > 0 for items, _, _ in launches)
    for kernel in TILE_KERNELS:
        launches = [config[kernel, c.name] for c in CASES]
        # grid capped: fewer blocks than tiles, and each block loops over 5+ tiles
        assert any(0 < blocks < tiles and tiles >= 5 * blocks for tiles, blocks, _ in launches)
    for c in CASES:  # the real cap never binds on these sizes: one thread per item, one block per tile
        if c.max_blocks == REAL_CAP:
            for kernel in ITEM_KERNELS:
                items, blocks, _ = config[kernel, c.name]
                assert blocks == math.ceil(items / THREADS)
            for kernel in TILE_KERNELS:
                tiles, blocks, _ = config[kernel, c.name]
                assert blocks == tiles
    assert any(c.H == 1 for c in CASES) and any(c.W == 1 for c in CASES)
    assert any(c.H > c.W for c in CASES) and any(c.H < c.W for c in CASES)
    # tiles whole and cut by the map's edge, along both sides of a tile
    assert any(c.H % TILE == 0 for c in CASES) and any(c.H % TILE for c in CASES)
    assert any(c.W > TILE and c.W % TILE for c in CASES)  # whole tiles along x, and a cut one
    assert any(c.H > TILE and c.H % TILE and c.W > TILE for c in CASES)  # two tiles along k, y and x
    # one item per element written: the output (padded to whole 8 x 4 tiles of x, y) and the pixels
    assert emu.cc_launch_config("combine", 2, 3, 4, 6, 1)[0] == 2 * 3 * 4 * 8  # x padded to the 8 x 4 tile
    assert emu.cc_launch_config("softmax", 2, 3, 4, 6, 1)[0] == 2 * 4 * 6  # one thread per pixel
    # one tile per 32 x 32 of (x, k) at each image row (pack, unpack), of (y, x) per channel (transpose)
    assert emu.cc_launch_config("pack", 2, 3, 40, 70, 1)[0] == 2 * 40 * 2 * 3
    assert emu.cc_launch_config("unpack", 2, 3, 40, 70, 1)[0] == 2 * 40 * 2 * 3
    assert emu.cc_launch_config("transpose", 2, 3, 40, 70, 1)[0] == 2 * 3 * 2 * 3
    assert emu.cc_launch_config("pack", 2, 3, 1, 6, 1)[:2] == [0, 0]  # H = 1: no column slots, no launch
    assert emu.cc_launch_config("unpack", 2, 3, 1, 6, 1)[0] == 2 * 1 * 1 * 1  # H = 1: the zero diagonal


# --- the emulation's barriers ---------------------------------------------------------------------

def test_emulated_barrier_orders_the_threads_of_a_block(emu):
    """Each block of 256 threads writes its slice into shared memory, waits at __syncthreads and reads
    it back reversed: right only if every thread's write comes before any thread's read."""
    x = torch.arange(3 * THREADS, dtype=torch.float32)
    torch.testing.assert_close(emu.cc_reverse_blocks(x, "blocks"), x.view(3, THREADS).flip(1).reshape(-1),
                               rtol=0, atol=0)


def test_emulated_threads_run_in_both_orders(emu):
    """With no barrier between the writes and the reads, a block whose thread t reads what thread
    t / 2 wrote is right when its threads run in ascending order and wrong in descending order. The
    emulation runs block 0 ascending and block 1 descending, so the race shows in one of them."""
    x = torch.arange(2 * THREADS, dtype=torch.float32) + 1
    out = emu.cc_reverse_blocks(x, "halves unsynced").view(2, THREADS)
    halves = x.view(2, THREADS)[:, torch.arange(THREADS) // 2]
    assert torch.equal(out[0], halves[0])  # ascending: every read after the write it needs
    assert not torch.equal(out[1], halves[1])  # descending: reads before the writes, the race shows


@pytest.mark.parametrize(("mode", "words"), [("diverge", "divergent __syncthreads in block 0: 128 of 256"),
                                             ("sequential", "run by launch, not launch_blocks")])
def test_emulated_barrier_misuse_is_an_error(emu, mode, words):
    """A barrier that half the block skips (undefined on a GPU), or one in a kernel launched without
    fibers, raises instead of computing something."""
    with pytest.raises(RuntimeError, match=words):
        emu.cc_reverse_blocks(torch.zeros(2 * THREADS), mode)


@pytest.mark.parametrize("a_layout", ["row", "col"])
@pytest.mark.parametrize("b_layout", ["row", "col"])
def test_emulated_wmma_reads_each_layout(emu, a_layout, b_layout):
    """A 16 x 16 x 16 product through the emulated fragments: an operand given row-major (element
    (i, j) at i * ldm + j) or column-major (at i + j * ldm), rows of 40 elements as the fused
    kernels' tiles have; the float32 product is the exact one (bf16 products are exact in float32,
    and 16 of them sum exactly at these magnitudes)."""
    gen = torch.Generator().manual_seed(8)
    a, b = (torch.randint(-8, 9, (16, 16), generator=gen).bfloat16() for _ in range(2))
    stored = lambda t, layout: t if layout == "row" else t.T.contiguous()  # noqa: E731
    out = emu.cc_wmma_probe(stored(a, a_layout), stored(b, b_layout), a_layout, b_layout, 0, 40)
    assert torch.equal(out, a.float() @ b.float())


@pytest.mark.parametrize(("offset", "ldm", "lanes", "words"), [
    (1, 40, 32, "not 256-bit aligned"), (0, 36, 32, "multiple of 16 bytes"),
    (0, 40, 16, "lanes of warp 0 in block 0 differ in their WMMA calls")])
def test_emulated_wmma_checks_its_documented_rules(emu, offset, ldm, lanes, words):
    """WMMA needs a 256-bit aligned pointer, a leading dimension of a multiple of 16 bytes, and the
    whole warp: 2 bytes off, rows of 36 bf16 (72 bytes), or calls from 16 lanes raise instead of
    computing something."""
    with pytest.raises(RuntimeError, match=words):
        emu.cc_wmma_probe(torch.zeros(16, 16).bfloat16(), torch.zeros(16, 16).bfloat16(), "row", "row", offset, ldm,
                          lanes)


# --- bad arguments ----------------------------------------------------------------------------

def _bad_calls():
    q, k = make_inputs("cc_energy", (1, 2, 3, 4), torch.float32)
    w, v = make_inputs("cc_aggregate", (1, 2, 3, 4), torch.float32)
    lse = torch.zeros(1, 3, 4)
    return {
        "energy shapes": ("cc_energy", (q, k[:, :1], 1), ValueError, "cc_energy: query .* same shape"),
        "energy rank": ("cc_energy", (q[0], k[0], 1), ValueError, "cc_energy: query must be 4-D"),
        "energy dtype": ("cc_energy", (q.int(), k.int(), 1), TypeError, "cc_energy: query has dtype"),
        "aggregate slots": ("cc_aggregate", (w[:, 1:], v, 1), ValueError,
                            "cc_aggregate: attention has shape"),
        "aggregate empty": ("cc_aggregate", (w[:0], v[:0], 1), ValueError, "cc_aggregate: value is empty"),
        "scatter dtypes": ("cc_scatter", (w, v.double(), 1), TypeError, "cc_scatter: attention has dtype"),
        "scatter height": ("cc_scatter", (w, v[:, :, :2], 1), ValueError, "cc_scatter: attention has shape"),
        "no blocks": ("cc_scatter", (w, v, 0), ValueError, "cc_scatter: max_blocks"),
        "fused shapes": ("cc_attention_fused", (q, k, v[:, :, :2], 1), ValueError,
                         "cc_attention_fused: value .* must match query"),
        "fused lse dtype": ("cc_attention_fused_backward", (v, q, k, v, v, lse.half(), 1), ValueError,
                            "cc_attention_fused_backward: lse must be .* in Float"),
        "fused lse shape": ("cc_attention_fused_backward", (v, q, k, v, v, lse[:, 1:], 1), ValueError,
                            "cc_attention_fused_backward: lse must be"),
        "fused out shape": ("cc_attention_fused_backward", (v, q, k, v, v[:, :1], lse, 1), ValueError,
                            "cc_attention_fused_backward: grad .* and out"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_errors_naming_the_op(emu, case):
    op, args, error, words = _bad_calls()[case]
    with pytest.raises(error, match=words):
        getattr(emu, op)(*args)


def test_emulation_uses_the_processes_cpp_runtime(emu):
    """Its argument errors format tensor sizes: with its own libstdc++ that crashed (g++ 13.3)."""
    name = f"{emulation.LIBRARY}_{emulation._build_key()}"
    assert not extension.carries_cpp_runtime(extension.cache_root() / name / f"{name}.so")


def test_failed_build_raises_with_the_compilers_message(monkeypatch, tmp_path):
    source = tmp_path / "csrc" / "cuda" / "emulation" / "cc_emulation.cpp"
    source.parent.mkdir(parents=True)
    source.write_text('#error "no kernels here"\n')
    monkeypatch.setattr(emulation, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(emulation, "SOURCE", source)
    monkeypatch.setenv("CCNET_OPS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(extension.BuildError, match="no kernels here"):
        load_emulation.__wrapped__()  # past the cache of the real library
