"""diffpool_fast: fast, memory-lean DiffPool coarsening.

``dense_diff_pool`` is a drop-in for ``torch_geometric.nn.dense_diff_pool``; the dense
coarsening runs on fused Triton kernels on CUDA and on a lean PyTorch path elsewhere.
``sparse_diff_pool`` computes the same from PyG's sparse batches (edge_index, batch).

Subpackages: ``ops`` (the functional pooling op and its backends), ``nn`` (layers and models),
``train`` (the training application), ``profiling`` (cost model and benchmarks), ``cli``.
"""
from .config import BACKEND_ENV
from .config import POOL_BACKENDS as BACKENDS
from .nn.model import DiffPool, DiffPoolClassifier
from .ops.pool import dense_diff_pool
from .ops.sparse_pool import sparse_diff_pool

__version__ = "0.1.0"
__all__ = ["dense_diff_pool", "sparse_diff_pool", "DiffPool", "DiffPoolClassifier", "BACKENDS", "BACKEND_ENV", "__version__"]
