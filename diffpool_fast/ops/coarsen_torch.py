"""The memory-lean PyTorch path of one DiffPool coarsening step.

Forward and backward are written by hand (docs/math.md) as one autograd Function, so that:

- no B x N x N intermediate is ever built (the link loss uses the identity
  ||A - S S^T||_F^2 = ||A||_F^2 - 2 tr(S^T A S) + ||S^T S||_F^2, reusing out_adj = S^T (A S) and
  one C x C product);
- the forward pass makes one matmul over A (A S), the backward pass one (A^T W, with every
  term that needs A^T folded into W = S (G - 2 g_Q I)), where autograd would make more;
- what is saved for backward is O(B N (C + F)) plus references to x, s and adj, never a copy.

An adjacency stored in another dtype than the computation's (bool, uint8, fp16, bf16, or fp32
under float64 x/s) is converted a block of rows at a time, one block alive at once
(``CONVERT_CHUNK_BYTES``), and ||A||^2 is summed from the same converted blocks, in the compute
dtype (float64 for float64 x/s).

On the CPU the three scalar terms of the link loss are summed per graph in float64. Where they
cancel (the assignment fits the graph), the graph is flagged and its Q and dQ/dS are recomputed
directly (``link_exact``). Off the CPU (a GPU) and under ``torch.compile`` the step reads no
value back (which would stall the host until the device drains, or break the graph): every
graph's Q and dQ/dS = -2 (R + R^T) S come from the residual R = A - S S^T directly, a block of
rows at a time (no B x N x N tensor), in S's dtype on a GPU (PyG's residual, its accuracy) and
in float64 on the CPU. Q is then clamped at 0, with zero gradient where the clamp acts; NaN and
inf pass through the clamp and the flags, so a diverging run sees them.

Double backward (``create_graph=True``): the backward then recomputes the step from the saved
inputs with differentiable torch ops (still no B x N x N tensor for a constant adjacency) and
lets autograd differentiate that; the first-order values stay those of the exact hand-written
backward (see ``_create_graph_backward``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..config import CONVERT_CHUNK_BYTES, EPS
from . import link_exact
from .block_sparse import BlockSparseAdj
from .inputs import reads_stall


def compute_dtype(x: Tensor, s: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (accumulate in fp32), else the promoted input dtype."""
    dt = torch.promote_types(x.dtype, s.dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def _blocks(B: int, N: int, itemsize: int):
    """(b0, b1, r0, r1) blocks of a [B, N, N] adjacency, each at most CONVERT_CHUNK_BYTES once
    converted to ``itemsize``-byte entries: whole graphs when one fits, else rows of one graph."""
    return link_exact.row_blocks(B, N, itemsize, CONVERT_CHUNK_BYTES)


def adjacency_matmul(adj, W: Tensor, transpose: bool = False, want_sq: bool = False):
    """A W (or A^T W), [B, N, K], without a converted copy of A; with ``want_sq`` also
    ``||A_b||_F^2`` [B] float64, accumulated in W's dtype (returns ``(product, sq)``).

    An adjacency stored in another dtype than W is converted a block of rows at a time (one
    block alive at once). ``adj`` may be a :class:`diffpool_fast.ops.block_sparse.BlockSparseAdj`.
    Made of differentiable ops (autograd keeps the converted blocks only when it differentiates
    through them; ``_create_graph_backward`` avoids that for a constant adjacency).
    """
    if isinstance(adj, BlockSparseAdj):
        prod = adj.tmm(W) if transpose else adj.mm(W)
        return (prod, adj.sq_norm) if want_sq else prod
    if adj.dtype == W.dtype:
        prod = (adj.transpose(1, 2) if transpose else adj) @ W
        if not want_sq:
            return prod
        # reduced over dims (1, 2) of a possibly strided adj: no copy
        return prod, torch.linalg.vector_norm(adj, dim=(1, 2)).to(torch.float64).square()
    B, N, _ = adj.shape
    sq = torch.zeros(B, dtype=torch.float64, device=W.device) if want_sq else None
    # Under autograd (a double backward) the blocks' products are joined with torch.cat; else
    # they are written into one preallocated output.
    graph = torch.is_grad_enabled() and W.requires_grad
    out = None if graph else (W.new_zeros(W.shape) if transpose else W.new_empty(W.shape))
    parts: List[Tensor] = []
    pending: Optional[Tensor] = None  # A^T W of the graph being summed over row blocks
    rows: List[Tensor] = []  # row blocks of the graph being built (A W)
    for b0, b1, r0, r1 in _blocks(B, N, W.element_size()):
        a = adj[b0:b1, r0:r1].to(W.dtype)
        if want_sq:
            sq[b0:b1] += torch.linalg.vector_norm(a, dim=(1, 2)).to(torch.float64).square()
        if not graph:
            if transpose:
                out[b0:b1].baddbmm_(a.transpose(1, 2), W[b0:b1, r0:r1])
            else:
                torch.bmm(a, W[b0:b1], out=out[b0:b1, r0:r1])
        elif r0 == 0 and r1 == N:
            parts.append((a.transpose(1, 2) @ W[b0:b1]) if transpose else a @ W[b0:b1])
        elif transpose:
            p = a.transpose(1, 2) @ W[b0:b1, r0:r1]
            pending = p if pending is None else pending + p
            if r1 == N:
                parts.append(pending)
                pending = None
        else:
            rows.append(a @ W[b0:b1])
            if r1 == N:
                parts.append(torch.cat(rows, dim=1))
                rows = []
        del a  # before the next block is converted: one block alive at once
    if graph:
        out = torch.cat(parts, dim=0) if parts else W.new_zeros(W.shape)
    return (out, sq) if want_sq else out


def _adjacency_grad(adj: Tensor, S: Tensor, G: Tensor, gQ: Tensor) -> Tensor:
    """dA = S G S^T + 2 gQ (A - S S^T) = (S (G - 2 gQ I)) S^T + 2 gQ A, in adj's dtype.

    Entrywise, as PyG's residual (no cancellation of whole-matrix terms). An N x N gradient, asked
    for only at levels >= 1, where N is the previous level's cluster count."""
    B, N, C = S.shape
    dt = S.dtype
    eye = torch.eye(C, dtype=dt, device=S.device)
    W = S @ (G - 2.0 * gQ.view(B, 1, 1) * eye)
    if adj.dtype == dt:
        return (W @ S.transpose(1, 2)).addcmul_(adj, 2.0 * gQ.view(B, 1, 1))
    out = torch.empty(adj.shape, dtype=adj.dtype, device=adj.device)
    for b0, b1, r0, r1 in _blocks(B, N, S.element_size()):
        blk = W[b0:b1, r0:r1] @ S[b0:b1].transpose(1, 2)
        blk.addcmul_(adj[b0:b1, r0:r1].to(dt), 2.0 * gQ[b0:b1].view(-1, 1, 1))
        out[b0:b1, r0:r1] = blk.to(adj.dtype)
        del blk
    return out


def _softmax_backward(S: Tensor, dS: Tensor, mask: Optional[Tensor]) -> Tensor:
    """dL = P * (dP - rowsum(P * dP)) with dP = m * dS. S = m * P stands in for P: on real rows
    they are equal, on padded rows dP = 0 (so is the result, unless P is NaN there, as in PyG)."""
    if mask is not None:
        dS = dS * mask.unsqueeze(-1).to(dS.dtype)
    return S * (dS - (S * dS).sum(-1, keepdim=True))


def _link_sq(adj_sq: Tensor, out_adj: Tensor, StS: Tensor) -> Tuple[Tensor, Tensor]:
    """(Q^ from the identity, ||S^T S||^2), per graph in float64."""
    f64 = torch.float64
    trace = torch.diagonal(out_adj, dim1=1, dim2=2).sum(-1, dtype=f64)
    sts_sq = StS.to(f64).square().sum(dim=(1, 2))
    return adj_sq - 2.0 * trace + sts_sq, sts_sq


def _flagged(flags: Tensor) -> Tensor:
    """Indices of the flagged graphs; all of them where the forward recomputed every graph's D
    (under torch.compile, or off the CPU), so nothing is read back from the device."""
    if torch.compiler.is_compiling() or reads_stall(flags.device):
        return torch.arange(flags.shape[0], device=flags.device)
    return flags.nonzero().squeeze(1)


class CoarsenTorchFunction(torch.autograd.Function):
    """(x, adj, s, mask) -> (out, out_adj, link_sq, ent_sum); see ``coarsen_torch``."""

    @staticmethod
    def forward(ctx, x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor], symmetric: bool,
                exact: bool = True):
        dt = compute_dtype(x, s)
        P = torch.softmax(s.to(dt), dim=-1)
        # P * 0 on padded rows: a NaN logit there propagates, as in PyG
        S = P if mask is None else P * mask.unsqueeze(-1).to(dt)
        del P
        St = S.transpose(1, 2)
        # S is 0 on padded rows, so S^T X needs no masked copy of X.
        out = St @ x.to(dt)
        # Under torch.compile a branch on the flags' values would break the graph, and on a GPU
        # reading them would stall the host until the device drains: there every graph takes the
        # direct recompute (one more chunked pass over A), Q and dQ/dS, so nothing is read back
        # and the identity's terms are not needed. On the CPU only flagged graphs are recomputed.
        compiling = torch.compiler.is_compiling()
        sync_free = compiling or reads_stall(S.device)
        direct = sync_free and exact
        AS, adj_sq = (adjacency_matmul(adj, S), None) if direct else adjacency_matmul(adj, S, want_sq=True)
        out_adj = St @ AS
        StS = St @ S
        D = None
        if direct:
            # on a GPU the residual in S's dtype, as PyG forms it (float64 products are slow there):
            # PyG's accuracy for every graph
            wide = torch.float64 if not reads_stall(S.device) else dt
            raw, D = link_exact.exact_link(adj, S, list(range(S.shape[0])), want_d=ctx.needs_input_grad[2],
                                           symmetric=symmetric, chunk_bytes=CONVERT_CHUNK_BYTES, wide=wide)
            flags = torch.ones(S.shape[0], dtype=torch.bool, device=S.device)
        else:
            raw, sts_sq = _link_sq(adj_sq, out_adj, StS)
            flags = link_exact.cancellation_flags(adj_sq, sts_sq, raw)
            if not exact:  # the caller discards link_sq (the BCE link loss): no recompute
                flags = torch.zeros_like(flags)
            elif bool(flags.any()):  # the CPU: no device to wait for
                idx = flags.nonzero().squeeze(1)
                q_exact, D = link_exact.exact_link(adj, S, idx, want_d=ctx.needs_input_grad[2], symmetric=symmetric,
                                                   chunk_bytes=CONVERT_CHUNK_BYTES)
                raw = raw.index_put((idx,), q_exact)
        # q <= 0 (only a graph whose terms are all 0) is clamped; NaN is not
        zero = raw <= 0
        link_sq = torch.where(zero, torch.zeros_like(raw), raw)
        # Row sums of C terms in fp32, the N rows of a graph in float64: no float64 copy of S.
        ent_sum = -(S * torch.log(S + EPS)).sum(-1).sum(-1, dtype=torch.float64)
        sparse = isinstance(adj, BlockSparseAdj)
        ctx.sparse_adj = adj if sparse else None  # not a tensor: kept on ctx
        ctx.save_for_backward(x, None if sparse else adj, s, S, AS, StS, ~zero, flags, D, mask)
        ctx.dtypes = (x.dtype, adj.dtype, s.dtype)
        ctx.symmetric = symmetric
        return out, out_adj, link_sq, ent_sum

    @staticmethod
    def backward(ctx, g_out, g_out_adj, g_link_sq, g_ent):
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            return (*_create_graph_backward(ctx, g_out, g_out_adj, g_link_sq, g_ent), None)
        return (*_backward_values(ctx, g_out, g_out_adj, g_link_sq, g_ent), None)


