"""Argument checks of the public op, worded like the kernels' own (``csrc/cc_checks.h``).

Shape, rank and device problems raise ``ValueError``; dtype problems raise ``TypeError``.
"""

from __future__ import annotations

from torch import Tensor


def _check_feature(t: Tensor, name: str, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(
            f"{op}: {name} is empty (shape {tuple(t.shape)}); every dimension must be at least 1"
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; a floating-point dtype is required")


def _check_same_kind(a: Tensor, a_name: str, b: Tensor, b_name: str, op: str) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{op}: {a_name} is on {a.device} but {b_name} is on {b.device}; put them on one device"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{op}: {a_name} has dtype {a.dtype} but {b_name} has dtype {b.dtype}; "
            "cast them to one dtype"
        )


def check_energy_args(q: Tensor, k: Tensor, op: str = "cc_energy") -> None:
    _check_feature(q, "query", op)
    _check_feature(k, "key", op)
    _check_same_kind(q, "query", k, "key", op)
    if q.shape != k.shape:
        raise ValueError(
            f"{op}: query {tuple(q.shape)} and key {tuple(k.shape)} must have the same shape "
            "(N, C', H, W)"
        )


def check_aggregate_args(attn: Tensor, v: Tensor, op: str = "cc_aggregate") -> None:
    _check_feature(v, "value", op)
    _check_feature(attn, "attention", op)
    _check_same_kind(attn, "attention", v, "value", op)
    N, _, H, W = v.shape
    if tuple(attn.shape) != (N, H + W - 1, H, W):
        raise ValueError(
            f"{op}: attention has shape {tuple(attn.shape)} but value {tuple(v.shape)} needs "
            f"(N, H + W - 1, H, W) = {(N, H + W - 1, H, W)}"
        )


def check_inputs(q: Tensor, k: Tensor, v: Tensor, op: str = "criss_cross_attention") -> None:
    """query, key (N, C', H, W) and value (N, C, H, W) on one device, in one dtype."""
    check_energy_args(q, k, op)
    _check_feature(v, "value", op)
    _check_same_kind(q, "query", v, "value", op)
    if (q.shape[0], *q.shape[2:]) != (v.shape[0], *v.shape[2:]):
        raise ValueError(
            f"{op}: query {tuple(q.shape)} and value {tuple(v.shape)} must agree in N, H and W"
        )
