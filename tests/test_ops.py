"""The criss-cross attention op: compiled kernels against the reference and an independent
per-pixel computation, gradients, registration, torch.compile, bad input and the switch."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import ops
from ops import criss_cross, extension, reference
from tests.conftest import DEVICES, sample_inputs

# (atol, rtol) of the compiled op against the reference, per dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def lib():
    """The compiled kernels (a failed build fails here: CCNET_OPS_STRICT=1 in conftest)."""
    info = ops.load_compiled()
    assert info is not None and info.library.exists()
    return torch.ops.ccnet_ops


class OpRecorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def per_pixel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention pixel by pixel, straight from the paper's definition."""
    N, _, H, W = q.shape
    out = torch.zeros(N, v.shape[1], H, W, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for n, y, x in itertools.product(range(N), range(H), range(W)):
        keys = [(y, i) for i in range(W)] + [(j, x) for j in range(H) if j != y]
        energy = torch.stack([q[n, :, y, x] @ k[n, :, a, b] for a, b in keys])
        weight = torch.softmax(energy, dim=0)
        out[n, :, y, x] = sum(w * v[n, :, a, b] for w, (a, b) in zip(weight, keys))
    return out


def forward_and_grads(impl: str, q, k, v, seed: int = 1):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = ops.criss_cross_attention(q, k, v, implementation=impl, fused=False)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(out))
    return [out.detach(), q.grad, k.grad, v.grad]


