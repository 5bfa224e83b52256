"""Checking and normalising the inputs of one coarsening step.

Every public entry point calls :func:`check_pool_inputs` once, so the torch path and the
Triton path see the same, already-validated shapes: x [B, N, F], adj [B, N, N], s [B, N, C],
mask [B, N] bool or None.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..config import BYTE_ADJ_DTYPES


class PoolInputs(NamedTuple):
    x: Tensor  # [B, N, F] floating
    adj: Tensor  # [B, N, N] floating, bool or uint8
    s: Tensor  # [B, N, C] floating (assignment logits)
    mask: Optional[Tensor]  # [B, N] bool, or None when every node is real


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _batched(name: str, t, ndim_hint: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    raise ValueError(
        f"{name} must be {ndim_hint} (or the same without the batch dimension), "
        f"got a {t.dim()}-D tensor of shape {_shape(t)}"
    )


def check_pool_inputs(x, adj, s, mask=None) -> PoolInputs:
    """Validate DiffPool inputs and return them batched.

    2-D inputs are a batch of one, as in ``torch_geometric.nn.dense_diff_pool``. Errors name the
    argument and the shapes involved.
    """
    x3 = _batched("x", x, "[B, N, F]")
    adj3 = _batched("adj", adj, "[B, N, N]")
    s3 = _batched("s", s, "[B, N, C]")

    if not x3.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x3.dtype}")
    if not s3.is_floating_point():
        raise TypeError(
            f"s (assignment logits) must be a floating-point tensor, got dtype {s3.dtype}"
        )
    if not (adj3.is_floating_point() or adj3.dtype in BYTE_ADJ_DTYPES):
        raise TypeError(
            f"adj must be floating point, bool or uint8, got dtype {adj3.dtype}"
        )

    devices = {str(t.device) for t in (x3, adj3, s3)}
    if mask is not None and isinstance(mask, Tensor):
        devices.add(str(mask.device))
    if len(devices) > 1:
        raise ValueError(
            "x, adj, s and mask must be on one device, got "
            f"x on {x3.device}, adj on {adj3.device}, s on {s3.device}"
            + (f", mask on {mask.device}" if isinstance(mask, Tensor) else "")
        )

    B, N = x3.shape[0], x3.shape[1]
    if adj3.shape[1] != adj3.shape[2]:
        raise ValueError(f"adj must be square in its last two dimensions, got shape {_shape(adj)}")
    if adj3.shape[0] != B or s3.shape[0] != B:
        raise ValueError(
            "batch sizes disagree: "
            f"x {_shape(x)}, adj {_shape(adj)}, s {_shape(s)} (the first dimension is the batch)"
        )
    if adj3.shape[1] != N or s3.shape[1] != N:
        raise ValueError(
            "node counts disagree: "
            f"x {_shape(x)} has N={N}, adj {_shape(adj)} has N={adj3.shape[1]}, "
            f"s {_shape(s)} has N={s3.shape[1]}"
        )
    if s3.shape[2] < 1:
        raise ValueError(f"s must have at least one cluster, got shape {_shape(s)}")

    mask_b = None
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool (or 0/1 integers or floats), got dtype {mask.dtype}")
        if mask.numel() != B * N or not (
            tuple(mask.shape) == (B, N) or (mask.dim() == 1 and B == 1)
            or tuple(mask.shape) == (B, N, 1)
        ):
            raise ValueError(
                f"mask must have shape [B, N] = [{B}, {N}] to match x {_shape(x)}, "
                f"got {_shape(mask)}"
            )
        mask_b = mask.reshape(B, N)
        if mask_b.dtype != torch.bool:
            # Float and integer masks are accepted for drop-in use, but only with 0/1 values:
            # a fractional weight would silently change what the mask means.
            bad = (mask_b != 0) & (mask_b != 1)
            if bool(bad.any()):
                raise ValueError(
                    f"mask of dtype {mask_b.dtype} must hold only 0 and 1, "
                    "pass a bool tensor (True = real node)"
                )
            mask_b = mask_b != 0
    return PoolInputs(x3, adj3, s3, mask_b)


def node_counts(mask: Optional[Tensor], B: int, N: int, device) -> Tensor:
    """Real nodes per graph, [B] int64."""
    if mask is None:
        return torch.full((B,), N, dtype=torch.int64, device=device)
    return mask.sum(dim=1)
