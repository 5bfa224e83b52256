"""Old module path, kept as a re-export: the op lives in :mod:`diffpool_fast.ops.pool`."""
from .ops.pool import NORMALIZE_MODES, dense_diff_pool  # noqa: F401

__all__ = ["dense_diff_pool", "NORMALIZE_MODES"]
