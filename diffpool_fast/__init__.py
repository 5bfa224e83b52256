"""diffpool_fast: fast, memory-lean DiffPool coarsening.

``dense_diff_pool`` is a drop-in for ``torch_geometric.nn.dense_diff_pool``; the dense
coarsening runs on fused Triton kernels on CUDA and on a lean PyTorch path elsewhere.
"""
from .pool import dense_diff_pool
from .dispatch import BACKENDS, BACKEND_ENV
from .model import DiffPool, DiffPoolClassifier

__version__ = "0.1.0"
__all__ = ["dense_diff_pool", "DiffPool", "DiffPoolClassifier", "BACKENDS", "BACKEND_ENV", "__version__"]
