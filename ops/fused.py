"""Fused criss-cross attention: the (N, H + W - 1, H, W) attention map is never stored.

The maths of ``ops.criss_cross`` (energies, one softmax over a pixel's row and column with the
pixel itself once, aggregation; no 1/sqrt(d) scaling), computed as flash attention computes
softmax attention:

- The row pass takes every image row as a batch: energies ``E_row = Q_row K_row^T`` (W x W),
  their per-pixel maximum ``m_row`` and sum ``s_row = sum exp(E_row - m_row)``, and the
  unnormalised output ``O_row = exp(E_row - m_row) V_row``.
- The column pass does the same over every image column, with the pixel's own slot (the
  diagonal of ``E_col``) left out, so the pixel is counted once.
- The two are merged by their per-pixel (max, sum), as an online softmax merges two blocks:
  ``m = max(m_row, m_col)``, ``out = (O_row e^(m_row - m) + O_col e^(m_col - m)) /
  (s_row e^(m_row - m) + s_col e^(m_col - m))``. The log-sum-exp ``m + log(sum)`` per pixel is
  all that is kept for the backward.
- The backward recomputes the energies block by block, takes the weights from the saved
  log-sum-exp, and uses ``dE = P * (dP - D)`` with ``D = sum_c dout * out`` per pixel.

Rows and columns are taken in blocks whose energies hold at most as many elements as the value
tensor, so besides the inputs and the output the op holds O(N * C * H * W) memory whatever the
image size: one float32 accumulator of the output's size, one block of energies, and three
(N, H, W) statistics. Each block is a batched GEMM (``torch.matmul``: oneDNN/MKL on the CPU,
cuBLAS strided-batched GEMMs on CUDA, on tensor cores for float16/bfloat16).

The dtype contract of ``ops.criss_cross``: energies accumulate in float32 (float64 for float64)
and are rounded to the inputs' dtype, the softmax statistics are float32 (float64), the weights
meet the value in its dtype, the output has the value's dtype. The backward is not itself
differentiable (no double backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_inputs
from .dtypes import autocast_inputs


def criss_cross_attention_fused(q: Tensor, k: Tensor, v: Tensor, *, block: int | None = None) -> Tensor:
    """out (N, C, H, W) from query, key (N, C', H, W) and value (N, C, H, W), without the map.

    block: rows (and columns) per block; by default as many as keep a block's energies within
    the value tensor's number of elements.
    """
    q, k, v = autocast_inputs(q, k, v)
    check_inputs(q, k, v)
    if block is not None and block < 1:
        raise ValueError(f"criss_cross_attention_fused: block must be >= 1, got {block}")
    return _FusedCrissCross.apply(q, k, v, block)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _blocks(length: int, other: int, channels: int, block: int | None):
    """Slices of ``length`` rows (or columns) of ``other`` pixels each: a block's energies,
    rows x other x other, hold at most channels x length x other elements."""
    size = block or max(1, (channels * length) // other)
    for start in range(0, length, size):
        yield slice(start, min(length, start + size))


# The two passes work on copies of q, k, v (and the gradient) in which a row (a column) and its
# pixels are contiguous, the blocked dimension first: (H, N, W, c) for the rows, (W, N, H, c) for
# the columns. A block is then a contiguous batch of GEMM operands, and its results are written in
# place. ``back`` returns a pass's (., N, ., c) tensor as (N, c, H, W) views.
PASSES = {"row": ((2, 0, 3, 1), (1, 3, 0, 2)), "column": ((3, 0, 2, 1), (1, 3, 2, 0))}


def _layout(t: Tensor, which: str) -> Tensor:
    return t.permute(*PASSES[which][0]).contiguous()


def _back(t: Tensor, which: str) -> Tensor:
    return t.permute(*PASSES[which][1])


def _bmm(t: Tensor) -> Tensor:  # (b, N, P, c) -> (b * N, P, c), a view
    return t.flatten(0, 1)


def _energies(qb: Tensor, kb: Tensor, acc: torch.dtype, diagonal: bool) -> Tensor:
    """(b, N, P, P) energies of a block, rounded to the inputs' dtype and held in ``acc``; with
    ``diagonal`` False the pixel's own slot is -inf."""
    e = torch.matmul(qb, kb.transpose(-1, -2)).to(acc)
    if not diagonal:
        e.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    return e


def _pass(q: Tensor, k: Tensor, v: Tensor, which: str, block: int | None):
    """One pass's per-pixel max and sum ((N, H, W) views) and unnormalised output (N, C, H, W)
    view, in the accumulation dtype."""
    N, C, H, W = v.shape
    acc = _acc(v.dtype)
    length, other = (H, W) if which == "row" else (W, H)
    qx, kx, vx = _layout(q, which), _layout(k, which), _layout(v, which)
    o = torch.empty(length, N, other, C, dtype=acc, device=v.device)
    m = torch.empty(length, N, other, 1, dtype=acc, device=v.device)
    s = torch.empty_like(m)
    for b in _blocks(length, other, C, block):
        e = _energies(qx[b], kx[b], acc, diagonal=which == "row")
        torch.amax(e, -1, keepdim=True, out=m[b])
        p = torch.exp(e.sub_(m[b]))
        torch.sum(p, -1, keepdim=True, out=s[b])
        if acc == v.dtype:
            torch.bmm(_bmm(p), _bmm(vx[b]), out=_bmm(o[b]))
        else:
            o[b] = torch.matmul(p.to(v.dtype), vx[b])
    return _back(m, which)[:, 0], _back(s, which)[:, 0], _back(o, which)


def _forward(q: Tensor, k: Tensor, v: Tensor, block: int | None) -> tuple[Tensor, Tensor]:
    """(out (N, C, H, W) in v's dtype, log-sum-exp (N, H, W) in the accumulation dtype)."""
    m_row, s_row, o_row = _pass(q, k, v, "row", block)
    if v.shape[2] == 1:  # one row: no column pixel besides the pixel itself
        return (o_row / s_row.unsqueeze(1)).to(v.dtype).contiguous(), m_row + torch.log(s_row)
    m_col, s_col, o_col = _pass(q, k, v, "column", block)
    m = torch.maximum(m_row, m_col)  # the two softmaxes merged by their (max, sum)
    a_row, a_col = torch.exp(m_row - m), torch.exp(m_col - m)
    total = s_row * a_row + s_col * a_col
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # (N, C, H, W), contiguous
    torch.add(o_row * (a_row / total).unsqueeze(1), o_col * (a_col / total).unsqueeze(1), out=out)
    return out, m + torch.log(total)


def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              block: int | None) -> tuple[Tensor, Tensor, Tensor]:
    N, C, H, W = v.shape
    acc = _acc(v.dtype)
    grad = grad.to(v.dtype)
    delta = (grad.to(acc) * out.to(acc)).sum(1)  # (N, H, W): D = sum_c dout * out
    parts = []
    for which in ("row", "column") if H > 1 else ("row",):
        length, other = (H, W) if which == "row" else (W, H)
        qx, kx, vx, gx = (_layout(t, which) for t in (q, k, v, grad))
        lx, dx = (_layout(t.unsqueeze(1), which) for t in (lse, delta))  # (length, N, other, 1)
        dq, dk, dv = (torch.empty(length, N, other, t.shape[1], dtype=acc, device=t.device) for t in (q, k, v))
        for b in _blocks(length, other, C, block):
            e = _energies(qx[b], kx[b], acc, diagonal=which == "row")
            p = torch.exp(e.sub_(lx[b]))  # the weights of the merged softmax
            dp = torch.matmul(gx[b], vx[b].transpose(-1, -2)).to(acc)
            de = p * dp.sub_(dx[b])
            if acc == q.dtype:
                torch.bmm(_bmm(de), _bmm(kx[b]), out=_bmm(dq[b]))
                torch.bmm(_bmm(de).transpose(-1, -2), _bmm(qx[b]), out=_bmm(dk[b]))
                torch.bmm(_bmm(p).transpose(-1, -2), _bmm(gx[b]), out=_bmm(dv[b]))
            else:
                de, p = de.to(q.dtype), p.to(v.dtype)
                dq[b] = torch.matmul(de, kx[b])
                dk[b] = torch.matmul(de.transpose(-1, -2), qx[b])
                dv[b] = torch.matmul(p.transpose(-1, -2), gx[b])
        parts.append([_back(t, which) for t in (dq, dk, dv)])
    grads = []
    for t, *pieces in zip((q, k, v), *parts):  # (N, c, H, W), contiguous, in the input's dtype
        g = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        if len(pieces) == 1:
            g.copy_(pieces[0])
        else:
            torch.add(*pieces, out=g)
        grads.append(g)
    return tuple(grads)


class _FusedCrissCross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, block: int | None) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _forward(q, k, v, block)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph: a second derivative was asked for
            raise RuntimeError("criss_cross_attention(fused=True): the backward is not differentiable (no double "
                               "backward, create_graph=True); use fused=False, whose backward is")
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(grad, q, k, v, out, lse, ctx.block)
        needed = ctx.needs_input_grad
        return (dq if needed[0] else None), (dk if needed[1] else None), (dv if needed[2] else None), None
