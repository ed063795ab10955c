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
from tests.conftest import DEVICES, sample_inputs

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
    the compiled op's tolerances of the float64 reference on the same (rounded) inputs."""
    shape = (2, 8, 16, 17, 13)
    q, k, v = (t.to(dtype).requires_grad_() for t in sample_inputs(shape, device=device))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ours = _grads(lambda a, b, c: criss_cross_attention_fused(a, b, c, block=4), q, k, v, grad.to(dtype))
    ref = _grads(reference.criss_cross_attention, q64, k64, v64, grad.double())
    atol, rtol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol, msg=name)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_fused_takes_non_contiguous_inputs(layout):
    """Forward and gradients, the gradient of the output non-contiguous too."""
    q, k, v = sample_inputs((2, 3, 5, 6, 7), layout=layout, requires_grad=True)
    grad = torch.randn(2, 5, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).transpose(2, 3)
    ours = _grads(lambda a, b, c: ops.criss_cross_attention(a, b, c, fused=True), q, k, v, grad)
    ref = _grads(reference.criss_cross_attention, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_fused_float16_stays_in_range():
    """Weights that sum to 1 meet the values: a flat attention over a 256-pixel row of values of
    300 gives 300, not the float16 overflow of their sum."""
    q = torch.zeros(1, 4, 2, 256, dtype=torch.float16)
    v = torch.full((1, 2, 2, 256), 300.0, dtype=torch.float16)
    out = ops.criss_cross_attention(q, q, v, fused=True)
    assert torch.isfinite(out).all() and torch.allclose(out.float(), torch.full_like(out.float(), 300.0))


def test_fused_on_meta_tensors_gives_the_shape():
    q, v = torch.empty(1, 2, 3, 4, device="meta"), torch.empty(1, 5, 3, 4, device="meta")
    assert ops.criss_cross_attention(q, q, v, fused=True).shape == (1, 5, 3, 4)


def test_fused_never_holds_the_map():
    """Forward and backward, every tensor any op returns: none is as large as the
    (N, H + W - 1, H, W) map, nor larger than the value (N, C, H, W). The mode with the map, seen
    the same way, returns the map."""
    N, Cq, C, H, W = 2, 2, 4, 24, 24
    q, k, v = sample_inputs((N, Cq, C, H, W), dtype=torch.float32, requires_grad=True)
    value, slots = N * C * H * W, N * (H + W - 1) * H * W
    for fused in (True, False):
        with LargestOutput() as seen:
            out = ops.criss_cross_attention(q, k, v, implementation="compiled", fused=fused)
            out.backward(torch.ones_like(out))
        if fused:
            assert seen.largest <= value < slots, (seen.largest, value, slots)
        else:
            assert seen.largest >= slots, seen.largest


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


def test_fused_under_autocast_runs_in_the_autocast_dtype():
    """Forward and backward: the op sees the inputs cast to bfloat16 (the cast passes the gradient
    through to the float32 leaves)."""
    q, k, v = sample_inputs((1, 4, 8, 7, 9), dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.criss_cross_attention(q, k, v, fused=True)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    expected = criss_cross_attention_fused(*low)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for g, e in zip(grads, torch.autograd.grad(expected.float().sum(), low)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), atol=0, rtol=0)


def test_fused_backward_is_not_differentiable_twice():
    q, k, v = sample_inputs((1, 2, 3, 4, 5), requires_grad=True)
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
