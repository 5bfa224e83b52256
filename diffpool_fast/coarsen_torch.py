"""The memory-lean PyTorch path of one DiffPool coarsening step.

Never builds a B x N x N intermediate. The link loss uses the identity (shared/MATH.md)

    ||A - S S^T||_F^2 = ||A||_F^2 - 2 tr(S^T A S) + ||S^T S||_F^2

so it reuses out_adj = S^T (A S) and one C x C product. The three scalar terms are summed in
float64: they can be large and nearly cancel, and the per-graph sum of a few numbers in float64
costs nothing. The result is clamped at 0 (cancellation can leave a tiny negative value).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

EPS = 1e-15

# Bytes of converted adjacency materialised at once when adj is not already in the compute
# dtype (bool/uint8/half adjacency): chunks of graphs keep the copy small.
_CONVERT_CHUNK_BYTES = 64 << 20


def compute_dtype(x: Tensor, s: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (accumulate in fp32), else the promoted input dtype."""
    dt = torch.promote_types(x.dtype, s.dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def _graph_chunk(N: int, itemsize: int) -> int:
    return max(1, _CONVERT_CHUNK_BYTES // max(1, N * N * itemsize))


class _ConvertedAdjMatmul(torch.autograd.Function):
    """A S for an adjacency stored in another dtype (bool, uint8, fp16, bf16).

    Converts a few graphs at a time and saves only the original adj for backward, so neither
    pass holds a converted B x N x N copy.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, S: Tensor) -> Tensor:
        B, N, _ = adj.shape
        out = S.new_empty(S.shape)
        step = _graph_chunk(N, S.element_size())
        for b0 in range(0, B, step):
            out[b0 : b0 + step] = adj[b0 : b0 + step].to(S.dtype) @ S[b0 : b0 + step]
        ctx.save_for_backward(adj, S)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        adj, S = ctx.saved_tensors
        B, N, _ = adj.shape
        step = _graph_chunk(N, S.element_size())
        g_adj = g_S = None
        if ctx.needs_input_grad[1]:
            g_S = torch.empty_like(S)
            for b0 in range(0, B, step):
                a = adj[b0 : b0 + step].to(S.dtype)
                g_S[b0 : b0 + step] = a.transpose(1, 2) @ g[b0 : b0 + step]
        if ctx.needs_input_grad[0]:
            g_adj = (g @ S.transpose(1, 2)).to(adj.dtype)
        return g_adj, g_S


def adjacency_times_assignment(adj: Tensor, S: Tensor) -> Tensor:
    """A S, [B, N, C], without a converted copy of A."""
    if adj.dtype == S.dtype:
        return adj @ S
    return _ConvertedAdjMatmul.apply(adj, S)


def adjacency_sq_norm(adj: Tensor) -> Tensor:
    """||A_b||_F^2 per graph in float64, [B], without an N x N temporary."""
    B = adj.shape[0]
    if adj.dtype == torch.bool:
        return torch.count_nonzero(adj.flatten(1), dim=1).to(torch.float64)
    if adj.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(adj.flatten(1), dim=1).to(torch.float64).square()
    # uint8 weights (squares summed exactly in int64) and half floats (fp32 norm): a reduction
    # with a wider dtype would convert the whole adjacency at once, so go a few graphs at a time.
    wide = torch.int64 if adj.dtype == torch.uint8 else torch.float32
    step = _graph_chunk(adj.shape[1], torch.empty((), dtype=wide).element_size())
    parts = []
    for b0 in range(0, B, step):
        part = adj[b0 : b0 + step].flatten(1).to(wide)
        if wide == torch.int64:
            parts.append(part.square().sum(1).to(torch.float64))
        else:
            parts.append(torch.linalg.vector_norm(part, dim=1).to(torch.float64).square())
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=adj.device)
    return torch.cat(parts)


def coarsen_torch(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One coarsening step on the PyTorch path; same contract as ``coarsen_reference``.

    Inputs are validated and batched (see ``inputs.check_pool_inputs``). Returns
    ``(out [B,C,F], out_adj [B,C,C], link_sq [B] float64, ent_sum [B] float64)``; out and
    out_adj are in the compute dtype (fp32 for half inputs).
    """
    dt = compute_dtype(x, s)
    S = torch.softmax(s.to(dt), dim=-1)
    if mask is not None:
        S = S * mask.unsqueeze(-1).to(dt)
    St = S.transpose(1, 2)
    # S is 0 on padded rows, so S^T X needs no masked copy of X.
    out = St @ x.to(dt)
    AS = adjacency_times_assignment(adj, S)
    out_adj = St @ AS
    StS = St @ S
    f64 = torch.float64
    trace = (AS * S).sum(dim=(1, 2), dtype=f64)
    sts_sq = StS.to(f64).square().sum(dim=(1, 2))
    link_sq = (adjacency_sq_norm(adj) - 2.0 * trace + sts_sq).clamp_min(0.0)
    ent_sum = -(S * torch.log(S + EPS)).sum(dim=(1, 2), dtype=f64)
    return out, out_adj, link_sq, ent_sum
