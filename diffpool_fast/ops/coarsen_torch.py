"""The memory-lean PyTorch path of one DiffPool coarsening step.

Forward and backward are written by hand (shared/MATH.md) as one autograd Function, so that:

- no B x N x N intermediate is ever built (the link loss uses the identity
  ||A - S S^T||_F^2 = ||A||_F^2 - 2 tr(S^T A S) + ||S^T S||_F^2, reusing out_adj = S^T (A S) and
  one C x C product);
- the forward pass makes one matmul over A (A S), the backward pass one (A^T W, with every
  term that needs A^T folded into W = S (G - 2 g_Q I)), where autograd would make more;
- what is saved for backward is O(B N (C + F)) plus a reference to adj, never a copy.

The three scalar terms of the link loss are summed per graph in float64: they can be large and
nearly cancel. The result is clamped at 0 (cancellation can leave a tiny negative value), with
zero gradient where the clamp acts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..config import CONVERT_CHUNK_BYTES, EPS
from .block_sparse import BlockSparseAdj


def compute_dtype(x: Tensor, s: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (accumulate in fp32), else the promoted input dtype."""
    dt = torch.promote_types(x.dtype, s.dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def _graph_chunk(N: int, itemsize: int) -> int:
    return max(1, CONVERT_CHUNK_BYTES // max(1, N * N * itemsize))


def adjacency_matmul(adj: Tensor, W: Tensor, transpose: bool = False) -> Tensor:
    """A W (or A^T W), [B, N, K], without a converted copy of A.

    An adjacency stored in another dtype than W (bool, uint8, fp16, bf16) is converted a few
    graphs at a time. ``adj`` may be a :class:`diffpool_fast.ops.block_sparse.BlockSparseAdj`.
    """
    if isinstance(adj, BlockSparseAdj):
        return adj.tmm(W) if transpose else adj.mm(W)
    if adj.dtype == W.dtype:
        return (adj.transpose(1, 2) if transpose else adj) @ W
    B, N, _ = adj.shape
    out = W.new_empty(W.shape)
    step = _graph_chunk(N, W.element_size())
    for b0 in range(0, B, step):
        a = adj[b0 : b0 + step].to(W.dtype)
        out[b0 : b0 + step] = (a.transpose(1, 2) if transpose else a) @ W[b0 : b0 + step]
    return out


def adjacency_sq_norm(adj: Tensor) -> Tensor:
    """||A_b||_F^2 per graph in float64, [B], without an N x N temporary."""
    if isinstance(adj, BlockSparseAdj):
        return adj.sq_norm
    B = adj.shape[0]
    if adj.dtype == torch.bool:
        return torch.count_nonzero(adj.flatten(1), dim=1).to(torch.float64)
    if adj.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(adj.flatten(1), dim=1).to(torch.float64).square()
    # uint8 weights (squares summed exactly in int64) and half floats (fp32 norm): a reduction
    # with a wider dtype would convert the whole adjacency at once, so go a few graphs at a time.
    wide = torch.int64 if adj.dtype == torch.uint8 else torch.float32
    step = _graph_chunk(adj.shape[1], torch.empty((), dtype=wide).element_size())
    parts = []
    for b0 in range(0, B, step):
        part = adj[b0 : b0 + step].flatten(1).to(wide)
        if wide == torch.int64:
            parts.append(part.square().sum(1).to(torch.float64))
        else:
            parts.append(torch.linalg.vector_norm(part, dim=1).to(torch.float64).square())
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=adj.device)
    return torch.cat(parts)


class CoarsenTorchFunction(torch.autograd.Function):
    """(x, adj, s, mask) -> (out, out_adj, link_sq, ent_sum); see ``coarsen_torch``."""

    @staticmethod
    def forward(ctx, x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor], symmetric: bool):
        dt = compute_dtype(x, s)
        P = torch.softmax(s.to(dt), dim=-1)
        S = P if mask is None else P * mask.unsqueeze(-1).to(dt)
        St = S.transpose(1, 2)
        xc = x.to(dt)
        # S is 0 on padded rows, so S^T X needs no masked copy of X.
        out = St @ xc
        AS = adjacency_matmul(adj, S)
        out_adj = St @ AS
        StS = St @ S
        f64 = torch.float64
        trace = torch.diagonal(out_adj, dim1=1, dim2=2).sum(-1, dtype=f64)
        raw = adjacency_sq_norm(adj) - 2.0 * trace + StS.to(f64).square().sum(dim=(1, 2))
        link_sq = raw.clamp_min(0.0)
        # Row sums of C terms in fp32, the N rows of a graph in float64: no float64 copy of S.
        ent_sum = -(S * torch.log(S + EPS)).sum(-1).sum(-1, dtype=f64)
        sparse = isinstance(adj, BlockSparseAdj)
        ctx.sparse_adj = adj if sparse else None  # not a tensor: kept on ctx
        ctx.save_for_backward(xc, None if sparse else adj, P, S, AS, StS, raw > 0, mask)
        ctx.dtypes = (x.dtype, adj.dtype, s.dtype)
        ctx.symmetric = symmetric
        return out, out_adj, link_sq, ent_sum

    @staticmethod
    def backward(ctx, g_out, g_out_adj, g_link_sq, g_ent):
        xc, adj, P, S, AS, StS, positive, mask = ctx.saved_tensors
        if ctx.sparse_adj is not None:
            adj = ctx.sparse_adj
        x_dtype, adj_dtype, s_dtype = ctx.dtypes
        dt = S.dtype
        B, N, C = S.shape
        need_x, need_adj, need_s = ctx.needs_input_grad[:3]
        gQ = (g_link_sq * positive).to(dt).view(B, 1, 1)
        G = g_out_adj.to(dt)
        eye = torch.eye(C, dtype=dt, device=S.device)

        g_x = g_adj = g_s = None
        # Every term of dS and dA that involves A^T (or S^T) goes through W = S (G - 2 gQ I).
        need_w = need_adj or (need_s and not ctx.symmetric)
        W = S @ (G - 2.0 * gQ * eye) if need_w else None
        if need_x:
            g_x = (S @ g_out.to(dt)).to(x_dtype)
        if need_s:
            # dS = X g_out^T + A S G^T + A^T S G + gQ (-2 (A + A^T) S + 4 S S^T S) + entropy term.
            # The A^T terms are one product A^T W with W = S (G - 2 gQ I); the A S terms reuse
            # the AS kept from forward.
            H = G.transpose(1, 2) - 2.0 * gQ * eye
            if ctx.symmetric:
                # A^T W = A S (G - 2 gQ I): the backward pass never touches A.
                dS = AS @ (H + G - 2.0 * gQ * eye)
            else:
                dS = adjacency_matmul(adj, W, transpose=True)
                dS.baddbmm_(AS, H)
            dS.baddbmm_(S, 4.0 * gQ * StS)
            dS.baddbmm_(xc, g_out.to(dt).transpose(1, 2))
            Se = S + EPS
            dS -= g_ent.to(dt).view(B, 1, 1) * (torch.log(Se) + S / Se)
            if mask is not None:
                dS = dS * mask.unsqueeze(-1).to(dt)
            # softmax backward: dL = P * (dP - rowsum(P * dP))
            dL = P * (dS - (P * dS).sum(-1, keepdim=True))
            g_s = dL.to(s_dtype)
        if need_adj:
            # dA = S G S^T + 2 gQ (A - S S^T) = W S^T + 2 gQ A: an N x N gradient, asked for only
            # at levels >= 1, where N is the previous level's cluster count.
            g_adj = (W @ S.transpose(1, 2)).addcmul_(adj.to(dt), 2.0 * gQ).to(adj_dtype)
        return g_x, g_adj, g_s, None, None


def coarsen_torch(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None, adj_symmetric: Optional[bool] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One coarsening step on the PyTorch path; same contract as ``coarsen_reference``.

    Inputs are validated and batched (see ``inputs.check_pool_inputs``). Returns
    ``(out [B,C,F], out_adj [B,C,C], link_sq [B] float64, ent_sum [B] float64)``; out and
    out_adj are in the compute dtype (fp32 for half inputs). Differentiable in x, adj and s.

    ``adj_symmetric=True`` is the caller's promise that every A_b equals its transpose: the
    backward then uses A^T S = A S and makes no pass over A. None (unknown) or False makes the
    one A^T product; on the CPU an exact symmetry check costs more than that product.
    """
    return CoarsenTorchFunction.apply(x, adj, s, mask, bool(adj_symmetric))
