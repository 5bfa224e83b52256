"""Passes over the adjacency A: the forward product A S with the link-loss terms, the direct
residual of graphs whose identity cancels, A^T S for the backward of a non-symmetric A, and dA.

Forward (``adjacency_fwd``), per graph b, one program per block of BLOCK_M rows of A holding all
C_PAD clusters, so every entry of A is read once from memory::

    (A S)_i    = sum_k A_ik S_k                    [N, C_PAD], kept for the backward
    ||A||_F^2  = sum_ik A_ik^2                     partial sums
    pad        = sum of A_ik^2 with i or k padded  (``normalize="graph"`` with a mask)
    asym       = [A_ik != A_ki for some k]         only when CHECK_SYM

A S is a split product (kernels/split.py): a 0/1 or small-integer adjacency (bool, uint8, bf16)
is exact in bf16, so it takes PARTS products with the parts of S (3 under "highest"); a float
adjacency is split too (6 products). The mirrored tile A[k-block, i-block] of the symmetry check
is the tile another program of the same graph reads at about the same time: mostly an L2 hit.
The comparison is exact: a graph whose A differs from A^T by any rounding, or holds a NaN, is
treated as non-symmetric (correct, slower).

The same kernel with A's row and column strides swapped computes A^T S (SKIP_SYMMETRIC: graphs
with asym == 0 skip the loop and store nothing), so the backward reads A only for them.

Residual (``link_residual``): for the graphs flagged by the finish step's test
(``link_exact.RHO``: the identity's three terms cancel), sum_ik (A_ik - S_i . S_k)^2 directly,
with S_i . S_k a split product (fp32-grade under "highest", as PyG's fp32 residual), one more
read of A_b; every other graph's programs exit at once. The flag is recomputed on the device
from the partial sums, so the host never learns which graphs were flagged (no synchronisation).

Gradient (``adjacency_bwd``), only when A needs a gradient (levels >= 1, small N)::

    dA = S G S^T + 2 g_all (A - S S^T) + 2 g_real (A - S S^T) [m_i m_k]
       = (W - 2 g S) S^T + 2 g_all A + 2 g_real A m_i m_k,   W = S G,  g = g_all + g_real

(g_real: the real pairs' Q of ``normalize="graph"``; ``finish.grad_scales``), one read of A and
one write of dA.

Bytes: A once (4 N^2 per graph in fp32, N^2 as bool/uint8), the parts of S once per row block
(from L2), A S written once. Nothing N x N is written in the forward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import cdiv, next_pow2, register_cap
from .finish import grad_scales, grad_strides
from .split import dot_exact_a, dot_f32, dot_parts, load_parts, split_bf16

#: adjacency dtypes exact in bf16 (one part): 0/1 and integers up to 256
EXACT_ADJ_DTYPES = (torch.bool, torch.uint8, torch.bfloat16)


class AdjConfig(NamedTuple):
    block_m: int  # rows of A per program
    block_k: int  # columns of A (= rows of S) per loop step
    num_warps: int
    num_stages: int
    block_c: int = 128  # clusters per program (C_PAD up to 128: all of them)


# C_PAD -> (block_m, block_k, num_warps, num_stages). 64 rows: one Hopper warp group's product
# height; from 128 clusters on, each program holds 128 of them (more: more programs), and
# block_k 16 keeps the split operand tiles, the mirrored tile of the symmetry check and the
# pipelined stages clear of spills on sm_80 and sm_90 at every C_PAD (``diffpool-fast
# compile-check --quick``: block_k 32 or 64 spilled on sm_80, and so did 128 rows on 8 warps,
# by 12 bytes). Not yet timed on a GPU: ``bench/scripts/gpu_tune.py`` tries the alternatives.
_ADJ_TABLE = {
    16: (64, 16, 4, 2),
    32: (64, 16, 4, 2),
    64: (64, 16, 4, 2),
    128: (64, 16, 4, 2),
    256: (64, 16, 4, 2),
    512: (64, 16, 4, 2),
}


# The residual passes (flagged graphs only) hold S_i's parts, the residual tile and (backward) a
# [BLOCK_M, BLOCK_C] accumulator: 64-row blocks and, above 64 clusters in the backward (above 128
# forward), cluster blocks keep them clear of spills on sm_80 and sm_90 (``diffpool-fast
# compile-check``). The backward recomputes S_i . S_k (over all clusters) once per cluster block:
# C_PAD / 32 times at 128 clusters, the price of no spill (block_c 64 spilled 48 bytes on sm_80).
# Entries: (block_m, block_k, num_warps, num_stages, block_c).
_RESIDUAL_TABLE = {
    16: (64, 64, 4, 2, 16),
    32: (64, 64, 4, 2, 32),
    64: (64, 32, 4, 2, 64),
    128: (64, 16, 4, 2, 128),
    256: (64, 16, 4, 2, 64),
    512: (64, 16, 4, 2, 64),
}
_RESIDUAL_BWD_TABLE = {
    16: (64, 16, 4, 2, 16),
    32: (64, 16, 4, 2, 32),
    64: (64, 16, 8, 2, 32),
    128: (64, 16, 8, 2, 32),
    256: (64, 16, 8, 2, 32),
    512: (64, 16, 8, 2, 32),
}


def adjacency_config(N: int, c_pad: int, block_m: Optional[int] = None,
                     block_k: Optional[int] = None, table: Optional[dict] = None) -> AdjConfig:
    """Block sizes keyed on C_PAD and bucketed N (row blocks no taller than N's bucket), from
    ``_ADJ_TABLE`` (or ``table``)."""
    entry = (table or _ADJ_TABLE)[c_pad]
    bm, bk, num_warps, num_stages = entry[:4]
    block_c = entry[4] if len(entry) > 4 else min(c_pad, 128)
    if block_m is None:
        block_m = min(bm, max(16, next_pow2(N)))
    if block_k is None:
        block_k = min(bk, max(16, next_pow2(N)))
    return AdjConfig(block_m, block_k, num_warps, num_stages, block_c)


def adjacency_configs(table: Optional[dict] = None):
    """Every (C_PAD, AdjConfig) ``adjacency_config`` can return (for the compile check), of the
    adjacency passes or of another table's (the residual passes')."""
    out = []
    for c_pad in (16, 32, 64, 128, 256, 512):
        for N in (16, 32, 4096):
            cfg = adjacency_config(N, c_pad, table=table)
            if (c_pad, cfg) not in out:
                out.append((c_pad, cfg))
    return out


@triton.jit
def _graph_sum(work_ptr, b, W, col, n, NPAD: tl.constexpr):
    """sum of work[b, col:col+n] in float64 (a scalar)."""
    js = tl.arange(0, NPAD)
    v = tl.load(work_ptr + b * W + col + js, mask=js < n, other=0.0)
    return tl.sum(v.to(tl.float64), axis=0)


@triton.jit(do_not_specialize=["N", "W"])
def adjacency_fwd_kernel(
    adj_ptr, Sp_ptr, AS_ptr, work_ptr, mask_ptr, asym_ptr,
    N, W, c_sq, c_pad, c_asym, plane,
    stride_ab, stride_ar, stride_ac, stride_mb,
    FWD_TERMS: tl.constexpr, CHECK_SYM: tl.constexpr, ASYM_DEFAULT: tl.constexpr,
    SKIP_SYMMETRIC: tl.constexpr, PAD_SQ: tl.constexpr, A_EXACT: tl.constexpr, S_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr,
):
    """(A S) for BLOCK_M rows and BLOCK_C clusters of graph b, and (FWD_TERMS) the link-loss
    partial sums.

    Grid (B, cdiv(N, BLOCK_M), C_PAD / BLOCK_C): above 128 clusters the accumulator is split
    over programs (A is then read once per cluster block, mostly from L2); the partial sums are
    written by the first cluster block. adj_ptr: A [B, N, N] as fp32/fp16/bf16/uint8 (bool viewed as
    uint8), strides (stride_ab, stride_ar, stride_ac) - swapped to read A^T; Sp_ptr: the parts
    of S [PARTS, B, N, C_PAD] bf16, ``plane`` apart; AS_ptr: output [B, N, C_PAD] fp32;
    work_ptr: [B, W] fp32 partial sums at columns c_sq / c_pad / c_asym + pid (FWD_TERMS;
    asym is ASYM_DEFAULT when not CHECK_SYM); mask_ptr: m [B, N] uint8 (PAD_SQ); asym_ptr: [B]
    int32, read when SKIP_SYMMETRIC (0 = skip this graph). A_EXACT: A is exact in bf16.
    S_FP32: Sp_ptr is S itself [B, N, C_PAD] fp32, split here (the backward's A^T S, which the
    forward's parts do not outlive).
    """
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    a_base = adj_ptr + b * stride_ab
    s_base = Sp_ptr + b * N * C_PAD

    k_end = N
    if SKIP_SYMMETRIC:
        k_end = N * tl.load(asym_ptr + b)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # per-row running sums: a [BLOCK_M, BLOCK_K] accumulator would cost registers the dot needs
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pad = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_asym = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PAD_SQ:
        m_i = tl.load(mask_ptr + b * stride_mb + rows64, mask=row_ok, other=0) != 0
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        ks64 = ks.to(tl.int64)
        a = tl.load(a_base + rows64[:, None] * stride_ar + ks64[None, :] * stride_ac,
                    mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
        sp = s_base + ks64[:, None] * C_PAD + cols[None, :]
        if S_FP32:
            s0, s1, s2 = split_bf16(tl.load(sp, mask=k_ok[:, None], other=0.0), PARTS)
        else:
            s0, s1, s2 = load_parts(sp, plane, k_ok[:, None], PARTS)
        if A_EXACT:
            acc = dot_exact_a(a, s0, s1, s2, acc, PARTS)
        else:
            a0, a1, a2 = split_bf16(a, PARTS)
            acc = dot_parts(a0, a1, a2, s0, s1, s2, acc, PARTS)
        if FWD_TERMS:
            aa = a * a
            sq += tl.sum(aa, axis=1)
            if PAD_SQ:
                m_k = tl.load(mask_ptr + b * stride_mb + ks64, mask=k_ok, other=0) != 0
                pad += tl.sum(tl.where(m_i[:, None] & m_k[None, :], 0.0, aa), axis=1)
        if CHECK_SYM:
            # element (i, k) of this tile is A_ki
            mirror = tl.load(a_base + ks64[None, :] * stride_ar + rows64[:, None] * stride_ac,
                             mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            n_asym += tl.sum(tl.where(a != mirror, 1.0, 0.0), axis=1)

    tl.store(AS_ptr + b * N * C_PAD + rows64[:, None] * C_PAD + cols[None, :], acc,
             mask=row_ok[:, None] & (k_end > 0))
    if FWD_TERMS & (pid_c == 0):
        part = work_ptr + b * W + pid_m
        tl.store(part + c_sq, tl.sum(sq, axis=0))
        tl.store(part + c_pad, tl.sum(pad, axis=0))
        if CHECK_SYM:
            tl.store(part + c_asym, (tl.sum(n_asym, axis=0) > 0).to(tl.float32))
        else:
            tl.store(part + c_asym, ASYM_DEFAULT * 1.0)


def _adj_arg(adj: torch.Tensor) -> torch.Tensor:
    # Triton has no bool loads we want (i1 pointers); the same bytes as uint8 load as 0/1.
    return adj.view(torch.uint8) if adj.dtype == torch.bool else adj


def adj_blocks(N: int, C: int, block_m: Optional[int] = None) -> int:
    """Programs per graph of the adjacency passes (partial-sum columns they write)."""
    from .assignment import cluster_pad

    return cdiv(N, adjacency_config(N, cluster_pad(C), block_m).block_m)


def adjacency_fwd(adj: torch.Tensor, Sp: torch.Tensor, mask: Optional[torch.Tensor], work: torch.Tensor,
                  cols, sym_mode: str, pad_sq: bool, block_m: Optional[int] = None,
                  block_k: Optional[int] = None) -> torch.Tensor:
    """Launch the forward pass: returns AS [B, N, C_PAD] fp32; the partial sums go to ``work``
    at ``cols`` = (c_sq, c_pad, c_asym). ``sym_mode``: "check" (compare A with A^T exactly),
    "yes" (promised symmetric: asym 0) or "no" (asym 1)."""
    parts, B, N, c_pad = Sp.shape
    cfg = adjacency_config(N, c_pad, block_m, block_k)
    a = _adj_arg(adj)
    AS = torch.empty((B, N, c_pad), device=Sp.device, dtype=torch.float32)
    mask_u8 = mask.view(torch.uint8) if (pad_sq and mask is not None) else Sp
    adjacency_fwd_kernel[(B, cdiv(N, cfg.block_m), c_pad // cfg.block_c)](
        a, Sp, AS, work, mask_u8, work,
        N, work.shape[1], cols[0], cols[1], cols[2], B * N * c_pad,
        a.stride(0), a.stride(1), a.stride(2), mask_u8.stride(0) if mask_u8 is not Sp else 0,
        FWD_TERMS=True, CHECK_SYM=sym_mode == "check", ASYM_DEFAULT=int(sym_mode == "no"),
        SKIP_SYMMETRIC=False, PAD_SQ=pad_sq and mask is not None, A_EXACT=adj.dtype in EXACT_ADJ_DTYPES,
        S_FP32=False,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c, C_PAD=c_pad, PARTS=parts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return AS


def adjacency_transpose_fwd(adj: torch.Tensor, S: torch.Tensor, asym: torch.Tensor, parts: int,
                            block_m: Optional[int] = None, block_k: Optional[int] = None) -> torch.Tensor:
    """A^T S [B, N, C_PAD] fp32 for the graphs with asym == 1; rows of the others are left
    unwritten (the backward row pass never reads them). S: [B, N, C_PAD] fp32, split in the
    kernel."""
    B, N, c_pad = S.shape
    cfg = adjacency_config(N, c_pad, block_m, block_k)
    a = _adj_arg(adj)
    AtS = torch.empty((B, N, c_pad), device=S.device, dtype=torch.float32)
    adjacency_fwd_kernel[(B, cdiv(N, cfg.block_m), c_pad // cfg.block_c)](
        a, S, AtS, AtS, AtS, asym,
        N, 0, 0, 0, 0, 0,
        a.stride(0), a.stride(2), a.stride(1), 0,
        FWD_TERMS=False, CHECK_SYM=False, ASYM_DEFAULT=1,
        SKIP_SYMMETRIC=True, PAD_SQ=False, A_EXACT=adj.dtype in EXACT_ADJ_DTYPES, S_FP32=True,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c, C_PAD=c_pad, PARTS=parts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return AtS


@triton.jit(do_not_specialize=["N", "W"])
def link_residual_kernel(
    adj_ptr, Sp_ptr, work_ptr,
    N, W, c_sq, n_adj, c_tr, n_tr, c_sts, n_sts, c_q, c_flag, plane, rho,
    stride_ab, stride_ar, stride_ac,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr, ADJ_PAD: tl.constexpr, TR_PAD: tl.constexpr, STS_PAD: tl.constexpr,
):
    """sum over BLOCK_M rows i of graph b and every k of (A_ik - S_i . S_k)^2, if graph b is
    flagged (else 0 without reading A), into work[b, c_q + pid].

    Grid (B, cdiv(N, BLOCK_M)). The flag: (||A|| + ||S^T S||)^2 > rho Q^, Q^ = ||A||^2 - 2 tr + ||S^T
    S||^2, from the partial sums in work (``link_exact.cancellation_flags``).
    """
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    sq = _graph_sum(work_ptr, b, W, c_sq, n_adj, ADJ_PAD)
    tr = _graph_sum(work_ptr, b, W, c_tr, n_tr, TR_PAD)
    sts = _graph_sum(work_ptr, b, W, c_sts, n_sts, STS_PAD)
    m_b = tl.sqrt(tl.maximum(sq, 0.0)) + tl.sqrt(tl.maximum(sts, 0.0))
    flagged = m_b * m_b > rho * (sq - 2.0 * tr + sts)
    k_end = N * flagged.to(tl.int32)
    if pid_m == 0:
        tl.store(work_ptr + b * W + c_flag, flagged.to(tl.float32))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    a_base = adj_ptr + b * stride_ab
    s_base = Sp_ptr + b * N * C_PAD
    q = tl.zeros((), dtype=tl.float64)
    if C_PAD == BLOCK_C:
        # S_i's parts stay in shared memory through the loop
        cols = tl.arange(0, C_PAD)
        si0, si1, si2 = load_parts(s_base + rows64[:, None] * C_PAD + cols[None, :], plane,
                                   row_ok[:, None] & (k_end > 0), PARTS)
        for k0 in range(0, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < N
            ks64 = ks.to(tl.int64)
            a = tl.load(a_base + rows64[:, None] * stride_ar + ks64[None, :] * stride_ac,
                        mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            # S_k^T parts, [C_PAD, BLOCK_K], read along the contiguous cluster dimension
            t0, t1, t2 = load_parts(s_base + ks64[None, :] * C_PAD + cols[:, None], plane, k_ok[None, :], PARTS)
            p = dot_parts(si0, si1, si2, t0, t1, t2, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PARTS)
            r = a - p
            q += tl.sum(tl.sum(r * r, axis=1), axis=0).to(tl.float64)
    else:
        # above 128 clusters the reduction over them is chunked; S_i's chunks come from L1/L2
        for k0 in range(0, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < N
            ks64 = ks.to(tl.int64)
            a = tl.load(a_base + rows64[:, None] * stride_ar + ks64[None, :] * stride_ac,
                        mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            p = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for c0 in range(0, C_PAD, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                si0, si1, si2 = load_parts(s_base + rows64[:, None] * C_PAD + cols[None, :], plane,
                                           row_ok[:, None], PARTS)
                t0, t1, t2 = load_parts(s_base + ks64[None, :] * C_PAD + cols[:, None], plane, k_ok[None, :], PARTS)
                p = dot_parts(si0, si1, si2, t0, t1, t2, p, PARTS)
            r = a - p
            q += tl.sum(tl.sum(r * r, axis=1), axis=0).to(tl.float64)
    tl.store(work_ptr + b * W + c_q + pid_m, q.to(tl.float32))


def _pad(n: int) -> int:
    return max(2, next_pow2(max(1, n)))


def link_residual(adj: torch.Tensor, Sp: torch.Tensor, work: torch.Tensor, ws, rho: float,
                  block_m: Optional[int] = None, block_k: Optional[int] = None) -> None:
    """Launch ``link_residual_kernel`` over every graph (unflagged ones exit at once)."""
    parts, B, N, c_pad = Sp.shape
    cfg = adjacency_config(N, c_pad, block_m, block_k, _RESIDUAL_TABLE)
    a = _adj_arg(adj)
    link_residual_kernel[(B, cdiv(N, cfg.block_m))](
        a, Sp, work,
        N, ws.width, ws.sq, ws.n_adj, ws.tr, ws.n_tr, ws.sts, ws.n_sts, ws.q, ws.flag, B * N * c_pad, rho,
        a.stride(0), a.stride(1), a.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c, C_PAD=c_pad, PARTS=parts,
        ADJ_PAD=_pad(ws.n_adj), TR_PAD=_pad(ws.n_tr), STS_PAD=_pad(ws.n_sts),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )


@triton.jit(do_not_specialize=["N"])
def link_residual_bwd_kernel(
    adj_ptr, S_ptr, fin_ptr, asym_ptr, D_ptr,
    N,
    stride_ab, stride_ar, stride_ac,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr,
):
    """D_i = sum_k (R_ik + R_ki) S_k, R = A - S S^T, for BLOCK_M rows and BLOCK_C clusters of a
    graph the forward flagged (fin[b, 3] = 1; the others exit at once): the direct dQ/dS = -2 D,
    which the identity's form loses to cancellation near an exact fit.

    Grid (B, cdiv(N, BLOCK_M), C_PAD / BLOCK_C). S_ptr: S [B, N, C_PAD] fp32, split here;
    asym_ptr: [B] int32 (0: A_b = A_b^T, so R_ki = R_ik and the mirrored tile is not read);
    D_ptr: [B, N, C_PAD] fp32, rows of unflagged graphs left unwritten. S_i . S_k is a split
    product over all C_PAD clusters (chunked by BLOCK_C), so R is fp32-grade per entry, as PyG's.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    flagged = tl.load(fin_ptr + b * 4 + 3).to(tl.int32) != 0
    asym = tl.load(asym_ptr + b)
    k_end = N * flagged.to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    a_base = adj_ptr + b * stride_ab
    s_base = S_ptr + b * N * C_PAD
    dcols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        ks64 = ks.to(tl.int64)
        tile_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_base + rows64[:, None] * stride_ar + ks64[None, :] * stride_ac,
                    mask=tile_ok, other=0).to(tl.float32)
        # element (i, k) is A_ki (only read for a non-symmetric A)
        a_t = tl.load(a_base + ks64[None, :] * stride_ar + rows64[:, None] * stride_ac,
                      mask=tile_ok & (asym != 0), other=0).to(tl.float32)
        a_t = tl.where(asym != 0, a_t, a)
        p = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for c0 in range(0, C_PAD, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            si = tl.load(s_base + rows64[:, None] * C_PAD + cols[None, :], mask=row_ok[:, None], other=0.0)
            st = tl.load(s_base + ks64[None, :] * C_PAD + cols[:, None], mask=k_ok[None, :], other=0.0)
            p = dot_f32(si, st, p, PARTS)
        # R_ik + R_ki with S_i . S_k = S_k . S_i
        r2 = a + a_t - 2.0 * p
        sk = tl.load(s_base + ks64[:, None] * C_PAD + dcols[None, :], mask=k_ok[:, None], other=0.0)
        acc = dot_f32(r2, sk, acc, PARTS)
    tl.store(D_ptr + b * N * C_PAD + rows64[:, None] * C_PAD + dcols[None, :], acc,
             mask=row_ok[:, None] & (k_end > 0))


def link_residual_bwd(adj: torch.Tensor, S: torch.Tensor, fin: torch.Tensor, asym: torch.Tensor, parts: int,
                      block_m: Optional[int] = None, block_k: Optional[int] = None) -> torch.Tensor:
    """Launch ``link_residual_bwd_kernel`` over every graph: D [B, N, C_PAD] fp32, written for the
    flagged graphs only (the backward row pass reads no other row of it)."""
    B, N, c_pad = S.shape
    cfg = adjacency_config(N, c_pad, block_m, block_k, _RESIDUAL_BWD_TABLE)
    a = _adj_arg(adj)
    D = torch.empty((B, N, c_pad), device=S.device, dtype=torch.float32)
    link_residual_bwd_kernel[(B, cdiv(N, cfg.block_m), c_pad // cfg.block_c)](
        a, S, fin, asym, D,
        N,
        a.stride(0), a.stride(1), a.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c, C_PAD=c_pad, PARTS=parts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return D


class AdjGradConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def adjacency_grad_config(N: int, block_m: Optional[int] = None, block_n: Optional[int] = None,
                          block_k: Optional[int] = None) -> AdjGradConfig:
    """A plain output-tiled product: 64 x 64 tiles, 32 x 32 for small graphs."""
    t = 64 if N > 32 else 32
    return AdjGradConfig(block_m or t, block_n or t, block_k or 32, 4, 2)


def adjacency_grad_configs():
    return [adjacency_grad_config(N) for N in (16, 4096)]


@triton.jit(do_not_specialize=["B", "N", "C", "sg_q", "sg_e", "sg_l", "sg_el"])
def adjacency_bwd_kernel(
    adj_ptr, W_ptr, S_ptr, mask_ptr, fin_ptr, aux_ptr, gq_ptr, gent_ptr, glink_ptr, gentl_ptr, dA_ptr,
    B, N, C, sg_q, sg_e, sg_l, sg_el,
    stride_ab, stride_ar, stride_ac,
    stride_wb, stride_wn, stride_wc,
    stride_mb,
    stride_db, stride_dr, stride_dc,
    HAS_MASK: tl.constexpr, HAS_GQ: tl.constexpr, HAS_GENT: tl.constexpr, HAS_GLINK: tl.constexpr,
    HAS_GENTL: tl.constexpr, MODE: tl.constexpr, PER_GRAPH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr,
):
    """dA = (W - 2 g S) S^T + 2 g_all A + 2 g_real A [m_i m_k] for one BLOCK_M x BLOCK_N tile.

    Grid (B, cdiv(N, BLOCK_M), cdiv(N, BLOCK_N)). adj_ptr: A [B, N, N] fp32/fp16/bf16; W_ptr:
    S G [B, N, C] fp32 (any strides); S_ptr: S [B, N, C_PAD] fp32; mask_ptr: m [B, N] uint8
    (HAS_MASK); the loss gradients: ``finish.grad_scales``; dA_ptr: [B, N, N] in A's dtype.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    g_all, g_real, g_e = grad_scales(b, B, N, fin_ptr, aux_ptr, gq_ptr, gent_ptr, glink_ptr, gentl_ptr,
                                     (sg_q, sg_e, sg_l, sg_el), HAS_GQ, HAS_GENT, HAS_GLINK, HAS_GENTL, MODE, PER_GRAPH)
    g = g_all + g_real
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        w = tl.load(W_ptr + b * stride_wb + rows64[:, None] * stride_wn + ks[None, :] * stride_wc,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        si = tl.load(S_ptr + b * N * C_PAD + rows64[:, None] * C_PAD + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # S^T tile loaded directly as [BLOCK_K, BLOCK_N]
        st = tl.load(S_ptr + b * N * C_PAD + cols64[None, :] * C_PAD + ks[:, None],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_f32(w - 2.0 * g * si, st, acc, PARTS)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    a = tl.load(adj_ptr + b * stride_ab + rows64[:, None] * stride_ar + cols64[None, :] * stride_ac,
                mask=tile_ok, other=0.0).to(tl.float32)
    scale = 2.0 * g_all + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 2:
        real = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
        if HAS_MASK:
            m_i = tl.load(mask_ptr + b * stride_mb + rows64, mask=row_ok, other=0) != 0
            m_k = tl.load(mask_ptr + b * stride_mb + cols64, mask=col_ok, other=0) != 0
            real = m_i[:, None] & m_k[None, :]
        scale += tl.where(real, 2.0 * g_real, 0.0)
    acc += scale * a
    tl.store(dA_ptr + b * stride_db + rows64[:, None] * stride_dr + cols64[None, :] * stride_dc,
             acc.to(dA_ptr.dtype.element_ty), mask=tile_ok)


def adjacency_bwd(adj: torch.Tensor, S: torch.Tensor, G: Optional[torch.Tensor], mask, fin, aux,
                  gq, gent, glink, gentl, C: int, mode: int, per_graph: bool, parts: int,
                  block_m: Optional[int] = None, block_n: Optional[int] = None,
                  block_k: Optional[int] = None) -> torch.Tensor:
    """Launch ``adjacency_bwd_kernel``: dA [B, N, N] in adj's dtype (floating adj only)."""
    B, N, c_pad = S.shape
    cfg = adjacency_grad_config(N, block_m, block_n, block_k)
    Sc = S[:, :, :C]
    # W = S G: one small batched product (levels >= 1 only), in torch
    W = torch.bmm(Sc, G.to(torch.float32)) if G is not None else torch.zeros_like(Sc)
    dA = torch.empty((B, N, N), device=S.device, dtype=adj.dtype)
    mask_u8 = mask.view(torch.uint8) if mask is not None else S

    def opt(t):
        return t if t is not None else fin

    grid = (B, cdiv(N, cfg.block_m), cdiv(N, cfg.block_n))
    adjacency_bwd_kernel[grid](
        adj, W, S, mask_u8, fin, aux, opt(gq), opt(gent), opt(glink), opt(gentl), dA,
        B, N, C, *grad_strides(gq, gent, glink, gentl),
        adj.stride(0), adj.stride(1), adj.stride(2),
        W.stride(0), W.stride(1), W.stride(2),
        mask_u8.stride(0) if mask is not None else 0,
        dA.stride(0), dA.stride(1), dA.stride(2),
        HAS_MASK=mask is not None, HAS_GQ=gq is not None, HAS_GENT=gent is not None,
        HAS_GLINK=glink is not None, HAS_GENTL=gentl is not None, MODE=mode, PER_GRAPH=per_graph,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, C_PAD=c_pad, PARTS=parts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return dA