def _saved(ctx):
    x, adj, s, S, AS, StS, positive, flags, D, mask = ctx.saved_tensors
    if ctx.sparse_adj is not None:
        adj = ctx.sparse_adj
    return x, adj, s, S, AS, StS, positive, flags, D, mask


def _backward_values(ctx, g_out, g_out_adj, g_link_sq, g_ent):
    """The hand-written backward (docs/math.md), plus the direct link term of flagged graphs."""
    x, adj, s, S, AS, StS, positive, flags, D, mask = _saved(ctx)
    x_dtype, adj_dtype, s_dtype = ctx.dtypes
    dt = S.dtype
    B, N, C = S.shape
    need_x, need_adj, need_s = ctx.needs_input_grad[:3]
    gQ = (g_link_sq * positive).to(dt)
    G = g_out_adj.to(dt)
    eye = torch.eye(C, dtype=dt, device=S.device)

    g_x = g_adj = g_s = None
    if need_x:
        g_x = (S @ g_out.to(dt)).to(x_dtype)
    if need_s:
        # dS = X g_out^T + A S G^T + A^T S G + gQ (-2 (A + A^T) S + 4 S S^T S) + entropy term.
        # The link term goes through the identity's products only for unflagged graphs (gI);
        # flagged graphs add their direct -2 gQ (R + R^T) S below.
        gI = torch.where(flags, torch.zeros_like(gQ), gQ).view(B, 1, 1)
        # The A^T terms are one product A^T W with W = S (G - 2 gI I); the A S terms reuse
        # the AS kept from forward.
        H = G.transpose(1, 2) - 2.0 * gI * eye
        if ctx.symmetric:
            # A^T W = A S (G - 2 gI I): the backward pass never touches A.
            dS = AS @ (H + G - 2.0 * gI * eye)
        else:
            dS = adjacency_matmul(adj, S @ (G - 2.0 * gI * eye), transpose=True)
            dS.baddbmm_(AS, H)
        dS.baddbmm_(S, 4.0 * gI * StS)
        dS.baddbmm_(x.to(dt), g_out.to(dt).transpose(1, 2))
        if D is not None:
            idx = _flagged(flags)
            dS.index_add_(0, idx, (-2.0 * gQ[idx].to(torch.float64).view(-1, 1, 1) * D).to(dt))
        Se = S + EPS
        dS -= g_ent.to(dt).view(B, 1, 1) * (torch.log(Se) + S / Se)
        g_s = _softmax_backward(S, dS, mask).to(s_dtype)
    if need_adj:
        g_adj = _adjacency_grad(adj, S, G, gQ).to(adj_dtype)
    return g_x, g_adj, g_s, None, None


