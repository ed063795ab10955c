"""Mixed precision: the op, its primitives and CCNet under ``torch.autocast`` (CPU bf16 here; CUDA
fp16/bf16 marked ``gpu``), against float64 computations, with both implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ops
from ccnet.model import build_ccnet
from ops import reference
from tests.conftest import requires_cuda, sample_inputs

IMPLS = ["compiled", "reference"]
# (device, autocast dtype): CPU bf16 always, CUDA fp16 and bf16 on a GPU
AUTOCAST = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dtype, marks=[pytest.mark.gpu, requires_cuda]) for dtype in (torch.float16, torch.bfloat16)]
# (atol, rtol) of a result computed from bf16/fp16 inputs against float64 from the same inputs
LOW = {torch.bfloat16: (4e-2, 4e-2), torch.float16: (1e-2, 1e-2)}


@pytest.fixture(scope="module", autouse=True)
def lib():
    assert ops.load_compiled() is not None
    return torch.ops.ccnet_ops


def rounded(tensors, dtype):
    """The inputs as the autocast region sees them, and their float64 copies for the reference."""
    low = [t.to(dtype) for t in tensors]
    return low, [t.double() for t in low]


def assert_close_low(actual, expected, dtype, what=""):
    atol, rtol = LOW[dtype]
    scale = expected.detach().abs().max().clamp(min=1)  # gradients of a sum grow with the shape
    torch.testing.assert_close(actual.detach().double(), expected.detach(), atol=atol * float(scale), rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_op_under_autocast_matches_float64(impl, device, dtype):
    """float32 inputs into an autocast region: the op casts them, softmax in float32, output in the
    autocast dtype; forward and gradients against the float64 reference of the rounded inputs."""
    q, k, v = sample_inputs((2, 4, 12, 7, 9), device=device, dtype=torch.float32)
    low, exact = rounded((q, k, v), dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast(device, dtype=dtype):
        out = ops.criss_cross_attention(*leaves, implementation=impl, fused=False)
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out.float().backward(grad)
    exact = [t.requires_grad_() for t in exact]
    ref = reference.criss_cross_attention(*exact)
    ref.backward(grad.double())
    assert_close_low(out, ref, dtype, "out")
    for name, leaf, e in zip("qkv", leaves, exact):
        assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
        assert_close_low(leaf.grad, e.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernels_take_reduced_precision(lib, dtype):
    """Each CPU primitive in bf16/fp16, outside autocast, accumulating in float32: as close to the
    float64 result of the same rounded inputs as one final rounding allows."""
    q, k, v = sample_inputs((2, 5, 11, 6, 8), dtype=torch.float32, layout="transposed")
    (ql, kl, vl), (qe, ke, ve) = rounded((q, k, v), dtype)
    energy = lib.cc_energy(ql, kl)
    assert energy.dtype == dtype
    assert_close_low(energy, reference.energy(qe, ke), dtype, "cc_energy")
    attn = torch.softmax(reference.energy(qe, ke), dim=1)
    (al,), (ae,) = rounded((attn,), dtype)
    assert_close_low(lib.cc_aggregate(al, vl), reference.aggregate(ae, ve), dtype, "cc_aggregate")
    assert_close_low(lib.cc_scatter(al, vl), scatter_reference(ae, ve), dtype, "cc_scatter")


def scatter_reference(weights: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """cc_scatter in float64: the adjoint of the reference aggregation in its value."""
    probe = torch.zeros(feature.shape, dtype=torch.float64, requires_grad=True)
    out, = torch.autograd.grad((reference.aggregate(weights.double(), probe) * feature.double()).sum(), probe)
    return out


@pytest.mark.parametrize("blas", ["1", "0"])
@pytest.mark.parametrize("H,W", [(H, W) for W in (5, 16, 21, 29) for H in (36, 37)] + [(1, 29), (37, 1), (33, 97)])
def test_cpu_bfloat16_kernels_round_float32_sums_once(lib, monkeypatch, blas, H, W):
    """bf16 runs natively on the CPU (no widened copies): each primitive is its float32 sum rounded
    once. Against the float32 kernels on the same inputs (sum s2, unrounded), the bf16 result
    round(s1) may differ by half a bf16 ulp (the rounding) plus |s1 - s2|, which another
    summation order of K float32 terms bounds by 2 K 2^-24 sum |term|; and as such a difference
    crosses a rounding boundary only about once in 2^15 values, at least 99% equal round(s2)
    bitwise (truncating instead of rounding to nearest would miss every other one). A kernel that
    summed in bf16, rounded twice or read its bf16 operands wrongly fails. W gives full, partial,
    wide and narrow lane tiles (97: 7 tiles of 16, register tiles of 4 and 3), H odd and even pairs
    of rows, H = 1 and W = 1 a single row or column; CCNET_OPS_CPU_BLAS=0 takes ATen's GEMMs for
    the row slots."""
    monkeypatch.setenv("CCNET_OPS_CPU_BLAS", blas)
    q, k, v = sample_inputs((2, 9, 40, H, W), dtype=torch.float32)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    attn = torch.softmax(lib.cc_energy(q.float(), k.float()), dim=1).bfloat16()
    slots = H + W - 1
    cases = (
        ("cc_energy", lib.cc_energy(q, k), lib.cc_energy(q.float(), k.float()),
         reference.energy(q.double().abs(), k.double().abs()), q.size(1)),
        ("cc_aggregate", lib.cc_aggregate(attn, v), lib.cc_aggregate(attn.float(), v.float()),
         reference.aggregate(attn.double(), v.double().abs()), slots),
        ("cc_scatter", lib.cc_scatter(attn, v), lib.cc_scatter(attn.float(), v.float()),
         scatter_reference(attn, v.abs()), slots),
    )
    for name, low, wide, magnitude, terms in cases:
        assert_rounded_once(name, low, wide, magnitude, terms)


def assert_rounded_once(name, low, wide, magnitude, terms):
    """low (bf16) is a float32 sum of `terms` terms of |sum| `magnitude` rounded once, where the
    float32 kernels' sum is wide (see test_cpu_bfloat16_kernels_round_float32_sums_once)."""
    assert low.dtype == torch.bfloat16
    # the rounding, half a bf16 ulp at |s1| <= |s2| + d, is within an ulp at |s2| (8 significant
    # bits) plus 2^-8 d; d = |s1 - s2| <= 2 K 2^-24 sum |term|; twice that covers both
    ulp = torch.exp2(torch.floor(torch.log2(wide.double().abs().clamp(min=torch.finfo(torch.bfloat16).tiny))) - 7)
    allowed = ulp + 2 * (2 * terms * 2.0**-24 * magnitude)
    over = (low.double() - wide.double()).abs() - allowed
    assert over.max().item() <= 0, f"{name}: {(over > 0).sum().item()} values beyond the bound"
    equal = (low == wide.bfloat16()).double().mean().item()
    assert equal >= 0.99, f"{name}: only {equal:.4f} equal the float32 kernels' sums rounded"


