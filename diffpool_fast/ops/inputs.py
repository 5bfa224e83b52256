"""Checking and normalising the inputs of one coarsening step.

Every public entry point calls :func:`check_pool_inputs` once, so the torch path and the
Triton path see the same, already-validated shapes: x [B, N, F], adj [B, N, N], s [B, N, C],
mask [B, N] bool or None. Every error is a ``TypeError`` (wrong kind: not a tensor, a sparse or
nested tensor, a wrong dtype) or a ``ValueError`` (wrong shape, device or values) whose message
names the argument and the shapes.
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


MASK_VALUES_MESSAGE = "mask of a non-bool dtype must hold only 0 and 1; pass a bool tensor (True = real node)"


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _dense_tensor(name: str, t, what: str) -> Tensor:
    """``t`` as an ordinary (strided, non-nested) tensor with data, else a TypeError naming it."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{what}, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got a nested tensor: pad the graphs to one "
            "node count first (torch_geometric.utils.to_dense_batch / to_dense_adj, or "
            "torch.nested.to_padded_tensor) and pass a mask"
        )
    if t.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {t.layout}: "
            f"pass {name}.to_dense() (dense_diff_pool works on padded dense batches)"
        )
    return t


def _batched(name: str, t, ndim_hint: str) -> Tensor:
    t = _dense_tensor(name, t, "")
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    raise ValueError(
        f"{name} must be {ndim_hint} (or the same without the batch dimension), "
        f"got a {t.dim()}-D tensor of shape {_shape(t)}"
    )


def reads_stall(device) -> bool:
    """Whether reading a tensor's values on ``device`` would stall the host until the device
    drains (every device but the CPU): code on such tensors reads none."""
    return device.type != "cpu"


def _check_mask_values(mask: Tensor) -> None:
    """A float or integer mask must hold only 0 and 1: a fractional weight (or 2, or NaN) would
    silently change what the mask means.

    Eagerly on the CPU this is a ``ValueError``. Inside ``torch.compile`` (and ``torch.export``) a
    Python ``if`` on tensor values would be a graph break, and on a GPU reading the values would
    stall the host until the device drains, so there the check is a tensor-side assertion
    (``torch._assert_async``): on CPU a ``RuntimeError`` with this message, on CUDA a device-side
    assert (which ends the CUDA context). A bool mask needs no check.
    """
    bad = (mask != 0) & (mask != 1)
    if torch.compiler.is_compiling() or reads_stall(mask.device):
        # no value read back: on a GPU that would stall the host until the device drains
        torch._assert_async(~bad.any(), MASK_VALUES_MESSAGE)
    elif bool(bad.any()):
        raise ValueError(f"mask of dtype {mask.dtype} must hold only 0 and 1, "
                         "pass a bool tensor (True = real node)")


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
    if mask is not None:
        _dense_tensor("mask", mask, " or None")

    devices = {str(t.device) for t in (x3, adj3, s3)}
    if mask is not None:
        devices.add(str(mask.device))
    if len(devices) > 1:
        raise ValueError(
            "x, adj, s and mask must be on one device, got "
            f"x on {x3.device}, adj on {adj3.device}, s on {s3.device}"
            + (f", mask on {mask.device}" if mask is not None else "")
        )
    if x3.device.type == "meta":
        raise ValueError(
            "x, adj, s" + (" and mask" if mask is not None else "") + " are on the meta device, "
            "which holds no values: dense_diff_pool computes values (and checks the mask's), so "
            "its inputs must be on a real device"
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
            # Float and integer masks are accepted for drop-in use, but only with 0/1 values.
            _check_mask_values(mask_b)
            mask_b = mask_b != 0
    return PoolInputs(x3, adj3, s3, mask_b)


def node_counts(mask: Optional[Tensor], B: int, N: int, device) -> Tensor:
    """Real nodes per graph, [B] int64."""
    if mask is None:
        return torch.full((B,), N, dtype=torch.int64, device=device)
    return mask.sum(dim=1)


def check_num_clusters(num_clusters, B: int, C: int, device) -> Optional[Tensor]:
    """``num_clusters`` as a [B] int64 tensor on ``device`` (or None), else a clear error.

    Accepted: None (every graph uses all C columns of s), a [B] integer tensor, or a sequence
    of B ints; each k_b must lie in [1, C] (a graph keeps at least one cluster, so every real
    row still sums to 1). Inside ``torch.compile`` the range check is a tensor-side
    assertion, as for the mask's values, and so is it for tensors on a GPU (no value is read
    back there).
    """
    if num_clusters is None:
        return None
    if isinstance(num_clusters, (list, tuple)):
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in num_clusters):
            raise TypeError("num_clusters must be a [B] integer tensor or a sequence of ints, got "
                            f"{[type(k).__name__ for k in num_clusters][:4]}")
        num_clusters = torch.tensor(list(num_clusters), dtype=torch.int64, device=device)
    if not isinstance(num_clusters, Tensor):
        raise TypeError(f"num_clusters must be None, a [B] integer tensor or a sequence of ints, "
                        f"got {type(num_clusters).__name__}")
    _dense_tensor("num_clusters", num_clusters, " or None")
    if num_clusters.is_floating_point() or num_clusters.is_complex() or num_clusters.dtype == torch.bool:
        raise TypeError(f"num_clusters must hold integers (clusters per graph), got dtype {num_clusters.dtype}")
    if tuple(num_clusters.shape) != (B,):
        raise ValueError(f"num_clusters must have shape [B] = [{B}] (one cluster count per graph), "
                         f"got {_shape(num_clusters)}")
    if str(num_clusters.device) != str(device):
        raise ValueError(f"num_clusters must be on the device of s ({device}), got {num_clusters.device}")
    k = num_clusters.to(torch.int64)
    bad = (k < 1) | (k > C)
    if torch.compiler.is_compiling() or reads_stall(k.device):
        # no value read back (a graph break; on a GPU a stall until the device drains): an
        # assertion on the device instead
        torch._assert_async(~bad.any(), "num_clusters must lie in [1, C]")
    elif B > 0 and bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"num_clusters must lie in [1, C] with C={C} (the columns of s), "
                         f"got num_clusters[{b}] = {int(k[b])}")
    return k


def cluster_mask(num_clusters: Tensor, C: int) -> Tensor:
    """[B, C] bool, True at the real clusters of each graph: column c of graph b is real when
    c < num_clusters[b]. This is the ``mask`` of the next level's nodes."""
    return torch.arange(C, device=num_clusters.device)[None, :] < num_clusters[:, None]


def mask_logits(s: Tensor, num_clusters: Optional[Tensor]) -> Tensor:
    """s [B, N, C] with the columns past each graph's k_b set to -inf, so a row softmax puts
    exactly 0 there and sends them no gradient (s itself when ``num_clusters`` is None)."""
    if num_clusters is None:
        return s
    keep = cluster_mask(num_clusters, s.shape[-1])
    return s.masked_fill(~keep[:, None, :], float("-inf"))
