"""Row passes over the soft assignment S: the forward softmax and the fused backward.

Per graph b, node i (row), cluster c (column); C clusters padded to a power of two ``C_PAD``
so that one program holds whole rows of S, which both the softmax and its backward need. S, A S
and A^T S are kept as [B, N, C_PAD] fp32 (padded columns 0): rows start on 64-byte boundaries and
every load of them is a full vector, which is what lets Triton pipeline them into shared memory.

Forward (``assignment_fwd``)::

    P_i   = softmax(L_i)                 L = s, the assignment logits [N, C]; precise exp
    S_i   = m_i * P_i                    rows of padded nodes are exactly 0 (NaN * 0 stays NaN)
    S     = S0 + S1 (+ S2)               bf16 parts for the products (kernels/split.py)
    ent_b = sum_i sum_c -S_ic log(S_ic + 1e-15),    n_b = sum_i m_i   (partial sums)

Bytes: reads L once, writes S (fp32) and its parts (bf16): 4 + 2 PARTS bytes per entry.

Backward (``assignment_bwd``), with upstream g_out [C, F], G = dL/dA' [C, C] and the per-graph
scales g_Q (link) and g_E (entropy) from ``finish.grad_scales``::

    dS = X g_out^T + (A S)(G^T - 2 g_Q I) + (A^T S)(G - 2 g_Q I) + 4 g_Q S (S^T S)
         - g_E (log(S + eps) + S / (S + eps))
    dP = m * dS                          a product: a NaN in x on a padded row propagates, as PyG
    dL = P * (dP - rowsum(P * dP))       softmax backward (S stands for P: equal on real rows,
                                         dP = 0 on padded ones)
    dX = S g_out

For a graph whose A is symmetric, A^T S = A S and the two middle terms are one product with
G^T + G - 4 g_Q I. The C x C right-hand factors are built in the kernel from G, S^T S and g_Q, so
the backward makes no torch arithmetic. Every product is a split product (kernels/split.py).
Bytes: reads X, S, A S (and A^T S for a non-symmetric graph) once, writes dL and dX once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import cdiv, next_pow2, register_cap
from .finish import grad_scales, grad_strides
from .split import dot_f32, precise_exp, precise_log, split_bf16

EPS = 1e-15
#: the largest cluster count one program's rows can hold (C_PAD); beyond it, the torch path.
MAX_C_PAD = 512


def cluster_pad(C: int) -> int:
    """C padded to the power of two (>= 16, the smallest ``tl.dot`` tile) that blocks use."""
    return max(16, next_pow2(C))


class RowConfig(NamedTuple):
    block_n: int  # rows of S per program
    block_k: int  # chunk of the reduced dimension (F or C) in the backward products
    num_warps: int
    num_stages: int
    block_c: int = 0  # backward: output clusters per step (C_PAD: all at once)


# C_PAD -> (block_n, num_warps) of the forward row pass: a few block_n x C_PAD fp32 tiles live,
# <= 16 values a thread each
_ROW_FWD_TABLE = {16: (64, 4), 32: (64, 4), 64: (32, 4), 128: (32, 8), 256: (16, 8), 512: (16, 16)}


def row_fwd_config(N: int, c_pad: int, block_n: Optional[int] = None) -> RowConfig:
    """Forward row pass (``_ROW_FWD_TABLE``); block_n no taller than N's bucket."""
    bn, num_warps = _ROW_FWD_TABLE[c_pad]
    if block_n is None:
        block_n = min(bn, max(16, next_pow2(N)))
    return RowConfig(block_n, 0, num_warps, 1)


# C_PAD -> (block_n, block_k, num_warps, num_stages, block_c) of the backward row pass. 64 rows:
# the smallest M of a Hopper warp-group product. From 128 clusters on, the output columns are
# taken 64 at a time (block_c; dP waits in a scratch buffer for its row sums): the epilogue's
# [64, C] tiles (dS, S, the entropy term, dP) spilled at 128 on sm_80 and sm_90, at 64 none does
# (``diffpool-fast compile-check``).
_ROW_BWD_TABLE = {
    16: (64, 16, 4, 2, 16),
    32: (64, 32, 4, 2, 32),
    64: (64, 16, 8, 2, 64),
    128: (64, 16, 8, 2, 64),
    256: (64, 16, 8, 2, 64),
    512: (64, 16, 8, 2, 64),
}


