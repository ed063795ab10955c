"""The public criss-cross attention op, its autograd and fake kernels, and the switch.

Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation" (ICCV 2019)::

    E   = cc_energy(Q, K)          # (N, H + W - 1, H, W), slot layout of csrc/cc_index.h
    A   = softmax(E, dim=1)        # no 1/sqrt(d) scaling, as in the paper
    out = cc_aggregate(A, V)       # (N, C, H, W)

The three registered ops (``torch.ops.ccnet_ops.cc_energy``, ``cc_aggregate``, ``cc_scatter``)
are closed under differentiation, so every backward below is built from registered ops and
``torch.compile`` traces through forward and backward alike. On CUDA the same maths runs as one
op each way (``cc_attention``: energies, softmax and aggregation; ``cc_attention_backward``),
with the primitives behind a backward that must itself be differentiable; and its fused mode as
``cc_attention_fused`` and ``cc_attention_fused_backward`` (no map; not differentiable twice).

Implementations: ``"compiled"`` (the default; the C++/CUDA kernels, built on first use) and
``"reference"`` (pure PyTorch, ``ops.reference``). Choose with ``set_implementation``,
``use_implementation`` or the environment variable ``CCNET_OPS_IMPL``.

The dtype contract, the same for both implementations and on every device:

- q, k and v share one dtype: float64, float32, float16 or bfloat16. Under ``torch.autocast``
  float32/16/bf16 inputs are first cast to the autocast dtype (so float32 inputs, or a mix, are
  accepted there; float64 stays float64, as autocast leaves it);
  the three registered ops carry that autocast rule too, for callers that use them directly.
- Energies and aggregations accumulate in float32 (float64 for float64) and are stored in the
  inputs' dtype.
- The softmax over the H + W - 1 slots runs in float32 (float64 for float64); the attention
  map is then cast to the value's dtype, and the output has the value's dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from . import extension, reference
from .checks import check_aggregate_args, check_energy_args, check_inputs
from .dtypes import autocast_inputs, castable, softmax_slots
from .fused import NO_DOUBLE_BACKWARD, criss_cross_attention_fused

IMPLEMENTATIONS = ("compiled", "reference")


@dataclasses.dataclass
class _State:
    choice: str | None = None  # None: read CCNET_OPS_IMPL on first use
    tried: bool = False
    info: extension.BuildInfo | None = None
    error: str | None = None
    warned: set[str] = dataclasses.field(default_factory=set)


_state = _State()


def _validate(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown criss-cross attention implementation {name!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    return name


def get_implementation() -> str:
    """The implementation in use: ``"compiled"`` or ``"reference"``."""
    if _state.choice is None:
        _state.choice = _validate(os.environ.get("CCNET_OPS_IMPL") or "compiled")
    return _state.choice


def set_implementation(name: str) -> None:
    """Selects ``"compiled"`` or ``"reference"`` for every later call."""
    _state.choice = _validate(name)


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Selects an implementation inside a ``with`` block."""
    previous = get_implementation()
    set_implementation(name)
    try:
        yield
    finally:
        _state.choice = previous


def _warn_once(key: str, message: str) -> None:
    if key not in _state.warned:
        _state.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _reason(text: str | None, lines: int = 8) -> str:
    """The lines of a compiler log that name the error (else its end)."""
    log = (text or "").strip().splitlines()
    errors = [line for line in log if "error" in line.lower()]
    return "\n".join((errors or log)[-lines:])


def _load() -> extension.BuildInfo | None:
    """Builds (or loads from the cache) the kernels once per process; None when that failed."""
    if not _state.tried:
        _state.tried = True
        try:
            _state.info = extension.build()
            _register_python_side()
        except extension.BuildError as exc:
            _state.error = str(exc)
    return _state.info


def load_compiled() -> extension.BuildInfo | None:
    """Builds (or loads from the cache) the kernels once per process.

    Returns None after one warning when they cannot be built; raises ``extension.BuildError``
    instead when CCNET_OPS_STRICT=1.
    """
    if _load() is None:
        if extension.strict():
            raise extension.BuildError(_state.error or "the compiled kernels are not available")
        _warn_once("build", f"ops: the compiled criss-cross attention kernels are unavailable "
                            f"({_reason(_state.error)}); the pure-PyTorch reference runs instead (ops.fused, "
                            "for fused=True). Set CCNET_OPS_STRICT=1 to make this an error.")
    return _state.info


_FIX = ("Fix: install a C++ compiler and, on GPU nodes, the CUDA toolkit (nvcc) matching PyTorch's CUDA; "
        "build ahead of time on every node with `python -m ops.build --cuda`; or choose the pure-PyTorch "
        "reference on purpose (model.attention_impl=reference, or CCNET_OPS_IMPL=reference).")