def test_cpu_bfloat16_row_sums_in_chunks(lib):
    """bf16 aggregations keep their float32 row sums in a buffer of about 16 MiB, a chunk of
    channels at a time. With two 256 x 256 images that is 32 channels on 2 threads; 70 channels
    take two whole chunks and a partial one (and a partial channel block), whose rows must land on
    their own channels of each image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, _, v = sample_inputs((2, 1, 70, 256, 256), dtype=torch.float32)
        v = v.bfloat16()
        gen = torch.Generator().manual_seed(3)
        attn = torch.softmax(torch.randn(2, 511, 256, 256, generator=gen), dim=1).bfloat16()
        for name, op, magnitude in (
                ("cc_aggregate", lib.cc_aggregate, reference.aggregate(attn.double(), v.double().abs())),
                ("cc_scatter", lib.cc_scatter, scatter_reference(attn, v.abs()))):
            assert_rounded_once(name, op(attn, v), op(attn.float(), v.float()), magnitude, 511)
    finally:
        torch.set_num_threads(threads)


def test_cpu_bfloat16_accumulates_in_float32(lib):
    """big + ones, big first: exact when summed in float32, while a bf16 sum loses each `+ 1`
    (half an ulp of big), in the row slots and the column slots alike. The expected values are
    integers that bf16 holds exactly, so the one final rounding is exact too."""
    big = 2 / torch.finfo(torch.bfloat16).eps  # 256: its bf16 ulp is 2
    N, C, H, W = 1, 17, 5, 19  # W: a full tile and a tail; L - 1 = 22 ones beside big
    query = torch.ones(N, C, H, W, dtype=torch.bfloat16)
    key = query.clone()
    key[:, 0] = big  # channel 0 first in every energy's sum
    energy = lib.cc_energy(query, key)
    assert (energy.double() == big + C - 1).all(), energy.unique().tolist()
    weights = torch.ones(N, H + W - 1, H, W, dtype=torch.bfloat16)
    feature = torch.ones(N, 1, H, W, dtype=torch.bfloat16)
    feature[..., 0, 0] = big  # pixel (0, 0): on the row or the column of every pixel of row 0 or column 0
    for name, out, expected in (("cc_aggregate", lib.cc_aggregate(weights, feature),
                                 reference.aggregate(weights.double(), feature.double())),
                                ("cc_scatter", lib.cc_scatter(weights, feature), scatter_reference(weights, feature))):
        assert torch.equal(expected.bfloat16().double(), expected)  # bf16 holds every expected value
        assert (expected > big).any() and (expected < big).any()
        assert torch.equal(out.double(), expected), f"{name}: {out.unique().tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("W", [18, 19])
def test_cpu_kernels_read_nothing_beyond_a_pixels_cross(lib, dtype, W):
    """An infinite value reaches exactly the pixels whose row or column holds it. Kernels that pad
    a row to whole pairs or lanes (the bf16 dot products pair neighbours along it) must not
    read the next row's first pixel: a zero weight times inf is NaN. (The pixel itself comes out
    inf or NaN: the column passes weigh a pixel's own value by zero.)"""
    N, H = 1, 5  # odd: the column passes pair rows, and row H, the pad, is the next channel's row 0
    weights = torch.ones(N, H + W - 1, H, W, dtype=dtype)
    feature = torch.ones(N, 2, H, W, dtype=dtype)
    feature[0, 0, 2, 0] = float("inf")  # just past the end of row 1
    feature[0, 1, 0, 3] = float("inf")  # just past the end of channel 0
    hits = torch.zeros(2, H, W, dtype=torch.bool)
    hits[0, 2, :] = hits[0, :, 0] = True
    hits[1, 0, :] = hits[1, :, 3] = True
    for name, out in (("cc_aggregate", lib.cc_aggregate(weights, feature)),
                      ("cc_scatter", lib.cc_scatter(weights, feature))):
        for c, hit in enumerate(hits):
            assert not torch.isfinite(out[0, c][hit]).any() and (out[0, c][~hit] == H + W - 1).all(), \
                f"{name}, channel {c}: {out[0, c]}"
    # the energies pair channels: an odd C's last pair must not reach the next image's channel 0
    query = torch.ones(2, 3, H, W, dtype=dtype)
    key = query.clone()
    key[1, 0] = float("inf")
    energy = lib.cc_energy(query, key)
    assert (energy[0] == 3).all() and not torch.isfinite(energy[1]).any()


