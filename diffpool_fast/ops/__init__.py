"""The functional DiffPool ops: input checks, the backend choice, the torch and Triton paths.

``pool.dense_diff_pool`` validates (``inputs``), coarsens on the backend ``dispatch`` picks
(``coarsen_torch`` or ``coarsen_triton``, whose kernels live in ``diffpool_fast.kernels``) and
normalises the losses. ``reference`` holds PyG's formulas, the test oracle. ``block_sparse``
multiplies with a batch's adjacency as one block-diagonal CSR matrix. The math of the
coarsening step is derived in docs/math.md.
"""
from .pool import dense_diff_pool
from .reference import coarsen_reference, dense_diff_pool_reference

__all__ = ["dense_diff_pool", "coarsen_reference", "dense_diff_pool_reference"]
