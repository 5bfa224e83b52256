"""GraphSAGE blocks as one autograd Function with a hand-written backward.

At the sizes DiffPool trains on (tens to a few hundred nodes per graph, 64 channels) a training
step is hundreds of small tensor operations; the matrix products are a small part of the time
and the rest goes to the many elementwise passes and autograd's bookkeeping around them.
:class:`SageBlocksFunction` computes what :class:`diffpool_fast.nn.model.DenseGNN` computes for
``gnn="sage"`` in training mode, layer by layer ``ReLU(SAGE(h))`` then batch norm over the real
nodes (or no norm), with the layer outputs concatenated (jumping knowledge), for G blocks at once
that read the same input graph: a DiffPool level's embedding and assignment GNNs. The G blocks'
channels sit side by side, so each layer makes one product with A, one pass per elementwise step
and one batch norm for all of them (batch norm is per channel, so this is exact), and the whole
thing is one autograd node.

Per layer, with m the node mask (1 = real node), deg = A's row sums, q = 1 / max(deg, 1):

    rel  = h W_rel^T                  (the product with A runs after the linear map)
    pre  = h W_root^T + b + q * (A rel)
    r    = m * relu(pre)
    out  = m * ((r - mean) rstd w + beta)

except that layer 0, when x has fewer features than the layer's output (node labels), takes A's
product first, pre = x W_root^T + b + (q * A x) W_rel^T: the same value, with the products with
A (and A^T in the backward pass) over x's width (measured in bench/notes/level_step.md).

with mean and rstd = 1 / sqrt(var + eps) over the n real rows of r (two passes: mean, then
centred squares; ATen's batch norm when there is no mask). The backward pass is the chain rule
through these lines: batch norm's gradient, ReLU's through ``r > 0`` (also 0 on padded rows), and
the gradients of A (``dagg rel^T`` plus the degree term, as A's row sums are differentiated in
PyG's layer) only when A requires one. Checked against the module path in float64
(tests/test_sage_blocks.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops.block_sparse import BlockSparseAdj
from ..ops.coarsen_torch import adjacency_matmul

__all__ = ["SageBlocksFunction", "sage_blocks"]


def _cat(ts: Sequence[Tensor], dim: int = 0) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), dim=dim)


class SageBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, adj, mask, count, bn_state, n_layers, n_groups, *params):
        # params: for each layer, for each group: W_rel [Fo, Fi], W_root [Fo, Fi], b [Fo], then
        # (w, beta) with batch norm. bn_state: the BatchNorm modules in the same order, or None.
        # count: the number of real nodes (B * N without a mask), known to the caller.
        B, N, _ = x.shape
        L, G = n_layers, n_groups
        use_bn = bn_state is not None
        per = 5 if use_bn else 3
        m = None if mask is None else mask.reshape(B, N, 1).to(x.dtype)
        sparse = isinstance(adj, BlockSparseAdj)
        # in x's dtype, as DenseSAGE's row sums (an adjacency of another float dtype is summed in
        # its own dtype, then converted)
        deg = adj.deg if sparse else adj.sum(dim=-1, keepdim=True).to(x.dtype)
        q = deg.clamp_min(1.0).reciprocal()
        count = float(count)
        need_adj_grad = ctx.needs_input_grad[1]

        def P(li, g):
            return params[(li * G + g) * per:(li * G + g + 1) * per]

        widths = [[P(li, g)[0].shape[0] for g in range(G)] for li in range(L)]
        # Columns of layer li's combined output [group 0 | group 1 | ...], and of layer li in
        # group g's output (the group's JK concatenation; one output tensor per group, so that
        # their gradients arrive separately and autograd makes no slice gradients).
        loff = [[sum(w[:g]) for g in range(G + 1)] for w in widths]
        gtot = [sum(widths[li][g] for li in range(L)) for g in range(G)]
        roff = [[sum(widths[j][g] for j in range(li)) for li in range(L)] for g in range(G)]
        results = [x.new_empty(B, N, gtot[g]) for g in range(G)]
        x2 = x.reshape(B * N, x.shape[-1])
        prev = None  # previous layer's combined output [B * N, tot]
        saved: List[Tensor] = []
        stats: List[Tensor] = []
        # Layer 0 reads x, narrower than the layer's output where the input features are few
        # (node labels): then A x first and the linear maps after, so the product with A (and in
        # the backward pass, with A^T) runs over x's width instead of the output's.
        agg_first = x.shape[-1] < loff[0][G]
        first: List[Tensor] = []
        for li in range(L):
            tot = loff[li][G]
            ps = [P(li, g) for g in range(G)]
            if li == 0 and agg_first:
                ax_raw = adjacency_matmul(adj, x)
                ax = ax_raw * q
                r = torch.addmm(_cat([p[2] for p in ps]), x2, _cat([p[1] for p in ps]).t())
                r = r.addmm_(ax.view(B * N, -1), _cat([p[0] for p in ps]).t()).view(B, N, tot).relu_()
                first = [ax, ax_raw] if need_adj_grad else [ax]
                rel = agg = None
            else:
                if li == 0:  # every group reads x: one product for all of them
                    rel = torch.mm(x2, _cat([p[0] for p in ps]).t())
                    root = torch.addmm(_cat([p[2] for p in ps]), x2, _cat([p[1] for p in ps]).t())
                else:
                    rel, root = _linear_maps(prev, ps, G, loff[li - 1], loff[li], B * N, x)
                rel = rel.view(B, N, tot)
                agg = adjacency_matmul(adj, rel)
                r = torch.addcmul(root.view(B, N, tot), agg, q).relu_()
            if m is not None:
                r.mul_(m)
            if use_bn:
                bns = bn_state[li * G:(li + 1) * G]
                out, mean, rstd = _bn_forward(r, m, count, _cat([p[3] for p in ps]), _cat([p[4] for p in ps]),
                                              bns, loff[li])
                stats += [mean, rstd]
            else:
                out = r
            for g in range(G):
                results[g][..., roff[g][li]:roff[g][li] + widths[li][g]] = out[..., loff[li][g]:loff[li][g + 1]]
            saved.append(r)
            if need_adj_grad:
                saved += [agg, rel]  # (None, None) for an aggregate-first layer 0
            prev = out.view(B * N, tot)
        ctx.geom = (L, G, per, widths, loff, roff)
        ctx.agg_first = agg_first
        ctx.count, ctx.use_bn, ctx.has_mask = count, use_bn, m is not None
        ctx.eps = [bn.eps for bn in bn_state] if use_bn else None
        ctx.sparse_adj = adj if sparse else None  # not a tensor: kept on ctx
        ctx.save_for_backward(x, None if sparse else adj, q, deg, *([m] if m is not None else []), *results, *saved,
                              *stats, *first, *params)
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        L, G, per, widths, loff, roff = ctx.geom
        count, use_bn = ctx.count, ctx.use_bn
        saved = ctx.saved_tensors
        x, adj, q, deg = saved[:4]
        if ctx.sparse_adj is not None:
            adj = ctx.sparse_adj
        i = 4
        m = None
        if ctx.has_mask:
            m = saved[i]
            i += 1
        results = saved[i:i + G]
        i += G
        need_adj_grad = ctx.needs_input_grad[1]
        nper = 3 if need_adj_grad else 1
        acts = saved[i:i + nper * L]
        i += nper * L
        stats = saved[i:i + (2 * L if use_bn else 0)]
        i += 2 * L if use_bn else 0
        nfirst = (2 if need_adj_grad else 1) if ctx.agg_first else 0
        first = saved[i:i + nfirst]
        params = saved[i + nfirst:]
        B, N, _ = x.shape
        BN = B * N
        res2 = [r.view(BN, r.shape[-1]) for r in results]
        x2 = x.reshape(BN, x.shape[-1])
        grad2 = [g.reshape(BN, g.shape[-1]) for g in grads]

        def P(li, g):
            return params[(li * G + g) * per:(li * G + g + 1) * per]

        pgrads: List[Optional[Tensor]] = [None] * len(params)

        def put(li, g, j, t):
            pgrads[(li * G + g) * per + j] = t

        def split(li, t):  # a combined per-channel vector (or row-stacked matrix) into groups
            return [t[loff[li][g]:loff[li][g + 1]] for g in range(G)]

        dq = dadj = g_next = dx = None
        for li in reversed(range(L)):
            tot = loff[li][G]
            ps = [P(li, g) for g in range(G)]
            r = acts[nper * li]
            # Gradient reaching layer li's combined output: its result columns (+ layer li+1's).
            g_res = _cat([grad2[g][:, roff[g][li]:roff[g][li] + widths[li][g]] for g in range(G)], dim=1)
            g = g_res if g_next is None else g_next.add_(g_res)
            g = g.view(B, N, tot)
            if use_bn:
                mean, rstd = stats[2 * li:2 * li + 2]
                w = _cat([p[3] for p in ps])
                dr, dw, dbeta = _bn_backward(g, r, m, count, mean, rstd, w, ctx.eps[li * G])
                for gi, (a, b) in enumerate(zip(split(li, dw), split(li, dbeta))):
                    put(li, gi, 3, a)
                    put(li, gi, 4, b)
            else:
                dr = g
            # ReLU (and the mask: r is 0 on padded rows) through r > 0.
            dpre = torch.ops.aten.threshold_backward(dr, r, 0.0)
            dpre2 = dpre.view(BN, tot)
            for gi, t in enumerate(split(li, dpre2.sum(dim=0))):
                put(li, gi, 2, t)
            if li == 0 and ctx.agg_first:
                dx, dadj, dq = _first_layer_backward(ctx, dpre2, x, x2, adj, q, first, ps, put, loff, dadj, dq)
                continue
            dagg = dpre * q
            drel = adjacency_matmul(adj, dagg, transpose=True).view(BN, tot)
            if li == 0:
                dwo = torch.mm(dpre2.t(), x2)
                dwr = torch.mm(drel.t(), x2)
                for gi in range(G):
                    put(li, gi, 1, dwo[loff[0][gi]:loff[0][gi + 1]])
                    put(li, gi, 0, dwr[loff[0][gi]:loff[0][gi + 1]])
                if ctx.needs_input_grad[0]:
                    dx = torch.mm(drel, _cat([p[0] for p in ps])).addmm_(dpre2, _cat([p[1] for p in ps]))
                    dx = dx.view(B, N, -1)
            else:
                g_next = x.new_empty(BN, loff[li - 1][G])
                for gi, p in enumerate(ps):
                    cols = slice(loff[li][gi], loff[li][gi + 1])
                    a = roff[gi][li - 1]
                    h = res2[gi][:, a:a + widths[li - 1][gi]]  # the group's input: its previous output
                    put(li, gi, 1, torch.mm(dpre2[:, cols].t(), h))
                    put(li, gi, 0, torch.mm(drel[:, cols].t(), h))
                    out = g_next[:, loff[li - 1][gi]:loff[li - 1][gi + 1]]
                    torch.mm(drel[:, cols], p[0], out=out)
                    out.addmm_(dpre2[:, cols], p[1])
            if need_adj_grad:
                agg, rel = acts[nper * li + 1], acts[nper * li + 2]
                part = torch.bmm(dagg, rel.transpose(1, 2))
                dadj = part if dadj is None else dadj.add_(part)
                dqi = (dpre * agg).sum(dim=-1, keepdim=True)
                dq = dqi if dq is None else dq.add_(dqi)
        if need_adj_grad:
            # q = 1 / clamp_min(deg, 1): clamp_min passes the gradient where deg >= 1.
            ddeg = -(dq * q * q) * (deg >= 1.0)
            dadj = dadj.add_(ddeg)
        return (dx, dadj, None, None, None, None, None, *pgrads)


def _first_layer_backward(ctx, dpre2, x, x2, adj, q, first, ps, put, loff, dadj, dq):
    """Backward of an aggregate-first layer 0, pre = x W_root^T + b + (q * A x) W_rel^T:
    puts the weight gradients, returns (dx, dadj, dq) with this layer's parts added."""
    B, N, Fi = x.shape
    ax = first[0]  # q * A x
    dwo = torch.mm(dpre2.t(), x2)
    dwr = torch.mm(dpre2.t(), ax.view(B * N, Fi))
    for gi in range(len(ps)):
        put(0, gi, 1, dwo[loff[0][gi]:loff[0][gi + 1]])
        put(0, gi, 0, dwr[loff[0][gi]:loff[0][gi + 1]])
    need_x, need_adj = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = None
    if need_x or need_adj:
        v = torch.mm(dpre2, _cat([p[0] for p in ps])).view(B, N, Fi)  # d(q * A x)
        u = v * q  # d(A x)
        if need_x:
            dx = adjacency_matmul(adj, u, transpose=True).add_(torch.mm(dpre2, _cat([p[1] for p in ps])).view(B, N, Fi))
        if need_adj:
            part = torch.bmm(u, x.transpose(1, 2))
            dadj = part if dadj is None else dadj.add_(part)
            dqi = (v * first[1]).sum(dim=-1, keepdim=True)  # first[1] = A x
            dq = dqi if dq is None else dq.add_(dqi)
    return dx, dadj, dq


