"""The CUDA kernels, run on the host: correct on a machine without a GPU.

``ops/csrc/cuda/cc_kernels.cuh`` is compiled twice: by nvcc into the CUDA op, and by the host
compiler with a shim for the CUDA built-ins into ``torch.ops.ccnet_ops_emu`` (``ops.emulation``),
which runs every thread of the same launch, kThreads per block on num_blocks blocks, one after
another. So these tests run the kernel bodies and host wrappers the GPU runs, and prove that:

* energy, aggregate and scatter (the adjoint of aggregate in the value, checked against
  autograd of the reference) match ``ops.reference`` in float64, float32, float16 and bfloat16,
  the reduced precisions against float64 maths on the same rounded inputs;
* over launch configurations that reach the edges: the grid capped at 1, 2 or 3 blocks so each
  thread runs its grid-stride loop many times, item counts not a multiple of the block, partial
  slot and channel groups, H = 1, W = 1, H != W, and non-contiguous inputs;
* every output element is written (outputs are allocated NaN-filled), the result does not depend
  on the grid, and the reduced precisions accumulate in float32;
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
THREADS, GROUP = 256, 8  # kThreads and kGroup of cc_kernels.cuh (checked below)


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
    # L = 15 slots and C = 19 channels: both end in a partial group; 252 and 378 items
    Case("real grid, partial groups", 2, 19, 7, 9, REAL_CAP),
    Case("one block, H == W", 2, 19, 9, 9, 1),
    Case("two blocks, H > W", 2, 19, 9, 5, 2),
    Case("H = 1", 2, 5, 1, 9, REAL_CAP),
    Case("W = 1", 2, 3, 9, 1, 1),
    Case("1 x 1 map", 1, 1, 1, 1, 1),
    Case("full groups", 1, 16, 4, 5, 3),  # L = 8 = kGroup, C = 2 kGroup
    Case("items a multiple of the block", 1, 8, 16, 16, 3),  # 1024 (energy) and 256 items
    Case("many items per thread", 2, 40, 24, 20, 3),  # 5760 and 4800 items on 768 threads
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


# --- the launch configurations the cases reach ------------------------------------------------

def test_cases_reach_the_launch_edges(emu):
    """What the module docstring claims the cases cover, from the wrappers' own grid maths."""
    config = {(op, c.name): emu.cc_launch_config(op, *c.shape, c.max_blocks) for op in OPS for c in CASES}
    assert {threads for _, _, threads in config.values()} == {THREADS}
    for op in OPS:
        launches = [config[op, c.name] for c in CASES]
        # grid capped: blocks below what the items need, and each thread loops 5+ times
        assert any(blocks < math.ceil(items / THREADS) and items >= 5 * blocks * THREADS
                   for items, blocks, _ in launches)
        assert any(items % THREADS for items, _, _ in launches)
        assert any(items % THREADS == 0 and items > 0 for items, _, _ in launches)
    for c in CASES:  # the real cap never binds on these sizes: one thread per item
        if c.max_blocks == REAL_CAP:
            items, blocks, _ = config["cc_energy", c.name]
            assert blocks == math.ceil(items / THREADS)
    assert any(c.C % GROUP for c in CASES) and any(c.C % GROUP == 0 for c in CASES)
    assert any((c.H + c.W - 1) % GROUP for c in CASES) and any((c.H + c.W - 1) % GROUP == 0 for c in CASES)
    assert any(c.H == 1 for c in CASES) and any(c.W == 1 for c in CASES)
    assert any(c.H > c.W for c in CASES) and any(c.H < c.W for c in CASES)
    # kGroup: slots per energy item, channels per aggregate/scatter item
    assert emu.cc_launch_config("cc_energy", 1, 1, 4, 6, 1)[0] == 2 * 4 * 6  # L = 9: 2 groups
    assert emu.cc_launch_config("cc_aggregate", 1, GROUP + 1, 4, 6, 1)[0] == 2 * 4 * 6


# --- bad arguments ----------------------------------------------------------------------------

def _bad_calls():
    q, k = make_inputs("cc_energy", (1, 2, 3, 4), torch.float32)
    w, v = make_inputs("cc_aggregate", (1, 2, 3, 4), torch.float32)
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
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_errors_naming_the_op(emu, case):
    op, args, error, words = _bad_calls()[case]
    with pytest.raises(error, match=words):
        getattr(emu, op)(*args)


def test_failed_build_raises_with_the_compilers_message(monkeypatch, tmp_path):
    source = tmp_path / "csrc" / "cuda" / "emulation" / "cc_emulation.cpp"
    source.parent.mkdir(parents=True)
    source.write_text('#error "no kernels here"\n')
    monkeypatch.setattr(emulation, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(emulation, "SOURCE", source)
    monkeypatch.setenv("CCNET_OPS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(extension.BuildError, match="no kernels here"):
        load_emulation.__wrapped__()  # past the cache of the real library
