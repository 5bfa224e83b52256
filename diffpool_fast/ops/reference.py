"""Plain PyTorch reference: the published formulas, line by line.

This is the test oracle and the documentation of what the fast paths compute. It builds the
N x N residual A - S S^T on purpose (that is what PyG does), so it is never used on a hot path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..config import EPS


def assignment(s: Tensor, mask: Optional[Tensor]) -> Tensor:
    """S = m * softmax(s) row-wise: rows of padded nodes are exactly 0."""
    S = torch.softmax(s, dim=-1)
    if mask is not None:
        S = S * mask.reshape(S.shape[0], S.shape[1], 1).to(S.dtype)
    return S


def coarsen_reference(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-graph quantities every backend computes, the naive way.

    Inputs are batched (x [B,N,F], adj [B,N,N], s [B,N,C] logits, mask [B,N] or None).
    Returns ``(out, out_adj, link_sq, ent_sum)``:

    - out     = S^T X                 [B, C, F]
    - out_adj = S^T A S               [B, C, C]
    - link_sq = ||A_b - S_b S_b^T||_F^2 per graph        [B]
    - ent_sum = sum_i sum_c -S_ic log(S_ic + eps) per graph   [B]
    """
    S = assignment(s, mask)
    A = adj.to(S.dtype)
    xm = x if mask is None else x * mask.reshape(x.shape[0], x.shape[1], 1).to(x.dtype)
    out = S.transpose(1, 2) @ xm
    out_adj = S.transpose(1, 2) @ A @ S
    R = A - S @ S.transpose(1, 2)
    link_sq = (R * R).sum(dim=(1, 2))
    ent_sum = (-S * torch.log(S + EPS)).sum(dim=(1, 2))
    return out, out_adj, link_sq, ent_sum


def dense_diff_pool_reference(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None, normalize: bool = True
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch_geometric.nn.dense_diff_pool``'s exact formulas (PyG 2.x)."""
    x = x.unsqueeze(0) if x.dim() == 2 else x
    adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
    s = s.unsqueeze(0) if s.dim() == 2 else s
    B, N, _ = x.shape
    s = torch.softmax(s, dim=-1)
    if mask is not None:
        m = mask.reshape(B, N, 1).to(x.dtype)
        x, s = x * m, s * m
    A = adj.to(s.dtype)
    out = s.transpose(1, 2) @ x
    out_adj = s.transpose(1, 2) @ A @ s
    link = torch.norm(A - s @ s.transpose(1, 2), p=2)
    if normalize is True:
        link = link / adj.numel()
    ent = (-s * torch.log(s + EPS)).sum(dim=-1).mean()
    return out, out_adj, link, ent


def per_graph_link_reference(
    adj: Tensor, s: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
    """Per-graph normalised link loss: ||A_b - S_b S_b^T||^2 / n_b^2, n_b real nodes of graph b.

    Graphs with no real node give 0. This is the normalisation of the original DiffPool code
    (an average over each graph's real node pairs), applied graph by graph: pairs with a padded
    node count nothing, whatever ``adj`` holds there.
    """
    adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
    s = s.unsqueeze(0) if s.dim() == 2 else s
    B, N, _ = s.shape
    S = assignment(s, mask)
    A = adj.to(S.dtype)
    R = A - S @ S.transpose(1, 2)
    if mask is not None:
        m = mask.reshape(B, N).to(R.dtype)
        R = R * (m[:, :, None] * m[:, None, :])
    q = (R * R).sum(dim=(1, 2))
    n = torch.full((B,), N, dtype=q.dtype) if mask is None else mask.reshape(B, N).sum(1).to(q.dtype)
    return torch.where(n > 0, q / n.clamp_min(1) ** 2, torch.zeros_like(q))
