"""Dense GNN layers with PyTorch Geometric's semantics and mask handling.

Every layer takes ``x`` [B, N, F], ``adj`` [B, N, N] and an optional ``mask`` [B, N] (True = real
node) and returns [B, N, F'] with the rows of padded nodes set to 0, as PyG's ``DenseGCNConv``,
``DenseSAGEConv`` and ``DenseGINConv`` do. 2-D inputs are a batch of one.

``adj`` may be floating point (weighted, e.g. a pooled ``S^T A S``) or bool/uint8 (a binary graph
kept in one byte per entry). A byte adjacency is converted to the feature dtype only where a
matrix product needs it; a model that runs several layers on one graph should convert once
(see ``DiffPoolClassifier``), since every conversion writes B*N*N floats.

- :class:`DenseGCN`: ``D^-1/2 (A + I) D^-1/2 X W + b`` (the loop replaces A's diagonal, as in
  PyG); the normalisation is applied to the features, never to a copy of A.
- :class:`DenseSAGE`: ``W_rel mean_{j in N(i)} x_j + W_root x_i + b``, the degree clamped at 1 so
  isolated rows (empty clusters after pooling, padding) stay finite.
- :class:`DenseGIN`: ``nn((1 + eps) x_i + sum_{j in N(i)} x_j)``.
- :class:`MaskedBatchNorm`: batch norm whose statistics come from real nodes only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseGCN", "DenseSAGE", "DenseGIN", "MaskedBatchNorm", "LAYER_TYPES", "make_layer"]


def _batched(x: Tensor, adj: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if adj.dim() == 2:
        adj = adj.unsqueeze(0)
    if x.dim() != 3 or adj.dim() != 3:
        raise ValueError(
            f"x must be [B, N, F] and adj [B, N, N] (or 2-D for one graph), got x {list(x.shape)}, "
            f"adj {list(adj.shape)}"
        )
    B, N = x.shape[0], x.shape[1]
    if adj.shape[-1] != adj.shape[-2] or adj.shape[-1] != N or adj.shape[0] not in (1, B):
        raise ValueError(
            f"adj must be [B, N, N] matching x [B, N, F], got x {list(x.shape)}, adj {list(adj.shape)}"
        )
    if mask is not None:
        if mask.numel() != B * N:
            raise ValueError(f"mask must be [B, N] = [{B}, {N}], got {list(mask.shape)}")
        mask = mask.reshape(B, N)
    return x, adj, mask


def _as_compute(adj: Tensor, dtype: torch.dtype) -> Tensor:
    return adj if adj.dtype == dtype else adj.to(dtype)


def _apply_mask(out: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return out
    return out * mask.unsqueeze(-1).to(out.dtype)


def _row_sum(adj: Tensor, dtype: torch.dtype) -> Tensor:
    """Row sums of A in ``dtype`` without a converted copy of a byte adjacency."""
    if adj.dtype == torch.bool or adj.dtype == torch.uint8:
        return adj.sum(dim=-1, dtype=torch.int64 if adj.dtype == torch.uint8 else None).to(dtype)
    return adj.sum(dim=-1).to(dtype)


class DenseGCN(nn.Module):
    r"""Dense graph convolution (Kipf & Welling), PyG's ``DenseGCNConv`` semantics.

    ``out = D^{-1/2} \hat A D^{-1/2} X W + b`` with ``\hat A`` = A whose diagonal is *set* to 1
    (2 when ``improved``) when ``add_loop``, and D its row sums clamped at 1. Instead of building
    ``\hat A`` and its normalised copy, it computes ``d * (A (d * XW) + (fill - diag A) * d * XW)``
    with ``d = D^{-1/2}``: one product with A as given.
    """

    def __init__(self, in_channels: int, out_channels: int, improved: bool = False, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.improved = in_channels, out_channels, improved
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.lin.weight)  # PyG's glorot
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None, add_loop: bool = True) -> Tensor:
        x, adj, mask = _batched(x, adj, mask)
        h = self.lin(x)
        deg = _row_sum(adj, h.dtype)
        if add_loop:
            fill = 2.0 if self.improved else 1.0
            diag = torch.diagonal(adj, dim1=-2, dim2=-1).to(h.dtype)
            loop = fill - diag  # what the self loop adds on top of A's own diagonal
            deg = deg + loop
        d = deg.clamp_min(1.0).rsqrt().unsqueeze(-1)
        hs = d * h
        agg = _as_compute(adj, h.dtype) @ hs
        if add_loop:
            agg = agg + loop.unsqueeze(-1) * hs
        out = d * agg
        if self.bias is not None:
            out = out + self.bias
        return _apply_mask(out, mask)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, improved={self.improved}"


class DenseSAGE(nn.Module):
    r"""Dense GraphSAGE with mean aggregation, PyG's ``DenseSAGEConv`` semantics.

    ``out = W_rel (A X / deg) + W_root X + b``, deg = row sums of A clamped at 1. Because W_rel is
    linear, the product with A runs at the narrower of the input and output widths.
    """

    def __init__(self, in_channels: int, out_channels: int, normalize: bool = False, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.normalize = in_channels, out_channels, normalize
        self.lin_rel = nn.Linear(in_channels, out_channels, bias=False)
        self.lin_root = nn.Linear(in_channels, out_channels, bias=bias)

    def reset_parameters(self) -> None:
        self.lin_rel.reset_parameters()
        self.lin_root.reset_parameters()

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x, adj, mask = _batched(x, adj, mask)
        a = _as_compute(adj, x.dtype)
        inv_deg = _row_sum(adj, x.dtype).clamp_min(1.0).reciprocal().unsqueeze(-1)
        w_rel, w_root, b = self.lin_rel.weight, self.lin_root.weight, self.lin_root.bias
        # The product with A runs at the narrower width. When the output is narrower, both
        # linear maps run as one matmul (measured faster on CPU there; for equal or wider output
        # the strided slice of the fused result made the product with A slower).
        if self.out_channels < self.in_channels:
            fo = self.out_channels
            bias = None if b is None else torch.cat([torch.zeros_like(b), b])
            h = F.linear(x, torch.cat([w_rel, w_root], 0), bias)  # [B, N, 2 * out]: rel | root
            out = ((a @ h[..., :fo]) * inv_deg).add_(h[..., fo:])
        else:
            out = F.linear((a @ x) * inv_deg, w_rel) + F.linear(x, w_root, b)
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        return _apply_mask(out, mask)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, normalize={self.normalize}"


class DenseGIN(nn.Module):
    r"""Dense graph isomorphism layer, PyG's ``DenseGINConv`` semantics.

    ``out = nn((1 + eps) x_i + sum_j A_ij x_j)``. ``nn`` defaults to
    ``Linear(in, hidden) -> ReLU -> Linear(hidden, out)`` with ``hidden = out``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: Optional[int] = None,
        eps: float = 0.0,
        train_eps: bool = False,
        nn_module: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        hidden = hidden_channels or out_channels
        self.nn = nn_module if nn_module is not None else nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_channels)
        )
        self.initial_eps = eps
        if train_eps:
            self.eps = nn.Parameter(torch.full((1,), float(eps)))
        else:
            self.register_buffer("eps", torch.full((1,), float(eps)))

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None, add_loop: bool = True) -> Tensor:
        x, adj, mask = _batched(x, adj, mask)
        out = _as_compute(adj, x.dtype) @ x
        if add_loop:
            out = out + (1 + self.eps) * x
        return _apply_mask(self.nn(out), mask)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class MaskedBatchNorm(nn.BatchNorm1d):
    """Batch norm over the feature dimension of [B, N, F], statistics from real nodes only.

    PyG's DiffPool example normalises the padding rows too, so a batch's padding changes the
    statistics of its real nodes. Here padded rows are left out of the statistics and come out 0.
    A training batch with fewer than two real rows uses the running statistics (batch statistics
    of one row are undefined).
    """

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        B, N, C = x.shape
        if mask is None:
            rows = x.reshape(B * N, C)
            if self.training and rows.shape[0] < 2:
                return self._eval_rows(rows).reshape(B, N, C)
            return super().forward(rows).reshape(B, N, C)
        if not self.training:
            # Running statistics: an affine map per channel, so padded rows need no gather.
            return _apply_mask(self._eval_rows(x.reshape(B * N, C)).reshape(B, N, C), mask)
        # Statistics from masked sums rather than gathering the real rows and scattering them
        # back: fewer, cheaper ops on the small batches this runs on.
        m = mask.reshape(B, N, 1).to(x.dtype)
        count = m.sum()
        if float(count) < 2:
            return self._eval_rows(x.reshape(B * N, C)).reshape(B, N, C) * m
        mean = (x * m).sum(dim=(0, 1)) / count
        centred = (x - mean) * m
        var = centred.square().sum(dim=(0, 1)) / count  # biased, as batch norm normalises with
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), mom)
                self.running_var.lerp_(var.detach() * (count / (count - 1)), mom)
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out * m

    def _eval_rows(self, rows: Tensor) -> Tensor:
        return F.batch_norm(
            rows, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


LAYER_TYPES = ("sage", "gcn", "gin")


def make_layer(kind: str, in_channels: int, out_channels: int) -> nn.Module:
    """A dense GNN layer by name: ``"sage"``, ``"gcn"`` or ``"gin"``."""
    if kind == "sage":
        return DenseSAGE(in_channels, out_channels)
    if kind == "gcn":
        return DenseGCN(in_channels, out_channels)
    if kind == "gin":
        return DenseGIN(in_channels, out_channels)
    raise ValueError(f"gnn must be one of {LAYER_TYPES}, got {kind!r}")
