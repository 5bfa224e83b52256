"""The functional DiffPool ops: input checks, the backend choice, the torch and Triton paths.

``pool.dense_diff_pool`` validates (``inputs``), coarsens on the backend ``dispatch`` picks
(``coarsen_torch`` or ``coarsen_triton``, whose kernels live in ``diffpool_fast.kernels``) and
normalises the losses. ``sparse_pool.sparse_diff_pool`` is the same op on PyG's sparse batch
(``edge_index``, ``batch``), with no N x N term. ``reference`` holds PyG's formulas, the test oracle. ``block_sparse``
multiplies with a batch's adjacency as one block-diagonal CSR matrix. The math of the
coarsening step is derived in docs/math.md.
"""
from .pool import dense_diff_pool
from .reference import coarsen_reference, dense_diff_pool_reference
from .sparse_pool import sparse_diff_pool

__all__ = ["dense_diff_pool", "sparse_diff_pool", "coarsen_reference", "dense_diff_pool_reference"]