def test_primitives_cast_mixed_inputs_under_autocast(lib):
    """The registered ops carry the autocast rule themselves: a float32 attention map (the
    softmax's output) meets a bf16 value."""
    _, _, v = sample_inputs((1, 2, 6, 5, 4), dtype=torch.bfloat16)
    attn = torch.softmax(torch.randn(1, 8, 5, 4, dtype=torch.float64), dim=1).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lib.cc_aggregate(attn, v)
    assert out.dtype == torch.bfloat16
    expected = reference.aggregate(attn.to(torch.bfloat16).double(), v.double())
    assert_close_low(out, expected, torch.bfloat16, "cc_aggregate")
    with pytest.raises(TypeError, match="cast them to one dtype"):  # outside autocast the mix is an error
        lib.cc_aggregate(attn, v)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_torch_compile_traces_autocast(device, dtype):
    """torch.compile(fullgraph=True) of a function that calls the op under autocast: the traced
    graph runs the registered ops in the autocast dtype (their autocast rule is traced, not lost),
    and forward and backward match the float64 reference of the rounded inputs."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    q, k, v = sample_inputs((2, 4, 6, 9, 7), device=device, dtype=torch.float32, requires_grad=True)

    def head(q, k, v):
        with torch.autocast(device, dtype=dtype):
            out = ops.criss_cross_attention(q, k, v, implementation="compiled", fused=False)
        return out, (out.float() * 2.0 + v).square().mean()

    backend = AotEagerAndRecordGraphs()
    out, loss = torch.compile(head, fullgraph=True, backend=backend)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    assert out.dtype == dtype
    traced = [n for g in backend.fw_graphs + backend.bw_graphs for n in g.graph.nodes
              if n.op == "call_function" and str(n.target).startswith("ccnet_ops.")]
    # on CUDA the whole attention is one op each way; on the CPU, the three primitives
    wanted = {"cc_attention", "cc_attention_backward"} if device == "cuda" else {"cc_energy", "cc_aggregate",
                                                                                "cc_scatter"}
    assert {str(n.target).split(".")[1] for n in traced} == wanted
    values = [(n.target, v) for n in traced for v in (n.meta["val"] if isinstance(n.meta["val"], (tuple, list))
                                                      else [n.meta["val"]])]
    assert all(v.dtype == dtype for _, v in values), [(target, v.dtype) for target, v in values]

    # float64 leaves; the op sees them rounded to dtype, as autocast casts them (the cast passes the
    # gradient straight through), and the loss's `+ v` sees v itself: dv has both terms
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = [t + (t.detach().to(dtype).double() - t.detach()) for t in leaves]
    out_ref = reference.criss_cross_attention(*exact)
    loss_ref = (out_ref * 2.0 + leaves[2]).square().mean()
    assert_close_low(out, out_ref, dtype, "out")
    for name, g, e in zip("qkv", grads, torch.autograd.grad(loss_ref, leaves)):
        assert g.dtype == torch.float32
        assert_close_low(g, e, dtype, f"d{name}")


def init_for_gradients(model: nn.Module) -> None:
    """Non-zero gamma and BN weights, so every parameter gets a gradient (as in test_model)."""
    for m in model.modules():
        if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter):
            nn.init.constant_(m.gamma, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_ccnet_trains_under_autocast(backbone, impl, device, dtype):
    """CCNet's forward under autocast runs in the low dtype, and every parameter gets a finite,
    non-zero float32 gradient; the loss stays near the float32 model's."""
    torch.manual_seed(0)
    model = build_ccnet(5, backbone=backbone, recurrence=2, head_channels=64).to(device)
    init_for_gradients(model)
    x = torch.randn(2, 3, 48, 56, device=device)
    target = torch.randint(0, 5, (2, 6, 7), device=device)
    with ops.use_implementation(impl):
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            loss = sum(nn.functional.cross_entropy(o, target) for o in out.values())
        assert out["out"].dtype == dtype and torch.isfinite(loss)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        with torch.no_grad():
            full = sum(nn.functional.cross_entropy(o, target) for o in model(x).values())
    assert abs(loss.item() - full.item()) < 0.05 * full.item()


@pytest.mark.gpu
@requires_cuda
def test_fp16_training_step_with_grad_scaler():
    """A float16 step as the trainer runs it: GradScaler scales, unscales and steps."""
    torch.manual_seed(0)
    model = build_ccnet(5, backbone="tiny", recurrence=2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, target = torch.randn(2, 3, 64, 64, device="cuda"), torch.randint(0, 5, (2, 8, 8), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x)["out"], target)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no overflow: the step was taken, not skipped
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert any(changed) and all(torch.isfinite(p).all() for p in model.parameters())
