"""The link loss where its three-term identity cancels: detection, and a direct, chunked recompute.

Both backends compute the per-graph squared residual from the identity (docs/math.md)

    Q_b = ||A_b - S_b S_b^T||_F^2 = ||A_b||^2 - 2 tr(S_b^T A_b S_b) + ||S_b^T S_b||^2,

whose three terms are read off products the step makes anyway. Its gradient is the same kind of
difference, dQ/dS = -2 (A + A^T) S + 4 S (S^T S) = -2 (R + R^T) S with R = A - S S^T. As the
assignment fits the graph (A ~ S S^T, where training converges) the terms stay O(||A||^2) while
Q and R S go to 0, and the rounding of the terms is all that is left: in float32 the identity
returned 0 (and a zero gradient) for a link loss of 4.9e-4 (issue 11).

Error argument. Let u be the unit roundoff of the products' dtype (2^-24 for float32, about
2^-22 for the Triton kernels' tf32x3 at PyTorch's default "highest" matmul precision, 2^-11 for
tf32) and

    M_b = (||A_b||_F + ||S_b^T S_b||_F)^2  >=  ||A_b||^2 + 2 tr(S^T |A| S) + ||S^T S||^2,

(the inequality is Cauchy-Schwarz on <|A|, S S^T>, S >= 0), which bounds the sum of the
magnitudes of everything the identity adds. Each term is computed from float products with a
reduction over N (A S, then S^T (A S) and S^T S), summed per graph in float64, so the computed
Q^_b satisfies |Q^_b - Q_b| <= c_N u M_b, with c_N ~ 2 N in the worst case (Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., section 3.1) and c_N = O(sqrt(N)) with high
probability for independent roundings (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019). This
part of the argument is empirical: the CPU's blocked float32 products measured c = |Q^ - Q| /
(u M) at most 4.2 on every input of bench/scripts/link_accuracy.py (random assignments,
two-clique fits at logit scales 0 to 20, planted partitions; N = 40 to 512; table in
bench/results/*-cpu-link_accuracy/). Taking c <= 5, a graph with

    M_b <= RHO * Q^_b                                                      (not flagged)

has |Q^ - Q| / Q <~ 5 RHO u = 40 u (2.4e-6 in float32; half that on the link, sqrt(Q)): float32
noise, within an order of magnitude of the rounding of PyG's float32 formula at these ratios
(about u sqrt(M / Q) per entry, summed). Its gradient is less exposed: the terms of dQ/dS are
O(||S|| ||S^T S||) against ||R S|| ~ sqrt(Q) ||S||, a relative error ~ c u sqrt(M / Q) <= c u
sqrt(RHO), as for PyG's gradient.

Under tf32 products (torch's "high"/"medium" on the Triton path) u is 2^-11 and so is this bound
on unflagged graphs, 40 u ~ 2%: the accuracy tf32 was asked for (PyG's formula under tf32 rounds
S S^T the same way); the flag itself does not depend on u.

Every other graph (M_b > RHO Q^_b, which includes Q^_b <= 0 with M_b > 0: the cancellation has
eaten more than 1/RHO of the terms) is *flagged*, and :func:`exact_link` recomputes it from R
itself, as PyG does, but in float64 from the rounded S: row chunks R[i0:i1] = A[i0:i1] -
S[i0:i1] S^T, never more than ``chunk_bytes`` of them at once (no B x N x N memory), with

    Q_b = sum ||R chunk||^2,   D_b = (R + R^T) S = sum_chunks R_c S  (rows i0:i1)  +  R_c^T S_c,

so dQ/dS = -2 D_b. Each residual entry of the float32 S is then rounded to about C 2^-53 (S_i .
S_j), so |Q - Q_exact| / Q <~ 2 C 2^-53 sqrt(M / Q), the bound of PyG's float32 formula with
2^-24 replaced by 2^-53 (float32 noise up to M / Q ~ 1e16 / C^2). For D_b the float64 residual
is rounded to S's dtype (one relative rounding per entry, where PyG's float32 R carries u |S
S^T|) and multiplied in that dtype, as PyG's gradient is: a sum of products of small entries,
without cancellation of large ones. The only error left is what the float32 rounding of S itself
does to the loss, which PyG's float32 formula has too. ``RHO = 8`` keeps random assignments (M /
Q between 1.1 and 5.8 measured, the larger values at C = 2: Q is then about ||A||^2) below the
threshold, so only graphs that fit their adjacency (logit scale >= 2 in the two-clique case) pay
for the recompute.

Cost of a flagged graph: one more read of A_b (in its own dtype, converted to float64 a block at
a time) and 2 N^2 C float64 FLOPs for Q (S S^T by chunks), 4 N^2 C more in S's dtype for D (R S
and R^T S; 2 N^2 C when A is known symmetric, where R^T S = R S). Unflagged graphs cost nothing
here. NaN or inf anywhere gives a NaN M or Q^, which compares False, so such a graph is never
flagged and its non-finite Q^ propagates.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .block_sparse import BlockSparseAdj

#: a graph is recomputed directly when M_b > RHO * Q^_b (module docstring)
RHO = 8.0

_WIDE = torch.float64


def cancellation_flags(adj_sq: Tensor, sts_sq: Tensor, q_raw: Tensor) -> Tensor:
    """[B] bool: graphs whose identity value ``q_raw`` cannot be trusted (module docstring).

    ``adj_sq`` = ||A_b||^2, ``sts_sq`` = ||S_b^T S_b||^2 and ``q_raw`` = the identity's Q^_b, all
    [B] float64. NaN and inf never flag a graph (their non-finite Q^ propagates).
    """
    terms = (adj_sq.clamp_min(0).sqrt() + sts_sq.clamp_min(0).sqrt()).square()
    return terms > RHO * q_raw


def row_blocks(B: int, N: int, itemsize: int, chunk_bytes: int) -> Iterator[Tuple[int, int, int, int]]:
    """(g0, g1, r0, r1): graphs g0:g1, rows r0:r1, each block at most ``chunk_bytes`` as
    ``itemsize``-byte entries [g, r, N] (one row at the least)."""
    rows = max(1, chunk_bytes // max(1, N * itemsize))
    if rows >= N:
        step = max(1, rows // max(1, N))
        for g0 in range(0, B, step):
            yield g0, min(B, g0 + step), 0, N
    else:
        for g in range(B):
            for r0 in range(0, N, rows):
                yield g, g + 1, r0, min(N, r0 + rows)


def sparse_rows(adj: BlockSparseAdj, b: int, r0: int, r1: int) -> Tensor:
    """Rows r0:r1 of graph b of a BlockSparseAdj, dense [1, r1 - r0, N] float64."""
    _, N, _ = adj.shape
    lo, hi = b * N + r0, b * N + r1
    rr, cc, vv = adj.entries()  # COO coordinates sorted by global row
    start = int(torch.searchsorted(rr, torch.tensor(lo, device=rr.device)))
    end = int(torch.searchsorted(rr, torch.tensor(hi, device=rr.device)))
    dense = torch.zeros((r1 - r0, N), dtype=_WIDE, device=rr.device)
    if end > start:
        rows = rr[start:end] - lo
        cols = cc[start:end] - b * N
        dense.index_put_((rows, cols), vv[start:end].to(_WIDE), accumulate=True)
    return dense.unsqueeze(0)


def exact_link(
    adj: Union[Tensor, BlockSparseAdj],
    S: Tensor,
    graphs: Tensor,
    *,
    want_q: bool = True,
    want_d: bool = False,
    symmetric: Union[bool, Sequence[bool], Tensor] = False,
    chunk_bytes: int = 64 << 20,
    wide: torch.dtype = _WIDE,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Q_g = ||A_g - S_g S_g^T||^2 and D_g = (R_g + R_g^T) S_g for the graphs ``graphs``, directly.

    ``adj``: [B, N, N] in any accepted dtype (or a BlockSparseAdj); ``S``: [B, N, C] (float32 or
    float64, padded rows 0); ``graphs``: [G] int64 indices. ``symmetric``: True (or one bool per
    listed graph) where A_g = A_g^T is known, so R^T S = R S is not recomputed. Returns ``(Q [G]
    float64 or None, D [G, N, C] in S's dtype or None)``. Works without autograd (call it under
    ``torch.no_grad()`` or in a backward); row chunks of at most ``chunk_bytes`` float64.
    ``wide``: the dtype R is formed in; float64 (default) as the docstring above argues, or S's
    own dtype, which is PyG's residual (its accuracy; the torch path's GPU branch, where every
    graph is recomputed and float64 products are slow).
    """
    B, N, C = S.shape
    G = len(graphs) if isinstance(graphs, list) else int(graphs.numel())
    dev = S.device
    q = torch.zeros(G, dtype=torch.float64, device=dev) if want_q else None
    D = torch.zeros((G, N, C), dtype=S.dtype, device=dev) if want_d else None
    if G == 0 or N == 0:
        return q, D
    if isinstance(symmetric, bool):
        sym = [symmetric] * G
    else:
        sym = [bool(v) for v in (symmetric.tolist() if isinstance(symmetric, Tensor) else symmetric)]
    sparse = isinstance(adj, BlockSparseAdj)
    # a list of every graph under torch.compile, where reading a tensor's values would break the graph
    graph_list = graphs if isinstance(graphs, list) else graphs.tolist()
    if isinstance(graphs, list):
        # every graph in order (the sync-free callers): arange launches no host-to-device copy,
        # which from pageable memory would wait for the device
        graphs = (torch.arange(G, device=dev) if graph_list == list(range(G))
                  else torch.tensor(graph_list, dtype=torch.long, device=dev))
    # sparse adjacencies are densified one graph's rows at a time
    blocks = row_blocks(G, N, wide.itemsize, chunk_bytes) if not sparse else (
        (g, g + 1, r0, r1) for g in range(G) for _, _, r0, r1 in row_blocks(1, N, wide.itemsize, chunk_bytes)
    )
    group_key = None
    for g0, g1, r0, r1 in blocks:
        if group_key != (g0, g1):
            group_key = (g0, g1)
            S_group = S.index_select(0, graphs[g0:g1])  # [g, N, C]: small
            S_wide = S_group.to(wide)
        # R rows = A rows - S rows S^T, one [g, r, N] float64 block (the only N-wide buffer;
        # converting first and subtracting in place is the fastest form on the CPU)
        if sparse:
            R = sparse_rows(adj, graph_list[g0], r0, r1).to(wide)
        elif g1 - g0 == 1:  # copy=True: adj itself must not be the block subtracted into
            R = adj[graph_list[g0], r0:r1].unsqueeze(0).to(wide, copy=True)
        else:
            R = adj.index_select(0, graphs[g0:g1])[:, r0:r1].to(wide)
        R.baddbmm_(S_wide[:, r0:r1], S_wide.transpose(1, 2), alpha=-1.0)
        if want_q:
            q[g0:g1] += torch.linalg.vector_norm(R, dim=(1, 2)).to(torch.float64).square()
        if want_d:
            # R rounded to S's dtype keeps each entry to its own relative precision (PyG's R
            # carries the rounding of S S^T); the products are then the same as PyG's
            Rp = R if S.dtype == R.dtype else R.to(S.dtype)
            del R
            RS = torch.bmm(Rp, S_group)
            if all(sym[g0:g1]):
                D[g0:g1, r0:r1] += RS.mul_(2.0)  # R^T S = R S
            else:
                D[g0:g1, r0:r1] += RS
                D[g0:g1].baddbmm_(Rp.transpose(1, 2), S_group[:, r0:r1])
            del RS, Rp
        else:
            del R
    return q, D