def row_bwd_config(N: int, c_pad: int, block_n: Optional[int] = None,
                   block_k: Optional[int] = None) -> RowConfig:
    """Block sizes of the backward row pass (``_ROW_BWD_TABLE``); block_n is at least 16 and
    no taller than N's bucket."""
    bn, bk, num_warps, num_stages, bc = _ROW_BWD_TABLE[c_pad]
    if block_n is None:
        block_n = min(bn, max(16, next_pow2(N)))
    return RowConfig(block_n, block_k or bk, num_warps, num_stages, min(bc, c_pad))


def row_configs():
    """Every (C_PAD, forward config, backward config) the launch helpers can pick, for the
    ahead-of-time compile check (N buckets: 16, 32 and larger)."""
    out = []
    for c_pad in (16, 32, 64, 128, 256, 512):
        for N in (16, 32, 4096):
            item = (c_pad, row_fwd_config(N, c_pad), row_bwd_config(N, c_pad))
            if item not in out:
                out.append(item)
    return out


@triton.jit(do_not_specialize=["N", "C", "W"])
def assignment_fwd_kernel(
    logit_ptr, mask_ptr, nc_ptr, S_ptr, Sp_ptr, work_ptr,
    N, C, W, col_ent, col_cnt, plane,
    stride_lb, stride_ln, stride_lc,
    stride_mb,
    HAS_MASK: tl.constexpr, HAS_NC: tl.constexpr, BLOCK_N: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr,
):
    """S = m * softmax(L) for BLOCK_N rows of graph b, its bf16 parts, and partial sums.

    Grid (B, cdiv(N, BLOCK_N)). logit_ptr: L [B, N, C] in any float dtype and strides;
    mask_ptr: m [B, N] as uint8 (read only when HAS_MASK); nc_ptr: k [B] int32, graph b's
    cluster count (HAS_NC): the softmax runs over columns < k_b and S is 0 past them; S_ptr:
    S [B, N, C_PAD] fp32; Sp_ptr: [PARTS, B, N, C_PAD] bf16 (``plane`` = B N C_PAD apart);
    work_ptr: [B, W] fp32, this program's entropy at column col_ent + pid, its real rows at
    col_cnt + pid.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, C_PAD)
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    col_real = col_ok
    if HAS_NC:
        col_real = col_ok & (cols < tl.load(nc_ptr + b))

    L = tl.load(
        logit_ptr + b * stride_lb + rows64[:, None] * stride_ln + cols[None, :] * stride_lc,
        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    # Padding columns take no softmax mass; rows past N keep a finite max (0).
    L = tl.where(col_real[None, :], L, float("-inf"))
    row_max = tl.max(L, axis=1)
    e = precise_exp(L - row_max[:, None])
    P = e / tl.sum(e, axis=1)[:, None]
    keep = row_ok
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + rows64, mask=row_ok, other=0)
        keep = keep & (m != 0)
    keep_f = keep.to(tl.float32)
    # m * P as a product: a NaN logit on a padded row stays NaN (NaN * 0), as in PyTorch/PyG
    S = tl.where(col_real[None, :], P * keep_f[:, None], 0.0)
    off = b * N * C_PAD + rows64[:, None] * C_PAD + cols[None, :]
    tl.store(S_ptr + off, S, mask=row_ok[:, None])
    s0, s1, s2 = split_bf16(S, PARTS)
    tl.store(Sp_ptr + off, s0, mask=row_ok[:, None])
    tl.store(Sp_ptr + plane + off, s1, mask=row_ok[:, None])
    if PARTS == 3:
        tl.store(Sp_ptr + 2 * plane + off, s2, mask=row_ok[:, None])

    ent = tl.sum(tl.sum(-S * precise_log(S + 1e-15), axis=1), axis=0)
    tl.store(work_ptr + b * W + col_ent + pid_n, ent)
    tl.store(work_ptr + b * W + col_cnt + pid_n, tl.sum(keep_f, axis=0))


def assignment_fwd(s: torch.Tensor, mask: Optional[torch.Tensor], num_clusters: Optional[torch.Tensor],
                   work: torch.Tensor, col_ent: int, col_cnt: int, parts: int,
                   block_n: Optional[int] = None):
    """Launch ``assignment_fwd_kernel``: returns (S [B, N, C_PAD] fp32, Sp [PARTS, B, N, C_PAD]
    bf16). Partial sums go to ``work`` (``finish.Workspace``: cdiv(N, block_n) columns each).

    num_clusters: [B] integer k_b in [1, C] (checked by the caller), or None."""
    B, N, C = s.shape
    c_pad = cluster_pad(C)
    cfg = row_fwd_config(N, c_pad, block_n)
    S = torch.empty((B, N, c_pad), device=s.device, dtype=torch.float32)
    Sp = torch.empty((parts, B, N, c_pad), device=s.device, dtype=torch.bfloat16)
    mask_u8 = mask.view(torch.uint8) if mask is not None else S
    nc = num_clusters if num_clusters is not None else S
    assignment_fwd_kernel[(B, cdiv(N, cfg.block_n))](
        s, mask_u8, nc, S, Sp, work,
        N, C, work.shape[1], col_ent, col_cnt, B * N * c_pad,
        s.stride(0), s.stride(1), s.stride(2),
        mask_u8.stride(0) if mask is not None else 0,
        HAS_MASK=mask is not None, HAS_NC=num_clusters is not None, BLOCK_N=cfg.block_n, C_PAD=c_pad,
        PARTS=parts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return S, Sp


def row_blocks(N: int, C: int, block_n: Optional[int] = None) -> int:
    """Programs per graph of the forward row pass (partial-sum columns it writes)."""
    return cdiv(N, row_fwd_config(N, cluster_pad(C), block_n).block_n)


@triton.jit
def _dp_chunk(cols, b, rows64, row_ok, nc_base, x_ptr, S_ptr, AS_ptr, AtS_ptr, D_ptr, StS_ptr, g_out_ptr, G_ptr,
              C, F, asym, g_q, g_d, g_e, keep_f, flagged,
              stride_xb, stride_xn, stride_xf, stride_gob, stride_goc, stride_gof, stride_Gb, stride_Gr, stride_Gc,
              HAS_D: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_G: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr,
              PARTS: tl.constexpr):
    """(dP, S) of BLOCK_N rows at the output clusters ``cols`` (module docstring: dS, then
    dP = m * dS)."""
    col_ok = cols < C
    dS = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    if HAS_GOUT:
        # X g_out^T, chunked over F
        for f0 in range(0, F, BLOCK_K):
            fs = f0 + tl.arange(0, BLOCK_K)
            f_ok = fs < F
            xt = tl.load(x_ptr + b * stride_xb + rows64[:, None] * stride_xn + fs[None, :] * stride_xf,
                         mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            got = tl.load(g_out_ptr + b * stride_gob + cols[None, :] * stride_goc + fs[:, None] * stride_gof,
                          mask=f_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            dS = dot_f32(xt, got, dS, PARTS)
    # (A S) H1 + S H3 (+ (A^T S) H2), chunked over the reduced cluster index k:
    # H1 = G^T - 2 g_Q I (+ H2 when A_b is symmetric), H2 = G - 2 g_Q I, H3 = 4 g_Q S^T S
    sym_f = (asym == 0).to(tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        nk = nc_base + rows64[:, None] * C_PAD + ks[None, :]
        h1 = -2.0 * g_q * (1.0 + sym_f) * tl.where(ks[:, None] == cols[None, :], 1.0, 0.0)
        if HAS_G:
            kc_ok = k_ok[:, None] & col_ok[None, :]
            Gt = tl.load(G_ptr + b * stride_Gb + cols[None, :] * stride_Gr + ks[:, None] * stride_Gc,
                         mask=kc_ok, other=0.0).to(tl.float32)
            Gk = tl.load(G_ptr + b * stride_Gb + ks[:, None] * stride_Gr + cols[None, :] * stride_Gc,
                         mask=kc_ok & (asym == 0), other=0.0).to(tl.float32)
            h1 += Gt + Gk
        ast = tl.load(AS_ptr + nk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dS = dot_f32(ast, h1, dS, PARTS)
    # S H3 in a loop of its own: one operand pair live at a time (registers)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        h3 = 4.0 * g_q * tl.load(StS_ptr + b * C_PAD * C_PAD + ks[:, None] * C_PAD + cols[None, :],
                                 mask=k_ok[:, None], other=0.0)
        st = tl.load(S_ptr + nc_base + rows64[:, None] * C_PAD + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dS = dot_f32(st, h3, dS, PARTS)
    # A^T S exists only for graphs flagged non-symmetric: the loop is empty otherwise.
    for k0 in range(0, C * asym, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        h2 = -2.0 * g_q * tl.where(ks[:, None] == cols[None, :], 1.0, 0.0)
        if HAS_G:
            h2 += tl.load(G_ptr + b * stride_Gb + ks[:, None] * stride_Gr + cols[None, :] * stride_Gc,
                          mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        atst = tl.load(AtS_ptr + nc_base + rows64[:, None] * C_PAD + ks[None, :],
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dS = dot_f32(atst, h2, dS, PARTS)
    if HAS_D:
        d = tl.load(D_ptr + nc_base + rows64[:, None] * C_PAD + cols[None, :],
                    mask=row_ok[:, None] & flagged, other=0.0)
        dS += -2.0 * g_d * d
    # S is loaded only now: keeping it live through the loops costs registers.
    S = tl.load(S_ptr + nc_base + rows64[:, None] * C_PAD + cols[None, :], mask=row_ok[:, None], other=0.0)
    dS -= g_e * (precise_log(S + 1e-15) + S / (S + 1e-15))
    # On real rows P == S; on padded rows dP == 0 (NaN * 0 stays NaN, as in PyG), so S for P is exact.
    return dS * keep_f[:, None], S


@triton.jit(do_not_specialize=["B", "N", "C", "F", "sg_q", "sg_e", "sg_l", "sg_el"])
def assignment_bwd_kernel(
    x_ptr, S_ptr, AS_ptr, AtS_ptr, D_ptr, asym_ptr, mask_ptr, StS_ptr,
    g_out_ptr, G_ptr, fin_ptr, aux_ptr, gq_ptr, gent_ptr, glink_ptr, gentl_ptr,
    dL_ptr, dX_ptr, dP_ptr,
    B, N, C, F, sg_q, sg_e, sg_l, sg_el,
    stride_xb, stride_xn, stride_xf,
    stride_mb,
    stride_gob, stride_goc, stride_gof,
    stride_Gb, stride_Gr, stride_Gc,
    stride_dlb, stride_dln, stride_dlc,
    stride_dxb, stride_dxn, stride_dxf,
    HAS_MASK: tl.constexpr, NEED_DL: tl.constexpr, NEED_DX: tl.constexpr, HAS_D: tl.constexpr,
    HAS_GOUT: tl.constexpr, HAS_G: tl.constexpr,
    HAS_GQ: tl.constexpr, HAS_GENT: tl.constexpr, HAS_GLINK: tl.constexpr, HAS_GENTL: tl.constexpr,
    MODE: tl.constexpr, PER_GRAPH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr,
):
    """dL (logit gradient) and dX for BLOCK_N rows of graph b, one pass (module docstring).

    Grid (B, cdiv(N, BLOCK_N)). x_ptr: X [B, N, F] any float dtype and strides; S_ptr, AS_ptr,
    AtS_ptr: [B, N, C_PAD] fp32; D_ptr: the direct (R + R^T) S [B, N, C_PAD] fp32 of graphs whose
    link was recomputed directly (fin[b, 3] = 1; HAS_D): for them dQ/dS = -2 D replaces the
    identity's terms; asym_ptr: [B] int32, 1 where A_b is not symmetric (only then is A^T S
    read); mask_ptr: m [B, N] uint8; StS_ptr: [B, C_PAD, C_PAD] fp32; g_out_ptr: [B, C, F]
    (HAS_GOUT), G_ptr: [B, C, C] (HAS_G), any float dtype and strides; fin_ptr, aux_ptr and the
    four upstream loss gradients: ``finish.grad_scales``. dL_ptr: [B, N, C] in s's dtype; dX_ptr:
    [B, N, F] in x's dtype. BLOCK_K: chunk of F and of C in the products. When BLOCK_C < C_PAD
    the output columns are taken BLOCK_C at a time and dP waits in dP_ptr [B, N, C_PAD] fp32
    until the row sums of S dP are complete.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    nc_base = b * N * C_PAD

    if NEED_DL:
        g_all, g_real, g_e = grad_scales(b, B, N, fin_ptr, aux_ptr, gq_ptr, gent_ptr, glink_ptr, gentl_ptr,
                                         (sg_q, sg_e, sg_l, sg_el), HAS_GQ, HAS_GENT, HAS_GLINK, HAS_GENTL,
                                         MODE, PER_GRAPH)
        g_q = g_all + g_real
        g_d = 0.0
        flagged = g_q != g_q  # False (a tensor, for the masks below)
        if HAS_D:
            # flagged graph: its link term comes from D, not from the identity's products
            flagged = tl.load(fin_ptr + b * 4 + 3).to(tl.int32) != 0
            g_d = tl.where(flagged, g_q, 0.0)
            g_q = tl.where(flagged, 0.0, g_q)
        asym = tl.load(asym_ptr + b)
        keep = row_ok
        if HAS_MASK:
            m = tl.load(mask_ptr + b * stride_mb + rows64, mask=row_ok, other=0)
            keep = keep & (m != 0)
        keep_f = keep.to(tl.float32)
        if BLOCK_C == C_PAD:
            cols = tl.arange(0, C_PAD)
            dP, S = _dp_chunk(cols, b, rows64, row_ok, nc_base, x_ptr, S_ptr, AS_ptr, AtS_ptr, D_ptr, StS_ptr,
                              g_out_ptr, G_ptr, C, F, asym, g_q, g_d, g_e, keep_f, flagged,
                              stride_xb, stride_xn, stride_xf, stride_gob, stride_goc, stride_gof,
                              stride_Gb, stride_Gr, stride_Gc, HAS_D, HAS_GOUT, HAS_G,
                              BLOCK_N, BLOCK_K, BLOCK_C, C_PAD, PARTS)
            dL = S * (dP - tl.sum(S * dP, axis=1)[:, None])
            tl.store(dL_ptr + b * stride_dlb + rows64[:, None] * stride_dln + cols[None, :] * stride_dlc,
                     dL.to(dL_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < C)[None, :])
        else:
            r = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, C_PAD, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                dP, S = _dp_chunk(cols, b, rows64, row_ok, nc_base, x_ptr, S_ptr, AS_ptr, AtS_ptr, D_ptr, StS_ptr,
                                  g_out_ptr, G_ptr, C, F, asym, g_q, g_d, g_e, keep_f, flagged,
                                  stride_xb, stride_xn, stride_xf, stride_gob, stride_goc, stride_gof,
                                  stride_Gb, stride_Gr, stride_Gc, HAS_D, HAS_GOUT, HAS_G,
                                  BLOCK_N, BLOCK_K, BLOCK_C, C_PAD, PARTS)
                r += tl.sum(S * dP, axis=1)
                tl.store(dP_ptr + nc_base + rows64[:, None] * C_PAD + cols[None, :], dP, mask=row_ok[:, None])
            for c0 in range(0, C_PAD, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                off = nc_base + rows64[:, None] * C_PAD + cols[None, :]
                dP = tl.load(dP_ptr + off, mask=row_ok[:, None], other=0.0)
                S = tl.load(S_ptr + off, mask=row_ok[:, None], other=0.0)
                dL = S * (dP - r[:, None])
                tl.store(dL_ptr + b * stride_dlb + rows64[:, None] * stride_dln + cols[None, :] * stride_dlc,
                         dL.to(dL_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < C)[None, :])

    if NEED_DX:
        # dX = S g_out, chunked over F (output) and over the clusters (reduced)
        for f0 in range(0, F, BLOCK_K):
            fs = f0 + tl.arange(0, BLOCK_K)
            f_ok = fs < F
            dx = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            if HAS_GOUT:
                for c0 in range(0, C_PAD, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    S = tl.load(S_ptr + nc_base + rows64[:, None] * C_PAD + cols[None, :],
                                mask=row_ok[:, None], other=0.0)
                    go = tl.load(g_out_ptr + b * stride_gob + cols[:, None] * stride_goc + fs[None, :] * stride_gof,
                                 mask=(cols < C)[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
                    dx = dot_f32(S, go, dx, PARTS)
            tl.store(
                dX_ptr + b * stride_dxb + rows64[:, None] * stride_dxn + fs[None, :] * stride_dxf,
                dx.to(dX_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :],
            )


def assignment_bwd(x, S, AS, AtS, D, asym, mask, StS, g_out, G, fin, aux, gq, gent, glink, gentl,
                   need_dl: bool, need_dx: bool, s_dtype: torch.dtype, C: int, mode: int, per_graph: bool,
                   parts: int, block_n: Optional[int] = None, block_k: Optional[int] = None):
    """Launch ``assignment_bwd_kernel``: returns (dL [B, N, C] in s_dtype or None, dX or None).

    AtS may be any [B, N, C_PAD] fp32 tensor when no graph has asym == 1 (it is then never read);
    D: the flagged graphs' direct (R + R^T) S (``adjacency.link_residual_bwd``), or None.
    g_out, G, gq, gent, glink, gentl: upstream gradients, None where none came.
    """
    B, N, c_pad = S.shape
    F = x.shape[2]
    cfg = row_bwd_config(N, c_pad, block_n, block_k)
    block_c = cfg.block_c
    # when the columns come block_c at a time, dP waits here for its row sums (kernel docstring)
    dP = torch.empty((B, N, c_pad), device=S.device, dtype=torch.float32) if need_dl and block_c < c_pad else S
    dL = torch.empty((B, N, C), device=S.device, dtype=s_dtype) if need_dl else None
    dX = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dl_arg = dL if need_dl else S
    dx_arg = dX if need_dx else x
    mask_u8 = mask.view(torch.uint8) if mask is not None else S
    go = g_out if g_out is not None else S
    Gm = G if G is not None else S

    def opt(t):
        return t if t is not None else fin

    assignment_bwd_kernel[(B, cdiv(N, cfg.block_n))](
        x, S, AS, AtS, D if D is not None else S, asym, mask_u8, StS,
        go, Gm, fin, aux, opt(gq), opt(gent), opt(glink), opt(gentl),
        dl_arg, dx_arg, dP,
        B, N, C, F, *grad_strides(gq, gent, glink, gentl),
        x.stride(0), x.stride(1), x.stride(2),
        mask_u8.stride(0) if mask is not None else 0,
        go.stride(0), go.stride(1), go.stride(2),
        Gm.stride(0), Gm.stride(1), Gm.stride(2),
        dl_arg.stride(0), dl_arg.stride(1), dl_arg.stride(2),
        dx_arg.stride(0), dx_arg.stride(1), dx_arg.stride(2),
        HAS_MASK=mask is not None, NEED_DL=need_dl, NEED_DX=need_dx, HAS_D=D is not None,
        HAS_GOUT=g_out is not None, HAS_G=G is not None,
        HAS_GQ=gq is not None, HAS_GENT=gent is not None, HAS_GLINK=glink is not None,
        HAS_GENTL=gentl is not None, MODE=mode, PER_GRAPH=per_graph,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_C=block_c, C_PAD=c_pad, PARTS=parts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return dL, dX
