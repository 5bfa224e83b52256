"""A batch of sparse input graphs as one block-diagonal CSR matrix, for level 0 on large graphs.

The input graphs of graph-classification datasets are sparse (PROTEINS and D&D: about 4 edges per
node), but a dense batch makes every product with A cost B * N^2 per output column. At level 0
of a batch padded to N = 620 (PROTEINS) or 5,748 (D&D) nodes those products dominate a training
step: the GNN layers' A H, their backward A^T G, and the pooling's A S over all C clusters.
:class:`BlockSparseAdj` holds the batch's adjacency as one CSR matrix over the B * N rows
(graph b's block at rows and columns b*N .. b*N+N-1), built once per step from the dense batch
(one pass over it), so that each product costs O(nnz * K) instead of O(B N^2 K).

Only the products change: the fused SAGE blocks (diffpool_fast.nn.sage_blocks) and the torch coarsening
(diffpool_fast.ops.coarsen_torch) take a BlockSparseAdj in place of the dense adjacency at level 0,
and compute the same values (up to summation order). A level-0 adjacency never needs a gradient
(it is input data), so none is computed. :class:`diffpool_fast.nn.model.DiffPoolClassifier` decides
per batch whether to use it (:func:`worth_it`).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..config import sparse_mode

__all__ = ["BlockSparseAdj", "worth_it", "MIN_NODES", "MAX_DENSITY"]

#: Padded node count from which level 0 uses the sparse adjacency (CPU, automatic mode). Below it
#: the dense batched products cost about what building the CSR matrix costs.
MIN_NODES = 384
#: Largest fraction of nonzero entries for the sparse path.
MAX_DENSITY = 0.05


def worth_it(adj: Tensor) -> bool:
    """Whether level 0 of this batch should use :class:`BlockSparseAdj`.

    ``DIFFPOOL_FAST_SPARSE=0`` never, ``=1`` always (for tests), otherwise (auto) on CPU when the
    batch pads to at least :data:`MIN_NODES` nodes and at most :data:`MAX_DENSITY` of the
    adjacency is nonzero. The GPU keeps the dense path (its fused kernels read A once; the sparse
    path has not been measured there).
    """
    mode = sparse_mode()
    if mode == "0" or adj.requires_grad or adj.dim() != 3:
        return False
    if mode == "1":
        return True
    if adj.device.type != "cpu" or adj.shape[-1] < MIN_NODES:
        return False
    return int(torch.count_nonzero(adj)) <= MAX_DENSITY * adj.numel()


class BlockSparseAdj:
    """Adjacency matrices [B, N, N] as one block-diagonal CSR matrix [B*N, B*N] (see module doc).

    Attributes: ``shape`` (B, N, N), ``dtype`` (of the values), ``deg`` [B, N, 1] row sums,
    ``sq_norm`` [B] float64 (||A_b||_F^2), ``nnz``. ``mm(X)`` = A X and ``tmm(X)`` = A^T X for
    X [B, N, K]; ``symmetric=True`` (the caller's promise) makes ``tmm`` use A. ``entries()``:
    the stored entries as (rows, cols, values) [nnz] in the [B*N, B*N] matrix's coordinates.
    """

    def __init__(self, adj: Tensor, dtype: torch.dtype, symmetric: bool = False):
        if adj.dim() != 3 or adj.shape[1] != adj.shape[2]:
            raise ValueError(f"adj must be [B, N, N], got {list(adj.shape)}")
        B, N, _ = adj.shape
        self.shape = (B, N, N)
        self.dtype = dtype
        self.device = adj.device
        self.symmetric = bool(symmetric)
        rows2 = adj.reshape(B * N, N)
        nz = rows2.nonzero()  # row-major order: sorted by row, then column
        r, cin = nz[:, 0], nz[:, 1]
        c = cin + torch.div(r, N, rounding_mode="floor") * N
        val = rows2[r, cin].to(dtype)
        self.nnz = int(r.numel())
        self._r, self._c, self._val = r, c, val
        self._a = self._csr(r, c, val)
        self._at: Optional[Tensor] = None
        self.deg = torch.zeros(B * N, dtype=dtype, device=adj.device).index_add_(0, r, val).view(B, N, 1)
        graph = torch.div(r, N, rounding_mode="floor")
        self.sq_norm = torch.zeros(B, dtype=torch.float64, device=adj.device).index_add_(
            0, graph, val.to(torch.float64).square())

    def _csr(self, rows: Tensor, cols: Tensor, vals: Tensor) -> Tensor:
        B, N, _ = self.shape
        crow = torch.zeros(B * N + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.bincount(rows, minlength=B * N).cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(crow, cols, vals, (B * N, B * N))

    def entries(self):
        """(rows, cols, values), each [nnz]: entry A_b[i, j] is at row b*N + i, column b*N + j,
        sorted by row, then column; the values in ``dtype``."""
        return self._r, self._c, self._val

    def mm(self, X: Tensor) -> Tensor:
        """A X for X [B, N, K]."""
        return self._prod(self._a, X)

    def tmm(self, X: Tensor) -> Tensor:
        """A^T X for X [B, N, K]."""
        if self.symmetric:
            return self._prod(self._a, X)
        if self._at is None:  # the transpose, built the first time it is needed
            order = torch.argsort(self._c * (self.shape[0] * self.shape[1]) + self._r)
            self._at = self._csr(self._c[order], self._r[order], self._val[order])
        return self._prod(self._at, X)

    def _prod(self, a: Tensor, X: Tensor) -> Tensor:
        B, N, _ = self.shape
        if X.dtype != self.dtype:
            raise TypeError(f"BlockSparseAdj holds {self.dtype} values, got X of dtype {X.dtype}")
        K = X.shape[-1]
        return torch.sparse.mm(a, X.reshape(B * N, K)).view(B, N, K)
