"""Products reduced over the nodes: S^T Y for Y in {X, S, A S}.

Per graph b::

    out  = S^T X        [C, F]      pooled embeddings (X' in the paper)
    StS  = S^T S        [C, C]      for the link loss, ||S S^T||_F^2 = ||S^T S||_F^2
    A'   = S^T (A S)    [C, C]      coarsened adjacency, from the A S of the adjacency pass

One kernel, launched once per Y. Bytes: reads S and Y once per (C-tile, K-tile) program,
O(N (C + K)) per graph; writes C x K.

Dot precision: ``tf32x3``. These products are O(N C K) FLOPs over O(N (C + K)) bytes
(about 32 FLOP/byte at C = K = 128): memory-bound on an H100 even at a third of the tf32 rate,
so three tf32 products for about fp32 accuracy cost no time, while plain fp32 (``ieee``, no
tensor cores, ~60 TF/s) would not be. Accumulation is fp32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import register_cap

GRAM_DOT_PRECISION = "tf32x3"


class GramConfig(NamedTuple):
    block_c: int  # rows of the output (clusters) per program
    block_k: int  # columns of the output (features or clusters) per program
    block_n: int  # nodes reduced per loop step
    num_warps: int
    num_stages: int


def gram_config(N: int, C: int, K: int, block_c: Optional[int] = None,
                block_k: Optional[int] = None, block_n: Optional[int] = None) -> GramConfig:
    """Block sizes keyed on bucketed C and K; N only chooses between two reduction chunks."""
    bc = block_c or (64 if C > 32 else 32)
    bk = block_k or (64 if K > 32 else 32)
    # tf32x3 splits both operands: 64 x 64 output tiles need 8 warps and 32-node steps to stay
    # clear of spills (a 16-bit Y spilled at 64 on sm_80)
    big = bc * bk >= 4096
    bn = block_n or (32 if big or N <= 32 else 64)
    return GramConfig(bc, bk, bn, 8 if big else 4, 3)


def gram_configs():
    """Every GramConfig ``gram_config`` can return (for the ahead-of-time compile check)."""
    out = []
    for C in (16, 64):
        for K in (16, 64):
            for N in (16, 64):
                cfg = gram_config(N, C, K)
                if cfg not in out:
                    out.append(cfg)
    return out


@triton.jit(do_not_specialize=["N", "C", "K"])
def gram_fwd_kernel(
    S_ptr, Y_ptr, out_ptr,
    N, C, K,
    stride_yb, stride_yn, stride_yk,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b] = S[b]^T Y[b] for one BLOCK_C x BLOCK_K tile.

    Grid (B, cdiv(C, BLOCK_C), cdiv(K, BLOCK_K)). S_ptr: S [B, N, C] fp32 contiguous; Y_ptr:
    Y [B, N, K] any float dtype and strides; out_ptr: [B, C, K] fp32 contiguous. Padded nodes
    have S = 0 rows, so they add nothing.
    """
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = cs < C
    k_ok = ks < K
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        ns64 = ns.to(tl.int64)
        # S^T tile loaded directly as [BLOCK_C, BLOCK_N]: no transpose in registers.
        st = tl.load(
            S_ptr + b * N * C + ns64[None, :] * C + cs[:, None],
            mask=c_ok[:, None] & n_ok[None, :], other=0.0,
        )
        y = tl.load(
            Y_ptr + b * stride_yb + ns64[:, None] * stride_yn + ks[None, :] * stride_yk,
            mask=n_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(st, y, acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + b * C * K + cs[:, None] * K + ks[None, :], acc,
        mask=c_ok[:, None] & k_ok[None, :],
    )


def gram_fwd(S: torch.Tensor, Y: torch.Tensor, block_c: Optional[int] = None,
             block_k: Optional[int] = None, block_n: Optional[int] = None) -> torch.Tensor:
    """Launch ``gram_fwd_kernel``: S^T Y, [B, C, K] fp32. block_* override the tile sizes."""
    B, N, C = S.shape
    K = Y.shape[2]
    cfg = gram_config(N, C, K, block_c, block_k, block_n)
    out = torch.empty((B, C, K), device=S.device, dtype=torch.float32)
    grid = (B, triton.cdiv(C, cfg.block_c), triton.cdiv(K, cfg.block_k))
    gram_fwd_kernel[grid](
        S, Y, out,
        N, C, K,
        Y.stride(0), Y.stride(1), Y.stride(2),
        BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
        DOT_PRECISION=GRAM_DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    return out
