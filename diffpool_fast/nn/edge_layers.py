"""The dense GNN layers of :mod:`diffpool_fast.nn.layers`, run on an edge list instead.

A batch in PyG's sparse form, ``x`` [N, F] over all graphs' nodes and ``edge_index`` [2, E]
(row i = source, col j = target) with optional ``edge_weight`` [E], stands for the block-diagonal
adjacency ``A[i, j] = sum of the weights of the edges i -> j`` (what ``to_dense_adj`` builds,
duplicates summed). :func:`edge_forward` computes exactly what the layer's dense ``forward``
computes on that adjacency, with the same parameters, in O(E * F) time and memory instead of
O(N^2 * F):

- the aggregation ``(A X)_i = sum_{e: row_e = i} w_e x_{col_e}`` is one ``index_add_``;
- the row sums (degrees) are ``index_add_`` of the weights over ``row``;
- GCN's self loop *replaces* A's diagonal (PyG's dense semantics): the diagonal is the summed
  weight of the self-loop edges of each node, so what the loop adds is ``fill - diag``.

Every node of an edge list is real (there is no padding), so no mask applies; isolated nodes
have degree 0, clamped at 1 as in the dense layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import DenseGCN, DenseGIN, DenseSAGE

__all__ = ["edge_forward", "check_edges"]


def check_edges(x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor]) -> None:
    """Shapes, dtypes and ranges of an edge list over ``x``'s rows; errors name the argument."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [N, F] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be a [2, E] tensor, got {getattr(edge_index, 'shape', None)}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"edge_index must be int64 (or int32), got dtype {edge_index.dtype}")
    n = x.shape[0]
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise ValueError(f"edge_index holds node ids outside [0, {n}) for x with {n} rows")
    if edge_weight is not None:
        if not isinstance(edge_weight, Tensor) or tuple(edge_weight.shape) != (edge_index.shape[1],):
            raise ValueError(f"edge_weight must be [E] = [{edge_index.shape[1]}], "
                             f"got {getattr(edge_weight, 'shape', type(edge_weight).__name__)}")


def _aggregate(x: Tensor, row: Tensor, col: Tensor, w: Optional[Tensor]) -> Tensor:
    """(A X) for the edge list: sum over edges i -> j of w_e x_j, into row i."""
    msg = x.index_select(0, col)
    if w is not None:
        msg = msg * w.unsqueeze(-1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, row, msg)


def _degree(n: int, row: Tensor, w: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    vals = torch.ones(row.shape[0], dtype=dtype, device=row.device) if w is None else w.to(dtype)
    return torch.zeros(n, dtype=dtype, device=row.device).index_add_(0, row, vals)


def _sage(layer: DenseSAGE, x: Tensor, row: Tensor, col: Tensor, w: Optional[Tensor]) -> Tensor:
    inv_deg = _degree(x.shape[0], row, w, x.dtype).clamp_min(1.0).reciprocal().unsqueeze(-1)
    w_rel, w_root, b = layer.lin_rel.weight, layer.lin_root.weight, layer.lin_root.bias
    if layer.out_channels < layer.in_channels:  # aggregate at the narrower width, as the dense layer
        out = _aggregate(F.linear(x, w_rel), row, col, w) * inv_deg + F.linear(x, w_root, b)
    else:
        out = F.linear(_aggregate(x, row, col, w) * inv_deg, w_rel) + F.linear(x, w_root, b)
    if layer.normalize:
        out = F.normalize(out, p=2.0, dim=-1)
    return out


def _gcn(layer: DenseGCN, x: Tensor, row: Tensor, col: Tensor, w: Optional[Tensor],
         add_loop: bool) -> Tensor:
    h = layer.lin(x)
    n = x.shape[0]
    deg = _degree(n, row, w, h.dtype)
    if add_loop:
        fill = 2.0 if layer.improved else 1.0
        is_loop = row == col
        loop_w = None if w is None else w[is_loop]
        diag = _degree(n, row[is_loop], loop_w, h.dtype)
        loop = fill - diag
        deg = deg + loop
    d = deg.clamp_min(1.0).rsqrt().unsqueeze(-1)
    hs = d * h
    agg = _aggregate(hs, row, col, w)
    if add_loop:
        agg = agg + loop.unsqueeze(-1) * hs
    out = d * agg
    if layer.bias is not None:
        out = out + layer.bias
    return out


def _gin(layer: DenseGIN, x: Tensor, row: Tensor, col: Tensor, w: Optional[Tensor],
         add_loop: bool) -> Tensor:
    out = _aggregate(x, row, col, w)
    if add_loop:
        out = out + (1 + layer.eps) * x
    return layer.nn(out)


def edge_forward(layer: nn.Module, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None,
                 *, add_loop: bool = True, check: bool = True) -> Tensor:
    """``layer``'s dense forward on the adjacency of ``edge_index``, computed from the edges.

    ``layer``: a :class:`~diffpool_fast.nn.layers.DenseSAGE`, ``DenseGCN`` or ``DenseGIN``.
    ``x`` [N, F]; ``edge_index`` [2, E]; ``edge_weight`` [E] or None (all ones). Returns [N, F'].
    ``add_loop`` as in the GCN and GIN layers' dense forward (SAGE has none). ``check=False``
    skips :func:`check_edges` (a caller running several layers on one edge list checks once).
    """
    if check:
        check_edges(x, edge_index, edge_weight)
    row, col = edge_index[0].long(), edge_index[1].long()
    if isinstance(layer, DenseSAGE):
        return _sage(layer, x, row, col, edge_weight)
    if isinstance(layer, DenseGCN):
        return _gcn(layer, x, row, col, edge_weight, add_loop)
    if isinstance(layer, DenseGIN):
        return _gin(layer, x, row, col, edge_weight, add_loop)
    raise TypeError(f"layer must be a DenseSAGE, DenseGCN or DenseGIN, got {type(layer).__name__}")
