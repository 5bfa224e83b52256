"""Every environment variable the package reads, and the constants more than one module shares.

Nothing here imports the rest of the package, so every module may import it.

Environment variables (also listed in README.md):

- ``DIFFPOOL_FAST_BACKEND``: ``torch``, ``triton`` or ``auto``; overrides the ``backend``
  argument of the pooling ops for a whole program.
- ``DIFFPOOL_FAST_FUSED``: ``0`` runs the GNN layer modules instead of the hand-written SAGE
  blocks (``diffpool_fast.nn.sage_blocks``).
- ``DIFFPOOL_FAST_SPARSE``: ``0`` never, ``1`` always, otherwise automatic: whether training runs
  level 0 on edge lists (``train --level0 auto``) instead of padded dense batches.
- ``DIFFPOOL_FAST_DATA``: the default ``--data-root`` of TU datasets (else ``./data``).
- ``DIFFPOOL_FAST_CACHE``: the writable cache of processed datasets (else
  ``~/.cache/diffpool_fast``).
- ``DIFFPOOL_FAST_DIST_TIMEOUT``: seconds a data-parallel collective waits before a lost rank
  stops the run (default 300).
- ``DIFFPOOL_FAST_KERNEL_CONFIGS``: a JSON file of Triton kernel configurations that replace
  the committed tables (``kernels/tuning.py``; what a GPU tuning run tries).
- ``TRITON_INTERPRET``: Triton's own switch; ``1`` runs the kernels on CPU tensors with NumPy.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKEND_ENV = "DIFFPOOL_FAST_BACKEND"
FUSED_ENV = "DIFFPOOL_FAST_FUSED"
SPARSE_ENV = "DIFFPOOL_FAST_SPARSE"
DATA_ROOT_ENV = "DIFFPOOL_FAST_DATA"
CACHE_ENV = "DIFFPOOL_FAST_CACHE"
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"
DIST_TIMEOUT_ENV = "DIFFPOOL_FAST_DIST_TIMEOUT"
KERNEL_CONFIGS_ENV = "DIFFPOOL_FAST_KERNEL_CONFIGS"

#: (variable, meaning) for every variable above, for documentation and ``--help`` texts.
ENVIRONMENT = (
    (BACKEND_ENV, "torch|triton|auto: the pooling backend for the whole program"),
    (FUSED_ENV, "0: run the GNN layer modules instead of the hand-written SAGE blocks"),
    (SPARSE_ENV, "0 never, 1 always, else auto: edge-list level 0 in train --level0 auto"),
    (DATA_ROOT_ENV, "default --data-root of TU datasets (else ./data)"),
    (CACHE_ENV, "cache folder of processed datasets (else ~/.cache/diffpool_fast)"),
    (TRITON_INTERPRET_ENV, "1: Triton's interpreter runs the kernels on CPU tensors"),
    (DIST_TIMEOUT_ENV, "seconds a data-parallel collective waits for a lost rank (default 300)"),
    (KERNEL_CONFIGS_ENV, "a JSON file of Triton kernel configurations replacing the committed ones (GPU tuning)"),
)

#: the pooling backends a caller may ask for
POOL_BACKENDS = ("auto", "torch", "triton")

#: added inside log(S + EPS) of the entropy term, as PyG does
EPS = 1e-15

#: clusters one program of the Triton row and adjacency passes holds (C padded to at most this)
MAX_CLUSTERS = 512

#: x and s dtypes the Triton kernels take; adjacency dtypes besides these: one byte per entry
TRITON_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BYTE_ADJ_DTYPES = (torch.bool, torch.uint8)
TRITON_ADJ_DTYPES = TRITON_FLOAT_DTYPES + BYTE_ADJ_DTYPES

#: bytes of converted adjacency the torch path materialises at once when adj is stored in
#: another dtype than the computation's (bool, uint8, half): a few graphs at a time
CONVERT_CHUNK_BYTES = 64 << 20


def env(name: str, default: str = "") -> str:
    """The value of one of the variables above (stripped), ``default`` when unset."""
    return os.environ.get(name, default).strip()


def backend_override() -> str:
    """``DIFFPOOL_FAST_BACKEND`` lower-cased, or ``""`` when unset."""
    return env(BACKEND_ENV).lower()


def fused_enabled() -> bool:
    return env(FUSED_ENV, "1") != "0"


def sparse_mode() -> str:
    """``"0"``, ``"1"`` or ``"auto"`` from ``DIFFPOOL_FAST_SPARSE``."""
    mode = env(SPARSE_ENV, "auto")
    return mode if mode in ("0", "1") else "auto"


#: whether triton can be imported, probed once at import: ``torch.compile`` (dynamo 2.11) refuses
#: to trace ``importlib.util.find_spec``, so no traced code may call it
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return TRITON_IMPORTABLE


def triton_interpreting() -> bool:
    return env(TRITON_INTERPRET_ENV, "0") not in ("", "0")
