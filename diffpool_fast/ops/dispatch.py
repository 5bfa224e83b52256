"""The one place that decides which backend computes a coarsening step.

Everything else calls :func:`coarsen` and is unaware of the choice.

- ``"torch"``: the lean PyTorch path (any device).
- ``"triton"``: the fused Triton kernels. On CUDA tensors they run compiled; on CPU tensors
  they run only under ``TRITON_INTERPRET=1`` (Triton's NumPy interpreter), else a clear error.
- ``"auto"``: on CUDA tensors, the path measured faster for this device capability and shape
  bucket (``dispatch_table``: N, C, F rounded up to powers of two, the dtypes of x and adj);
  where the table has no entry, Triton when triton is importable. On other devices: torch.

The environment variable ``DIFFPOOL_FAST_BACKEND`` (torch|triton|auto) overrides the argument
for a whole program.

Nothing here reads a file, probes an import or syncs with the device per call: whether triton is
importable is resolved once, at import; the table is read once, at import; a device's capability
once, at its first call. So ``torch.compile(fullgraph=True)`` traces the choice as plain Python.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

from torch import Tensor

from ..config import BACKEND_ENV, POOL_BACKENDS, TRITON_IMPORTABLE, backend_override, triton_interpreting
from . import dispatch_table
from .coarsen_torch import coarsen_torch
from .inputs import mask_logits

_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_backend(backend) -> None:
    """A TypeError for a backend that is not a str, a ValueError for an unknown name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {POOL_BACKENDS}, got {type(backend).__name__} {backend!r}")
    if backend not in POOL_BACKENDS:
        raise ValueError(f"backend must be one of {POOL_BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device, key: Optional[dispatch_table.Bucket] = None) -> str:
    """Return "torch" or "triton" for a requested backend and the tensors' device.

    ``key``: the shape bucket of the call (``dispatch_table.bucket_of(x, adj, s)``); with it,
    ``"auto"`` on CUDA takes the table's measured choice for this device's capability and bucket.
    Without it, or where the table has no entry, ``"auto"`` on CUDA is Triton when importable.

    The argument is checked even when ``DIFFPOOL_FAST_BACKEND`` overrides it, so that a typo does
    not pass unnoticed until the variable is unset.
    """
    check_backend(backend)
    forced = backend_override()
    if forced:
        if forced not in POOL_BACKENDS:
            raise ValueError(
                f"environment variable {BACKEND_ENV}={forced!r} is not one of {POOL_BACKENDS}"
            )
        backend = forced
    is_cuda = getattr(device, "type", str(device)) == "cuda"
    if backend == "auto":
        if not is_cuda:
            return "torch"
        if not TRITON_IMPORTABLE:
            return "torch"
        return dispatch_table.lookup(device, key) or "triton"
    if backend == "triton":
        if not TRITON_IMPORTABLE:
            raise RuntimeError(
                "backend='triton' needs the triton package: pip install 'diffpool_fast[triton]'"
            )
        if not is_cuda and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' got tensors on {device}: Triton kernels run on CUDA tensors, "
                "or on CPU only under the interpreter (set TRITON_INTERPRET=1 before importing "
                "diffpool_fast); use backend='torch' or 'auto' on CPU"
            )
    return backend


def coarsen(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Optional[Tensor],
    backend: str = "auto",
    adj_symmetric: Optional[bool] = None,
    adj_op=None,
    num_clusters: Optional[Tensor] = None,
    exact_link: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-graph coarsening quantities ``(out, out_adj, link_sq, ent_sum)`` on the chosen backend.

    Inputs must already be checked and batched (``inputs.check_pool_inputs``, and
    ``inputs.check_num_clusters`` for ``num_clusters``). ``adj_op``: the same adjacency as a
    :class:`diffpool_fast.ops.block_sparse.BlockSparseAdj`, which the torch path then multiplies
    with (the Triton kernels read the dense ``adj``). ``num_clusters`` [B] int64: graph b's softmax
    runs over its first k_b columns, the others of S are exactly 0 (the Triton row pass masks
    them in the kernel; the torch path sets those logits to -inf first). ``exact_link=False``: the
    caller discards ``link_sq`` (the BCE link loss), so no graph gets its direct recompute
    (``link_exact``) and ``link_sq`` may carry the identity's cancellation.
    """
    chosen = resolve_backend(backend, x.device, dispatch_table.bucket_of(x, adj, s))
    if chosen == "triton":
        try:
            from . import coarsen_triton
        except ImportError as err:  # pragma: no cover - depends on the build
            raise RuntimeError(f"the Triton path is not available in this build: {err}") from err
        reason = coarsen_triton.unsupported_reason(x, adj, s, mask)
        if reason is None:
            return coarsen_triton.coarsen_triton(x, adj, s, mask, adj_symmetric=adj_symmetric,
                                                 num_clusters=num_clusters, exact_link=exact_link)
        _warn_once(reason, f"diffpool_fast: falling back to the torch path: {reason}")
    return coarsen_torch(x, adj if adj_op is None else adj_op, mask_logits(s, num_clusters), mask, adj_symmetric,
                         exact_link)


def explain_auto(x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor]) -> Tuple[str, str]:
    """``(path, why)``: the path ``backend="auto"`` runs for these batched inputs, as
    :func:`coarsen` decides it (the override variable included, the torch fallback for inputs
    the kernels cannot take too), and where that choice comes from. For reports, not hot paths."""
    forced = backend_override()
    key = dispatch_table.bucket_of(x, adj, s)
    chosen = resolve_backend("auto", x.device, key)
    if forced:
        why = f"{BACKEND_ENV}={forced}"
    elif x.device.type != "cuda":
        why = f"not CUDA ({x.device.type})"
    elif not TRITON_IMPORTABLE:
        why = "triton is not importable"
    else:
        why = dispatch_table.describe(x.device, key)
    if chosen == "triton":
        from . import coarsen_triton

        reason = coarsen_triton.unsupported_reason(x, adj, s, mask)
        if reason is not None:
            return "torch", f"{why}; the Triton path falls back: {reason}"
    return chosen, why
