r"""The DiffPool authors' link loss: binary cross-entropy of min(S S^T, 1) against A.

For graph b with n_b real nodes (mask m), P = min(S_b S_b^T, 1) entrywise and

    L_b = sum over real pairs (i, j) (m_i = m_j = 1) of
          - A_ij log(P_ij + EPS_BCE) - (1 - A_ij) log(1 - P_ij + EPS_BCE),     EPS_BCE = 1e-7.

Pairs with a padded node count 0 and get no gradient, whatever A holds there. The batch loss
is sum_b L_b / sum_b n_b^2 (the mean over every real pair of the batch), which is what the
original DiffPool code (RexYing/diffpool, ``SoftPoolingGcnEncoder.loss``) computes with its
default single hop; :func:`diffpool_fast.dense_diff_pool` documents the other scalings.

The clamp. For a row-stochastic S every entry of S S^T is at most 1 (Cauchy-Schwarz:
S_i . S_j <= ||S_i|| ||S_j|| <= 1), so min(., 1) only acts on rounding. Its derivative is
defined as torch.minimum's: 1 where P < 1, 0 where S S^T > 1, and 1/2 where S S^T == 1 exactly
(a one-hot row paired with itself, or two identical one-hot rows).

Gradient: with G_ij = dL/dP_ij times the clamp's derivative (zero at padded pairs),
dL/dS = (G + G^T) S, and dL/dA = log(1 - P + EPS) - log(P + EPS) at real pairs.

Memory: nothing of size B x N x N. The sum runs over row blocks [r, N] of one graph (or over
whole graphs when several fit), at most ``chunk_bytes`` per block, each under
``torch.utils.checkpoint``, so autograd keeps only the inputs of a block and recomputes its
[r, N] intermediates in the backward pass. Cost: forward 2 N^2 C FLOPs per graph plus a few
elementwise passes over N^2; backward the same again for the recompute plus 4 N^2 C for
(G + G^T) S: about 4x the forward's FLOPs, and one read of A per pass (twice in all). On CUDA
this is the same chunked torch code (no fused kernel): bytes moved per graph are about N^2
(A, read in both passes) plus a few [r, N] temporaries per block, which stay in L2 only for
small blocks.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .block_sparse import BlockSparseAdj
from .link_exact import row_blocks, sparse_rows

#: inside the logarithms, as in the original DiffPool code
EPS_BCE = 1e-7

#: bytes of one [g, r, N] block in the compute dtype; a handful of such temporaries live at once
_CHUNK_BYTES = 8 << 20


def _block_bce(S_g: Tensor, adj, m_g: Optional[Tensor], g0: int, r0: int, r1: int) -> Tensor:
    """The sum of the BCE terms over rows r0:r1 of the graphs of ``S_g`` ([g, N, C], graphs
    g0:g0+g of the batch), per graph, [g] float64.

    Everything N-wide is made here, from views: under checkpoint only the views are kept, and
    the block's A rows (densified for a BlockSparseAdj, converted for a byte adjacency), pair
    mask and P are rebuilt in the backward pass."""
    g = S_g.shape[0]
    dt = S_g.dtype
    if isinstance(adj, BlockSparseAdj):
        A_r = sparse_rows(adj, g0, r0, r1).to(dt)
    else:
        A_r = adj[g0:g0 + g, r0:r1].to(dt)
    S_r = S_g[:, r0:r1]
    P = torch.minimum(torch.bmm(S_r, S_g.transpose(1, 2)), torch.ones((), dtype=dt, device=S_g.device))
    terms = -A_r * torch.log(P + EPS_BCE) - (1.0 - A_r) * torch.log(1.0 - P + EPS_BCE)
    if m_g is not None:
        pair = m_g[:, r0:r1, None] & m_g[:, None, :]
        terms = torch.where(pair, terms, torch.zeros((), dtype=dt, device=S_g.device))
    return terms.sum(dim=(1, 2), dtype=torch.float64)


def _check_targets(adj) -> None:
    """A cross-entropy target is a probability: every entry of adj must lie in [0, 1] (a
    weighted or coarsened adjacency has no BCE link loss; its (1 - A) log(1 - P) term would be
    unbounded below). One pass over adj, no copy."""
    vals = adj.entries()[2] if isinstance(adj, BlockSparseAdj) else adj
    if vals.dtype == torch.bool or vals.numel() == 0:
        return
    lo, hi = torch.aminmax(vals.detach())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
        raise ValueError(f"link_loss='bce' needs adjacency entries in [0, 1] (link probabilities), got values in "
                         f"[{lo:g}, {hi:g}] in adj of shape {list(adj.shape)}; use link_loss='frobenius' for "
                         "weighted or coarsened graphs")


def bce_link_sums(adj: Union[Tensor, BlockSparseAdj], S: Tensor, mask: Optional[Tensor],
                  chunk_bytes: int = _CHUNK_BYTES) -> Tensor:
    """Per graph, L_b of the module docstring: [B] float64, differentiable in S (and in a
    floating ``adj`` that requires grad).

    ``adj``: [B, N, N] floating, bool or uint8 (or a BlockSparseAdj of it); ``S`` [B, N, C] the
    masked assignment (float32 or float64); ``mask`` [B, N] bool or None."""
    B, N, C = S.shape
    dt = S.dtype
    _check_targets(adj)
    if B == 0 or N == 0:
        return torch.zeros(B, dtype=torch.float64, device=S.device) + 0.0 * S.sum()
    sparse = isinstance(adj, BlockSparseAdj)
    blocks = row_blocks(B, N, dt.itemsize, chunk_bytes) if not sparse else (
        (g, g + 1, r0, r1) for g in range(B) for _, _, r0, r1 in row_blocks(1, N, dt.itemsize, chunk_bytes))
    pieces = {}
    for g0, g1, r0, r1 in blocks:
        m_g = mask[g0:g1] if mask is not None else None
        part = checkpoint(_block_bce, S[g0:g1], adj, m_g, g0, r0, r1, use_reentrant=False)
        pieces.setdefault((g0, g1), []).append(part)
    per = [torch.stack(p).sum(dim=0) if len(p) > 1 else p[0] for _, p in sorted(pieces.items())]
    return torch.cat(per)