class _ConstAdjProduct(torch.autograd.Function):
    """A W (or A^T W) for a constant adjacency stored in another dtype than W, differentiable in W
    to any order without autograd keeping the converted blocks: its backward is the transposed
    product, itself this Function."""

    @staticmethod
    def forward(ctx, W: Tensor, adj, transpose: bool):
        ctx.adj, ctx.transpose = adj, transpose
        return adjacency_matmul(adj, W, transpose=transpose)

    @staticmethod
    def backward(ctx, g):
        return _ConstAdjProduct.apply(g, ctx.adj, not ctx.transpose), None, None


def _create_graph_backward(ctx, g_out, g_out_adj, g_link_sq, g_ent):
    """The backward of a ``create_graph=True`` pass: the hand-written formulas (docs/math.md)
    again, written with differentiable ops on S recomputed from the saved s, so that autograd
    differentiates them (in x, s, adj and the upstream gradients).

    One value in them cancels: dQ/dS = -2 (A S + A^T S) + 4 S (S^T S). For flagged graphs it is
    ``exact + (identity - identity.detach())``: the direct value -2 (R + R^T) S from the forward,
    with the identity's derivatives, the Hessian terms -2 (A + A^T) V + 4 (V S^T S + S V^T S +
    S S^T V), which do not cancel (their size is that of the terms that survive). So the
    derivatives that use dQ/dS's value (d/d g_Q, and the softmax backward's own derivative)
    see the direct one. No N x N tensor is built for a constant adjacency.
    """
    x, adj, s, _, _, _, positive, flags, D, mask = _saved(ctx)
    need_x, need_adj, need_s = ctx.needs_input_grad[:3]
    x_dtype, adj_dtype, s_dtype = ctx.dtypes
    dt = compute_dtype(x, s)
    B, N, C = s.shape
    gQ = (g_link_sq * positive.to(g_link_sq.dtype)).to(dt).view(B, 1, 1)
    G = g_out_adj.to(dt)
    go = g_out.to(dt)
    m = None if mask is None else mask.unsqueeze(-1).to(dt)
    P = torch.softmax(s.to(dt), dim=-1)
    S = P if m is None else P * m

    sparse = isinstance(adj, BlockSparseAdj)
    const_adj = sparse or not adj.requires_grad

    def prod(W: Tensor, transpose: bool) -> Tensor:
        if sparse or adj.dtype == dt:
            return adjacency_matmul(adj, W, transpose=transpose)
        if const_adj:
            return _ConstAdjProduct.apply(W, adj, transpose)
        a = adj.to(dt)  # a half adjacency that needs a gradient: converted whole (double backward)
        return (a.transpose(1, 2) if transpose else a) @ W

    g_x = g_adj = g_s = None
    if need_x:
        g_x = (S @ go).to(x_dtype)
    if need_s:
        AS = prod(S, False)
        AtS = AS if ctx.symmetric else prod(S, True)
        dQ = -2.0 * (AS + AtS) + 4.0 * S @ (S.transpose(1, 2) @ S)
        if D is not None:
            idx = _flagged(flags)
            exact = dQ.detach().index_copy(0, idx, (-2.0 * D).to(dt))
            dQ = exact + (dQ - dQ.detach())
        Se = S + EPS
        dS = (x.to(dt) @ go.transpose(1, 2) + AS @ G.transpose(1, 2) + AtS @ G + gQ * dQ
              - g_ent.to(dt).view(B, 1, 1) * (torch.log(Se) + S / Se))
        if m is not None:
            dS = dS * m
        g_s = (P * (dS - (P * dS).sum(-1, keepdim=True))).to(s_dtype)
    if need_adj:
        g_adj = _adjacency_grad(adj, S, G, gQ.view(B)).to(adj_dtype)
    return g_x, g_adj, g_s, None, None