def _linear_maps(prev, ps, G, lin, lout, rows, like) -> Tuple[Tensor, Tensor]:
    """h W_rel^T and h W_root^T + b of a layer after the first, each group reading its own columns
    ``lin`` of the previous layer's output ``prev`` and writing its columns ``lout``."""
    if G == 1:
        return torch.mm(prev, ps[0][0].t()), torch.addmm(ps[0][2], prev, ps[0][1].t())
    rel = like.new_empty(rows, lout[G])
    root = like.new_empty(rows, lout[G])
    for g, p in enumerate(ps):
        h = prev[:, lin[g]:lin[g + 1]]
        torch.mm(h, p[0].t(), out=rel[:, lout[g]:lout[g + 1]])
        torch.addmm(p[2], h, p[1].t(), out=root[:, lout[g]:lout[g + 1]])
    return rel, root


def _momentum(bn) -> Optional[float]:
    """Running-statistics update factor of batch norm ``bn`` for this step (None: no update),
    counting the step as nn.BatchNorm1d does."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return None
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def _bn_forward(r, m, count, w, beta, bns, offs) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch norm of r [B, N, F] over its real rows (channels of the modules ``bns`` side by
    side at ``offs``); returns (out, mean, rstd), padded rows of out 0, and updates the modules'
    running statistics as they would."""
    B, N, F = r.shape
    eps = bns[0].eps
    if any(bn.eps != eps for bn in bns):
        raise ValueError("fused batch norms need one eps")
    if m is None:
        out, mean, rstd = torch.native_batch_norm(r.view(B * N, F), w, beta, None, None, True, 0.0, eps)
        out = out.view(B, N, F)
        var = None
    else:
        # Two passes over the real rows (r is 0 on padded rows): mean, then centred squares.
        mean = r.view(B * N, F).sum(dim=0).div_(count)
        c = (r - mean).mul_(m)
        var = c.square().view(B * N, F).sum(dim=0).div_(count)
        rstd = torch.rsqrt(var + eps)
        out = torch.addcmul(beta, c, rstd * w).mul_(m)
    moms = [_momentum(bn) for bn in bns]
    if any(mom is not None for mom in moms):
        with torch.no_grad():
            if var is None:
                var = rstd.pow(-2).sub_(eps)
            unbiased = var * (count / (count - 1))
            for g, (bn, mom) in enumerate(zip(bns, moms)):
                if mom is not None:
                    bn.running_mean.lerp_(mean[offs[g]:offs[g + 1]], mom)
                    bn.running_var.lerp_(unbiased[offs[g]:offs[g + 1]], mom)
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


