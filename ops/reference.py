"""Pure-PyTorch criss-cross attention: the reference the compiled kernels are held to.

Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation" (ICCV 2019), in the
einsum form of the authors' "pure" branch and mmcv: row energies (N, H, W, W) and column
energies (N, H, W, H), the column's self slot set to -inf so the centre pixel is counted once,
one softmax over the H + W slots, two einsums to aggregate. Runs on any device and dtype.

``energy`` and ``aggregate`` compute the same maths in the compiled kernels' slot layout
(N, H + W - 1, H, W) (see ``ops/csrc/cc_index.h``), for testing the primitives one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_aggregate_args, check_energy_args, check_inputs
from .dtypes import autocast_inputs, softmax_slots


def criss_cross_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """out (N, C, H, W) from query, key (N, C', H, W) and value (N, C, H, W); the dtype contract
    of ``ops.criss_cross`` (softmax in float32 at least, output in the value's dtype)."""
    q, k, v = autocast_inputs(q, k, v)
    check_inputs(q, k, v)
    H = q.shape[2]
    e_row = torch.einsum("ncyx,ncyi->nyxi", q, k)  # (N, H, W, W): key (y, i)
    e_col = torch.einsum("ncyx,nckx->nyxk", q, k)  # (N, H, W, H): key (k, x)
    self_slot = torch.eye(H, dtype=torch.bool, device=q.device).view(1, H, 1, H)
    e_col = e_col.masked_fill(self_slot, float("-inf"))  # the centre lives in the row part
    attn = softmax_slots(torch.cat([e_row, e_col], dim=-1), v.dtype, dim=-1)
    a_row, a_col = attn.split([q.shape[3], H], dim=-1)
    return torch.einsum("nyxi,ncyi->ncyx", a_row, v) + torch.einsum("nyxk,nckx->ncyx", a_col, v)


def criss_cross_attention_bmm(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same maths in the layout of the authors' pure-PyTorch module, for the benchmark: every
    column and every row as its own batch of ``torch.bmm`` over permuted copies, -inf added on
    the column energies' diagonal (an (H, H) matrix, broadcast; the authors' module materialises
    it for each of the N * W columns, in float32), one softmax over the concatenation, and two more
    ``bmm`` over permuted copies of the maps. This module's dtype contract."""
    q, k, v = autocast_inputs(q, k, v)
    check_inputs(q, k, v)
    N, _, H, W = q.shape

    def columns(t):  # (N, c, H, W) -> (N * W, H, c)
        return t.permute(0, 3, 2, 1).reshape(N * W, H, t.shape[1])

    def rows(t):  # (N, c, H, W) -> (N * H, W, c)
        return t.permute(0, 2, 3, 1).reshape(N * H, W, t.shape[1])

    inf = torch.diag(torch.full((H,), float("inf"), device=q.device, dtype=q.dtype))
    e_col = (torch.bmm(columns(q), columns(k).transpose(1, 2)) - inf).view(N, W, H, H).permute(0, 2, 1, 3)
    e_row = torch.bmm(rows(q), rows(k).transpose(1, 2)).view(N, H, W, W)
    attn = softmax_slots(torch.cat([e_col, e_row], dim=3), v.dtype, dim=3)  # (N, H, W, H + W)
    a_col = attn[..., :H].permute(0, 2, 1, 3).reshape(N * W, H, H)
    a_row = attn[..., H:].reshape(N * H, W, W)
    out_col = torch.bmm(a_col, columns(v)).view(N, W, H, -1).permute(0, 3, 2, 1)
    out_row = torch.bmm(a_row, rows(v)).view(N, H, W, -1).permute(0, 3, 1, 2)
    return out_col + out_row


def column_pixels(H: int, device: torch.device | str | None = None) -> Tensor:
    """(H, H - 1) table: the key row of column slot j for a query on row y (y itself skipped)."""
    j = torch.arange(H - 1, device=device)
    y = torch.arange(H, device=device)
    return j[None, :] + (j[None, :] >= y[:, None]).long()


def _column_index(attn_like: Tensor, H: int, W: int) -> Tensor:
    """Gather index (N, H - 1, H, W) from slot layout to dense key rows."""
    idx = column_pixels(H, attn_like.device).t()  # (H - 1, H): [j, y] -> k
    return idx.view(1, H - 1, H, 1).expand(attn_like.shape[0], H - 1, H, W)


def energy(q: Tensor, k: Tensor) -> Tensor:
    """E (N, H + W - 1, H, W) in slot layout."""
    check_energy_args(q, k)
    N, _, H, W = q.shape
    e_row = torch.einsum("ncyx,ncyi->niyx", q, k)  # (N, W, H, W)
    e_dense = torch.einsum("ncyx,nckx->nkyx", q, k)  # (N, H, H, W): [n, k, y, x]
    e_col = torch.gather(e_dense, 1, _column_index(e_dense, H, W))
    return torch.cat([e_row, e_col], dim=1)


def aggregate(attn: Tensor, v: Tensor) -> Tensor:
    """out (N, C, H, W) from slot-layout attention (N, H + W - 1, H, W) and value."""
    check_aggregate_args(attn, v)
    N, _, H, W = v.shape
    a_row, a_col = attn[:, :W], attn[:, W:]
    a_dense = attn.new_zeros(N, H, H, W).scatter(1, _column_index(attn, H, W), a_col)
    return torch.einsum("niyx,ncyi->ncyx", a_row, v) + torch.einsum("nkyx,nckx->ncyx", a_dense, v)
