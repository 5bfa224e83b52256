"""A whole GraphSAGE block as one autograd Function with a hand-written backward.

At the sizes DiffPool trains on (tens to a few hundred nodes per graph, 64 channels) a training
step is hundreds of small tensor operations, and the time goes to their per-operation overhead
and autograd's bookkeeping, not to arithmetic. :class:`SageBlockFunction` computes what
:class:`diffpool_fast.model.DenseGNN` computes for ``gnn="sage"`` in training mode, layer by
layer ``ReLU(SAGE(h))`` followed by batch norm over the real nodes (or no norm), with the layer
outputs concatenated (jumping knowledge), in about 20 tensor operations per layer each way and a
single autograd node for the block.

Per layer, with m the node mask (1 = real node), deg = A's row sums, q = 1 / max(deg, 1):

    rel  = h W_rel^T                  (the product with A runs after the linear map)
    pre  = h W_root^T + b + q * (A rel)
    r    = m * relu(pre)
    out  = m * (r k + t)              k = w / sqrt(var + eps), t = beta - mean k

with mean and var (biased) over the n real rows of r. Batch-norm statistics use
E[r^2] - E[r]^2 accumulated in float64 (one pass over r instead of two). The backward pass is
the chain rule through these lines: the batch-norm gradient written as
``dr = k go + alpha r + beta`` with per-channel alpha, beta; ReLU's through ``r > 0`` (which is
also 0 on padded rows); the gradients of A (``dagg rel^T`` plus the degree term, as A's row sums
are differentiated like in PyG's layer) only when A requires one. Checked against the module path
in float64 (tests/test_fused.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["SageBlockFunction", "sage_block"]


class SageBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, adj, mask, count, bn_state, n_layers, *params):
        # params: per layer W_rel [Fo, Fi], W_root [Fo, Fi], b [Fo], then (w, beta) if batch norm.
        # count: the number of real nodes (B * N without a mask), known to the caller.
        B, N, _ = x.shape
        use_bn = bn_state is not None
        per = 5 if use_bn else 3
        m = None if mask is None else mask.reshape(B, N, 1).to(x.dtype)
        deg = adj.sum(dim=-1, keepdim=True)
        q = deg.clamp_min(1.0).reciprocal()
        count = float(count)
        need_adj_grad = ctx.needs_input_grad[1]
        h = x
        outs: List[Tensor] = []
        saved: List[Tensor] = []
        stats: List[Tensor] = []
        for li in range(n_layers):
            p = params[li * per:(li + 1) * per]
            w_rel, w_root, b = p[0], p[1], p[2]
            fo = w_rel.shape[0]
            h2 = h.reshape(B * N, h.shape[-1])
            rel = torch.mm(h2, w_rel.t()).view(B, N, fo)
            root = torch.addmm(b, h2, w_root.t()).view(B, N, fo)
            agg = torch.bmm(adj, rel)
            r = torch.addcmul(root, agg, q).relu_()
            if m is not None:
                r.mul_(m)
            if use_bn:
                out, mean, rstd = _bn_forward(r, m, count, p[3], p[4], bn_state[li])
                stats += [mean, rstd]
            else:
                out = r
            saved.append(r)
            if need_adj_grad:
                saved += [agg, rel]
            outs.append(out)
            h = out
        result = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        ctx.widths = [o.shape[-1] for o in outs]
        ctx.n_layers, ctx.use_bn, ctx.per, ctx.count = n_layers, use_bn, per, count
        ctx.eps = [bn.eps for bn in bn_state] if use_bn else None
        ctx.has_mask = m is not None
        ctx.save_for_backward(x, adj, q, deg, *([m] if m is not None else []), result, *saved, *stats, *params)
        return result

    @staticmethod
    def backward(ctx, grad):
        L, use_bn, per, count = ctx.n_layers, ctx.use_bn, ctx.per, ctx.count
        saved = ctx.saved_tensors
        x, adj, q, deg = saved[:4]
        i = 4
        m = None
        if ctx.has_mask:
            m = saved[i]
            i += 1
        result = saved[i]
        i += 1
        need_adj_grad = ctx.needs_input_grad[1]
        nper = 3 if need_adj_grad else 1
        acts = saved[i:i + nper * L]
        i += nper * L
        stats = saved[i:i + (2 * L if use_bn else 0)]
        i += 2 * L if use_bn else 0
        params = saved[i:]
        B, N, _ = x.shape

        # Layer outputs are slices of the concatenated result (inputs of the next layer).
        offs = [0]
        for w in ctx.widths:
            offs.append(offs[-1] + w)
        gslices = [grad[..., offs[j]:offs[j + 1]] for j in range(L)] if L > 1 else [grad]
        pgrads: List[Optional[Tensor]] = [None] * len(params)
        dq = None
        dadj = None
        g_next = None  # gradient reaching layer l's output from layer l+1's input
        dx = None
        for li in reversed(range(L)):
            p = params[li * per:(li + 1) * per]
            w_rel, w_root = p[0], p[1]
            fo = w_rel.shape[0]
            r = acts[nper * li]
            h = x if li == 0 else result[..., offs[li - 1]:offs[li]]
            g = gslices[li] if g_next is None else g_next.add_(gslices[li])
            if use_bn:
                mean, rstd = stats[2 * li:2 * li + 2]
                dr, dw, dbeta = _bn_backward(g, r, m, count, mean, rstd, p[3], ctx.eps[li])
                pgrads[li * per + 3] = dw
                pgrads[li * per + 4] = dbeta
            else:
                dr = g
            # ReLU (and the mask: r is 0 on padded rows) through r > 0.
            dpre = torch.ops.aten.threshold_backward(dr, r, 0.0)
            dpre2 = dpre.view(B * N, fo)
            h2 = h.reshape(B * N, h.shape[-1])
            pgrads[li * per + 2] = dpre2.sum(dim=0)
            pgrads[li * per + 1] = torch.mm(dpre2.t(), h2)
            dagg = dpre * q
            drel = torch.bmm(adj.transpose(1, 2), dagg).view(B * N, fo)
            pgrads[li * per] = torch.mm(drel.t(), h2)
            if need_adj_grad:
                agg, rel = acts[nper * li + 1], acts[nper * li + 2]
                part = torch.bmm(dagg, rel.transpose(1, 2))
                dadj = part if dadj is None else dadj.add_(part)
                dqi = (dpre * agg).sum(dim=-1, keepdim=True)
                dq = dqi if dq is None else dq.add_(dqi)
            if li > 0 or ctx.needs_input_grad[0]:
                dh = torch.mm(drel, w_rel).addmm_(dpre2, w_root).view(B, N, -1)
                if li > 0:
                    g_next = dh
                else:
                    dx = dh
        if need_adj_grad:
            # q = 1 / clamp_min(deg, 1): clamp_min passes the gradient where deg >= 1.
            ddeg = -(dq * q * q) * (deg >= 1.0)
            dadj = dadj.add_(ddeg)
        return (dx, dadj, None, None, None, None, *pgrads)


def _momentum(bn) -> Optional[float]:
    """Running-statistics update factor of batch norm ``bn`` for this step (None: no update),
    counting the step as nn.BatchNorm1d does."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return None
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def _bn_forward(r, m, count, w, beta, bn):
    """Batch norm of r [B, N, F] over its real rows; returns (out, mean, rstd) with padded rows
    of out 0. Without a mask it is ATen's batch norm (which also updates the running statistics)."""
    B, N, F = r.shape
    mom = _momentum(bn)
    if m is None:
        out, mean, rstd = torch.native_batch_norm(
            r.view(B * N, F), w, beta, bn.running_mean if mom is not None else None,
            bn.running_var if mom is not None else None, True, mom if mom is not None else 0.0, bn.eps)
        return out.view(B, N, F), mean, rstd
    # Two passes over the real rows (r is 0 on padded rows): mean, then centred squares.
    mean = r.view(B * N, F).sum(dim=0).div_(count)
    c = (r - mean).mul_(m)
    var = c.square().view(B * N, F).sum(dim=0).div_(count)
    rstd = torch.rsqrt(var + bn.eps)
    out = torch.addcmul(beta, c, rstd * w).mul_(m)
    if mom is not None:
        with torch.no_grad():
            bn.running_mean.lerp_(mean, mom)
            bn.running_var.lerp_(var * (count / (count - 1)), mom)
    return out, mean, rstd


