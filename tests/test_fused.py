"""The fused mode of the criss-cross op (``ops.fused``): the reference's maths and gradients
without ever holding the attention map, chosen by size or on purpose, through the model's
module and the pipeline's config."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ops
from ops import reference
from ops.fused import criss_cross_attention_fused
from tests.conftest import DEVICES, requires_cuda, sample_inputs

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
SHAPES = [(2, 3, 5, 4, 6), (1, 2, 3, 1, 5), (1, 2, 3, 5, 1), (1, 4, 6, 9, 7), (2, 1, 1, 2, 3), (1, 1, 1, 1, 1)]


class LargestOutput(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns, and the ops' names."""

    def __init__(self):
        super().__init__()
        self.largest, self.names = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [None, 1, 2, 100], ids=["default", "1", "2", "whole"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_reference_float64(device, shape, block):
    """Output and every gradient, in float64, with blocks of 1 and 2 rows and columns (the
    merge across blocks), the default blocks and whole passes; one row and one column (no
    column pixel)."""
    q, k, v = sample_inputs(shape, device=device, requires_grad=True)
    grad = torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(1)).to(device)
    ours = _grads(lambda a, b, c: criss_cross_attention_fused(a, b, c, block=block), q, k, v, grad)
    ref = _grads(reference.criss_cross_attention, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_fused_keeps_the_dtype_contract(device, dtype):
    """float32, float16 and bfloat16 inputs: the output and gradients in the inputs' dtype, within
    the compiled op's tolerances of the float64 reference on the same (rounded) inputs: ``ops.fused``
    in blocks of 4 rows, and ``fused=True`` (on CUDA the fused kernels, 70 value channels in two
    chunks, lines of 40 and 37 pixels in two tiles)."""
    shape = (2, 8, 70, 40, 37)
    q, k, v = (t.to(dtype).requires_grad_() for t in sample_inputs(shape, device=device))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref = _grads(reference.criss_cross_attention, q64, k64, v64, grad.double())
    atol, rtol = TOLERANCE[dtype]
    for fn in (lambda a, b, c: criss_cross_attention_fused(a, b, c, block=4),
               lambda a, b, c: ops.criss_cross_attention(a, b, c, fused=True)):
        for name, a, b in zip(("out", "dq", "dk", "dv"), _grads(fn, q, k, v, grad.to(dtype)), ref):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol,
                                       msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_when_a_pass_has_no_finite_energy(device):
    """float16 energies beyond its range are -inf: here every column energy of pixel (0, 0) (300 x
    -300), not its row's. The column pass then adds nothing, and the output and gradients are the
    reference's (in float64, where that weight is exp(-90000)), not NaN."""
    q = torch.tensor([[[[300.0, 0.0], [0.0, 0.0]]]], device=device).half()
    k = torch.tensor([[[[0.0, 0.0], [-300.0, 0.0]]]], device=device).half()
    v, grad = (torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(s)).to(device).half() for s in (4, 5))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _grads(reference.criss_cross_attention, *(t.double().requires_grad_() for t in (q, k, v)), grad.double())
    for fn in (criss_cross_attention_fused, lambda a, b, c: ops.criss_cross_attention(a, b, c, fused=True)):
        for name, a, b in zip(("out", "dq", "dk", "dv"), _grads(fn, *leaves, grad), ref):
            torch.testing.assert_close(a.double(), b, atol=1e-2 * max(1.0, b.abs().max().item()), rtol=1e-2, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_fused_takes_non_contiguous_inputs(device, layout):
    """Forward and gradients, the gradient of the output non-contiguous too."""
    q, k, v = sample_inputs((2, 3, 5, 6, 7), device=device, layout=layout, requires_grad=True)
    grad = torch.randn(2, 5, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad = grad.to(device).transpose(2, 3)
    ours = _grads(lambda a, b, c: ops.criss_cross_attention(a, b, c, fused=True), q, k, v, grad)
    ref = _grads(reference.criss_cross_attention, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_float16_stays_in_range(device):
    """Weights that sum to 1 meet the values: a flat attention over a 256-pixel row of values of
    300 gives 300, not the float16 overflow of their sum."""
    q = torch.zeros(1, 4, 2, 256, dtype=torch.float16, device=device)
    v = torch.full((1, 2, 2, 256), 300.0, dtype=torch.float16, device=device)
    out = ops.criss_cross_attention(q, q, v, fused=True)
    assert torch.isfinite(out).all() and torch.allclose(out.float(), torch.full_like(out.float(), 300.0))


def test_fused_on_meta_tensors_gives_the_shape():
    q, v = torch.empty(1, 2, 3, 4, device="meta"), torch.empty(1, 5, 3, 4, device="meta")
    assert ops.criss_cross_attention(q, q, v, fused=True).shape == (1, 5, 3, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_never_holds_the_map(device):
    """Forward and backward, every tensor any op returns: none is as large as the
    (N, H + W - 1, H, W) map, nor larger than the value (N, C, H, W). The mode with the map, seen
    the same way, returns the map."""
    N, Cq, C, H, W = 2, 2, 4, 24, 24
    q, k, v = sample_inputs((N, Cq, C, H, W), device=device, dtype=torch.float32, requires_grad=True)
    value, slots = N * C * H * W, N * (H + W - 1) * H * W
    for fused in (True, False):
        with LargestOutput() as seen:
            out = ops.criss_cross_attention(q, k, v, implementation="compiled", fused=fused)
            out.backward(torch.ones_like(out))
        if fused:
            assert seen.largest <= value < slots, (seen.largest, value, slots)
        else:
            assert seen.largest >= slots, seen.largest


FUSED_OPS = {"ccnet_ops.cc_attention_fused.default", "ccnet_ops.cc_attention_fused_backward.default"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 40, 70, 40, 35), (1, 2, 3, 1, 37)],
                         ids=["small", "tiles and chunks", "one row"])
def test_fused_runs_the_kernels_of_ours_on_cuda(device, shape):
    """fused=True with the compiled implementation: on CUDA the fused kernels (cc_attention_fused
    and its backward: lines of more than one 32-pixel tile, more than 64 value channels), on the
    CPU ``ops.fused`` (no op of the library); the reference implementation never runs them. The
    output and gradients are the reference's, in float64."""
    q, k, v = sample_inputs(shape, device=device, requires_grad=True)
    grad = torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(3)).to(device)
    for implementation in ("compiled", "reference"):
        with LargestOutput() as seen:
            ours = _grads(lambda a, b, c: ops.criss_cross_attention(a, b, c, implementation=implementation,
                                                                    fused=True), q, k, v, grad)
        ran = {name for name in seen.names if "ccnet_ops" in name}
        assert ran == (FUSED_OPS if device == "cuda" and implementation == "compiled" else set()), ran
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, _grads(reference.criss_cross_attention, q, k, v, grad)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_fused_op_registration_on_meta_tensors(dtype):
    """The registered fused op (its CUDA kernels run on GPUs) through its fake kernels: the shapes
    and dtypes of out and the log-sum-exp (float32 for 16-bit inputs), gradients of the inputs'
    shapes through the registered autograd, a bad log-sum-exp refused, no second derivative."""
    assert ops.load_compiled() is not None
    lib = torch.ops.ccnet_ops
    q, k = (torch.empty(2, 3, 5, 7, device="meta", dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.empty(2, 4, 5, 7, device="meta", dtype=dtype, requires_grad=True)
    out, lse = lib.cc_attention_fused(q, k, v)
    assert out.shape == v.shape and out.dtype == dtype
    assert lse.shape == (2, 5, 7) and lse.dtype == torch.promote_types(dtype, torch.float32)
    assert not lse.requires_grad
    grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    with pytest.raises(ValueError, match="lse must be"):
        lib.cc_attention_fused_backward(out, q, k, v, out, lse[:, 1:])
    out, _ = lib.cc_attention_fused(q, k, v)
    with pytest.raises(RuntimeError, match=r"fused=True\): the backward is not differentiable"):
        torch.autograd.grad(out, q, torch.empty_like(out), create_graph=True)


@pytest.mark.gpu
@requires_cuda
def test_fused_kernels_hold_no_map_on_cuda():
    """On CUDA the op's own allocations count too: forward and backward of the fused kernels at
    256 x 256 take at most 10x the value tensor beyond the inputs and gradients, under a quarter
    of the (N, H + W - 1, H, W) map alone."""
    N, Cq, C, H, W = 1, 4, 8, 256, 256
    q, k, v = sample_inputs((N, Cq, C, H, W), device="cuda", dtype=torch.float32, requires_grad=True)
    grad = torch.randn_like(v)
    value, slots = v.numel() * 4, N * (H + W - 1) * H * W * 4
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ops.criss_cross_attention(q, k, v, implementation="compiled", fused=True)
    out.backward(grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # out and dq, dk, dv are the op's results; beyond them, what the op itself holds
    held = extra - (out.numel() + q.numel() + k.numel() + v.numel()) * 4
    assert held <= 10 * value < slots / 4, (held, value, slots)


def test_fused_is_chosen_by_size_with_the_compiled_implementation():
    """fused=None: the fused mode once a pixel's slots outnumber the value's channels three times
    (``ops.fused_by_default``), the compiled kernels below; the reference stays the reference."""
    small, large = (1, 2, 4, 5, 6), (1, 2, 3, 5, 6)  # H + W - 1 = 10 slots: not above 3 x 4, above 3 x 3
    assert not ops.fused_by_default(small[:1] + small[2:]) and ops.fused_by_default(large[:1] + large[2:])
    for shape, fused in ((small, False), (large, True)):
        q, k, v = sample_inputs(shape)
        with LargestOutput() as seen:
            out = ops.criss_cross_attention(q, k, v, implementation="compiled")
        compiled = any("ccnet_ops" in name for name in seen.names)
        assert compiled != fused, (shape, seen.names)
        torch.testing.assert_close(out, reference.criss_cross_attention(q, k, v), atol=1e-10, rtol=1e-10)
        with LargestOutput() as seen:
            ops.criss_cross_attention(q, k, v, implementation="reference")
        assert not any("ccnet_ops" in name for name in seen.names)
        assert seen.largest >= shape[0] * shape[3] * shape[4] * (shape[3] + shape[4])  # the reference's map


@pytest.mark.parametrize("device", DEVICES)
def test_fused_under_autocast_runs_in_the_autocast_dtype(device):
    """Forward and backward: the op sees the inputs cast to bfloat16 (the cast passes the gradient
    through to the float32 leaves)."""
    q, k, v = sample_inputs((1, 4, 8, 7, 9), device=device, dtype=torch.float32, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.criss_cross_attention(q, k, v, fused=True)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    expected = ops.criss_cross_attention(*low, fused=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for g, e in zip(grads, torch.autograd.grad(expected.float().sum(), low)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backward_is_not_differentiable_twice(device):
    q, k, v = sample_inputs((1, 2, 3, 4, 5), device=device, requires_grad=True)
    out = ops.criss_cross_attention(q, k, v, fused=True)
    with pytest.raises(RuntimeError, match=r"fused=True\): the backward is not differentiable"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape  # a first derivative is fine


def test_model_and_config_choose_the_mode():
    """``build_ccnet(fused_attention=...)`` and ``model.fused_attention``: the same model, the same
    output; "always" for a non-local block is refused; "auto" keeps the steps' keys."""
    from ccnet import build_ccnet
    from pipeline.checkpoint import model_from_config
    from pipeline.config import ConfigError, load_config
    from pipeline.dag import step_keys

    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 40)
    outputs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_ccnet(5, backbone="tiny", recurrence=2, fused_attention=fused, gamma_init=1.0).eval()
        with LargestOutput() as seen, torch.no_grad():
            outputs[fused] = model(images)["out"]
        assert any("ccnet_ops" in name for name in seen.names) != fused
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-4, rtol=1e-4)

    model = model_from_config(load_config(None, ["model.fused_attention=always"]), 5, pretrained=False)
    assert all(m.attention.keywords == {"fused": True} for m in model.head.attention)
    with pytest.raises(ConfigError, match="fused_attention"):
        load_config(None, ["model.fused_attention=always", "model.attention=non_local"])
    with pytest.raises(ConfigError, match="fused_attention"):
        load_config(None, ["model.fused_attention=yes"])
    assert step_keys(load_config(None, ["model.fused_attention=auto"]))["train"] == step_keys(load_config())["train"]
    assert step_keys(load_config(None, ["model.fused_attention=never"]))["train"] != step_keys(load_config())["train"]