def require_compiled(device: torch.device | str) -> extension.BuildInfo:
    """The compiled kernels for ``device``, or ``extension.BuildError`` saying why they are not
    there and how to fix it: for callers (the training workers) that must not fall back.

    On CUDA the library must hold the CUDA kernels, and the visible GPU must be one the build's
    architectures run on.
    """
    device = torch.device(device)
    info = _load()
    if info is not None and device.type not in info.devices:
        possible, why = extension.cuda_build_possible()
        why = why if not possible else "CCNET_OPS_CUDA=0 left the CUDA sources out"
        raise extension.BuildError(f"ops: the CUDA kernels were not built on this node: {why}. {_FIX}")
    if info is None:
        raise extension.BuildError(f"ops: the compiled criss-cross attention kernels cannot be built or "
                                   f"loaded for {device.type}:\n{_reason(_state.error, 20)}\n{_FIX}")
    if device.type == "cuda":
        archs, capability = extension.cuda_arch_list(), torch.cuda.get_device_capability(device)
        if not extension.arch_covers(archs, capability):
            raise extension.BuildError(
                f"ops: the CUDA kernels were built for TORCH_CUDA_ARCH_LIST={archs!r}, which does not run on "
                f"this GPU (compute capability {capability[0]}.{capability[1]}); set TORCH_CUDA_ARCH_LIST to "
                "include it, the same on every node, and rebuild with `python -m ops.build --cuda`.")
    return info


def _compiled_serves(device: torch.device) -> bool:
    info = load_compiled()
    if info is None:
        return False
    if device.type not in info.devices:
        if extension.strict() and device.type == "cuda":
            raise extension.BuildError(f"ops: the compiled kernels were built for {'/'.join(info.devices)}, not "
                                       f"{device.type} (CCNET_OPS_STRICT=1: no fallback to the reference)")
        _warn_once(f"device:{device.type}", f"ops: the compiled kernels were built for "
                   f"{'/'.join(info.devices)}, not {device.type}; the pure-PyTorch reference runs "
                   "on this device instead (ops.fused, for fused=True).")
        return False
    return True


# The fused mode by default (fused=None, the compiled implementation) once a pixel's slots,
# H + W - 1, outnumber the value's channels C by this factor. Measured on the CPU, forward +
# backward, float32 (``python -m ops.bench --shape "slots 3C" ...``; README, "The fused mode"):
# from 3 slots per channel on, the fused mode's peak memory is at most 0.42x the map's (11
# against 26 MB at 3, 22 against 58 at 4, 61 against 186 at 6), for 1.68x and 1.42x the time at
# 3 and 4 and 0.95x at 6; at 2 it takes 0.54x the memory for 1.77x the time (nothing measured
# between 0.75 and 2), at a whole Cityscapes image (0.75) 0.91x for 2.54x, and at the paper's
# shape (0.38) 1.14x for 3.26x: 3 keeps the faster map where the fused mode saves little memory.
# On CUDA the same threshold applies. An H100 timed the fused kernels only below it (2026-11-27):
# 1.3x-3.3x the map's time at 0.38 and 0.75 slots per channel, 0.63x-0.69x at 0.51 (a small,
# launch-bound shape); not at the shapes it takes them for.
FUSED_SLOTS_PER_CHANNEL = 3.0


def fused_by_default(value_shape) -> bool:
    """Whether ``fused=None`` takes the fused mode for a value of this (N, C, H, W) shape."""
    _, C, H, W = value_shape
    return H + W - 1 > FUSED_SLOTS_PER_CHANNEL * C


def criss_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, implementation: str | None = None,
                          fused: bool | None = None) -> Tensor:
    """Criss-cross attention without gamma or residual.

    Args:
        q: query (N, C', H, W).
        k: key (N, C', H, W).
        v: value (N, C, H, W), on the same device and in the same dtype.
        implementation: ``"compiled"`` or ``"reference"``; None uses the current selection.
        fused: True: the fused mode, which never stores the (N, H + W - 1, H, W) attention map
            and holds O(N * C * H * W) memory, on any device and with either implementation: on
            CUDA with the compiled implementation, kernels of ours (``cc_attention_fused``,
            ``csrc/cuda/cc_fused.cuh``); elsewhere ``ops.fused`` (blocks of batched GEMMs, no
            compiled kernel needed). False: the map. None: the fused mode with the compiled
            implementation where ``fused_by_default`` says so; the reference is always the
            reference.

    Returns:
        out (N, C, H, W): for each pixel, the softmax-weighted sum of the values on its row and
        column (H + W - 1 pixels, itself once).
    """
    q, k, v = autocast_inputs(q, k, v)
    check_inputs(q, k, v)
    name = _validate(implementation) if implementation is not None else get_implementation()
    if fused is None:
        fused = name == "compiled" and fused_by_default(v.shape)
    if fused:
        if name == "compiled" and q.device.type == "cuda" and _compiled_serves(q.device):
            return torch.ops.ccnet_ops.cc_attention_fused(q, k, v)[0]
        return criss_cross_attention_fused(q, k, v)
    if name == "compiled" and _compiled_serves(q.device):
        if q.device.type == "cuda":  # one op each way: energies, softmax and aggregation fused
            return torch.ops.ccnet_ops.cc_attention(q, k, v)[0]
        energy = torch.ops.ccnet_ops.cc_energy(q, k)  # (N, H + W - 1, H, W)
        return torch.ops.ccnet_ops.cc_aggregate(softmax_slots(energy, v.dtype), v)
    return reference.criss_cross_attention(q, k, v)