def sage_blocks(x: Tensor, adj: Tensor, mask: Optional[Tensor], count: int, blocks: Sequence) -> Tuple[Tensor, ...]:
    """Run G SAGE blocks on the same graph as one autograd node.

    ``blocks``: ``(convs, norms)`` pairs with the same number of layers, each layer a
    ``DenseSAGE`` followed by ReLU and, when ``norms`` is not None, the batch norm ``norms[i]``
    (training mode). ``count``: the number of real nodes. Returns one tensor per block,
    [B, N, the block's JK width]: its layer outputs concatenated.
    """
    L = len(blocks[0][0])
    use_bn = blocks[0][1] is not None
    if any(len(c) != L or (n is not None) != use_bn for c, n in blocks):
        raise ValueError("fused SAGE blocks need the same number of layers and the same norm choice")
    params: List[Tensor] = []
    norms: List = []
    for li in range(L):
        for convs, bns in blocks:
            conv = convs[li]
            params += [conv.lin_rel.weight, conv.lin_root.weight, conv.lin_root.bias]
            if use_bn:
                params += [bns[li].weight, bns[li].bias]
                norms.append(bns[li])
    if isinstance(adj, BlockSparseAdj):
        if adj.dtype != x.dtype:
            raise TypeError(f"sparse adjacency holds {adj.dtype} values, x is {x.dtype}")
    elif not adj.is_floating_point():
        adj = adj.to(x.dtype)
    return SageBlocksFunction.apply(x, adj, mask, count, norms if use_bn else None, L, len(blocks), *params)
