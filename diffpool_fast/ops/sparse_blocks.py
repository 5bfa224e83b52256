"""Per-graph products of ``sparse_diff_pool``: S_b^T Y_b and the float64 Gram D_b^T D_b.

Graph b is the contiguous node slice [ptr_b, ptr_b + n_b). ``GraphBlocks`` groups graphs by size
into buckets [2^l, 2^(l+1)) and multiplies each bucket with one batched product (see
``sparse_pool``'s module docstring for the padding rule and its cost); ``Products`` and
``Gram64`` are the autograd functions on top, and ``per_graph`` / ``per_graph_count`` the float64
per-graph sums.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .sparse_edges import first_order


class GraphBlocks:
    """Graph b = nodes [ptr_b, ptr_b + n_b); graphs bucketed by size for batched products.

    Each bucket is ``(kind, gids, data)``: ``"slice"`` (one graph, its rows in place),
    ``"view"`` (graphs of one size one after the other: a [G, n, C] view) or ``"pad"`` (rows
    gathered into [G, n_pad, C], zero past each graph's end).
    """

    def __init__(self, counts: Tensor, B: int, N: int):
        self.B, self.N = B, N
        device = counts.device
        n_list = counts.tolist()
        ptr, acc = [], 0
        for n in n_list:
            ptr.append(acc)
            acc += n
        levels = {}
        for b, n in enumerate(n_list):
            if n > 0:
                levels.setdefault(n.bit_length() - 1, []).append(b)
        self.buckets = []
        order = []
        for lvl in sorted(levels):
            gids = levels[lvl]
            n_pad = max(n_list[g] for g in gids)
            G = len(gids)
            if G == 1:
                data = ("slice", (ptr[gids[0]], n_list[gids[0]]))
            elif all(n_list[g] == n_pad for g in gids) and gids[-1] - gids[0] == G - 1:
                data = ("view", (ptr[gids[0]], G, n_pad))
            else:
                starts = torch.tensor([ptr[g] for g in gids], dtype=torch.int64, device=device)
                ns = torch.tensor([n_list[g] for g in gids], dtype=torch.int64, device=device)
                ar = torch.arange(n_pad, device=device)
                valid = ar[None, :] < ns[:, None]
                # past its end a graph repeats its own rows: U is zeroed there, Y need not be,
                # and nothing (not even a NaN) reaches another graph
                idx = starts[:, None] + ar[None, :] % ns[:, None]
                data = ("pad", (idx, valid[..., None]))
            self.buckets.append((data[0], torch.tensor(gids, dtype=torch.int64, device=device), data[1]))
            order.extend(gids)
        self.gids = torch.tensor(order, dtype=torch.int64, device=device)
        self.identity = order == list(range(B))

    @staticmethod
    def _rows(U: Tensor, kind: str, data, lo: int = 0, hi: Optional[int] = None, zero: bool = True) -> Tensor:
        """The bucket's rows of U as [G, n, C] (graphs lo:hi of the bucket); ``zero``: padding
        rows are 0, else copies of the graph's own rows."""
        if kind == "slice":
            p0, n = data
            # the whole tensor, not a slice of it: a slice's backward would allocate and copy
            return (U if n == U.shape[0] else U[p0 : p0 + n]).unsqueeze(0)
        if kind == "view":
            p0, G, n = data
            hi = G if hi is None else min(hi, G)
            rows = U if (lo, hi * n) == (0, U.shape[0]) else U[p0 + lo * n : p0 + hi * n]
            return rows.reshape(hi - lo, n, U.shape[1])  # a view unless U is not contiguous
        idx, valid = data
        rows = U[idx[lo:hi]]
        return rows.masked_fill_(~valid[lo:hi], 0.0) if zero else rows

    def products(self, U: Tensor, Ys: List[Tensor]) -> List[Tensor]:
        """[U_b^T Y_b for every graph b] as [B, C, K_y] for each Y in Ys (zeros for empty graphs)."""
        C = U.shape[1]
        pieces = [[] for _ in Ys]
        for kind, _, data in self.buckets:
            u = self._rows(U, kind, data).transpose(1, 2)
            for out, Y in zip(pieces, Ys):
                out.append(u @ self._rows(Y, kind, data, zero=False))
        return [self._assemble(out, U.new_zeros(self.B, C, Y.shape[1])) for out, Y in zip(pieces, Ys)]

    def _assemble(self, pieces: List[Tensor], zeros: Tensor) -> Tensor:
        if not pieces:
            return zeros
        stacked = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return stacked if self.identity else zeros.index_copy(0, self.gids, stacked)

    def times(self, U: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Y [N, K] with Y_i = U_i W_b for node i of graph b; W [B, C, K]. With ``out`` [N, K],
        Y is added to it in place and ``out`` returned."""
        # every row lies in some bucket (a node's graph has n > 0), so every row is written
        Y = U.new_empty(U.shape[0], W.shape[2]) if out is None else out
        acc = out is not None
        for kind, gids, data in self.buckets:
            if kind == "slice":
                p0, n = data
                u, w, y = U[p0 : p0 + n], W[int(gids[0])], Y[p0 : p0 + n]
                y.addmm_(u, w) if acc else torch.mm(u, w, out=y)
            elif kind == "view":
                p0, G, n = data
                u, w, y = self._rows(U, kind, data), W[gids], Y[p0 : p0 + G * n].view(G, n, -1)
                y.baddbmm_(u, w) if acc else torch.bmm(u, w, out=y)
            else:
                idx, valid = data
                Yp = self._rows(U, kind, data) @ W[gids]
                keep = valid[..., 0]
                rows = idx[keep]
                if acc:
                    Y.index_add_(0, rows, Yp[keep])
                else:
                    Y[rows] = Yp[keep]
        return Y


class Products(torch.autograd.Function):
    """(U [N, C], Y1 [N, K1], Y2 [N, K2]) -> (U_b^T Y1_b, U_b^T Y2_b) per graph, [B, C, K].

    One function for both products, so the backward writes U's gradient Y1 g1^T + Y2 g2^T
    into one contiguous buffer instead of summing two transposed [C, N] gradients."""

    @staticmethod
    def forward(ctx, U: Tensor, Y1: Tensor, Y2: Tensor, blocks: "GraphBlocks"):
        ctx.blocks = blocks
        ctx.save_for_backward(U, Y1, Y2)
        return tuple(blocks.products(U, [Y1, Y2]))

    @staticmethod
    @first_order
    def backward(ctx, g1: Tensor, g2: Tensor):
        U, Y1, Y2 = ctx.saved_tensors
        bl = ctx.blocks
        g_U = g_Y1 = g_Y2 = None
        if ctx.needs_input_grad[0]:
            g_U = bl.times(Y1, g1.transpose(1, 2))
            bl.times(Y2, g2.transpose(1, 2), out=g_U)
        if ctx.needs_input_grad[1]:
            g_Y1 = bl.times(U, g1)
        if ctx.needs_input_grad[2]:
            g_Y2 = bl.times(U, g2)
        return g_U, g_Y1, g_Y2, None


class Gram64(torch.autograd.Function):
    """(D [N, C], slot [N] or None, slots) -> (G, K): G = D_b^T D_b per graph [B, C, C] and K =
    the sums of D's rows per slot [slots, C] (0 for ``slot=None``), both in float64 from one pass that converts ``chunk_rows``
    rows at a time into one reused buffer; no float64 copy of D is kept."""

    @staticmethod
    def forward(ctx, D: Tensor, blocks: "GraphBlocks", slot: Tensor, slots: int, chunk_rows: int = 1 << 15):
        ctx.blocks = blocks
        ctx.save_for_backward(D, slot)
        C = D.shape[1]
        f64 = torch.float64
        G = D.new_zeros(blocks.B, C, C, dtype=f64)
        K = D.new_zeros(slots, C, dtype=f64)
        buf = D.new_empty(min(chunk_rows, D.shape[0]) * C, dtype=f64)
        for kind, gids, data in blocks.buckets:
            if kind == "slice":
                p0, n = data
                acc = G.new_zeros(C, C)
                for r0 in range(p0, p0 + n, chunk_rows):
                    r1 = min(r0 + chunk_rows, p0 + n)
                    u = buf[: (r1 - r0) * C].view(r1 - r0, C)
                    u.copy_(D[r0:r1])
                    acc.addmm_(u.t(), u)
                    if slot is not None:
                        K.index_add_(0, slot[r0:r1], u)
                G[int(gids[0])] = acc
                continue
            Gn, n = gids.numel(), (data[2] if kind == "view" else data[0].shape[1])
            step = max(1, chunk_rows // n)
            for g0 in range(0, Gn, step):
                rows = blocks._rows(D, kind, data, g0, g0 + step)  # padding rows are 0
                if buf.numel() < rows.numel():  # padding can make a chunk larger than D
                    buf = D.new_empty(rows.numel(), dtype=f64)
                u = buf[: rows.numel()].view(rows.shape)
                u.copy_(rows)
                G[gids[g0 : g0 + step]] = u.transpose(1, 2) @ u
                if slot is None:
                    continue
                if kind == "view":
                    p0 = data[0]
                    sl = slot[p0 + g0 * n : p0 + (g0 + u.shape[0]) * n]
                else:  # padding rows repeat a real row's slot and add 0 to it
                    sl = slot.index_select(0, data[0][g0 : g0 + step].reshape(-1))
                K.index_add_(0, sl, u.reshape(-1, C))
        return G, K

    @staticmethod
    @first_order
    def backward(ctx, gG: Tensor, gK: Tensor):
        D, slot = ctx.saved_tensors
        g_D = None if slot is None else gK.to(D.dtype).index_select(0, slot)
        g_D = ctx.blocks.times(D, (gG + gG.transpose(1, 2)).to(D.dtype), out=g_D)
        return g_D, None, None, None, None


def weighted_count(index: Tensor, weights: Tensor, n: int) -> Tensor:
    """``torch.bincount(index, weights, minlength=n)`` in ``weights``' dtype. On CUDA an
    ``index_add_`` instead: a weighted bincount adds with atomics there and has no deterministic
    form (``torch.use_deterministic_algorithms`` refuses it), while ``index_add_`` becomes a sorted
    segment sum under that mode (``train --deterministic on``). The callers count: integer-valued
    weights, whose sums are exact in any order."""
    if index.device.type == "cuda":
        return weights.new_zeros(n).index_add_(0, index, weights)
    return torch.bincount(index, weights=weights, minlength=n)


def per_graph_count(flag: Tensor, graph: Optional[Tensor], B: int) -> Tensor:
    """Per-graph counts of the true entries of ``flag`` [M], as float64 [B] (exact integers)."""
    if graph is None:
        out = flag.sum().to(torch.float64).reshape(1)
        return out if B == 1 else torch.cat([out, out.new_zeros(B - 1)])
    return weighted_count(graph, flag.to(torch.float64), B)


def per_graph(v: Tensor, graph: Optional[Tensor], B: int) -> Tensor:
    """Per-graph float64 sums of v [M] with graph ids ``graph`` [M] (None: all in graph 0)."""
    if graph is None:
        out = v.sum(dtype=torch.float64).reshape(1)
        return out if B == 1 else torch.cat([out, out.new_zeros(B - 1)])
    v64 = v.to(torch.float64)
    return v64.new_zeros(B).index_add(0, graph, v64)