def assert_close_all(actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a.float() if dtype in (torch.float16, torch.bfloat16) else a,
                                   e.to(a.dtype).float() if dtype in (torch.float16, torch.bfloat16) else e,
                                   atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


# --- the reference itself --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2, 3, 3, 4), (2, 3, 2, 1, 5), (1, 2, 3, 4, 1), (1, 1, 1, 1, 1)])
def test_reference_matches_per_pixel_definition(shape):
    q, k, v = sample_inputs(shape)
    torch.testing.assert_close(reference.criss_cross_attention(q, k, v), per_pixel(q, k, v),
                               atol=1e-12, rtol=1e-12)


def test_reference_slot_layout_agrees_with_fused_form():
    q, k, v = sample_inputs((2, 3, 4, 5, 6))
    attn = torch.softmax(reference.energy(q, k), dim=1)
    torch.testing.assert_close(reference.aggregate(attn, v), reference.criss_cross_attention(q, k, v),
                               atol=1e-12, rtol=1e-12)


# --- compiled against reference ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 8, 16, 17, 13), (1, 4, 6, 1, 9), (1, 4, 6, 9, 1), (1, 1, 1, 1, 1)])
def test_compiled_matches_reference_float64(lib, device, shape):
    q, k, v = sample_inputs(shape, device=device)
    assert_close_all(forward_and_grads("compiled", q, k, v), forward_and_grads("reference", q, k, v),
                     torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("W", [3, 5, 8, 11, 12, 14, 16, 21, 24, 29])
def test_every_cpu_column_tile_matches_reference(lib, dtype, W):
    """The CPU column passes tile x by the wide vector (16 float32 or 8 float64 lanes with
    AVX-512, else 8 or 4) and finish with a narrow one (8 or 4 lanes) or a masked wide one; these
    widths give every kind of tile, full and partial, for either build. H = 101 splits the
    column energy into several row blocks (four of 25 or 26 rows on 2 threads at W = 29)."""
    q, k, v = sample_inputs((1, 2, 3, 101, W), dtype=dtype)
    assert_close_all(forward_and_grads("compiled", q, k, v), forward_and_grads("reference", q, k, v), dtype)


@pytest.mark.parametrize("shape", [(2, 8, 64, 33, 31), (1, 64, 96, 97, 97)])
def test_compiled_matches_reference_float32_cpu(lib, shape):
    q, k, v = sample_inputs(shape, dtype=torch.float32)
    q, k = q * 0.3, k * 0.3  # energies of a trained head: softmax far from one-hot
    assert_close_all(forward_and_grads("compiled", q, k, v), forward_and_grads("reference", q, k, v),
                     torch.float32)


@pytest.mark.parametrize("blas", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_row_gemm_paths_match_reference(lib, monkeypatch, blas, dtype):
    """The row slots run on PyTorch's BLAS (float32 on kernels of ours where the build has AVX-512),
    or on ATen's bmm with CCNET_OPS_CPU_BLAS=0: both agree with the reference."""
    monkeypatch.setenv("CCNET_OPS_CPU_BLAS", blas)
    q, k, v = sample_inputs((2, 4, 12, 9, 11), dtype=dtype, layout="sliced")
    assert_close_all(forward_and_grads("compiled", q, k, v), forward_and_grads("reference", q, k, v), dtype)


@pytest.mark.parametrize("shape", [(2, 5, 11, 1, 50), (1, 1, 6, 7, 64), (1, 11, 13, 5, 65), (2, 7, 17, 3, 16),
                                   (1, 3, 5, 2, 1), (2, 4, 9, 4, 20), (1, 2, 8, 3, 40)])
def test_cpu_float32_row_kernels_match_reference(lib, shape):
    """float32 row slots (on AVX-512: register tiles of 6 rows x up to 4 vectors of 16 lanes,
    packed per image row; else the BLAS): C and W leave every remainder of a 6-row block (1 to 5,
    and none); W gives groups of 1 (16, 1), 2 (20), 3 (40) and 4 (50, 64) vectors and 4 + 1 (65),
    with a partial last vector (1, 20, 40, 50: a 2-lane tail, 65: a 1-lane one) or none (16, 64);
    H = 1 has rows only."""
    q, k, v = sample_inputs(shape, dtype=torch.float32)
    assert_close_all(forward_and_grads("compiled", q, k, v), forward_and_grads("reference", q, k, v),
                     torch.float32)


# Instruction sets besides the host's that the CPU kernels have code paths for, and the CPU
# flags that running them needs: AVX2 (32-byte vectors, no masked loads); AVX-512 without bf16
# dot products (64-byte vectors; bf16 through float32 FMAs and MKL's bf16 GEMM).
OTHER_ISAS = {"x86-64-v3": {"avx2", "fma", "bmi2", "movbe"},
              "skylake-avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(OTHER_ISAS))
def test_cpu_kernels_built_for_another_instruction_set(tmp_path, arch):
    """CCNET_OPS_CPU_ARCH compiles the C++ kernels for another instruction set than the host's
    (-march=native by default), so the code paths of other CPUs run here too: the CPU kernel
    tests pass against a build of their own, in a fresh cache."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip(f"{arch} is an x86-64 instruction set; this host is {platform.machine()}")
    flags = set(extension._cpu_signature().split(":", 1)[-1].split())
    if not OTHER_ISAS[arch] <= flags:
        pytest.skip(f"this CPU cannot run {arch} code: it lacks {sorted(OTHER_ISAS[arch] - flags)}")
    env = {**os.environ, "CCNET_OPS_CPU_ARCH": arch, "CCNET_OPS_CACHE": str(tmp_path), "CCNET_OPS_CUDA": "0"}
    selection = ("round_float32 or accumulates_in_float32 or beyond or reduced_precision or sums_in_chunks"
                 " or every_cpu_column_tile or row_gemm_paths or row_kernels or compiled_matches_reference")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                           "tests/test_ops.py", "tests/test_mixed_precision.py", "-k", selection],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    counts = proc.stdout.strip().splitlines()[-1]
    assert " passed" in counts and "failed" not in counts and "error" not in counts, counts
    built = list(tmp_path.glob("ccnet_ops_cpu_*/*.so"))
    assert len(built) == 1, built  # the kernels the tests ran, built in this cache
    # and built for arch: its code has the registers and instructions of arch, and no others
    # (objdump comes with binutils, as the assembler and linker the compiler runs)
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(built[0])], capture_output=True, text=True,
                          check=True).stdout
    assert ("%zmm" in code) == (arch == "skylake-avx512") and "%ymm" in code and "vdpbf16ps" not in code


def test_bfloat16_dot_products_are_used_where_the_cpu_has_them(lib):
    """On a CPU with AVX512_BF16 the native build runs bf16 on vdpbf16ps (no silent fallback to
    float32 FMAs): its code has the instruction."""
    flags = set(extension._cpu_signature().split(":", 1)[-1].split())
    if "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AVX512_BF16: the bf16 kernels run on float32 FMAs here")
    info = ops.load_compiled()
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(info.library)], capture_output=True,
                          text=True, check=True).stdout
    assert "vdpbf16ps" in code


def test_cpu_arch_must_be_a_march_name(monkeypatch):
    monkeypatch.setenv("CCNET_OPS_CPU_ARCH", "native -fno-strict-aliasing")
    with pytest.raises(ValueError, match="CCNET_OPS_CPU_ARCH=.* is not a -march name"):
        extension.cxx_flags()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(2, 8, 64, 33, 31), (1, 64, 512, 97, 97), (1, 3, 5, 1, 7), (2, 3, 5, 7, 1)])
def test_compiled_matches_reference_cuda(lib, dtype, shape):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, v = sample_inputs(shape, device="cuda", dtype=dtype)
    q, k = q * 0.3, k * 0.3
    # the reference runs in float32 on the same (rounded) inputs: the kernels accumulate in float32
    expected = forward_and_grads("reference", q.float(), k.float(), v.float())
    assert_close_all(forward_and_grads("compiled", q, k, v), expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_accumulates_in_float32(lib, dtype):
    """big + 16 ones on a 1 x 17 map, big first in the GEMM's K loop: exact in float32, but
    accumulated in the input dtype each `+ 1` is half an ulp of big and is lost (the emulation's
    test, here on cuBLAS, for the energy and for the aggregation)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    big = 2 / torch.finfo(dtype).eps  # its ulp is 2
    ones = torch.ones(1, 17, 1, 17, dtype=dtype, device="cuda")  # query, or attention of 17 slots
    key = ones.clone()
    key[:, 0] = big  # channel 0: the first term of every energy
    value = torch.ones(1, 1, 1, 17, dtype=dtype, device="cuda")
    value[..., 0] = big  # pixel 0, slot 0: the first term of every sum
    for name, out in (("cc_energy", lib.cc_energy(ones, key)), ("cc_aggregate", lib.cc_aggregate(ones, value))):
        assert (out.double() == big + 16).all(), f"{name} {dtype}: {out.unique().tolist()} != {big + 16}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_results_are_deterministic(lib, dtype):
    """The same inputs give bitwise the same output and gradients, run after run (cuBLAS GEMMs
    with one owner per output element, no atomics)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, v = sample_inputs((2, 64, 256, 61, 67), device="cuda", dtype=dtype)
    runs = [forward_and_grads("compiled", q * 0.3, k * 0.3, v) for _ in range(3)]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))


@pytest.mark.parametrize("device", DEVICES)
def test_primitives_match_reference(lib, device):
    q, k, v = sample_inputs((2, 3, 5, 6, 7), device=device)
    attn = torch.softmax(reference.energy(q, k), dim=1)
    torch.testing.assert_close(lib.cc_energy(q, k), reference.energy(q, k), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lib.cc_aggregate(attn, v), reference.aggregate(attn, v), atol=1e-12, rtol=1e-12)
    # cc_scatter is the adjoint of cc_aggregate in v: <aggregate(w, v), g> == <v, scatter(w, g)>
    g = torch.randn_like(v)
    lhs = (lib.cc_aggregate(attn, v) * g).sum()
    rhs = (v * lib.cc_scatter(attn, g)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-12)


layouts = st.sampled_from(["contiguous", "transposed", "channels_last", "sliced"])


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 2), Cq=st.integers(1, 5), C=st.integers(1, 9), H=st.integers(1, 11),
       W=st.integers(1, 11), layout=layouts, seed=st.integers(0, 2**16))
def test_compiled_matches_reference_property(lib, N, Cq, C, H, W, layout, seed):
    q, k, v = sample_inputs((N, Cq, C, H, W), layout=layout, seed=seed)
    assert_close_all(forward_and_grads("compiled", q, k, v, seed), forward_and_grads("reference", q, k, v, seed),
                     torch.float64)


def test_compiled_path_runs_the_kernels(lib):
    q, k, v = sample_inputs((1, 2, 3, 4, 5), requires_grad=True)
    with OpRecorder() as rec:
        ops.criss_cross_attention(q, k, v, implementation="compiled", fused=False).sum().backward()
    assert {"ccnet_ops.cc_energy.default", "ccnet_ops.cc_aggregate.default",
            "ccnet_ops.cc_scatter.default"} <= set(rec.names)
    with OpRecorder() as rec:
        ops.criss_cross_attention(q, k, v, implementation="reference")
    assert not [n for n in rec.names if n.startswith("ccnet_ops")]


# --- the centre pixel is counted exactly once -------------------------------------------------

@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_centre_pixel_counted_once(lib, impl, device):
    # Zero query/key: every one of the H + W - 1 slots weighs 1 / (H + W - 1). A one-hot value at
    # the centre gives it exactly that weight; counting it twice would give 2 / (H + W),
    # dropping it 0.
    N, C, H, W, yc, xc = 1, 1, 5, 7, 2, 3
    q = torch.zeros(N, 2, H, W, dtype=torch.float64, device=device)
    v = torch.zeros(N, C, H, W, dtype=torch.float64, device=device)
    v[0, 0, yc, xc] = 1.0
    out = ops.criss_cross_attention(q, q.clone(), v, implementation=impl, fused=False)[0, 0].cpu()
    expected = torch.zeros(H, W, dtype=torch.float64)
    expected[yc, :] = 1.0 / (H + W - 1)  # every pixel on the centre's row sees it once
    expected[:, xc] = 1.0 / (H + W - 1)  # and every pixel on its column
    torch.testing.assert_close(out, expected, atol=1e-15, rtol=0)


# --- autograd, registration, torch.compile --------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(lib, device):
    q, k, v = sample_inputs((2, 2, 3, 4, 5), device=device, requires_grad=True)
    fn = lambda q, k, v: ops.criss_cross_attention(q, k, v, implementation="compiled", fused=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    fused = lambda q, k, v: ops.criss_cross_attention(q, k, v, implementation="compiled", fused=True)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (q, k, v))  # on CUDA cc_attention_fused and its backward


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_primitives(lib, device):
    q, k, v = sample_inputs((1, 2, 3, 3, 4), device=device, requires_grad=True)
    attn = torch.rand(1, 6, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lib.cc_energy, (q, k))
    assert torch.autograd.gradcheck(lib.cc_aggregate, (attn, v))
    assert torch.autograd.gradcheck(lib.cc_scatter, (attn, v))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(lib, device):
    q, k, v = sample_inputs((2, 3, 4, 5, 6), device=device, dtype=torch.float32)
    attn = torch.softmax(reference.energy(q, k), dim=1)
    for requires_grad in (False, True):
        args = {
            lib.cc_energy.default: (q, k),
            lib.cc_aggregate.default: (attn, v),
            lib.cc_scatter.default: (attn, v),
        }
        if device == "cuda":  # the whole attention in one op each way, CUDA only
            out, attn_fused = lib.cc_attention(q, k, v)
            args[lib.cc_attention.default] = (q, k, v)
            if not requires_grad:  # the backward op has no derivative of its own
                args[lib.cc_attention_backward.default] = (torch.randn_like(out), q, k, v, attn_fused)
            out, lse = lib.cc_attention_fused(q, k, v)  # the fused mode, no map
            args[lib.cc_attention_fused.default] = (q, k, v)
            if not requires_grad:
                args[lib.cc_attention_fused_backward.default] = (torch.randn_like(out), q, k, v, out, lse)
        for op, inputs in args.items():
            inputs = tuple(t.detach().clone().requires_grad_(requires_grad) for t in inputs)
            torch.library.opcheck(op, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["map", "fused"])
def test_torch_compile_fullgraph(lib, device, fused):
    q, k, v = sample_inputs((2, 4, 6, 9, 7), device=device, dtype=torch.float32, requires_grad=True)

    def head(q, k, v):
        return (ops.criss_cross_attention(q, k, v, implementation="compiled", fused=fused) * 2.0 + v).square().mean()

    compiled = torch.compile(head, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = head(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


# --- bad input ------------------------------------------------------------------------------

def _bad_inputs():
    f64 = dict(dtype=torch.float64)
    q = torch.randn(2, 3, 4, 5, **f64)
    v = torch.randn(2, 6, 4, 5, **f64)
    return {
        "rank": ((q[0], q[0], v[0]), ValueError, "4-D"),
        "query/key shape": ((q, q[:, :2], v), ValueError, "same shape"),
        "batch": ((q, q, v[:1]), ValueError, "agree in N, H and W"),
        "height": ((q, q, v[:, :, :3]), ValueError, "agree in N, H and W"),
        "width": ((q, q, v[..., :4]), ValueError, "agree in N, H and W"),
        "dtype mix": ((q, q, v.float()), TypeError, "dtype"),
        "integer": ((q.long(), q.long(), v.long()), TypeError, "floating-point"),
        "empty": ((q[:, :, :0], q[:, :, :0], v[:, :, :0]), ValueError, "empty"),
        "empty batch": ((q[:0], q[:0], v[:0]), ValueError, "empty"),
        "device mix": ((q, q, v.to("meta")), ValueError, "device"),
    }


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_clear_error(lib, impl, case):
    args, error, words = _bad_inputs()[case]
    with pytest.raises(error, match=words):
        ops.criss_cross_attention(*args, implementation=impl, fused=False)


def test_kernels_check_their_own_arguments(lib):
    q, k, v = sample_inputs((1, 2, 3, 4, 5))
    attn = torch.softmax(reference.energy(q, k), dim=1)
    with pytest.raises(ValueError, match=r"needs \(N, H \+ W - 1, H, W\)"):
        lib.cc_aggregate(attn[:, 1:], v)
    with pytest.raises(ValueError, match="same shape"):
        lib.cc_energy(q, k[:, :1])
    with pytest.raises(TypeError, match="CPU kernels support float32, float64, float16 and bfloat16"):
        lib.cc_energy(q.int(), k.int())
    with pytest.raises(TypeError, match="CPU kernels support"):
        lib.cc_scatter(attn.int(), v.int())
    with pytest.raises(ValueError, match="empty"):
        lib.cc_aggregate(attn[:0], v[:0])
    with pytest.raises(ValueError, match="4-D"):
        lib.cc_energy(q[0], k[0])


# --- the switch, the fallback and the build ----------------------------------------------------

def test_switch_selects_the_implementation(lib):
    q, k, v = sample_inputs((1, 2, 3, 4, 5))
    with ops.use_implementation("reference"):
        assert ops.get_implementation() == "reference"
        with OpRecorder() as rec:
            ops.criss_cross_attention(q, k, v)
        assert not [n for n in rec.names if n.startswith("ccnet_ops")]
    assert ops.get_implementation() == "compiled"
    with OpRecorder() as rec:
        ops.criss_cross_attention(q, k, v)
    assert "ccnet_ops.cc_energy.default" in rec.names
    with pytest.raises(ValueError, match="unknown criss-cross attention implementation"):
        ops.set_implementation("fast")


def test_environment_selects_the_implementation(monkeypatch):
    monkeypatch.setattr(criss_cross, "_state", criss_cross._State())
    monkeypatch.setenv("CCNET_OPS_IMPL", "reference")
    assert ops.get_implementation() == "reference"


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken_build(**kwargs):
        raise extension.BuildError("ninja: cc_attention.cpp:1: error: nvcc exploded")

    monkeypatch.setattr(criss_cross, "_state", criss_cross._State())
    monkeypatch.setattr(extension, "build", broken_build)
    monkeypatch.setenv("CCNET_OPS_STRICT", "0")
    q, k, v = sample_inputs((1, 2, 3, 4, 5))
    with pytest.warns(RuntimeWarning) as record:
        first = ops.criss_cross_attention(q, k, v)
        ops.criss_cross_attention(q, k, v)
    messages = [str(w.message) for w in record if "compiled" in str(w.message)]
    assert len(messages) == 1 and "nvcc exploded" in messages[0] and "reference runs" in messages[0]
    torch.testing.assert_close(first, reference.criss_cross_attention(q, k, v), atol=0, rtol=0)

    monkeypatch.setenv("CCNET_OPS_STRICT", "1")
    with pytest.raises(extension.BuildError, match="nvcc exploded"):
        ops.criss_cross_attention(q, k, v)


def test_cache_directory_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("CCNET_OPS_CACHE", str(tmp_path))
    assert extension.cache_root() == tmp_path
    assert extension.build_key(True) != extension.build_key(False)


def test_build_command_reports_the_cached_library(lib):
    result = subprocess.run([sys.executable, "-m", "ops.build"], capture_output=True, text=True,
                            env=os.environ, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    library = result.stdout.split("library: ")[1].split()[0]
    assert os.path.exists(library) and "built ccnet_ops" in result.stdout


def test_library_uses_the_processes_cpp_runtime(lib, tmp_path):
    """An extension with its own libstdc++ crashes while formatting an error message (seen with
    g++ 13.3 + torch 2.11, whose g++ does so by default): ours resolves the C++ runtime in the
    process's shared libstdc++. The detector is checked on two small libraries, one linked as our
    build links (the process's libstdc++ named), one with -static-libstdc++."""
    assert not extension.carries_cpp_runtime(ops.load_compiled().library)
    source = tmp_path / "fmt.cpp"
    source.write_text('#include <sstream>\n'
                      'extern "C" int digits(long v) { std::ostringstream s; s << v; return s.str().size(); }\n')
    built = {}
    for name, flags in (("shared", extension.runtime_ldflags()), ("static", ["-static-libstdc++"])):
        built[name] = tmp_path / f"{name}.so"
        link = subprocess.run([*shlex.split(extension.cxx()), "-shared", "-fPIC", "-O1", str(source), *flags,
                               "-o", str(built[name])], capture_output=True, text=True, timeout=120,
                              check=False)
        if link.returncode != 0 and name == "static":  # no libstdc++.a here (libstdc++-static)
            pytest.skip(f"the static control cannot be linked here: {link.stderr.strip()[-300:]}")
        assert link.returncode == 0, link.stderr
    assert not extension.carries_cpp_runtime(built["shared"])
    assert extension.carries_cpp_runtime(built["static"])
    with pytest.raises(extension.BuildError, match="links its own copy of libstdc"):
        extension.check_runtime(built["static"])
    assert not built["static"].exists()  # removed: the next build compiles again


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 2, 3, 1, 5), (1, 2, 3, 5, 1)])
def test_bmm_formulation_matches_the_reference(shape):
    """ops.bench's third column computes the reference's maths, forward and backward."""
    N, Cq, C, H, W = shape
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(N, Cq, H, W, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    outs = []
    for attention in (reference.criss_cross_attention, reference.criss_cross_attention_bmm):
        out = attention(q, k, v)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU peak is read from Linux's /proc")
def test_cpu_peak_memory_is_what_a_step_holds_at_once():
    """ops.bench's CPU peak: 64 MiB held together, then 32 MiB held (the reset: not 64 again), 32
    MiB twice in turn, and 4 MiB three times in a row (each reading its own)."""
    code = ("import torch\nfrom ops.bench import cpu_peak_mb\nn = 2**23\nm = 2**20\n"
            "print(cpu_peak_mb(lambda: (torch.ones(n), torch.ones(n))), cpu_peak_mb(lambda: torch.ones(n)),"
            " cpu_peak_mb(lambda: [torch.ones(n).sum() for _ in range(2)]),"
            " *(cpu_peak_mb(lambda: torch.ones(m)) for _ in range(3)))")
    from ops.bench import CPU_PEAK_ENV

    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **CPU_PEAK_ENV}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    if "None" in proc.stdout.split():
        pytest.skip("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    together, one, in_turn, *small = map(float, proc.stdout.split())
    assert 63 < together < 68 and 31 < one < 36 and 31 < in_turn < 36, proc.stdout
    assert all(3.5 < mb < 6 for mb in small), proc.stdout


def test_bmm_formulation_keeps_the_dtype_contract():
    """Under CPU autocast bf16: bf16 output, as close to the float64 maths as the reference is."""
    gen = torch.Generator().manual_seed(1)
    q, k = (0.5 * torch.randn(1, 4, 6, 7, generator=gen) for _ in range(2))
    v = torch.randn(1, 8, 6, 7, generator=gen)
    exact = reference.criss_cross_attention(*(t.bfloat16().double() for t in (q, k, v)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = reference.criss_cross_attention_bmm(q, k, v), reference.criss_cross_attention(q, k, v)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), exact, rtol=2e-2, atol=2e-2)
    assert (ours.double() - exact).abs().max() <= 1.5 * (ref.double() - exact).abs().max() + 1e-3


# --- fuzzed input validation -------------------------------------------------------------------
# Random inputs, valid or not: every call either returns what an independent computation gives,
# or raises ValueError/TypeError with a message that names the op. Nothing else (a crash, an
# IndexError, a wrong result) is allowed.

FUZZ_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
               torch.complex64]
# drawn mostly from the valid part, so that about half the inputs are valid
dtypes = st.sampled_from([torch.float64] * 6 + [torch.float32] * 6 + FUZZ_DTYPES)
sizes = st.sampled_from([0] + [1, 2, 3, 4, 5] * 4)
CLEAR_ERROR = r"^(criss_cross_attention|cc_energy|cc_aggregate|cc_scatter): \S"


@st.composite
def fuzz_tensor(draw, shape: list[int], dtype: torch.dtype, non_tensor: bool = True):
    """A tensor of roughly ``shape`` (sometimes a dimension dropped, added or resized), in one of
    several memory layouts, on the CPU or (rarely) the meta device; rarely not a tensor at all
    (``non_tensor``: the raw ops' schema turns those away before any kernel runs)."""
    shape = list(shape)
    mutation = draw(st.sampled_from(["none"] * 24 + ["drop", "add", "resize"]))
    if mutation == "drop" and shape:
        del shape[draw(st.integers(0, len(shape) - 1))]
    elif mutation == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
    elif mutation == "resize" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 6))
    if non_tensor and draw(st.integers(0, 40)) == 0:
        return draw(st.sampled_from([None, 1.0, [[0.5]]]))
    device = "meta" if draw(st.integers(0, 25)) == 0 else "cpu"
    layout = draw(st.sampled_from(["contiguous", "transposed", "channels_last", "sliced", "expanded", "offset"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def make(s):
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)

    if len(shape) >= 2 and layout == "transposed":
        t = make(shape[:-2] + [shape[-1], shape[-2]]).transpose(-1, -2)
    elif len(shape) == 4 and layout == "channels_last":
        t = make(shape).contiguous(memory_format=torch.channels_last)
    elif shape and layout == "sliced":
        t = make(shape[:-1] + [2 * shape[-1]])[..., ::2]
    elif shape and layout == "expanded":  # stride 0 along the first dimension
        t = make([1] + shape[1:]).expand(shape)
    elif layout == "offset":  # a view that starts inside its storage
        t = make([2] + shape)[1]
    else:
        t = make(shape)
    return t.to(device)


def _expect_valid(*tensors) -> bool:
    """The independent oracle of what the CPU build accepts: tensors, 4-D, non-empty, one device,
    one dtype, float64/32/16 or bfloat16 (the CPU kernels) on the CPU, any float on meta (shapes only)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if any(t.dim() != 4 or t.numel() == 0 for t in tensors):
        return False
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        return False
    t = tensors[0]
    return t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) or \
        (t.device.type == "meta" and t.is_floating_point())


@st.composite
def fuzz_op_inputs(draw):
    N, Cq, C, H, W = (draw(sizes) for _ in range(5))
    dtype = draw(dtypes)
    each = [dtype if draw(st.integers(0, 15)) else draw(st.sampled_from(FUZZ_DTYPES)) for _ in range(3)]
    return (draw(fuzz_tensor([N, Cq, H, W], each[0])), draw(fuzz_tensor([N, Cq, H, W], each[1])),
            draw(fuzz_tensor([N, C, H, W], each[2])))


FUZZ_TRIED = {"op": 0, "op_valid": 0, "primitive": 0, "primitive_valid": 0}


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(inputs=fuzz_op_inputs())
def test_fuzzed_inputs_to_the_op(lib, inputs):
    import warnings

    q, k, v = inputs
    valid = _expect_valid(q, k, v) and q.shape == k.shape and \
        (q.shape[0], *q.shape[2:]) == (v.shape[0], *v.shape[2:])
    FUZZ_TRIED["op"] += 1
    if not valid:
        with pytest.raises((ValueError, TypeError), match=CLEAR_ERROR):
            ops.criss_cross_attention(q, k, v, implementation="compiled", fused=False)
        return
    FUZZ_TRIED["op_valid"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meta tensors: "the reference runs on this device instead"
        out = ops.criss_cross_attention(q, k, v, implementation="compiled", fused=False)
    assert out.shape == v.shape and out.dtype == v.dtype and out.device == v.device
    if q.device.type == "meta":
        return
    expected = per_pixel(q, k, v) if q.numel() + v.numel() < 200 else \
        reference.criss_cross_attention(q.double(), k.double(), v.double())
    atol, rtol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol * 10, rtol=rtol * 10)
    if q.dtype == torch.float64:
        assert_close_all(forward_and_grads("compiled", q, k, v), forward_and_grads("reference", q, k, v),
                         torch.float64)


@st.composite
def fuzz_primitive_inputs(draw):
    name = draw(st.sampled_from(["cc_energy", "cc_aggregate", "cc_scatter"]))
    N, C, H, W = (draw(sizes) for _ in range(4))
    dtype = draw(dtypes)
    other = dtype if draw(st.integers(0, 15)) else draw(st.sampled_from(FUZZ_DTYPES))
    first = [N, C, H, W] if name == "cc_energy" else \
        [N, max(0, H + W - 1 + draw(st.sampled_from([0] * 12 + [-1, 1]))), H, W]
    return name, draw(fuzz_tensor(first, dtype, False)), draw(fuzz_tensor([N, C, H, W], other, False))


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(inputs=fuzz_primitive_inputs())
def test_fuzzed_inputs_to_the_kernels(lib, inputs):
    name, a, b = inputs
    valid = _expect_valid(a, b) and (a.shape == b.shape if name == "cc_energy" else
                                     tuple(a.shape) == (b.shape[0], b.shape[2] + b.shape[3] - 1, *b.shape[2:]))
    FUZZ_TRIED["primitive"] += 1
    op = getattr(lib, name)
    if not valid:
        with pytest.raises((ValueError, TypeError), match=CLEAR_ERROR):
            op(a, b)
        return
    FUZZ_TRIED["primitive_valid"] += 1
    out = op(a, b)
    if a.device.type == "meta":
        return
    a64, b64 = a.double(), b.double()
    if name == "cc_energy":
        expected = reference.energy(a64, b64)
    elif name == "cc_aggregate":
        expected = reference.aggregate(a64, b64)
    else:  # scatter(w, g) is the gradient of <aggregate(w, v), g> in v
        v = torch.zeros_like(b64, requires_grad=True)
        expected, = torch.autograd.grad((reference.aggregate(a64, v) * b64).sum(), v)
    atol, rtol = TOLERANCE[a.dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol * 10, rtol=rtol * 10)


def test_fuzzing_tried_valid_and_invalid_inputs():
    """The fuzzers above really produced both kinds of input (run after them)."""
    if FUZZ_TRIED["op"] == 0:
        pytest.skip("run with the fuzz tests")
    assert 0 < FUZZ_TRIED["op_valid"] < FUZZ_TRIED["op"]
    assert 0 < FUZZ_TRIED["primitive_valid"] < FUZZ_TRIED["primitive"]
    print(f"fuzzed inputs: {FUZZ_TRIED}")


def _big_enough(device: str, nbytes: int) -> bool:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] > nbytes
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return available > nbytes


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_offsets_beyond_32_bits(lib, device):
    """An attention map of more than 2^31 elements (8.7 GB in float32): every kernel reads or writes
    offsets past 2^31, in the row part (the CPU's row kernels or BLAS calls) and in the column part. Checked on the
    pixels whose offsets are largest, against sums written out here."""
    H, W = 64, 5800
    L = H + W - 1
    assert L * H * W > 2**31
    if not _big_enough(device, L * H * W * 4 + 2**30):
        pytest.skip("needs 10 GB of free memory")
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, 1, H, W, generator=gen).to(device) for _ in range(4))
    e = lib.cc_energy(q, k)  # (1, L, H, W)
    out, back = lib.cc_aggregate(e, v), lib.cc_scatter(e, g)
    qd, kd, vd, gd = (t[0, 0].double().cpu() for t in (q, k, v, g))
    rows = lambda y: [r for r in range(H) if r != y]  # noqa: E731 - the column slots of row y, in order
    for y, x in [(H - 1, W - 1), (H - 1, 0), (0, W - 1), (H // 2, W // 2)]:
        slots = e[0, :, y, x].double().cpu()  # the largest offsets: slot s sits at s * H * W
        keys = torch.cat([kd[y, :], kd[rows(y), x]])
        torch.testing.assert_close(slots, qd[y, x] * keys, atol=1e-4, rtol=1e-5)
        values = torch.cat([vd[y, :], vd[rows(y), x]])
        torch.testing.assert_close(out[0, 0, y, x].double().cpu(), (slots * values).sum(), atol=1e-2, rtol=1e-4)
        # scatter: the queries that read pixel (y, x): its row (slot x) and its column
        by_row = e[0, x, y, :].double().cpu() @ gd[y, :]
        col = [(r, W + (y if y < r else y - 1)) for r in rows(y)]  # query row r reads key row y here
        by_col = sum(e[0, s, r, x].double().cpu() * gd[r, x] for r, s in col)
        torch.testing.assert_close(back[0, 0, y, x].double().cpu(), by_row + by_col, atol=1e-2, rtol=1e-4)


# --- the roofline model of the CUDA path --------------------------------------------------------

def test_roofline_against_hand_counts():
    """ops.roofline's kernels, bytes and FLOPs against counts made by hand for a 1 x (1, 2) x 2 x 3
    map in float32 and for the paper's shape in bf16, and its GEMM FLOPs against the criss-cross
    maths: H + W products per pixel and channel (the dense column matrices keep the diagonal)."""
    from ops import roofline

    ks = {k.name: k for k in roofline.kernels(1, 1, 2, 2, 3, "float32")}  # P = 6, L = 4, dense = 12
    assert ks["fwd transpose q"].bytes == 2 * 6 * 4
    assert (ks["fwd energy rows GEMM"].bytes, ks["fwd energy rows GEMM"].flops) == ((6 + 6 + 18) * 4, 36)
    assert (ks["fwd energy columns GEMM"].bytes, ks["fwd energy columns GEMM"].flops) == ((6 + 6 + 12) * 4, 24)
    assert ks["fwd pack energy"].bytes == ks["bwd pack d attention"].bytes == (12 + 6) * 4  # reads dense, writes the column slots (H - 1 per pixel)
    assert ks["fwd softmax"].bytes == (24 + 24) * 4  # reads and writes every slot
    assert ks["fwd unpack attention"].bytes == ks["bwd unpack d energy"].bytes == (6 + 12) * 4  # slots to dense
    assert ks["bwd softmax backward"].bytes == (24 + 24 + 24) * 4  # reads the map and dA, writes dE
    assert (ks["fwd aggregate rows GEMM"].bytes, ks["fwd aggregate rows GEMM"].flops) == ((12 + 18 + 12) * 4, 72)
    assert ks["fwd aggregate combine"].bytes == (12 + 12 + 12) * 4
    assert len(ks) == 11 + 19  # the launches of cc_attention and cc_attention_backward

    paper = {k.name: k for k in roofline.kernels(1, 64, 512, 97, 97, "bfloat16")}
    assert paper["fwd transpose v"].bytes == 19_269_632  # 512 x 97 x 97 x 2 bytes, read and written
    h200 = roofline.GPUS["H200 SXM"]
    assert roofline.floor_seconds(paper["fwd transpose v"], h200, "tensor16") == 19_269_632 / 4.8e12

    for shape in [(1, 64, 512, 97, 97), (2, 3, 5, 4, 7)]:
        N, Cq, C, H, W = shape
        ks = roofline.kernels(*shape, "float32")
        fwd = sum(k.flops for k in ks if k.gemm and k.name.startswith("fwd"))
        bwd = sum(k.flops for k in ks if k.gemm and k.name.startswith("bwd"))
        assert fwd == 2 * N * (Cq + C) * H * W * (H + W)
        assert bwd == 2 * N * (2 * C + 2 * Cq) * H * W * (H + W)
        total = roofline.floors(shape, "float32")["H100 SXM"]
        assert total == sum(roofline.floor_seconds(k, roofline.GPUS["H100 SXM"], "fp32") for k in ks) > 0

    # the fused mode, by hand for 1 x (1, 2) x 2 x 3 in float32: forward reads q, k (6 floats each)
    # and v (12), writes out (12) and the log-sum-exp (6); backward reads q, k, v, out, dout and the
    # log-sum-exp, writes dq, dk, dv; 4 slots per pixel
    fwd, bwd = roofline.fused_kernels(1, 1, 2, 2, 3, "float32")
    assert (fwd.bytes, fwd.flops) == ((6 + 6 + 12 + 12 + 6) * 4, 2 * 6 * 4 * (1 + 2))
    assert (bwd.bytes, bwd.flops) == ((6 + 6 + 12 + 12 + 12 + 6 + 6 + 6 + 12) * 4, 2 * 6 * 4 * (3 * 1 + 2 * 2))
    hbm = roofline.hbm_floors((1, 1, 2, 2, 3), "float32", fused=True)["H200 SXM"]
    assert hbm == (fwd.bytes + bwd.bytes) / 4.8e12

    # the fused mode as built (cc_fused.cuh), by hand for the same map. Statistics: the column pass
    # reads q and k (6 floats each), writes (max, sum) (6 each); the row pass reads q, k and those,
    # writes the log-sum-exp (6). Products: the column pass reads q, k, v (12) and the log-sum-exp,
    # writes its product (12); the row pass also reads that and writes out (12). Every tile is
    # computed whole: 32 x 32 pairs per line, 3 columns and 2 rows; per pair, 1 energy channel
    # (statistics), and 1 energy and 2 value channels (products)
    ks = {k.name: k for k in roofline.fused_line_kernels(1, 1, 2, 2, 3, "float32")}
    assert (ks["fwd columns stats"].bytes, ks["fwd columns stats"].flops) == ((6 + 6 + 6 + 6) * 4, 2 * 3 * 1024 * 1)
    assert (ks["fwd rows stats"].bytes, ks["fwd rows stats"].flops) == ((6 + 6 + 6 + 6 + 6) * 4, 2 * 2 * 1024 * 1)
    assert (ks["fwd columns forward"].bytes, ks["fwd columns forward"].flops) == ((6 + 6 + 12 + 6 + 12) * 4,
                                                                              2 * 3 * 1024 * 3)
    assert (ks["fwd rows forward"].bytes, ks["fwd rows forward"].flops) == ((6 + 6 + 12 + 6 + 12 + 12) * 4,
                                                                        2 * 2 * 1024 * 3)
    assert ks["fwd transpose lse"].bytes == 2 * 6 * 4
    # dq: q, k, v, dout, lse, D in; the column pass's dq in; dq out; per pair 1 + 2 (energy, dP) + 1
    assert (ks["bwd rows dq"].bytes, ks["bwd rows dq"].flops) == ((6 + 6 + 12 + 12 + 12 + 6 + 6) * 4, 2 * 2 * 1024 * 4)
    assert ks["bwd transpose columns dv"].bytes == 2 * 12 * 4 and ks["bwd D"].bytes == (12 + 12 + 6) * 4
    assert len(ks) == 11 + 16  # the launches of cc_attention_fused and its backward
    assert len(roofline.fused_line_kernels(1, 1, 2, 1, 3, "float32")) == 2 + 4  # one row: no column pass
    # the paper's shape in bf16: 97 rows and 97 columns of 4 tiles (128 x 128 pairs each); forward,
    # the statistics' 64 energy channels, then energies recomputed for each of 8 chunks of 64 value
    # channels: 64 + 8 x 64 + 512 per pair; backward dq and dk (one chunk of 64): 64 + 512 + 64
    # each, dv: 8 x 64 + 512
    pairs = 2 * 97 * 128 * 128
    paper = roofline.fused_line_kernels(1, 64, 512, 97, 97, "bfloat16")
    assert sum(k.flops for k in paper if k.gemm and k.name.startswith("fwd")) == 2 * pairs * (64 + 1024)
    assert sum(k.flops for k in paper if k.gemm and k.name.startswith("bwd")) == 2 * pairs * (2 * 640 + 1024)
    # float64, 2 images: the statistics' 3 channels, chunks of 32 (3 for 70 channels); 7 columns
    # of 4 pixels and 4 rows of 7, one tile each
    pairs = 2 * (7 + 4) * 32 * 32
    small = roofline.fused_line_kernels(2, 3, 70, 4, 7, "float64")
    assert sum(k.flops for k in small if k.gemm and k.name.startswith("fwd")) == 2 * pairs * (3 + 3 * 3 + 70)
    assert sum(k.flops for k in small if k.gemm and k.name.startswith("bwd")) == 2 * pairs * (
        2 * (3 + 70 + 3) + 3 * 3 + 70)
    assert roofline.line_path("float64") == "fp64_fma" and roofline.GPUS["H100 SXM"]["fp64_fma"] == 33.5e12
