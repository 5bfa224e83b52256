"""Row passes over the soft assignment S: the forward softmax and the fused backward.

Per graph b, node i (row), cluster c (column); C clusters padded to a power of two ``C_PAD``
so that one program holds whole rows of S, which both the softmax and its backward need.

Forward (``assignment_fwd``)::

    P_i   = softmax(L_i)                 L = s, the assignment logits [N, C]
    S_i   = m_i * P_i                    rows of padded nodes are exactly 0
    ent_b = sum_i sum_c -S_ic log(S_ic + 1e-15)

Backward (``assignment_bwd``), with upstream g_out [C, F] and the C x C matrices H1, H2, H3
prepared on the host (see ``diffpool_fast.coarsen_triton``)::

    dS = X g_out^T + (A S) H1 + (A^T S) H2 + S H3 + g_ent * -(log(S + eps) + S / (S + eps))
    dP = m * dS
    dL = P * (dP - rowsum(P * dP))       softmax backward, 0 on padded rows
    dX = S g_out                         0 on padded rows because S is

so the softmax backward, the entropy gradient and the sum of every contribution into dL are one
pass over the rows. Bytes: reads X, S, AS (and A^T S for a non-symmetric graph) once, writes
dL and dX once: O(N (C + F)) per graph.

Dot precision (backward only; the forward has no dot): every ``tl.dot`` multiplies an
O(N x C) operand by a small C x C or C x F matrix, so the pass is memory-bound on an H100 even
at a third of the tf32 rate. It uses ``tf32x3`` (about fp32 accuracy) up to C_PAD = 128. Above,
it follows the caller's ``input_precision`` (PyTorch's matmul precision, chosen in
``diffpool_fast.ops.coarsen_triton``): ``tf32`` for "high"/"medium"; for "highest" tf32x3 still,
for dL only, with dX = S g_out as a torch matmul (the fused pass spills registers there, see
``_ROW_BWD_TABLE``).
Accumulation is always fp32.

Padded rows: S = m * P is a product, not a select, so a NaN logit of a padded node propagates
(NaN * 0), as in PyTorch and PyG.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import register_cap

EPS = 1e-15
#: the largest cluster count one program's rows can hold (C_PAD); beyond it, the torch path.
MAX_C_PAD = 512


def cluster_pad(C: int) -> int:
    """C padded to the power of two (>= 16, the smallest ``tl.dot`` tile) that blocks use."""
    return max(16, triton.next_power_of_2(C))


class RowConfig(NamedTuple):
    block_n: int  # rows of S per program
    block_k: int  # chunk of the reduced dimension (F or C) in the backward dots
    num_warps: int
    num_stages: int
    dot_precision: str  # backward only; see ``row_bwd_config``
    split: bool = False  # backward only: the kernel for dL only, dX in torch (``_ROW_BWD_TABLE``)


def row_fwd_config(N: int, c_pad: int, block_n: Optional[int] = None) -> RowConfig:
    """Block sizes of the forward row pass, keyed on C_PAD and bucketed N (never N itself).

    The softmax keeps a few block_n x C_PAD fp32 tiles live; <= 8 values a thread each keeps
    it free of spills for every input dtype (16 spilled at fp16 on sm_90; checked by
    ``diffpool-fast compile-check``). 16 rows is the minimum.
    """
    num_warps = 4 if c_pad <= 64 else 8 if c_pad <= 256 else 16
    if block_n is None:
        block_n = max(16, min(64, 8 * 32 * num_warps // c_pad))
        block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    return RowConfig(block_n, 0, num_warps, 1, "")


#: the caller's precision modes (``input_precision`` of ``assignment_bwd``): "tf32x3" asks for
#: fp32-grade products (torch's "highest"), "tf32" allows tf32 ("high", "medium")
ROW_PRECISION_MODES = ("tf32", "tf32x3")

# C_PAD -> (block_n, block_k, num_warps, num_stages, (dot precision, split) when fp32-grade is
# asked, dot precision when tf32 is allowed) of the backward row pass. tf32x3 splits every
# operand in two; past C_PAD = 128 the pass holding both dL and dX then spills on sm_80/sm_90
# whatever the tile (so does plain fp32 FMA, ``ieee``), and so does the dX half alone (its
# S [BLOCK_N, C_PAD] operand), while the dL half does not: there fp32-grade runs the kernel for
# dL only (``split``) and dX = S g_out as one torch matmul; tf32 (operands rounded to 10
# mantissa bits, fp32 accumulation) runs the fused pass.
_ROW_BWD_TABLE = {
    16: (64, 16, 4, 1, ("tf32x3", False), "tf32x3"),
    32: (64, 16, 4, 1, ("tf32x3", False), "tf32x3"),
    64: (32, 16, 4, 1, ("tf32x3", False), "tf32x3"),
    128: (16, 16, 8, 1, ("tf32x3", False), "tf32x3"),
    256: (16, 16, 8, 1, ("tf32x3", True), "tf32"),
    512: (16, 16, 8, 1, ("tf32x3", True), "tf32"),
}


def row_bwd_config(N: int, c_pad: int, block_n: Optional[int] = None,
                   block_k: Optional[int] = None, input_precision: str = "tf32x3") -> RowConfig:
    """Block sizes and dot precision of the backward row pass (``_ROW_BWD_TABLE``);
    ``input_precision``: one of ``ROW_PRECISION_MODES``."""
    if input_precision not in ROW_PRECISION_MODES:
        raise ValueError(f"input_precision must be one of {ROW_PRECISION_MODES}, got {input_precision!r}")
    bn, bk, num_warps, num_stages, (prec_full, split_full), prec_fast = _ROW_BWD_TABLE[c_pad]
    prec, split = (prec_full, split_full) if input_precision == "tf32x3" else (prec_fast, False)
    if block_n is None:
        block_n = min(bn, max(16, triton.next_power_of_2(N)))
        if block_n * c_pad <= 256:  # ptxas spilled the 16 x 16 tile at 4 warps
            num_warps = 2
    return RowConfig(block_n, block_k or bk, num_warps, num_stages, prec, split)


def row_configs():
    """Every (C_PAD, forward config, backward config) the launch helpers can pick, for the
    ahead-of-time compile check (N buckets: 16, 32, 64 and larger; both precision modes)."""
    out = []
    for c_pad in (16, 32, 64, 128, 256, 512):
        for N in (16, 32, 64, 4096):
            for mode in ROW_PRECISION_MODES:
                item = (c_pad, row_fwd_config(N, c_pad), row_bwd_config(N, c_pad, input_precision=mode))
                if item not in out:
                    out.append(item)
    return out


@triton.jit(do_not_specialize=["N", "C", "n_blocks"])
def assignment_fwd_kernel(
    logit_ptr, mask_ptr, nc_ptr, S_ptr, ent_part_ptr,
    N, C, n_blocks,
    stride_lb, stride_ln, stride_lc,
    stride_mb,
    HAS_MASK: tl.constexpr, HAS_NC: tl.constexpr, BLOCK_N: tl.constexpr, C_PAD: tl.constexpr,
):
    """S = m * softmax(L) for BLOCK_N rows of graph b, and their entropy.

    Grid (B, cdiv(N, BLOCK_N)). logit_ptr: L [B, N, C] in any float dtype and strides;
    mask_ptr: m [B, N] as uint8 (read only when HAS_MASK); nc_ptr: k [B] int32, graph b's
    cluster count (read only when HAS_NC): the softmax runs over columns < k_b and S is 0 past
    them; S_ptr: S [B, N, C] fp32, contiguous; ent_part_ptr: [B, n_blocks] fp32, this program's
    sum of -S log(S + eps).
    """
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, C_PAD)
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # the graph's own clusters: columns past k_b take no softmax mass (k_b >= 1, checked)
    col_real = col_ok
    if HAS_NC:
        k_b = tl.load(nc_ptr + b)
        col_real = col_ok & (cols < k_b)

    L = tl.load(
        logit_ptr + b * stride_lb + rows64[:, None] * stride_ln + cols[None, :] * stride_lc,
        mask=tile_ok, other=0.0,
    ).to(tl.float32)
    # Padding columns must not take softmax mass; rows past N keep a finite max (0).
    L = tl.where(col_real[None, :], L, float("-inf"))
    row_max = tl.max(L, axis=1)
    e = tl.exp(L - row_max[:, None])
    P = e / tl.sum(e, axis=1)[:, None]
    keep = row_ok
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + rows64, mask=row_ok, other=0)
        keep = keep & (m != 0)
    # m * P as a product: a NaN logit on a padded row stays NaN (NaN * 0), as in PyTorch/PyG;
    # rows past N loaded 0 logits, so their P is finite and their S 0.
    S = tl.where(col_real[None, :], P * keep.to(tl.float32)[:, None], 0.0)
    tl.store(S_ptr + b * N * C + rows64[:, None] * C + cols[None, :], S, mask=tile_ok)

    ent = tl.sum(tl.sum(-S * tl.log(S + 1e-15), axis=1), axis=0)
    tl.store(ent_part_ptr + b * n_blocks + pid_n, ent)


def assignment_fwd(s: torch.Tensor, mask: Optional[torch.Tensor], block_n: Optional[int] = None,
                   num_clusters: Optional[torch.Tensor] = None):
    """Launch ``assignment_fwd_kernel``: returns (S [B,N,C] fp32, ent_sum [B] float64).

    block_n overrides the row block (tests force it to reach every branch). num_clusters: [B]
    integer k_b in [1, C] (checked by the caller), or None for all C columns.
    """
    B, N, C = s.shape
    c_pad = cluster_pad(C)
    cfg = row_fwd_config(N, c_pad, block_n)
    n_blocks = triton.cdiv(N, cfg.block_n)
    S = torch.empty((B, N, C), device=s.device, dtype=torch.float32)
    ent_part = torch.empty((B, n_blocks), device=s.device, dtype=torch.float32)
    mask_u8 = mask.view(torch.uint8) if mask is not None else S
    nc = num_clusters.to(torch.int32).contiguous() if num_clusters is not None else ent_part
    assignment_fwd_kernel[(B, n_blocks)](
        s, mask_u8, nc, S, ent_part,
        N, C, n_blocks,
        s.stride(0), s.stride(1), s.stride(2),
        mask_u8.stride(0) if mask is not None else 0,
        HAS_MASK=mask is not None, HAS_NC=num_clusters is not None, BLOCK_N=cfg.block_n, C_PAD=c_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return S, ent_part.to(torch.float64).sum(dim=1)


@triton.jit(do_not_specialize=["N", "C", "F"])
def assignment_bwd_kernel(
    x_ptr, S_ptr, AS_ptr, AtS_ptr, asym_ptr, mask_ptr,
    g_out_ptr, H1_ptr, H2_ptr, H3_ptr, g_ent_ptr,
    dL_ptr, dX_ptr,
    N, C, F,
    stride_xb, stride_xn, stride_xf,
    stride_mb,
    stride_dlb, stride_dln, stride_dlc,
    stride_dxb, stride_dxn, stride_dxf,
    HAS_MASK: tl.constexpr, NEED_DL: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, C_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dL (logit gradient) and dX for BLOCK_N rows of graph b, one pass (see module docstring).

    Grid (B, cdiv(N, BLOCK_N)). x_ptr: X [B, N, F] any float dtype and strides; S_ptr, AS_ptr,
    AtS_ptr: [B, N, C] fp32 contiguous; asym_ptr: [B] int32, 1 where A_b is not symmetric (only
    then is A^T S read; else H1 already holds H1 + H2); mask_ptr: m [B, N] uint8; g_out_ptr:
    [B, C, F] fp32 contiguous; H1/H2/H3_ptr: [B, C, C] fp32 contiguous; g_ent_ptr: [B] fp32.
    dL_ptr: [B, N, C] in s's dtype; dX_ptr: [B, N, F] in x's dtype. BLOCK_K: chunk of F and
    of C in the dots; C_PAD: C rounded up to a power of two.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, C_PAD)
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    nc_base = b * N * C
    cc_base = b * C * C
    S_rows = S_ptr + nc_base + rows64[:, None] * C + cols[None, :]

    if NEED_DL:
        dS = tl.zeros((BLOCK_N, C_PAD), dtype=tl.float32)
        # X g_out^T, chunked over F
        for f0 in range(0, F, BLOCK_K):
            fs = f0 + tl.arange(0, BLOCK_K)
            f_ok = fs < F
            xt = tl.load(
                x_ptr + b * stride_xb + rows64[:, None] * stride_xn + fs[None, :] * stride_xf,
                mask=row_ok[:, None] & f_ok[None, :], other=0.0,
            ).to(tl.float32)
            got = tl.load(
                g_out_ptr + b * C * F + cols[None, :] * F + fs[:, None],
                mask=f_ok[:, None] & col_ok[None, :], other=0.0,
            )
            dS = tl.dot(xt, got, dS, input_precision=DOT_PRECISION)
        # (A S) H1 + (A^T S) H2 + S H3, chunked over the reduced cluster index k
        asym = tl.load(asym_ptr + b)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            nk_off = nc_base + rows64[:, None] * C + ks[None, :]
            nk_ok = row_ok[:, None] & k_ok[None, :]
            kc_off = cc_base + ks[:, None] * C + cols[None, :]
            kc_ok = k_ok[:, None] & col_ok[None, :]
            ast = tl.load(AS_ptr + nk_off, mask=nk_ok, other=0.0)
            h1 = tl.load(H1_ptr + kc_off, mask=kc_ok, other=0.0)
            dS = tl.dot(ast, h1, dS, input_precision=DOT_PRECISION)
            st = tl.load(S_ptr + nk_off, mask=nk_ok, other=0.0)
            h3 = tl.load(H3_ptr + kc_off, mask=kc_ok, other=0.0)
            dS = tl.dot(st, h3, dS, input_precision=DOT_PRECISION)
        # A^T S exists only for graphs flagged non-symmetric: the loop is empty otherwise.
        for k0 in range(0, C * asym, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            atst = tl.load(
                AtS_ptr + nc_base + rows64[:, None] * C + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0,
            )
            h2 = tl.load(
                H2_ptr + cc_base + ks[:, None] * C + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :], other=0.0,
            )
            dS = tl.dot(atst, h2, dS, input_precision=DOT_PRECISION)

        # S is loaded only now (and again for dX): keeping it live through the loops spills.
        S = tl.load(S_rows, mask=tile_ok, other=0.0)
        g_ent = tl.load(g_ent_ptr + b)
        dS += g_ent * -(tl.log(S + 1e-15) + S / (S + 1e-15))
        keep = row_ok
        if HAS_MASK:
            m = tl.load(mask_ptr + b * stride_mb + rows64, mask=row_ok, other=0)
            keep = keep & (m != 0)
        # On real rows P == S; on padded rows dP == 0, so using S for P is exact.
        dP = tl.where(keep[:, None] & col_ok[None, :], dS, 0.0)
        dL = S * (dP - tl.sum(S * dP, axis=1)[:, None])
        tl.store(
            dL_ptr + b * stride_dlb + rows64[:, None] * stride_dln + cols[None, :] * stride_dlc,
            dL.to(dL_ptr.dtype.element_ty), mask=tile_ok,
        )

    if NEED_DX:
        S = tl.load(S_rows, mask=tile_ok, other=0.0)
        for f0 in range(0, F, BLOCK_K):
            fs = f0 + tl.arange(0, BLOCK_K)
            f_ok = fs < F
            go = tl.load(
                g_out_ptr + b * C * F + cols[:, None] * F + fs[None, :],
                mask=col_ok[:, None] & f_ok[None, :], other=0.0,
            )
            dx = tl.dot(S, go, input_precision=DOT_PRECISION)
            tl.store(
                dX_ptr + b * stride_dxb + rows64[:, None] * stride_dxn + fs[None, :] * stride_dxf,
                dx.to(dX_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :],
            )


def assignment_bwd(
    x, S, AS, AtS, asym, mask, g_out, H1, H2, H3, g_ent,
    need_dl: bool, need_dx: bool, s_dtype: torch.dtype,
    block_n: Optional[int] = None, block_k: Optional[int] = None,
    input_precision: str = "tf32x3",
):
    """Launch ``assignment_bwd_kernel``: returns (dL [B,N,C] in s_dtype or None, dX or None).

    AtS may be any [B,N,C] fp32 tensor when no graph has asym == 1 (it is then never read).
    block_n / block_k override the row block and the reduction chunk (tests force branches);
    input_precision: "tf32x3" (fp32-grade products) or "tf32" (tf32 allowed), see the module
    docstring.
    """
    B, N, C = S.shape
    F = x.shape[2]
    c_pad = cluster_pad(C)
    cfg = row_bwd_config(N, c_pad, block_n, block_k, input_precision)
    dL = torch.empty((B, N, C), device=S.device, dtype=s_dtype) if need_dl else None
    dX = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dl_arg = dL if need_dl else S
    dx_arg = dX if need_dx else x
    mask_u8 = mask.view(torch.uint8) if mask is not None else S
    if cfg.split:
        # the kernel's dX half (S [BLOCK_N, C_PAD] in one tf32x3 dot) spills here: dX = S g_out is
        # one batched fp32 matmul, in torch (PyTorch's fp32 precision: full fp32 by default)
        if need_dx:
            dX.copy_(torch.bmm(S, g_out))
        if not need_dl:
            return dL, dX
        need_dx = False
    assignment_bwd_kernel[(B, triton.cdiv(N, cfg.block_n))](
        x, S, AS, AtS, asym, mask_u8,
        g_out, H1, H2, H3, g_ent,
        dl_arg, dx_arg,
        N, C, F,
        x.stride(0), x.stride(1), x.stride(2),
        mask_u8.stride(0) if mask is not None else 0,
        dl_arg.stride(0), dl_arg.stride(1), dl_arg.stride(2),
        dx_arg.stride(0), dx_arg.stride(1), dx_arg.stride(2),
        HAS_MASK=mask is not None, NEED_DL=need_dl, NEED_DX=need_dx,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, C_PAD=c_pad,
        DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return dL, dX
