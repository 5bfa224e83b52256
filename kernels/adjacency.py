"""Passes over the adjacency A: the forward product A S with the link-loss terms, A^T S for the
backward of a non-symmetric A, and the adjacency gradient dA.

Forward (``adjacency_fwd``), per graph b, one program per block of BLOCK_M rows of A holding all
C_PAD clusters, so every entry of A is read exactly once::

    (A S)_i    = sum_k A_ik S_k                    [N, C], kept for the backward
    ||A||_F^2  = sum_ik A_ik^2                     per-program partial sums
    asym       = #{(i, k): A_ik != A_ki}           only when CHECK_SYM

With these and tr(S^T A S) = tr(A') from the later S^T (A S) product,
||A - S S^T||_F^2 = ||A||^2 - 2 tr(S^T A S) + ||S^T S||^2 needs no N x N work, and
the backward needs A^T S only for graphs with asym > 0 (A^T S = A S otherwise). The mirrored
tile A[k-block, i-block] that CHECK_SYM compares is the tile another program of the same graph
reads at about the same time, so on a GPU it mostly comes from L2, not HBM. Comparison is exact:
a graph whose A differs from A^T by any rounding is treated as non-symmetric (correct, slower).

The same kernel with A's row and column strides swapped computes A^T S (SKIP_SYMMETRIC: graphs
with asym == 0 skip the loop and store nothing, so the backward reads A only for them).

Bytes: A once (4 N^2 per graph in fp32, N^2 as bool/uint8), S once per row block (from L2),
A S written once. Nothing N x N is written.

Gradient (``adjacency_bwd``)::

    dA = (S H) S^T + two_g * A,    H = G - two_g I,  two_g = 2 g_link_sq

i.e. S G S^T + 2 g (A - S S^T), one read of A and one write of dA, only when A needs a gradient.

Dot precision: the ``input_precision`` argument of every launch helper (a ``DOT_PRECISION``
constexpr of the kernels), which the package picks from ``torch.get_float32_matmul_precision()``
(``diffpool_fast.ops.coarsen_triton.dot_precision``), as PyTorch's own CUDA matmuls do:

- ``"tf32x3"`` under ``"highest"`` (PyTorch's default): each operand split into a tf32 high and
  low part, three tensor-core products, about fp32 accuracy (A as bool/uint8/fp16/bf16 has no
  low part, so S is kept to ~21 bits). These are the O(N^2 C) products: tf32x3 triples the
  tensor work, which makes A S compute-bound on an H100 above C ~ 100 (~165 TF/s effective
  against ~3 TB/s of A), still 3x the speed of plain fp32 (``ieee``, ~60 TF/s).
- ``"tf32"`` under ``"high"`` or ``"medium"``: one tf32 product, memory-bound for C up to ~300
  on an H100 (~495 TF/s); S rounded to 10 mantissa bits (relative error <= 2^-11 per product,
  fp32 accumulation), as PyTorch's tf32 matmuls.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import register_cap

#: the dot precisions the launch helpers take (``input_precision``); the compile check builds both
ADJ_DOT_PRECISIONS = ("tf32x3", "tf32")
#: the default of the launch helpers: fp32-grade, as torch's "highest" matmul precision
ADJ_DOT_PRECISION = "tf32x3"


def _check_precision(input_precision: str) -> str:
    if input_precision not in ADJ_DOT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {ADJ_DOT_PRECISIONS}, got {input_precision!r}")
    return input_precision


class AdjConfig(NamedTuple):
    block_m: int  # rows of A per program (all clusters of those rows in registers)
    block_k: int  # columns of A (= rows of S) per loop step
    num_warps: int
    num_stages: int


# C_PAD -> (block_m, block_k, num_warps, num_stages). S is re-read (from L2) once per row
# block, C / block_m times A's bytes in fp32, so row blocks are as tall as the accumulator
# block_m x C_PAD allows without a spill on sm_80 and sm_90 (``diffpool-fast compile-check``).
_ADJ_TABLE = {
    16: (128, 32, 8, 3),
    32: (128, 32, 8, 3),
    64: (64, 32, 8, 3),
    128: (64, 32, 8, 3),
    256: (64, 32, 8, 2),
    512: (32, 16, 8, 2),
}
# tf32x3 holds each operand tile twice (high and low parts): half-height row blocks where the
# tf32 ones spill (C_PAD = 64 with the symmetry check, C_PAD = 256; compile-check, sm_80/sm_90)
_ADJ_TABLES = {"tf32": _ADJ_TABLE,
               "tf32x3": {**_ADJ_TABLE, 64: (32, 32, 4, 3), 256: (32, 32, 8, 2)}}


def adjacency_config(N: int, c_pad: int, block_m: Optional[int] = None,
                     block_k: Optional[int] = None,
                     input_precision: str = ADJ_DOT_PRECISION) -> AdjConfig:
    """Block sizes keyed on C_PAD, the dot precision and bucketed N (row blocks no taller than
    N's bucket)."""
    bm, bk, num_warps, num_stages = _ADJ_TABLES[_check_precision(input_precision)][c_pad]
    if block_m is None:
        block_m = min(bm, max(16, triton.next_power_of_2(N)))
    if block_m < bm:
        num_warps = max(4 if c_pad <= 64 else 8, num_warps * block_m // bm)
    return AdjConfig(block_m, block_k or bk, num_warps, num_stages)


def adjacency_configs(input_precision: str = ADJ_DOT_PRECISION):
    """Every (C_PAD, AdjConfig) ``adjacency_config`` can return at one dot precision (for the
    compile check)."""
    out = []
    for c_pad in (16, 32, 64, 128, 256, 512):
        for N in (16, 32, 64, 128, 4096):
            cfg = adjacency_config(N, c_pad, input_precision=input_precision)
            if (c_pad, cfg) not in out:
                out.append((c_pad, cfg))
    return out


@triton.jit(do_not_specialize=["N", "C", "n_blocks"])
def adjacency_fwd_kernel(
    adj_ptr, S_ptr, AS_ptr, part_ptr, asym_ptr,
    N, C, n_blocks,
    stride_ab, stride_ar, stride_ac,
    FWD_TERMS: tl.constexpr, CHECK_SYM: tl.constexpr, SKIP_SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, C_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(A S) for BLOCK_M rows of graph b, and (FWD_TERMS) the link-loss partial sums.

    Grid (B, cdiv(N, BLOCK_M)). adj_ptr: A [B, N, N] as fp32/fp16/bf16/uint8 (bool viewed as
    uint8), strides (stride_ab, stride_ar, stride_ac) - swapped to read A^T; S_ptr: S
    [B, N, C] fp32 contiguous; AS_ptr: output [B, N, C] fp32 contiguous; part_ptr: [2, B,
    n_blocks] fp32 (||A||^2, #asymmetric entries) when FWD_TERMS; asym_ptr: [B]
    int32, read when SKIP_SYMMETRIC (0 = skip this graph).
    """
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, C_PAD)
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    a_base = adj_ptr + b * stride_ab
    s_base = S_ptr + b * N * C

    k_end = N
    if SKIP_SYMMETRIC:
        k_end = N * tl.load(asym_ptr + b)
    acc = tl.zeros((BLOCK_M, C_PAD), dtype=tl.float32)
    # per-row running sums: a [BLOCK_M, BLOCK_K] accumulator would cost registers the dot needs
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_asym = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        ks64 = ks.to(tl.int64)
        a = tl.load(
            a_base + rows64[:, None] * stride_ar + ks64[None, :] * stride_ac,
            mask=row_ok[:, None] & k_ok[None, :], other=0,
        ).to(tl.float32)
        s = tl.load(s_base + ks64[:, None] * C + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, s, acc, input_precision=DOT_PRECISION)
        if FWD_TERMS:
            sq += tl.sum(a * a, axis=1)
        if CHECK_SYM:
            a_mirror = tl.load(
                a_base + ks64[:, None] * stride_ar + rows64[None, :] * stride_ac,
                mask=k_ok[:, None] & row_ok[None, :], other=0,
            ).to(tl.float32)
            n_asym += tl.sum(tl.where(a != tl.trans(a_mirror), 1.0, 0.0), axis=1)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(AS_ptr + b * N * C + rows64[:, None] * C + cols[None, :], acc,
             mask=tile_ok & (k_end > 0))
    if FWD_TERMS:
        part = part_ptr + b * n_blocks + pid_m
        tl.store(part, tl.sum(sq, axis=0))
        tl.store(part + n_blocks * tl.num_programs(0), tl.sum(n_asym, axis=0))


def _adj_arg(adj: torch.Tensor) -> torch.Tensor:
    # Triton has no bool loads we want (i1 pointers); the same bytes as uint8 load as 0/1.
    return adj.view(torch.uint8) if adj.dtype == torch.bool else adj


def _launch_adjacency_fwd(a, S, out, part_ptr, flag_ptr, cfg: AdjConfig, c_pad: int, *,
                          transpose: bool, fwd_terms: bool, check_sym: bool, skip_symmetric: bool,
                          input_precision: str):
    """One launch of ``adjacency_fwd_kernel``: A S, or A^T S with A's row and column strides
    swapped (``transpose``)."""
    B, N, C = S.shape
    n_blocks = triton.cdiv(N, cfg.block_m)
    row_stride, col_stride = (a.stride(2), a.stride(1)) if transpose else (a.stride(1), a.stride(2))
    adjacency_fwd_kernel[(B, n_blocks)](
        a, S, out, part_ptr, flag_ptr,
        N, C, n_blocks,
        a.stride(0), row_stride, col_stride,
        FWD_TERMS=fwd_terms, CHECK_SYM=check_sym, SKIP_SYMMETRIC=skip_symmetric,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, C_PAD=c_pad,
        DOT_PRECISION=_check_precision(input_precision),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )


def adjacency_fwd(adj: torch.Tensor, S: torch.Tensor, check_sym: bool,
                  block_m: Optional[int] = None, block_k: Optional[int] = None,
                  input_precision: str = ADJ_DOT_PRECISION):
    """Launch the forward pass: returns (AS [B,N,C] fp32, adj_sq [B] f64, asym [B] int32
    (1 = not symmetric; all 1 unless check_sym)).

    block_m / block_k override the row block and the column chunk (tests force branches);
    input_precision: "tf32x3" or "tf32" (module docstring).
    """
    B, N, C = S.shape
    from .assignment import cluster_pad

    c_pad = cluster_pad(C)
    cfg = adjacency_config(N, c_pad, block_m, block_k, input_precision)
    n_blocks = triton.cdiv(N, cfg.block_m)
    a = _adj_arg(adj)
    AS = torch.empty((B, N, C), device=S.device, dtype=torch.float32)
    part = torch.empty((2, B, n_blocks), device=S.device, dtype=torch.float32)
    _launch_adjacency_fwd(a, S, AS, part, part, cfg, c_pad, transpose=False,
                          fwd_terms=True, check_sym=check_sym, skip_symmetric=False,
                          input_precision=input_precision)
    sums = part.to(torch.float64).sum(dim=2)
    if check_sym:
        asym = (sums[1] > 0).to(torch.int32)
    else:
        asym = torch.ones(B, device=S.device, dtype=torch.int32)
    return AS, sums[0], asym


def adjacency_transpose_fwd(adj: torch.Tensor, S: torch.Tensor, asym: torch.Tensor,
                            block_m: Optional[int] = None, block_k: Optional[int] = None,
                            input_precision: str = ADJ_DOT_PRECISION):
    """A^T S [B,N,C] fp32 for the graphs with asym == 1; rows of the others are left unwritten
    (the backward row pass never reads them)."""
    B, N, C = S.shape
    from .assignment import cluster_pad

    c_pad = cluster_pad(C)
    cfg = adjacency_config(N, c_pad, block_m, block_k, input_precision)
    a = _adj_arg(adj)
    AtS = torch.empty((B, N, C), device=S.device, dtype=torch.float32)
    _launch_adjacency_fwd(a, S, AtS, AtS, asym, cfg, c_pad, transpose=True,
                          fwd_terms=False, check_sym=False, skip_symmetric=True,
                          input_precision=input_precision)
    return AtS


class AdjGradConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def adjacency_grad_config(N: int, block_m: Optional[int] = None, block_n: Optional[int] = None,
                          block_k: Optional[int] = None,
                          input_precision: str = ADJ_DOT_PRECISION) -> AdjGradConfig:
    """A plain output-tiled product: 64 x 64 tiles, 32 x 32 for small graphs; 8 warps for the
    tf32x3 64 x 64 tile (4 spilled on sm_80)."""
    t = 64 if N > 32 else 32
    warps = 8 if _check_precision(input_precision) == "tf32x3" and t == 64 else 4
    return AdjGradConfig(block_m or t, block_n or t, block_k or 32, warps, 3)


def adjacency_grad_configs(input_precision: str = ADJ_DOT_PRECISION):
    return [adjacency_grad_config(N, input_precision=input_precision) for N in (16, 4096)]


@triton.jit(do_not_specialize=["N", "C"])
def adjacency_bwd_kernel(
    adj_ptr, SH_ptr, S_ptr, two_g_ptr, dA_ptr,
    N, C,
    stride_ab, stride_ar, stride_ac,
    stride_db, stride_dr, stride_dc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dA = (S H) S^T + two_g A for one BLOCK_M x BLOCK_N tile of graph b.

    Grid (B, cdiv(N, BLOCK_M), cdiv(N, BLOCK_N)). adj_ptr: A [B, N, N] fp32/fp16/bf16;
    SH_ptr, S_ptr: [B, N, C] fp32 contiguous; two_g_ptr: [B] fp32 (2 g_link_sq);
    dA_ptr: [B, N, N] in A's dtype.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        sh = tl.load(SH_ptr + b * N * C + rows64[:, None] * C + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # S^T tile loaded directly as [BLOCK_K, BLOCK_N]
        st = tl.load(S_ptr + b * N * C + cols64[None, :] * C + ks[:, None],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(sh, st, acc, input_precision=DOT_PRECISION)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    a = tl.load(adj_ptr + b * stride_ab + rows64[:, None] * stride_ar + cols64[None, :] * stride_ac,
                mask=tile_ok, other=0.0).to(tl.float32)
    acc += tl.load(two_g_ptr + b) * a
    tl.store(dA_ptr + b * stride_db + rows64[:, None] * stride_dr + cols64[None, :] * stride_dc,
             acc.to(dA_ptr.dtype.element_ty), mask=tile_ok)


def adjacency_bwd(adj: torch.Tensor, SH: torch.Tensor, S: torch.Tensor, two_g: torch.Tensor,
                  block_m: Optional[int] = None, block_n: Optional[int] = None,
                  block_k: Optional[int] = None,
                  input_precision: str = ADJ_DOT_PRECISION) -> torch.Tensor:
    """Launch ``adjacency_bwd_kernel``: dA [B, N, N] in adj's dtype (floating adj only)."""
    B, N, C = S.shape
    cfg = adjacency_grad_config(N, block_m, block_n, block_k, input_precision)
    dA = torch.empty((B, N, N), device=S.device, dtype=adj.dtype)
    grid = (B, triton.cdiv(N, cfg.block_m), triton.cdiv(N, cfg.block_n))
    adjacency_bwd_kernel[grid](
        adj, SH, S, two_g, dA,
        N, C,
        adj.stride(0), adj.stride(1), adj.stride(2),
        dA.stride(0), dA.stride(1), dA.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_check_precision(input_precision),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return dA
