"""The public criss-cross attention op, its autograd and fake kernels, and the switch.

Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation" (ICCV 2019)::

    E   = cc_energy(Q, K)          # (N, H + W - 1, H, W), slot layout of csrc/cc_index.h
    A   = softmax(E, dim=1)        # no 1/sqrt(d) scaling, as in the paper
    out = cc_aggregate(A, V)       # (N, C, H, W)

The three registered ops (``torch.ops.ccnet_ops.cc_energy``, ``cc_aggregate``, ``cc_scatter``)
are closed under differentiation, so every backward below is built from registered ops and
``torch.compile`` traces through forward and backward alike.

Implementations: ``"compiled"`` (the default; the C++/CUDA kernels, built on first use) and
``"reference"`` (pure PyTorch, ``ops.reference``). Choose with ``set_implementation``,
``use_implementation`` or the environment variable ``CCNET_OPS_IMPL``.
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


def load_compiled() -> extension.BuildInfo | None:
    """Builds (or loads from the cache) the kernels once per process.

    Returns None after one warning when they cannot be built; raises ``extension.BuildError``
    instead when CCNET_OPS_STRICT=1.
    """
    if not _state.tried:
        _state.tried = True
        try:
            _state.info = extension.build()
            _register_python_side()
        except extension.BuildError as exc:
            _state.error = str(exc)
    if _state.info is None:
        if extension.strict():
            raise extension.BuildError(_state.error or "the compiled kernels are not available")
        _warn_once("build", f"ops: the compiled criss-cross attention kernels are unavailable "
                            f"({_reason(_state.error)}); the pure-PyTorch reference runs instead. "
                            "Set CCNET_OPS_STRICT=1 to make this an error.")
    return _state.info


def _compiled_serves(device: torch.device) -> bool:
    info = load_compiled()
    if info is None:
        return False
    if device.type not in info.devices:
        _warn_once(f"device:{device.type}", f"ops: the compiled kernels were built for "
                   f"{'/'.join(info.devices)}, not {device.type}; the pure-PyTorch reference runs "
                   "on this device instead.")
        return False
    return True


def criss_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, implementation: str | None = None) -> Tensor:
    """Criss-cross attention without gamma or residual.

    Args:
        q: query (N, C', H, W).
        k: key (N, C', H, W).
        v: value (N, C, H, W), on the same device and in the same dtype.
        implementation: ``"compiled"`` or ``"reference"``; None uses the current selection.

    Returns:
        out (N, C, H, W): for each pixel, the softmax-weighted sum of the values on its row and
        column (H + W - 1 pixels, itself once).
    """
    check_inputs(q, k, v)
    name = _validate(implementation) if implementation is not None else get_implementation()
    if name == "compiled" and _compiled_serves(q.device):
        attn = torch.softmax(torch.ops.ccnet_ops.cc_energy(q, k), dim=1)  # (N, H + W - 1, H, W)
        return torch.ops.ccnet_ops.cc_aggregate(attn, v)
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


def _register_python_side() -> None:
    """Fake kernels and autograd; runs once, right after the library is loaded."""
    for op, fake, backward in (
        ("cc_energy", _energy_fake, _energy_backward),
        ("cc_aggregate", _mix_fake, _aggregate_backward),
        ("cc_scatter", _mix_fake, _scatter_backward),
    ):
        name = f"{extension.LIBRARY}::{op}"
        torch.library.register_fake(name)(fake)
        torch.library.register_autograd(name, backward, setup_context=_save_inputs)
    _register_flop_formulas()


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