def _bn_backward(g, r, m, count, mean, rstd, w, eps):
    """Gradients (d r, d w, d beta) of :func:`_bn_forward` for the output gradient g."""
    B, N, F = r.shape
    if m is None:
        dr, dw, dbeta = torch.ops.aten.native_batch_norm_backward(
            g.reshape(B * N, F), r.view(B * N, F), w, None, None, mean, rstd, True, eps, [True, True, True])
        return dr.view(B, N, F), dw, dbeta
    # x_hat = c rstd with c = m (r - mean); out = m (x_hat w + beta):
    # d r = k (go - sum(go) / n - x_hat sum(go x_hat) / n), k = rstd w, go = m g.
    go = g * m
    c = (r - mean).mul_(m)
    sg = go.view(B * N, F).sum(dim=0)
    dw = (go * c).view(B * N, F).sum(dim=0).mul_(rstd)
    k = rstd * w
    alpha = -(k * rstd * dw) / count
    dr = torch.addcmul(-(k * sg) / count, go, k).addcmul_(c, alpha)
    return dr, dw, sg


def sage_block(x: Tensor, adj: Tensor, mask: Optional[Tensor], count: int, convs: Sequence,
               norms: Optional[Sequence]) -> Tensor:
    """Run SAGE layers ``convs`` (each ReLU, then ``norms[i]`` in training mode when given) as
    one autograd node; returns the concatenation of the layer outputs. ``count``: real nodes."""
    params: List[Tensor] = []
    for i, conv in enumerate(convs):
        params += [conv.lin_rel.weight, conv.lin_root.weight, conv.lin_root.bias]
        if norms is not None:
            params += [norms[i].weight, norms[i].bias]
    if not adj.is_floating_point():
        adj = adj.to(x.dtype)
    return SageBlockFunction.apply(x, adj, mask, count, list(norms) if norms is not None else None, len(convs), *params)