def coarsen_torch(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None, adj_symmetric: Optional[bool] = None,
    exact_link: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One coarsening step on the PyTorch path; same contract as ``coarsen_reference``.

    Inputs are validated and batched (see ``inputs.check_pool_inputs``). Returns
    ``(out [B,C,F], out_adj [B,C,C], link_sq [B] float64, ent_sum [B] float64)``; out and
    out_adj are in the compute dtype (fp32 for half inputs). Differentiable in x, adj and s, twice
    too (``create_graph=True``).

    ``adj_symmetric=True`` is the caller's promise that every A_b equals its transpose: the
    backward then uses A^T S = A S and makes no pass over A. False makes the one A^T product.
    None (unknown): on the CPU, when a gradient into s is coming, C >= ``SYM_CHECK_MIN_C`` and
    N <= ``SYM_CHECK_MAX_N``, the batch is checked exactly (:func:`all_symmetric`, one read of A)
    and the A^T product is skipped if every graph is symmetric; elsewhere the product is about as
    cheap as the check, and it is made.

    ``exact_link=False``: the caller discards ``link_sq`` (the BCE link loss), so graphs whose
    identity terms cancel are not recomputed directly; ``link_sq`` is then the identity's value.
    """
    symmetric = bool(adj_symmetric)
    if (adj_symmetric is None and isinstance(adj, Tensor) and adj.device.type == "cpu"
            and s.shape[-1] >= SYM_CHECK_MIN_C and adj.shape[-1] <= SYM_CHECK_MAX_N
            and torch.is_grad_enabled() and s.requires_grad and not torch.compiler.is_compiling()):
        symmetric = all_symmetric(adj)
    return CoarsenTorchFunction.apply(x, adj, s, mask, symmetric, exact_link)


#: Where ``coarsen_torch`` checks symmetry itself (CPU). The check reads A once with its column
#: slabs transposed, N^2 compares per graph; the A^T S product it can spare costs 2 N^2 C FLOPs.
#: The check's rate falls once a graph's adjacency leaves the cache (N > 512 in float32 on this
#: project's machine), the product's does not: measured in bench/notes/sym_check.md.
SYM_CHECK_MIN_C = 48
SYM_CHECK_MAX_N = 512

#: rows of A compared at once by :func:`all_symmetric` (a [B, rows, N] bool temporary at most
#: CONVERT_CHUNK_BYTES)
_SYM_ROWS = 128


def all_symmetric(adj: Tensor) -> bool:
    """Whether every A_b of adj [B, N, N] equals its transpose, exactly (NaN is never equal).

    Row slabs A[:, i:i+r, :] are compared with the transposed column slabs A[:, :, i:i+r]^T,
    which reads A in cache-sized pieces; graphs are taken a group at a time so the boolean
    temporary stays within CONVERT_CHUNK_BYTES. Stops at the first slab that differs.
    """
    B, N, _ = adj.shape
    rows = max(1, min(N, _SYM_ROWS))
    graphs = max(1, CONVERT_CHUNK_BYTES // max(1, rows * N))
    for b0 in range(0, B, graphs):
        a = adj[b0:b0 + graphs]
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            if not torch.equal(a[:, r0:r1, :], a[:, :, r0:r1].transpose(1, 2)):
                return False
    return True