# --- fake kernels and autograd of the registered ops ---------------------------------------
# E = energy(a, b): da = aggregate(dE, b), db = scatter(dE, a)
# out = aggregate(w, v): dw = energy(dout, v), dv = scatter(w, dout)
# r = scatter(w, g): dw = energy(g, dr), dg = aggregate(w, dr)


def _energy_fake(query: Tensor, key: Tensor) -> Tensor:
    check_energy_args(query, key)
    N, _, H, W = query.shape
    return query.new_empty((N, H + W - 1, H, W))


def _mix_fake(attn: Tensor, feature: Tensor) -> Tensor:
    check_aggregate_args(attn, feature)
    return feature.new_empty(feature.shape)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _energy_backward(ctx, grad: Tensor):
    q, k = ctx.saved_tensors
    lib = torch.ops.ccnet_ops
    dq = lib.cc_aggregate(grad, k) if ctx.needs_input_grad[0] else None
    dk = lib.cc_scatter(grad, q) if ctx.needs_input_grad[1] else None
    return dq, dk


def _aggregate_backward(ctx, grad: Tensor):
    attn, v = ctx.saved_tensors
    lib = torch.ops.ccnet_ops
    dattn = lib.cc_energy(grad, v) if ctx.needs_input_grad[0] else None
    dv = lib.cc_scatter(attn, grad) if ctx.needs_input_grad[1] else None
    return dattn, dv


def _scatter_backward(ctx, grad: Tensor):
    attn, g = ctx.saved_tensors
    lib = torch.ops.ccnet_ops
    dattn = lib.cc_energy(g, grad) if ctx.needs_input_grad[0] else None
    dg = lib.cc_aggregate(attn, grad) if ctx.needs_input_grad[1] else None
    return dattn, dg


# out, attn = attention(q, k, v) (CUDA): the same maths as aggregate(softmax(energy(q, k)), v);
# its backward is one op too, unless the backward must itself be differentiable (create_graph),
# where it is taken through the three primitives instead.


def _attention_fake(q: Tensor, k: Tensor, v: Tensor):
    check_inputs(q, k, v)
    N, _, H, W = q.shape
    return v.new_empty(v.shape), q.new_empty((N, H + W - 1, H, W))


def _attention_backward_fake(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor):
    check_inputs(q, k, v)
    check_aggregate_args(attn, v)
    if grad.shape != v.shape:
        raise ValueError(f"cc_attention_backward: grad {tuple(grad.shape)} must have the shape of value "
                         f"{tuple(v.shape)}")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _attention_backward(ctx, grad: Tensor, _grad_attn: Tensor | None):
    q, k, v, attn = ctx.saved_tensors
    lib = torch.ops.ccnet_ops
    needed = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph: differentiate the primitives' composition
        with torch.enable_grad():
            out = lib.cc_aggregate(softmax_slots(lib.cc_energy(q, k), v.dtype), v)
            wanted = [t for t, need in zip((q, k, v), needed) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            return tuple(next(grads) if need else None for need in needed)
    return tuple(g if need else None for g, need in zip(lib.cc_attention_backward(grad, q, k, v, attn), needed))


# out, lse = attention_fused(q, k, v) (CUDA): the fused mode, with the per-pixel log-sum-exp of the
# merged softmax kept for its backward, which recomputes the energies. Not differentiable twice.


def _attention_fused_fake(q: Tensor, k: Tensor, v: Tensor):
    check_inputs(q, k, v)
    N, _, H, W = q.shape
    return v.new_empty(v.shape), v.new_empty((N, H, W), dtype=torch.promote_types(v.dtype, torch.float32))


def _attention_fused_backward_fake(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    check_inputs(q, k, v)
    if grad.shape != v.shape or out.shape != v.shape:
        raise ValueError(f"cc_attention_fused_backward: grad {tuple(grad.shape)} and out {tuple(out.shape)} must "
                         f"have the shape of value {tuple(v.shape)}")
    N, _, H, W = v.shape
    acc = torch.promote_types(v.dtype, torch.float32)
    if lse.shape != (N, H, W) or lse.dtype != acc:
        raise ValueError(f"cc_attention_fused_backward: lse must be (N, H, W) = {(N, H, W)} in {acc}, got "
                         f"{tuple(lse.shape)} in {lse.dtype}")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_fused_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])


