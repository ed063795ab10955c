"""Fused criss-cross attention: the (N, H + W - 1, H, W) attention map is never stored.

The maths of ``ops.criss_cross`` (energies, one softmax over a pixel's row and column with the
pixel itself once, aggregation; no 1/sqrt(d) scaling), computed as flash attention computes
softmax attention:

- The row pass takes every image row as a batch: energies ``E_row = Q_row K_row^T`` (W x W),
  their per-pixel maximum ``m_row`` and sum ``s_row = sum exp(E_row - m_row)``, and the pass's
  own softmax output ``O_row = exp(E_row - m_row) V_row / s_row`` (weights that sum to 1: the
  product stays within the values' range, in float16 too).
- The column pass does the same over every image column, with the pixel's own slot (the
  diagonal of ``E_col``) left out, so the pixel is counted once.
- The two are merged by their per-pixel (max, sum), as an online softmax merges two blocks:
  ``m = max(m_row, m_col)``, ``w_row = s_row e^(m_row - m)``, ``w_col = s_col e^(m_col - m)``,
  ``out = (O_row w_row + O_col w_col) / (w_row + w_col)``. The log-sum-exp ``m + log(sum)`` per pixel is
  all that is kept for the backward.
- The backward recomputes the energies block by block, takes the weights from the saved
  log-sum-exp, and uses ``dE = P * (dP - D)`` with ``D = sum_c dout * out`` per pixel.

Rows and columns are taken in blocks of at most a quarter of them, whose energies hold at most
as many elements as the value tensor, so besides the inputs and the output the op holds
O(N * C * H * W) memory whatever the image size: a float32 accumulator of the output's size
(the output itself in float32), a block's copies of its rows or columns and its energies, and
three (N, H, W) statistics; the backward, float32 accumulators of the gradients' sizes (the
gradients themselves in float32) and a block. Each block is a batched GEMM (``torch.matmul``: oneDNN/MKL on the CPU,
cuBLAS strided-batched GEMMs on CUDA, on tensor cores for float16/bfloat16).

The dtype contract of ``ops.criss_cross``: energies accumulate in float32 (float64 for float64)
and are rounded to the inputs' dtype, the softmax statistics are float32 (float64), the weights
meet the value in its dtype, the output has the value's dtype. The backward is not itself
differentiable (no double backward).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .checks import check_inputs
from .dtypes import AUTOCAST_DEVICE_TYPES, autocast_inputs


NO_DOUBLE_BACKWARD = ("criss_cross_attention(fused=True): the backward is not differentiable (no double "
                      "backward, create_graph=True); use fused=False, whose backward is")


def _no_autocast(device_type: str):
    """Autocast off inside the op (its inputs are already cast), where the device has autocast."""
    if device_type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def criss_cross_attention_fused(q: Tensor, k: Tensor, v: Tensor, *, block: int | None = None) -> Tensor:
    """out (N, C, H, W) from query, key (N, C', H, W) and value (N, C, H, W), without the map.

    block: rows (and columns) per block; by default at most a quarter of them (rounded up), and
    no more than keep a block's energies within the value tensor's number of elements.
    """
    q, k, v = autocast_inputs(q, k, v)
    check_inputs(q, k, v)
    if block is not None and block < 1:
        raise ValueError(f"criss_cross_attention_fused: block must be >= 1, got {block}")
    return _FusedCrissCross.apply(q, k, v, block)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _blocks(length: int, other: int, channels: int, block: int | None):
    """Slices of ``length`` rows (or columns) of ``other`` pixels each. By default a block holds
    at most a quarter of the rows, and its energies, rows x other x other, at most as many elements
    as the value (channels x length x other), unless one row alone holds more (other > channels x
    length: an image more than C times wider than high)."""
    size = block or max(1, min(-(-length // 4), (channels * length) // other))
    for start in range(0, length, size):
        yield slice(start, min(length, start + size))


# A pass takes one block of rows (or columns) at a time. Its slice of q, k, v (and of the
# gradient) is copied so that a row (a column) and its pixels are contiguous, the blocked
# dimension first: (b, N, W, c) for rows, (b, N, H, c) for columns; a block is then a contiguous
# batch of GEMM operands. ``_view`` is the same block of an (N, c, H, W) tensor seen in that
# order, for the results to be added where they belong.
def _view(t: Tensor, which: str, b: slice) -> Tensor:
    return t[:, :, b, :].permute(2, 0, 3, 1) if which == "row" else t[:, :, :, b].permute(3, 0, 2, 1)


def _pixels(t: Tensor, which: str, b: slice) -> Tensor:  # (N, H, W) -> (b, N, other)
    return t[:, b, :].transpose(0, 1) if which == "row" else t[:, :, b].permute(2, 0, 1)


def _energies(qb: Tensor, kb: Tensor, acc: torch.dtype, diagonal: bool) -> Tensor:
    """(b, N, P, P) energies of a block, rounded to the inputs' dtype and held in ``acc``; with
    ``diagonal`` False the pixel's own slot is -inf."""
    e = torch.matmul(qb, kb.transpose(-1, -2)).to(acc)
    if not diagonal:
        e.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    return e


def _pass_block(q: Tensor, k: Tensor, v: Tensor, which: str, b: slice, acc: torch.dtype):
    """One block of a pass: the per-pixel max and sum of its energies ((b, N, P), in ``acc``) and
    its own softmax output ((b, N, P, C), in v's dtype). The weights sum to 1 when they meet the
    value, so the product stays within max |v| (float16 too)."""
    qb, kb, vb = (_view(t, which, b).contiguous() for t in (q, k, v))
    e = _energies(qb, kb, acc, diagonal=which == "row")
    m = e.amax(-1, keepdim=True)
    # a pixel with no finite energy in the pass (every key at -inf: float16 energies beyond its
    # range) gets sum 0 and output 0, which the merge weighs 0, rather than NaN
    p = torch.exp(e.sub_(m.masked_fill(m == float("-inf"), 0)))
    s = p.sum(-1, keepdim=True)
    return m.squeeze(-1), s.squeeze(-1), torch.matmul(p.div_(s.clamp_min(torch.finfo(acc).tiny)).to(v.dtype), vb)


def _forward(q: Tensor, k: Tensor, v: Tensor, block: int | None) -> tuple[Tensor, Tensor]:
    """(out (N, C, H, W) in v's dtype, log-sum-exp (N, H, W) in the accumulation dtype)."""
    N, C, H, W = v.shape
    acc = _acc(v.dtype)
    out = torch.empty(N, C, H, W, dtype=acc, device=v.device)  # the output itself for float32/64
    m_row = torch.empty(N, H, W, dtype=acc, device=v.device)
    s_row = torch.empty_like(m_row)
    for b in _blocks(H, W, C, block):  # the row pass: its own max, sum and (normalised) output
        m, s, o = _pass_block(q, k, v, "row", b, acc)
        _pixels(m_row, "row", b).copy_(m)
        _pixels(s_row, "row", b).copy_(s)
        _view(out, "row", b).copy_(o)
    if H == 1:  # one row: no column pixel besides the pixel itself
        return out.to(v.dtype), m_row + torch.log(s_row)
    lse = torch.empty_like(m_row)
    for b in _blocks(W, H, C, block):  # the column pass, merged into the rows' by (max, sum)
        m_col, s_col, o_col = _pass_block(q, k, v, "column", b, acc)
        o_col = o_col.to(acc)
        m_r, s_r = _pixels(m_row, "column", b), _pixels(s_row, "column", b)
        m = torch.maximum(m_r, m_col)
        w_row, w_col = s_r * torch.exp(m_r - m), s_col * torch.exp(m_col - m)  # each pass's share
        total = w_row + w_col
        o = _view(out, "column", b)
        o.copy_(o * (w_row / total).unsqueeze(-1) + o_col.mul_((w_col / total).unsqueeze(-1)))
        _pixels(lse, "column", b).copy_(m + torch.log(total))
    return out.to(v.dtype), lse


def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              block: int | None) -> tuple[Tensor, Tensor, Tensor]:
    N, C, H, W = v.shape
    acc = _acc(v.dtype)
    grad = grad.to(v.dtype)
    delta = (grad.to(acc) * out.to(acc)).sum(1)  # (N, H, W): D = sum_c dout * out
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for which in ("row", "column") if H > 1 else ("row",):
        length, other = (H, W) if which == "row" else (W, H)
        for b in _blocks(length, other, C, block):
            qb, kb, vb, gb = (_view(t, which, b).contiguous() for t in (q, k, v, grad))
            e = _energies(qb, kb, acc, diagonal=which == "row")
            p = torch.exp(e.sub_(_pixels(lse, which, b).unsqueeze(-1)))  # the weights of the merged softmax
            dp = torch.matmul(gb, vb.transpose(-1, -2)).to(acc)
            de = (p * dp.sub_(_pixels(delta, which, b).unsqueeze(-1))).to(q.dtype)
            p = p.to(v.dtype)
            _view(dq, which, b).add_(torch.matmul(de, kb))
            _view(dk, which, b).add_(torch.matmul(de.transpose(-1, -2), qb))
            _view(dv, which, b).add_(torch.matmul(p.transpose(-1, -2), gb))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FusedCrissCross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, block: int | None) -> Tensor:
        with _no_autocast(q.device.type):
            out, lse = _forward(q, k, v, block)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph: a second derivative was asked for
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        q, k, v, out, lse = ctx.saved_tensors
        with _no_autocast(q.device.type):
            dq, dk, dv = _backward(grad, q, k, v, out, lse, ctx.block)
        needed = ctx.needs_input_grad
        return (dq if needed[0] else None), (dk if needed[1] else None), (dv if needed[2] else None), None
