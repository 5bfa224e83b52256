"""The last forward launch: per-graph sums and the two losses, and their gradient scales.

Every earlier pass leaves fp32 partial sums in one workspace ``work`` [B, W] (columns by pass,
``Workspace`` below). One program (the batch is small: B x W values) sums them per graph in
float64 and writes:

- ``q`` [B] float64: Q_b = ||A_b - S_b S_b^T||_F^2 over all N^2 pairs, clamped at 0 (NaN passes).
  From the identity ||A||^2 - 2 tr(S^T A S) + ||S^T S||^2 unless the residual pass flagged the
  graph (``link_exact.RHO``): then from that pass's direct sum.
- ``ent`` [B] float64: E_b = sum_i sum_c -S_ic log(S_ic + 1e-15).
- ``fin`` [B, 4] float64: Q_b, the Q of the link loss's mode (Q_b, or for ``normalize="graph"``
  the real pairs' Q_b - (sum of A^2 at pairs with a padded node), clamped), n_b, flagged (0/1).
- ``asym`` [B] int32: 1 where A_b is not known to be symmetric.
- ``link``, ``ent_loss`` ([1], or [B] per graph) in the result dtype, as ``pool.finish_losses``:

  ============  =========================  ==================================
  mode          per_graph=False            per_graph=True
  ============  =========================  ==================================
  0 numel       sqrt(sum_b Q_b) / (B N N)  sqrt(Q_b) / (N N)
  1 none        sqrt(sum_b Q_b)            sqrt(Q_b)
  2 graph       mean over n_b > 0 of       Q'_b / n_b^2 (0 when n_b = 0)
                Q'_b / n_b^2
  ============  =========================  ==================================

  and the entropy loss sum_b E_b / (B N), or E_b / n_b per graph (0 when n_b = 0).
- ``aux`` [2] float64: sum_b of the mode's Q_b, and the number of graphs with a node.

``grad_scales`` turns the upstream gradients of these outputs into dQ and dE per graph, inside
the backward kernels, so the backward needs no torch arithmetic on them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import next_pow2

#: modes of the link loss's scaling (``normalize``), as the kernels' MODE constexpr
MODE_NUMEL, MODE_NONE, MODE_GRAPH = 0, 1, 2


class Workspace(NamedTuple):
    """Column ranges of ``work`` [B, width]: each pass writes its partial sums there."""
    width: int
    ent: int  # row pass: entropy, n_row blocks
    cnt: int  # row pass: real nodes, n_row blocks
    n_row: int
    sq: int  # adjacency pass: ||A||^2, n_adj blocks
    pad: int  # adjacency pass: A^2 at pairs with a padded node
    asym: int  # adjacency pass: 1 where the row block saw A_ik != A_ki (or symmetry is unknown)
    n_adj: int
    tr: int  # gram: tr(S^T A S), n_tr tiles
    n_tr: int
    sts: int  # gram: ||S^T S||^2, n_sts tiles
    n_sts: int
    q: int  # residual pass: direct sum of (A - S S^T)^2, n_q blocks
    n_q: int
    flag: int  # residual pass: 1 where the graph was flagged (one column)


def workspace(n_row: int, n_adj: int, n_tr: int, n_sts: int, n_q: int) -> Workspace:
    cols = [0]
    for n in (n_row, n_row, n_adj, n_adj, n_adj, n_tr, n_sts, n_q, 1):
        cols.append(cols[-1] + n)
    return Workspace(cols[-1], cols[0], cols[1], n_row, cols[2], cols[3], cols[4], n_adj,
                     cols[5], n_tr, cols[6], n_sts, cols[7], n_q, cols[8])


@triton.jit
def _row_sum(work_ptr, rows64, row_ok, W, col, n, NPAD: tl.constexpr):
    """sum over columns col:col+n of work[rows], in float64 ([BLOCK_B])."""
    js = tl.arange(0, NPAD)
    v = tl.load(work_ptr + rows64[:, None] * W + col + js[None, :],
                mask=row_ok[:, None] & (js[None, :] < n), other=0.0)
    return tl.sum(v.to(tl.float64), axis=1)


@triton.jit
def _positive(q):
    """q where q > 0, else 0; NaN passes (it compares False)."""
    return tl.where(q <= 0, 0.0, q)


@triton.jit(do_not_specialize=["B", "N", "W"])
def finish_kernel(
    work_ptr, q_ptr, ent_ptr, fin_ptr, asym_ptr, link_ptr, entl_ptr, aux_ptr,
    B, N, W,
    c_ent, c_cnt, n_row, c_sq, c_pad, c_asym, n_adj, c_tr, n_tr, c_sts, n_sts, c_q, n_q, c_flag,
    MODE: tl.constexpr, PER_GRAPH: tl.constexpr, EXACT: tl.constexpr, PAD_SQ: tl.constexpr,
    BLOCK_B: tl.constexpr, ROW_PAD: tl.constexpr, ADJ_PAD: tl.constexpr, TR_PAD: tl.constexpr,
    STS_PAD: tl.constexpr, Q_PAD: tl.constexpr,
):
    """Grid (1,). See the module docstring; EXACT: flagged graphs take the residual pass's sum;
    PAD_SQ: the adjacency pass summed A^2 at padded pairs (graph mode with a mask)."""
    q_tot = tl.zeros((), dtype=tl.float64)
    e_tot = tl.zeros((), dtype=tl.float64)
    per_tot = tl.zeros((), dtype=tl.float64)
    n_graphs = tl.zeros((), dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = rows < B
        r64 = rows.to(tl.int64)
        sq = _row_sum(work_ptr, r64, ok, W, c_sq, n_adj, ADJ_PAD)
        tr = _row_sum(work_ptr, r64, ok, W, c_tr, n_tr, TR_PAD)
        sts = _row_sum(work_ptr, r64, ok, W, c_sts, n_sts, STS_PAD)
        ent = _row_sum(work_ptr, r64, ok, W, c_ent, n_row, ROW_PAD)
        n_b = _row_sum(work_ptr, r64, ok, W, c_cnt, n_row, ROW_PAD)
        asym = _row_sum(work_ptr, r64, ok, W, c_asym, n_adj, ADJ_PAD)
        q_raw = sq - 2.0 * tr + sts
        flagged = tl.zeros((BLOCK_B,), dtype=tl.int1)
        q = q_raw
        if EXACT:
            # the residual pass's flag (link_exact.cancellation_flags), as it decided
            flagged = tl.load(work_ptr + r64 * W + c_flag, mask=ok, other=0.0) != 0
            q = tl.where(flagged, _row_sum(work_ptr, r64, ok, W, c_q, n_q, Q_PAD), q_raw)
        q = _positive(q)
        q_mode = q
        if MODE == 2:
            if PAD_SQ:
                q_mode = _positive(q - _row_sum(work_ptr, r64, ok, W, c_pad, n_adj, ADJ_PAD))
        tl.store(q_ptr + r64, q, mask=ok)
        tl.store(ent_ptr + r64, ent, mask=ok)
        tl.store(asym_ptr + r64, (asym > 0).to(tl.int32), mask=ok)
        tl.store(fin_ptr + r64 * 4, q, mask=ok)
        tl.store(fin_ptr + r64 * 4 + 1, q_mode, mask=ok)
        tl.store(fin_ptr + r64 * 4 + 2, n_b, mask=ok)
        tl.store(fin_ptr + r64 * 4 + 3, flagged.to(tl.float64), mask=ok)
        has = (n_b > 0) & ok
        n_safe = tl.maximum(n_b, 1.0)
        if PER_GRAPH:
            if MODE == 2:
                link = tl.where(has, q_mode / (n_safe * n_safe), 0.0)
            else:
                link = tl.sqrt(q_mode)
                if MODE == 0:
                    link = link / tl.maximum(N.to(tl.float64) * N, 1.0)
            tl.store(link_ptr + r64, link.to(link_ptr.dtype.element_ty), mask=ok)
            e_b = tl.where(has, ent / n_safe, 0.0)
            tl.store(entl_ptr + r64, e_b.to(entl_ptr.dtype.element_ty), mask=ok)
        q_tot += tl.sum(tl.where(ok, q_mode, 0.0), axis=0)
        e_tot += tl.sum(tl.where(ok, ent, 0.0), axis=0)
        per_tot += tl.sum(tl.where(has, q_mode / (n_safe * n_safe), 0.0), axis=0)
        n_graphs += tl.sum(has.to(tl.float64), axis=0)
    if not PER_GRAPH:
        if MODE == 2:
            link = per_tot / tl.maximum(n_graphs, 1.0)
        else:
            link = tl.sqrt(q_tot)
            if MODE == 0:
                link = link / tl.maximum(B.to(tl.float64) * N * N, 1.0)
        tl.store(link_ptr, link.to(link_ptr.dtype.element_ty))
        e_l = e_tot / tl.maximum(B.to(tl.float64) * N, 1.0)
        tl.store(entl_ptr, e_l.to(entl_ptr.dtype.element_ty))
    tl.store(aux_ptr, q_tot)
    tl.store(aux_ptr + 1, n_graphs)


def _pad(n: int) -> int:
    return max(2, next_pow2(max(1, n)))


def finish(work: torch.Tensor, ws: Workspace, N: int, mode: int, per_graph: bool, exact: bool,
           pad_sq: bool, result_dtype: torch.dtype):
    """Launch ``finish_kernel``: returns (q [B] f64, ent [B] f64, fin [B, 4] f64, asym [B] i32,
    link, ent_loss ([1] or [B], result_dtype), aux [2] f64)."""
    B = work.shape[0]
    dev = work.device
    f64 = dict(dtype=torch.float64, device=dev)
    q, ent = torch.empty(B, **f64), torch.empty(B, **f64)
    fin = torch.empty((B, 4), **f64)
    aux = torch.empty(2, **f64)
    asym = torch.empty(B, dtype=torch.int32, device=dev)
    shape = (B,) if per_graph else ()
    link = torch.empty(shape, dtype=result_dtype, device=dev)
    ent_loss = torch.empty(shape, dtype=result_dtype, device=dev)
    finish_kernel[(1,)](
        work, q, ent, fin, asym, link, ent_loss, aux,
        B, N, ws.width,
        ws.ent, ws.cnt, ws.n_row, ws.sq, ws.pad, ws.asym, ws.n_adj, ws.tr, ws.n_tr, ws.sts, ws.n_sts,
        ws.q, ws.n_q, ws.flag,
        MODE=mode, PER_GRAPH=per_graph, EXACT=exact, PAD_SQ=pad_sq,
        BLOCK_B=min(16, _pad(B)), ROW_PAD=_pad(ws.n_row), ADJ_PAD=_pad(ws.n_adj), TR_PAD=_pad(ws.n_tr),
        STS_PAD=_pad(ws.n_sts), Q_PAD=_pad(ws.n_q),
        num_warps=4, num_stages=1,
    )
    return q, ent, fin, asym, link, ent_loss, aux


@triton.jit
def grad_scales(b, B, N, fin_ptr, aux_ptr, gq_ptr, gent_ptr, glink_ptr, gentl_ptr, g_strides,
                HAS_GQ: tl.constexpr, HAS_GENT: tl.constexpr, HAS_GLINK: tl.constexpr,
                HAS_GENTL: tl.constexpr, MODE: tl.constexpr, PER_GRAPH: tl.constexpr):
    """(g_all, g_real, g_e) of graph b, fp32: the gradients of the loss with respect to Q_b over
    all pairs, to Q'_b over real pairs (graph mode's link), and to E_b, from the upstream
    gradients of ``q`` (gq [B]), ``ent`` (gent [B]), ``link`` and ``ent_loss`` (glink, gentl:
    [1] or [B]; ``g_strides``: their four element strides, as the gradient of a sum arrives
    expanded, stride 0). A clamped Q (0) gets no gradient, as sqrt at 0 in ``pool._safe_sqrt``."""
    s_q, s_e, s_l, s_el = g_strides
    q_b = tl.load(fin_ptr + b * 4)
    qm_b = tl.load(fin_ptr + b * 4 + 1)
    n_b = tl.load(fin_ptr + b * 4 + 2)
    g_all = tl.zeros((), dtype=tl.float64)
    g_real = tl.zeros((), dtype=tl.float64)
    g_e = tl.zeros((), dtype=tl.float64)
    if HAS_GQ:
        g_all += tl.where(q_b <= 0, 0.0, tl.load(gq_ptr + b * s_q).to(tl.float64))
    if HAS_GENT:
        g_e += tl.load(gent_ptr + b * s_e).to(tl.float64)
    if HAS_GLINK:
        if PER_GRAPH:
            g = tl.load(glink_ptr + b * s_l).to(tl.float64)
        else:
            g = tl.load(glink_ptr).to(tl.float64)
        if MODE == 2:
            if PER_GRAPH:
                den = 1.0
            else:
                den = tl.maximum(tl.load(aux_ptr + 1), 1.0)
            n_safe = tl.maximum(n_b, 1.0)
            g_real += tl.where((n_b <= 0) | (qm_b <= 0), 0.0, g / (den * n_safe * n_safe))
        else:
            if PER_GRAPH:
                q_ref = q_b
                den = 1.0
                if MODE == 0:
                    den = tl.maximum(N.to(tl.float64) * N, 1.0)
            else:
                q_ref = tl.load(aux_ptr)
                den = 1.0
                if MODE == 0:
                    den = tl.maximum(B.to(tl.float64) * N * N, 1.0)
            # d sqrt(Q) / dQ = 1 / (2 sqrt(Q)); 0 at Q = 0 and for this graph's clamped Q_b; NaN
            # (which compares False) passes, as through pool._safe_sqrt
            zero = (q_b <= 0) | (q_ref <= 0)
            g_all += tl.where(zero, 0.0, g / (2.0 * tl.sqrt(tl.where(zero, 1.0, q_ref)) * den))
    if HAS_GENTL:
        if PER_GRAPH:
            g_e += tl.where(n_b > 0, tl.load(gentl_ptr + b * s_el).to(tl.float64) / tl.maximum(n_b, 1.0), 0.0)
        else:
            g_e += tl.load(gentl_ptr).to(tl.float64) / tl.maximum(B.to(tl.float64) * N, 1.0)
    return g_all.to(tl.float32), g_real.to(tl.float32), g_e.to(tl.float32)


def grad_strides(*grads):
    """The element strides of the upstream loss gradients (0 for a missing one), for ``grad_scales``."""
    return tuple(int(g.stride(0)) if g is not None and g.dim() == 1 else 0 for g in grads)