def _attention_fused_backward(ctx, grad: Tensor, _grad_lse: Tensor | None):
    if torch.is_grad_enabled():  # create_graph: a second derivative was asked for
        raise RuntimeError(NO_DOUBLE_BACKWARD)
    q, k, v, out, lse = ctx.saved_tensors
    grads = torch.ops.ccnet_ops.cc_attention_fused_backward(grad, q, k, v, out, lse)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3]))


def _register_python_side() -> None:
    """Fake kernels and autograd; runs once, right after the library is loaded."""
    for op, fake, backward, setup in (
        ("cc_energy", _energy_fake, _energy_backward, _save_inputs),
        ("cc_aggregate", _mix_fake, _aggregate_backward, _save_inputs),
        ("cc_scatter", _mix_fake, _scatter_backward, _save_inputs),
        ("cc_attention", _attention_fake, _attention_backward, _attention_setup),
        ("cc_attention_fused", _attention_fused_fake, _attention_fused_backward, _attention_fused_setup),
    ):
        name = f"{extension.LIBRARY}::{op}"
        torch.library.register_fake(name)(fake)
        torch.library.register_autograd(name, backward, setup_context=setup)
        for device_type in ("cpu", "cuda"):
            _register_autocast(op, device_type)
    torch.library.register_fake(f"{extension.LIBRARY}::cc_attention_backward")(_attention_backward_fake)
    torch.library.register_fake(f"{extension.LIBRARY}::cc_attention_fused_backward")(_attention_fused_backward_fake)
    _register_flop_formulas()


_libraries: list[torch.library.Library] = []  # registrations live as long as their Library


def _register_autocast(op_name: str, device_type: str) -> None:
    """Under autocast, the op casts its floating inputs to the autocast dtype of the moment (as
    ``torch.library.register_autocast`` does, which fixes one dtype at registration), so that
    a float32 attention map from the float32 softmax meets a bfloat16 value. Registered on the
    dispatcher and as a Python kernel, so eager code and ``torch.compile`` both see it."""
    op = getattr(getattr(torch.ops, extension.LIBRARY), op_name).default
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    dispatch_key = getattr(torch._C.DispatchKey, key)

    def cast_and_call(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return op(*(a.to(dtype) if castable(a) and a.device.type == device_type else a for a in args))

    if op.has_kernel_for_dispatch_key(dispatch_key):
        op.py_kernels.pop(dispatch_key)
    op.py_impl(dispatch_key)(cast_and_call)
    if not _libraries:
        _libraries.append(torch.library.Library(extension.LIBRARY, "IMPL"))
    _libraries[0].impl(op_name, lambda _keyset, *args: cast_and_call(*args), key, with_keyset=True)


def _register_flop_formulas() -> None:
    """FLOPs for ``torch.utils.flop_counter``: each op is one multiply-add per (n, c, slot, pixel)."""
    from torch.utils.flop_counter import register_flop_formula

    lib = getattr(torch.ops, extension.LIBRARY)

    @register_flop_formula(lib.cc_energy)
    def _energy_flops(a_shape, b_shape, *args, **kwargs) -> int:
        N, C, H, W = a_shape
        return 2 * N * C * H * W * (H + W - 1)

    @register_flop_formula([lib.cc_aggregate, lib.cc_scatter])
    def _mix_flops(w_shape, f_shape, *args, **kwargs) -> int:
        N, L, H, W = w_shape
        return 2 * N * f_shape[1] * H * W * L

    @register_flop_formula(lib.cc_attention)
    def _attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:  # energy + aggregate
        N, Cq, H, W = q_shape
        return 2 * N * (Cq + v_shape[1]) * H * W * (H + W - 1)

    @register_flop_formula(lib.cc_attention_fused)
    def _attention_fused_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return _attention_flops(q_shape, k_shape, v_shape)

    @register_flop_formula(lib.cc_attention_fused_backward)
    def _attention_fused_backward_flops(g_shape, q_shape, *args, **kwargs) -> int:
        return _attention_backward_flops(g_shape, q_shape)

    @register_flop_formula(lib.cc_attention_backward)
    def _attention_backward_flops(g_shape, q_shape, *args, **kwargs) -> int:  # dattn, dv, dq, dk
        N, Cq, H, W = q_shape
        return 2 * N * (2 * g_shape[1] + 2 * Cq) * H * W * (H + W - 1)
