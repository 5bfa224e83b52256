"""The edge pattern of ``sparse_diff_pool`` and the two edge passes its link loss needs.

A batch's coalesced edges, sorted by (row, col), are a CSR pattern (``Pattern``). Every edge pass
is one of two kernels, on CPU and CUDA alike, each O(E C) time and O(E + N C) memory, never an
E x C tensor: ``A Y`` is ``embedding_bag`` over the CSR rows with the edge values as per-sample
weights, and the per-edge dot products <U_i, V_j> are ``torch.sparse.sampled_addmm`` on the
pattern. ``SpMM`` (A S) and ``EdgeTerms`` (the per-edge part of the link loss, derived in
``sparse_pool``'s module docstring) are autograd functions built from them; their backward
passes use the same two kernels, ``A^T Y`` on the transposed pattern (one stable sort of the
columns, made once per pattern), or one pass for (G + G^T) Y when the pattern is symmetric.
"""
from __future__ import annotations

import functools
import warnings
from typing import Tuple

import torch
import torch.nn.functional as F_nn
from torch import Tensor


def first_order(backward):
    """Marks a hand-written backward as first order: under ``create_graph=True`` (grad mode is
    on inside a backward only then) it raises instead of building a graph that would give
    wrong second derivatives."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "sparse_diff_pool has no double backward: its backward passes are first order, so "
                "create_graph=True (second derivatives, gradient penalties) is refused; "
                "dense_diff_pool(..., backend='torch') on the dense form supports it"
            )
        return backward(ctx, *grads)

    return checked



class Pattern:
    """Coalesced edges sorted by (row, col), as CSR; the transposed pattern on demand."""

    def __init__(self, row: Tensor, col: Tensor, N: int):
        self.N = N
        self.row, self.col = row, col
        self.crow = _offsets(row, N)
        self._t = None
        self._sym = None

    def transposed(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(perm, rows in column order, column offsets): A^T's CSR is (crow_t, row[perm], vals[perm])."""
        if self._t is None:
            # int32 keys sort about 1.5x faster than int64 (bench/notes/sparse_profile_1e6.md)
            keys = self.col.int() if self.N <= torch.iinfo(torch.int32).max else self.col
            perm = torch.argsort(keys, stable=True)
            del keys
            self._t = (perm, self.row.index_select(0, perm), _offsets(self.col, self.N))
        return self._t

    def symmetric(self) -> bool:
        """Whether the pattern is its own transpose (values aside): then A^T's values, in this
        pattern's edge order, are vals[perm]."""
        if self._sym is None:
            _, row_t, crow_t = self.transposed()
            self._sym = bool(torch.equal(crow_t, self.crow) and torch.equal(row_t, self.col))
        return self._sym

    def mm(self, vals: Tensor, Y: Tensor, transpose: bool = False) -> Tensor:
        """A Y (or A^T Y), [N, K], with A the pattern holding ``vals``."""
        if transpose:
            perm, row_t, crow_t = self.transposed()
            idx, offsets, vals = row_t, crow_t, vals.index_select(0, perm)
        else:
            idx, offsets = self.col, self.crow
        # detached: a saved tensor that requires grad would send embedding_bag down its
        # training path, which also builds the bag bookkeeping its own backward needs
        return F_nn.embedding_bag(idx, Y.detach().contiguous(), offsets, mode="sum",
                                  per_sample_weights=vals.detach().to(Y.dtype), include_last_offset=True)

    def dots(self, U: Tensor, V: Tensor) -> Tensor:
        """<U_i, V_j> for every edge (i, j), [E]."""
        if self.row.numel() == 0:
            return U.new_zeros(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pat = torch.sparse_csr_tensor(self.crow, self.col, U.new_zeros(self.row.numel()), (self.N, self.N),
                                          check_invariants=False)
            return torch.sparse.sampled_addmm(pat, U.contiguous(), V.t(), beta=0.0).values()


def _offsets(sorted_idx: Tensor, N: int) -> Tensor:
    out = torch.zeros(N + 1, dtype=torch.int64, device=sorted_idx.device)
    if sorted_idx.numel():
        out[1:] = torch.bincount(sorted_idx, minlength=N).cumsum(0)
    return out


class SpMM(torch.autograd.Function):
    """(vals [E], S [N, C]) -> A S, A the pattern holding vals."""

    @staticmethod
    def forward(ctx, vals: Tensor, S: Tensor, pattern: Pattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(vals, S)
        return pattern.mm(vals, S)

    @staticmethod
    @first_order
    def backward(ctx, g: Tensor):
        vals, S = ctx.saved_tensors
        p = ctx.pattern
        g_vals = p.dots(g, S) if ctx.needs_input_grad[0] else None
        g_S = p.mm(vals, g, transpose=True) if ctx.needs_input_grad[1] else None
        return g_vals, g_S, None


class EdgeTerms(torch.autograd.Function):
    """The link loss's per-edge part: V_b = sum over graph b's edges (i, j) of

        v = res^2 - T^2 - 2 R dots = q (q - 2 T) - 2 R dots,   q = A - R,  res = q - T,

    with R_ij = 1 when i and j share a hard cluster, dots = <D_i, D_j> and
    T = (S S^T - R)_ij = <H_i, D_j> + <D_i, H_j> + <D_i, D_j>, where <H_i, D_j> = D[j, k_i] for
    a row i with a hard cluster k_i, else 0. (q (q - 2 T) is res^2 - T^2 without the
    cancellation of two near-equal squares on same-cluster edges, where q = 0 when A = 1.) Each
    v is in the compute dtype, V in float64. Inputs: D [N, C], the edge values A [E], ``hard``
    = (k_r, k_c, a_r, a_c, same) -- the edges' hard clusters, whether the ends have one, and R as
    a bool [E] -- or None when no row has a hard cluster (then R = 0 and T = dots), each edge's
    graph ``eg`` [E] (None: one graph) and B. Gradients for D and A."""

    @staticmethod
    def forward(ctx, D, A, pattern: Pattern, hard, eg, B: int):
        dots = pattern.dots(D, D)
        if hard is None:
            T, q = dots, A
            v = torch.add(q, T, alpha=-2.0).mul_(q)
            ctx.hard = None
        else:
            k_r, k_c, a_r, a_c, same = hard
            C = D.shape[1]
            flat = D.reshape(-1)
            # flat positions of D[j, k_i] and D[i, k_j] (valid indices: k is an argmax even where
            # the row has no hard cluster; those terms are masked to 0)
            i_hj = torch.add(k_r, pattern.col, alpha=C)
            i_ih = torch.add(k_c, pattern.row, alpha=C)
            T = flat.index_select(0, i_hj).masked_fill_(~a_r, 0.0)
            T += flat.index_select(0, i_ih).masked_fill_(~a_c, 0.0)
            T += dots
            q = A - same.to(A.dtype)
            v = torch.add(q, T, alpha=-2.0).mul_(q)
            v -= torch.where(same, dots, 0.0).mul_(2.0)
            ctx.hard = (i_hj, i_ih, a_r, a_c, same)
        del dots, q
        if eg is None:
            V = v.sum(dtype=torch.float64).reshape(1)
            V = V if B == 1 else torch.cat([V, V.new_zeros(B - 1)])
        else:
            V = v.new_zeros(B, dtype=torch.float64).index_add_(0, eg, v.to(torch.float64))
        ctx.pattern = pattern
        ctx.save_for_backward(D, A, T, eg)
        return V

    @staticmethod
    @first_order
    def backward(ctx, gV: Tensor):
        D, A, T, eg = ctx.saved_tensors
        p = ctx.pattern
        gv = gV.to(D.dtype)
        ge = gv[0] if eg is None else gv.index_select(0, eg)  # d(loss)/dv per edge
        q = A if ctx.hard is None else A - ctx.hard[4].to(A.dtype)
        g_A = None
        if ctx.needs_input_grad[1]:
            g_A = torch.sub(q, T).mul_(ge).mul_(2.0)  # dv/dA = 2 (q - T)
        g_T = (q * ge).mul_(-2.0)  # dv/dT = -2 q
        del q
        # dv/d(dots) = -2 R, plus dT/d(dots) = 1
        g = g_T if ctx.hard is None else torch.where(ctx.hard[4], g_T - 2.0 * ge, g_T)
        if p.symmetric():  # (G + G^T) D as one pass: G^T has the values g[perm] on the same pattern
            g = g + g.index_select(0, p.transposed()[0])
            g_D = p.mm(g, D)
        else:
            g_D = p.mm(g, D)
            g_D += p.mm(g, D, transpose=True)
        del g
        if ctx.hard is not None:
            i_hj, i_ih, a_r, a_c, _ = ctx.hard
            flat = g_D.view(-1)
            flat.index_add_(0, i_hj, g_T.masked_fill(~a_r, 0.0))
            flat.index_add_(0, i_ih, g_T.masked_fill_(~a_c, 0.0))
        return g_D, g_A, None, None, None, None
