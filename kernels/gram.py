"""Products reduced over the nodes: S^T Y for Y in {X, A S, S}, in one launch.

Per graph b::

    out  = S^T X        [C, F]      pooled embeddings (X' in the paper)
    A'   = S^T (A S)    [C, C]      coarsened adjacency, from the A S of the adjacency pass
    StS  = S^T S        [C, C]      for the link loss, ||S S^T||_F^2 = ||S^T S||_F^2

The grid's second axis enumerates the output tiles of all three products (out's, then A''s,
then S^T S's), so one launch computes the three. S^T comes from the bf16 parts of S (read along
the contiguous cluster dimension: an MN-major operand, which bf16 wgmma takes from shared
memory); X and A S are split in the kernel (kernels/split.py). Epilogues:

- A' tiles on the diagonal write their trace (partial sums for the link identity);
- S^T S tiles write the sum of their squares;
- when one tile holds all of A' (C_PAD <= BLOCK_C) and the adjacency pass found A_b symmetric,
  A' is made bitwise symmetric, 0.5 (A' + A'^T): S^T A S of a symmetric A is symmetric, but not
  bitwise so after rounding, and the next level's exact symmetry check wants it so (it spares
  that level's backward a read of A). Larger C: ``symmetrize`` does it in a second launch.

Bytes: S's parts and Y once per (C-tile, K-tile) program, O(N (C + K)) per graph; writes C x K.
These products are about 32 FLOP per byte at C = K = 128: memory-bound even with 6 split
products.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import cdiv, next_pow2, register_cap
from .split import dot_parts, load_parts, split_bf16


class GramConfig(NamedTuple):
    block_c: int  # rows and columns of a C x C tile, rows of an out tile
    block_f: int  # columns of an out tile (features)
    block_n: int  # nodes reduced per loop step
    num_warps: int
    num_stages: int


# C_PAD -> (block_c, block_f, block_n, num_warps, num_stages). A 128 x 128 tile holds all of A' up
# to 128 clusters (symmetrised in the kernel); 8 warps keep its accumulator and the split operand
# tiles clear of spills (``diffpool-fast compile-check``; above 128 clusters 16-node steps, 32
# spilled 8 bytes on sm_80).
_GRAM_TABLE = {
    16: (16, 64, 32, 4, 2),
    32: (32, 64, 32, 4, 2),
    64: (64, 64, 16, 4, 2),
    128: (128, 64, 32, 8, 2),
    256: (128, 64, 16, 8, 2),
    512: (128, 64, 16, 8, 2),
}


def gram_config(N: int, c_pad: int, F: int, block_c: Optional[int] = None,
                block_f: Optional[int] = None, block_n: Optional[int] = None) -> GramConfig:
    """Block sizes keyed on C_PAD (``_GRAM_TABLE``); F and N only cap the tiles."""
    bc, bf, bn, warps, stages = _GRAM_TABLE[c_pad]
    bc = min(block_c or bc, c_pad)
    bf = block_f or min(bf, max(16, next_pow2(F)))
    bn = block_n or min(bn, max(16, next_pow2(N)))
    if bc < 128 and warps == 8 and block_c is not None:
        warps = 4
    return GramConfig(bc, bf, bn, warps, stages)


def gram_configs():
    """Every (C_PAD, GramConfig) ``gram_config`` can return (for the ahead-of-time compile check)."""
    out = []
    for c_pad in (16, 32, 64, 128, 256, 512):
        for N, F in ((16, 16), (4096, 16), (4096, 128)):
            item = (c_pad, gram_config(N, c_pad, F))
            if item not in out:
                out.append(item)
    return out


@triton.jit(do_not_specialize=["N", "C", "F", "W"])
def gram_fwd_kernel(
    x_ptr, Sp_ptr, AS_ptr, out_ptr, out_adj_ptr, StS_ptr, work_ptr,
    N, C, F, W, c_tr, c_sts, c_asym, n_adj, plane, n_ft,
    stride_xb, stride_xn, stride_xf,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, C_PAD: tl.constexpr,
    PARTS: tl.constexpr, ADJ_PAD: tl.constexpr, SYM_TILE: tl.constexpr,
):
    """One output tile of out, A' or S^T S of graph b (module docstring).

    Grid (B, NT n_ft + 2 NT^2), NT = C_PAD / BLOCK_C, n_ft = cdiv(F, BLOCK_F). x_ptr: X [B, N, F]
    any float dtype and strides; Sp_ptr: S's parts [PARTS, B, N, C_PAD] bf16, ``plane`` apart;
    AS_ptr: [B, N, C_PAD] fp32; out_ptr: [B, C, F] fp32; out_adj_ptr: [B, C, C] fp32; StS_ptr:
    [B, C_PAD, C_PAD] fp32; work_ptr: [B, W] fp32, traces at c_tr + tile row, squares at c_sts +
    tile; the adjacency pass's asym partials at c_asym (n_adj of them) are read (SYM_TILE).
    """
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    NT: tl.constexpr = C_PAD // BLOCK_C
    n_out = NT * n_ft
    s_base = Sp_ptr + b * N * C_PAD
    if t < n_out:
        ci = t // n_ft
        fj = t % n_ft
        cs = ci * BLOCK_C + tl.arange(0, BLOCK_C)
        fs = fj * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = fs < F
        acc_o = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < N
            ns64 = ns.to(tl.int64)
            s0, s1, s2 = load_parts(s_base + ns64[None, :] * C_PAD + cs[:, None], plane, n_ok[None, :], PARTS)
            y = tl.load(x_ptr + b * stride_xb + ns64[:, None] * stride_xn + fs[None, :] * stride_xf,
                        mask=n_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            y0, y1, y2 = split_bf16(y, PARTS)
            acc_o = dot_parts(s0, s1, s2, y0, y1, y2, acc_o, PARTS)
        tl.store(out_ptr + b * C * F + cs[:, None] * F + fs[None, :], acc_o,
                 mask=(cs < C)[:, None] & f_ok[None, :])
    else:
        u = t - n_out
        is_sts = u >= NT * NT
        u = u % (NT * NT)
        ci = u // NT
        cj = u % NT
        cs = ci * BLOCK_C + tl.arange(0, BLOCK_C)
        ds = cj * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        if is_sts:
            for n0 in range(0, N, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                n_ok = ns < N
                ns64 = ns.to(tl.int64)
                s0, s1, s2 = load_parts(s_base + ns64[None, :] * C_PAD + cs[:, None], plane, n_ok[None, :], PARTS)
                y0, y1, y2 = load_parts(s_base + ns64[:, None] * C_PAD + ds[None, :], plane, n_ok[:, None], PARTS)
                acc = dot_parts(s0, s1, s2, y0, y1, y2, acc, PARTS)
            tl.store(StS_ptr + b * C_PAD * C_PAD + cs[:, None] * C_PAD + ds[None, :], acc)
            tl.store(work_ptr + b * W + c_sts + u, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
        else:
            for n0 in range(0, N, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                n_ok = ns < N
                ns64 = ns.to(tl.int64)
                s0, s1, s2 = load_parts(s_base + ns64[None, :] * C_PAD + cs[:, None], plane, n_ok[None, :], PARTS)
                y = tl.load(AS_ptr + b * N * C_PAD + ns64[:, None] * C_PAD + ds[None, :],
                            mask=n_ok[:, None], other=0.0)
                y0, y1, y2 = split_bf16(y, PARTS)
                acc = dot_parts(s0, s1, s2, y0, y1, y2, acc, PARTS)
            if ci == cj:
                tl.store(work_ptr + b * W + c_tr + ci,
                         tl.sum(tl.sum(tl.where(cs[:, None] == ds[None, :], acc, 0.0), axis=1), axis=0))
            if SYM_TILE:
                js = tl.arange(0, ADJ_PAD)
                asym = tl.sum(tl.load(work_ptr + b * W + c_asym + js, mask=js < n_adj, other=0.0), axis=0)
                if asym == 0:
                    acc = 0.5 * (acc + tl.trans(acc))
            tl.store(out_adj_ptr + b * C * C + cs[:, None] * C + ds[None, :], acc,
                     mask=(cs < C)[:, None] & (ds < C)[None, :])


@triton.jit(do_not_specialize=["C", "W"])
def symmetrize_kernel(out_adj_ptr, work_ptr, C, W, c_asym, n_adj,
                      BLOCK_C: tl.constexpr, ADJ_PAD: tl.constexpr):
    """A' <- 0.5 (A' + A'^T) for graph b where the adjacency pass found A_b symmetric.

    Grid (B, NT, NT): program (i, j) with i <= j reads tiles (i, j) and (j, i) before it writes
    either, and no other program touches them, so the update is race-free."""
    b = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    js = tl.arange(0, ADJ_PAD)
    asym = tl.sum(tl.load(work_ptr + b * W + c_asym + js, mask=js < n_adj, other=0.0), axis=0)
    if (ti <= tj) & (asym == 0):
        cs = ti * BLOCK_C + tl.arange(0, BLOCK_C)
        ds = tj * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (cs < C)[:, None] & (ds < C)[None, :]
        base = out_adj_ptr + b * C * C
        upper = tl.load(base + cs[:, None] * C + ds[None, :], mask=ok, other=0.0)
        lower_t = tl.load(base + ds[None, :] * C + cs[:, None], mask=ok, other=0.0)  # (j, i) tile, transposed
        v = 0.5 * (upper + lower_t)
        tl.store(base + cs[:, None] * C + ds[None, :], v, mask=ok)
        tl.store(base + ds[None, :] * C + cs[:, None], v, mask=ok)


def _pad(n: int) -> int:
    return max(2, next_pow2(max(1, n)))


def gram_tiles(c_pad: int, block_c: Optional[int] = None) -> int:
    """Tiles per side of a C x C product (trace partials; squares: its square)."""
    return c_pad // gram_config(16, c_pad, 16, block_c).block_c


def gram_fwd(x: torch.Tensor, Sp: torch.Tensor, AS: torch.Tensor, work: torch.Tensor, ws, C: int,
             block_c: Optional[int] = None, block_f: Optional[int] = None, block_n: Optional[int] = None):
    """Launch ``gram_fwd_kernel`` (and ``symmetrize_kernel`` when C_PAD > block_c): returns
    (out [B, C, F] fp32, out_adj [B, C, C] fp32, StS [B, C_PAD, C_PAD] fp32)."""
    parts, B, N, c_pad = Sp.shape
    F = x.shape[2]
    cfg = gram_config(N, c_pad, F, block_c, block_f, block_n)
    nt = c_pad // cfg.block_c
    n_ft = cdiv(F, cfg.block_f)
    dev = Sp.device
    out = torch.empty((B, C, F), device=dev, dtype=torch.float32)
    out_adj = torch.empty((B, C, C), device=dev, dtype=torch.float32)
    StS = torch.empty((B, c_pad, c_pad), device=dev, dtype=torch.float32)
    sym_tile = nt == 1
    gram_fwd_kernel[(B, nt * n_ft + 2 * nt * nt)](
        x, Sp, AS, out, out_adj, StS, work,
        N, C, F, ws.width, ws.tr, ws.sts, ws.asym, ws.n_adj, B * N * c_pad, n_ft,
        x.stride(0), x.stride(1), x.stride(2),
        BLOCK_C=cfg.block_c, BLOCK_F=cfg.block_f, BLOCK_N=cfg.block_n, C_PAD=c_pad, PARTS=parts,
        ADJ_PAD=_pad(ws.n_adj), SYM_TILE=sym_tile,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=register_cap(cfg.num_warps),
    )
    if not sym_tile:
        st = min(64, cfg.block_c)  # two st x st fp32 tiles a program: no spill at 4 warps
        symmetrize_kernel[(B, c_pad // st, c_pad // st)](out_adj, work, C, ws.width, ws.asym, ws.n_adj,
                                                         BLOCK_C=st, ADJ_PAD=_pad(ws.n_adj), num_warps=4)
    return out, out_adj, StS
