r"""``sparse_diff_pool``: DiffPool on PyG's sparse batch format, with no N x N tensor anywhere.

Inputs are a mini-batch as PyG's ``DataLoader`` gives it: ``x`` [N, F], ``edge_index`` [2, E],
``s`` [N, C] (assignment logits), ``batch`` [N] (sorted graph ids), ``edge_weight`` [E]. The
result is exactly :func:`diffpool_fast.dense_diff_pool` (and PyG's ``dense_diff_pool``) applied
to ``to_dense_batch(x, batch)``, ``to_dense_adj(edge_index, batch, edge_weight)`` and
``to_dense_batch(s, batch)`` with its mask: every graph padded to the batch's largest, N_max.

Design
------
With S = softmax(s) (row-wise) and graph b's nodes the contiguous slice [ptr_b, ptr_b+1):

* **Edges.** The edge list is coalesced into unique (i, j) pairs sorted by (i, j) -- skipped
  when it already is, else one sort, O(E log E) -- so the adjacency is a CSR pattern; duplicate
  edges sum their weights, as ``to_dense_adj`` does. Two kernels make every edge pass, on CPU
  and CUDA alike, each O(E C) time and O(E + N C) memory, never an E x C tensor:
  ``A Y`` is ``embedding_bag`` over the CSR rows with the edge weights as per-sample weights, and
  the per-edge dot products <U_i, V_j> are ``torch.sparse.sampled_addmm`` on the pattern. Their
  backward passes (``_SpMM``, ``_EdgeT``) are the same two kernels, ``A^T Y`` on the transposed
  pattern (one stable argsort of the columns, made on the first backward that needs it).
* **Per-graph products** S_b^T Y_b ([B, C, K]): out = S^T x, out_adj = S^T (A S), and the Gram
  D^T D below. Graphs are grouped by size into buckets [2^l, 2^(l+1)), at most
  log2(N_max) + 1 of them, one ``bmm`` each. A graph alone in its bucket multiplies its rows in
  place, and graphs of one size that lie one after the other are a [G, n, C] view: no copy.
  Otherwise the bucket's rows are gathered into [G, n_pad, C], n_pad its largest graph: S is
  zero past a graph's end, Y repeats the graph's own rows there (so not even a NaN reaches
  another graph). Padding at most doubles a graph, so the copies are O(N (C + K)), never
  B * N_max; time O(N C K).
* **Link loss** ||A_b - S_b S_b^T||_F^2 without enumerating node pairs, and without the
  catastrophic cancellation of ||A||^2 - 2 tr(S^T A S) + ||S^T S||^2 when A ~ S S^T. Let
  H = one-hot(argmax S) (a constant), R = H H^T (R_ij = 1 when i, j share a hard cluster),
  D = S - H (computed without cancellation: the argmax entry of D is minus the sum of the other
  entries of S), T = S S^T - R = H D^T + D H^T + D D^T, and E' the coalesced edge pairs. Then

      Q = sum_E' ((A - R) - T)^2 + sum_{pairs not in E'} (R + T)^2

  and the second sum is "all pairs minus E'" of R, 2 R T and T^2, each from C x C quantities:
  sum_all R = sum_k m_k^2 (m_k: nodes of hard cluster k, exact integers);
  sum_all R T = 2 sum_k m_k K_kk + ||K||^2 with K = H^T D;
  sum_all T^2 = 2 sum_k m_k G_kk + 2 tr(K^2) + 4 tr(K G) + ||G||^2 with G = D^T D.
  H_i is 0 for a row with no entry above 1/2 (the identity holds for any such H), so |D| <= 1/2.
  Near convergence (S ~ one-hot) R carries the O(1) part exactly and T, D, K, G are small, so
  no large terms cancel; for a spread-out S nothing is large either. On the edges the sum is
  taken as one term per edge, ((A - R) - T)^2 - T^2 - 2 R <D_i, D_j> (the edges' share of the
  three "all pairs minus E'" sums), written q (q - 2 T) with q = A - R so that the two squares
  do not cancel on same-cluster edges. Per-edge terms are in the compute dtype; K and G
  accumulate in float64 (32k rows converted at a time into one reused buffer, no float64 copy
  of D kept), and so does every per-graph sum. The part of sum R T linear in D, which cancels
  between "all pairs" and E' when every same-cluster pair is an edge, is summed in float64 from
  the per-node argmax entries (each times its exact count of same-cluster edges), and its
  gradient cancels in float64 too. Clamped at 0.
* **Softmax** has a hand-written backward that subtracts the argmax entry's gradient first:
  mathematically the same, but it keeps the gradient of a saturated row (S ~ one-hot) instead of
  rounding it to 0 as P * (g - <P, g>) does in float32.
* **Entropy** -sum S log(S + EPS) per row, per-graph sums in float64, averaged over B * N_max
  rows as the dense op does (padded rows count 0).

Every backward here is first order: ``create_graph=True`` raises a ``RuntimeError`` (the dense
torch path has a double backward).

Cost: time O(E C + N C (F + C)) forward and backward (plus O(E log E) to coalesce unsorted
edges and once for the transposed pattern); memory O(E) for indices and per-edge scalars,
O(N (C + F)) for S, D, A S and the bucket copies, O(B C (C + F)) for the outputs. Nothing
depends on N_max^2. Gradients flow to ``x``, ``s`` and ``edge_weight``.
"""
from __future__ import annotations

import functools
import warnings
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from ..config import BACKEND_ENV, EPS, POOL_BACKENDS, backend_override
from .coarsen_torch import compute_dtype
from .inputs import check_num_clusters, cluster_mask
from .pool import _normalize_mode, finish_losses

_INDEX_DTYPES = (torch.int64, torch.int32)


def _first_order(backward):
    """Marks a hand-written backward as first order: under ``create_graph=True`` (grad mode is
    on inside a backward only then) it raises instead of building a graph that would give
    wrong second derivatives."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "sparse_diff_pool has no double backward: its backward passes are first order, so "
                "create_graph=True (second derivatives, gradient penalties) is refused; "
                "dense_diff_pool(..., backend='torch') on the dense form supports it"
            )
        return backward(ctx, *grads)

    return checked


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    x: Tensor  # [N, F]
    s: Tensor  # [N, C]
    row: Tensor  # [E] int64
    col: Tensor  # [E] int64
    weight: Optional[Tensor]  # [E] floating or None
    batch: Optional[Tensor]  # [N] int64 or None (one graph)
    B: int


def _check_backend(backend) -> None:
    if backend not in POOL_BACKENDS:
        raise ValueError(f"backend must be one of {POOL_BACKENDS}, got {backend!r}")
    forced = backend_override()
    if forced and forced not in POOL_BACKENDS:
        raise ValueError(f"environment variable {BACKEND_ENV}={forced!r} is not one of {POOL_BACKENDS}")
    chosen = forced or backend
    if chosen == "triton":
        via = f" ({BACKEND_ENV}=triton asks for it)" if forced else ""
        raise ValueError(
            "sparse_diff_pool: backend='triton' is not available: the edge pass has no Triton kernel "
            f"yet{via}; use backend='torch' or 'auto' (the torch path runs on CPU and CUDA)"
        )


def _check_inputs(x, edge_index, s, batch, edge_weight, num_graphs) -> _Inputs:
    for name, t in (("x", x), ("edge_index", edge_index), ("s", s)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("batch", batch), ("edge_weight", edge_weight)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, F] (node features of the whole batch), got shape {_shape(x)}")
    if s.dim() != 2:
        raise ValueError(f"s must be [N, C] (assignment logits of the whole batch), got shape {_shape(s)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not s.is_floating_point():
        raise TypeError(f"s (assignment logits) must be a floating-point tensor, got dtype {s.dtype}")
    N = x.shape[0]
    if s.shape[0] != N:
        raise ValueError(f"x and s must have one row per node, the same N: got x {_shape(x)} and s {_shape(s)}")
    if s.shape[1] < 1:
        raise ValueError(f"s must have at least one cluster, got shape {_shape(s)}")

    devices = {"x": x.device, "edge_index": edge_index.device, "s": s.device}
    if batch is not None:
        devices["batch"] = batch.device
    if edge_weight is not None:
        devices["edge_weight"] = edge_weight.device
    if len({str(d) for d in devices.values()}) > 1:
        raise ValueError(
            "x, edge_index, s, batch and edge_weight must be on one device, got "
            + ", ".join(f"{k} on {v}" for k, v in devices.items())
        )

    if edge_index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"edge_index must be an int64 (or int32) tensor, got dtype {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {_shape(edge_index)}")
    E = edge_index.shape[1]
    row, col = edge_index[0].long(), edge_index[1].long()
    if E > 0:
        lo = int(torch.minimum(row.min(), col.min()))
        hi = int(torch.maximum(row.max(), col.max()))
        if lo < 0 or hi >= N:
            raise ValueError(
                f"edge_index holds node ids in [{lo}, {hi}], outside [0, N) with N={N} (the rows of x {_shape(x)})"
            )

    if edge_weight is not None:
        if not edge_weight.is_floating_point():
            raise TypeError(f"edge_weight must be a floating-point tensor, got dtype {edge_weight.dtype}")
        if edge_weight.dim() != 1 or edge_weight.shape[0] != E:
            raise ValueError(
                f"edge_weight must have shape [E] = [{E}] to match edge_index {_shape(edge_index)}, "
                f"got {_shape(edge_weight)}"
            )
        if E > 0:
            w = edge_weight.detach()
            if not bool(torch.isfinite(w).all()):
                raise ValueError("edge_weight must be finite, got NaN or infinite values")
            if bool((w < 0).any()):
                raise ValueError(f"edge_weight must be non-negative, got a minimum of {float(w.min())}")

    if num_graphs is not None and (isinstance(num_graphs, bool) or not isinstance(num_graphs, int)):
        raise TypeError(f"num_graphs must be an int or None, got {type(num_graphs).__name__}")
    if num_graphs is not None and num_graphs < 1:
        raise ValueError(f"num_graphs must be at least 1, got {num_graphs}")

    if batch is None:
        B = 1 if num_graphs is None else num_graphs
        return _Inputs(x, s, row, col, edge_weight, None, B)

    if batch.dtype not in _INDEX_DTYPES:
        raise TypeError(f"batch must be an int64 (or int32) tensor of graph ids, got dtype {batch.dtype}")
    if batch.dim() != 1 or batch.shape[0] != N:
        raise ValueError(f"batch must have shape [N] = [{N}] (one graph id per row of x), got {_shape(batch)}")
    batch = batch.long()
    if N == 0:
        B = 1 if num_graphs is None else num_graphs
        return _Inputs(x, s, row, col, edge_weight, batch, B)
    if int(batch[0]) < 0:
        raise ValueError(f"batch must hold graph ids >= 0, got {int(batch.min())}")
    if N > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (graph ids non-decreasing, as PyG's DataLoader gives them)")
    needed = int(batch[-1]) + 1
    if num_graphs is not None and num_graphs < needed:
        raise ValueError(f"num_graphs={num_graphs} is smaller than batch.max() + 1 = {needed}")
    B = needed if num_graphs is None else num_graphs
    if E > 0 and int(batch[0]) != int(batch[-1]):  # one graph (sorted ids): no edge can cross
        cross = batch.index_select(0, row) != batch.index_select(0, col)
        if bool(cross.any()):
            e = int(cross.nonzero()[0, 0])
            i, j = int(row[e]), int(col[e])
            raise ValueError(
                f"edge_index joins two graphs: edge {e} ({i} -> {j}) goes from graph {int(batch[i])} "
                f"to graph {int(batch[j])}"
            )
    return _Inputs(x, s, row, col, edge_weight, batch, B)


# --------------------------------------------------------------------------------------------
# the edge pattern and its two kernels
# --------------------------------------------------------------------------------------------


class _Pattern:
    """Coalesced edges sorted by (row, col), as CSR; the transposed pattern on demand."""

    def __init__(self, row: Tensor, col: Tensor, N: int):
        self.N = N
        self.row, self.col = row, col
        self.crow = _offsets(row, N)
        self._t = None
        self._sym = None

    def transposed(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(perm, rows in column order, column offsets): A^T's CSR is (crow_t, row[perm], vals[perm])."""
        if self._t is None:
            # int32 keys sort about 1.5x faster than int64 (bench/notes/sparse_profile_1e6.md)
            keys = self.col.int() if self.N <= torch.iinfo(torch.int32).max else self.col
            perm = torch.argsort(keys, stable=True)
            del keys
            self._t = (perm, self.row.index_select(0, perm), _offsets(self.col, self.N))
        return self._t

    def symmetric(self) -> bool:
        """Whether the pattern is its own transpose (values aside): then A^T's values, in this
        pattern's edge order, are vals[perm]."""
        if self._sym is None:
            _, row_t, crow_t = self.transposed()
            self._sym = bool(torch.equal(crow_t, self.crow) and torch.equal(row_t, self.col))
        return self._sym

    def mm(self, vals: Tensor, Y: Tensor, transpose: bool = False) -> Tensor:
        """A Y (or A^T Y), [N, K], with A the pattern holding ``vals``."""
        if transpose:
            perm, row_t, crow_t = self.transposed()
            idx, offsets, vals = row_t, crow_t, vals.index_select(0, perm)
        else:
            idx, offsets = self.col, self.crow
        # detached: a saved tensor that requires grad would send embedding_bag down its
        # training path, which also builds the bag bookkeeping its own backward needs
        return F_nn.embedding_bag(idx, Y.detach().contiguous(), offsets, mode="sum",
                                  per_sample_weights=vals.detach().to(Y.dtype), include_last_offset=True)

    def dots(self, U: Tensor, V: Tensor) -> Tensor:
        """<U_i, V_j> for every edge (i, j), [E]."""
        if self.row.numel() == 0:
            return U.new_zeros(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pat = torch.sparse_csr_tensor(self.crow, self.col, U.new_zeros(self.row.numel()), (self.N, self.N),
                                          check_invariants=False)
            return torch.sparse.sampled_addmm(pat, U.contiguous(), V.t(), beta=0.0).values()


def _offsets(sorted_idx: Tensor, N: int) -> Tensor:
    out = torch.zeros(N + 1, dtype=torch.int64, device=sorted_idx.device)
    if sorted_idx.numel():
        out[1:] = torch.bincount(sorted_idx, minlength=N).cumsum(0)
    return out


class _SpMM(torch.autograd.Function):
    """(vals [E], S [N, C]) -> A S, A the pattern holding vals."""

    @staticmethod
    def forward(ctx, vals: Tensor, S: Tensor, pattern: _Pattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(vals, S)
        return pattern.mm(vals, S)

    @staticmethod
    @_first_order
    def backward(ctx, g: Tensor):
        vals, S = ctx.saved_tensors
        p = ctx.pattern
        g_vals = p.dots(g, S) if ctx.needs_input_grad[0] else None
        g_S = p.mm(vals, g, transpose=True) if ctx.needs_input_grad[1] else None
        return g_vals, g_S, None


class _EdgeTerms(torch.autograd.Function):
    """The link loss's per-edge part: V_b = sum over graph b's edges (i, j) of

        v = res^2 - T^2 - 2 R dots = q (q - 2 T) - 2 R dots,   q = A - R,  res = q - T,

    with R_ij = 1 when i and j share a hard cluster, dots = <D_i, D_j> and
    T = (S S^T - R)_ij = <H_i, D_j> + <D_i, H_j> + <D_i, D_j>, where <H_i, D_j> = D[j, k_i] for
    a row i with a hard cluster k_i, else 0. (q (q - 2 T) is res^2 - T^2 without the
    cancellation of two near-equal squares on same-cluster edges, where q = 0 when A = 1.) Each
    v is in the compute dtype, V in float64. Inputs: D [N, C], the edge values A [E], the edges'
    hard clusters ``k_r``, ``k_c`` and whether they have one (``a_r``, ``a_c``), R as ``same``
    [E] bool, each edge's graph ``eg`` [E] (None: one graph) and B. Gradients for D and A."""

    @staticmethod
    def forward(ctx, D, A, pattern: _Pattern, k_r, k_c, a_r, a_c, same, eg, B: int):
        C = D.shape[1]
        flat = D.reshape(-1)
        # flat positions of D[j, k_i] and D[i, k_j] (valid indices: k is an argmax even where
        # the row has no hard cluster; those terms are masked to 0)
        i_hj = torch.add(k_r, pattern.col, alpha=C)
        i_ih = torch.add(k_c, pattern.row, alpha=C)
        dots = pattern.dots(D, D)
        T = flat.index_select(0, i_hj).masked_fill_(~a_r, 0.0)
        T += flat.index_select(0, i_ih).masked_fill_(~a_c, 0.0)
        T += dots
        q = A - same.to(A.dtype)
        v = torch.add(q, T, alpha=-2.0).mul_(q)
        v -= torch.where(same, dots, 0.0).mul_(2.0)
        del dots
        if eg is None:
            V = v.sum(dtype=torch.float64).reshape(1)
            V = V if B == 1 else torch.cat([V, V.new_zeros(B - 1)])
        else:
            V = v.new_zeros(B, dtype=torch.float64).index_add_(0, eg, v.to(torch.float64))
        ctx.pattern, ctx.B = pattern, B
        ctx.save_for_backward(D, A, T, i_hj, i_ih, a_r, a_c, same, eg)
        return V

    @staticmethod
    @_first_order
    def backward(ctx, gV: Tensor):
        D, A, T, i_hj, i_ih, a_r, a_c, same, eg = ctx.saved_tensors
        p = ctx.pattern
        gv = gV.to(D.dtype)
        ge = gv[0] if eg is None else gv.index_select(0, eg)  # d(loss)/dv per edge
        q = A - same.to(A.dtype)
        g_A = None
        if ctx.needs_input_grad[1]:
            g_A = torch.sub(q, T).mul_(ge).mul_(2.0)  # dv/dA = 2 (q - T)
        g_T = (q * ge).mul_(-2.0)  # dv/dT = -2 q
        del q
        # dv/d(dots) = -2 R, plus dT/d(dots) = 1
        g = torch.where(same, g_T - 2.0 * ge, g_T)
        if p.symmetric():  # (G + G^T) D as one pass: G^T has the values g[perm] on the same pattern
            g += g.index_select(0, p.transposed()[0])
            g_D = p.mm(g, D)
        else:
            g_D = p.mm(g, D)
            g_D += p.mm(g, D, transpose=True)
        del g
        flat = g_D.view(-1)
        flat.index_add_(0, i_hj, g_T.masked_fill(~a_r, 0.0))
        flat.index_add_(0, i_ih, g_T.masked_fill_(~a_c, 0.0))
        return g_D, g_A, None, None, None, None, None, None, None, None


class _RowEntropy(torch.autograd.Function):
    """S [N, C] -> -sum_c S log(S + EPS) per row, [N]; saves nothing but S."""

    # Both directions work in place on one (two) [N, C] buffers: the same operations in the same
    # order as -(S * log(S + EPS)).sum(-1) and -g (log(S + EPS) + S / (S + EPS)), bit for bit, at
    # half the time of the out-of-place form on a large N (bench/notes/sparse_profile_1e6.md).
    @staticmethod
    def forward(ctx, S: Tensor) -> Tensor:
        ctx.save_for_backward(S)
        t = S + EPS
        t.log_()
        t.mul_(S)
        return t.sum(-1).neg_()

    @staticmethod
    @_first_order
    def backward(ctx, g: Tensor):
        (S,) = ctx.saved_tensors
        t = S + EPS
        q = torch.div(S, t)
        t.log_()
        t.add_(q)
        del q
        return t.mul_(g[:, None]).neg_()


class _Softmax(torch.autograd.Function):
    """Row softmax, (s [N, C]) -> (P, top, k): P and each row's largest entry and its column
    (not differentiable). The backward shifts the incoming gradient by its argmax entry first.

    P * (h - <P, h>) with h = g - g[argmax] equals P * (g - <P, g>) exactly in real arithmetic;
    in floating point it keeps the gradient of the argmax logit of a saturated row, where
    <P, g> rounds to g[argmax] and the textbook form gives 0.
    """

    @staticmethod
    def forward(ctx, s: Tensor):
        P = torch.softmax(s, dim=-1)
        top, k = P.max(dim=-1)
        ctx.mark_non_differentiable(top, k)
        ctx.save_for_backward(P, k)
        return P, top, k

    @staticmethod
    @_first_order
    def backward(ctx, g: Tensor, _g_top, _g_k):
        P, k = ctx.saved_tensors
        h = g - g.gather(1, k[:, None])
        dot = (P * h).sum(-1, keepdim=True)  # (an einsum skips the [N, C] product but rounds worse)
        return h.sub_(dot).mul_(P)  # P * (h - <P, h>), in h's buffer


class _SplitHard(torch.autograd.Function):
    """(S [N, C], k [N], assigned [N]) -> (D, d): D = S - H with H_i = one-hot(k_i) for an
    assigned row (H_i = 0 otherwise), and d [N] = D[i, k_i] for an assigned row, else 0.

    D[i, k_i] = S[i, k_i] - 1 is computed as minus the sum of the row's other entries, so it has
    no cancellation when S_i is near one-hot; it then does not depend on S[i, k_i] at all, and
    the backward says so (the gradient of S[i, k_i] is 0 for an assigned row)."""

    @staticmethod
    def forward(ctx, S: Tensor, k: Tensor, assigned: Tensor):
        kk = k[:, None]
        top = S.gather(1, kk)[:, 0]
        D = S.clone()
        D.scatter_(1, kk, 0.0)
        d = D.sum(-1).neg_()
        dm = torch.where(assigned, d, 0.0)
        D.scatter_(1, kk, torch.where(assigned, d, top)[:, None])
        ctx.save_for_backward(k, assigned)
        return D, dm

    @staticmethod
    @_first_order
    def backward(ctx, g_D: Tensor, g_d: Tensor):
        k, assigned = ctx.saved_tensors
        kk = k[:, None]
        g_Dk = g_D.gather(1, kk)[:, 0]
        # an assigned row: dD[i, c]/dS[i, c] = 1 and dD[i, k_i]/dS[i, c] = d(d_i)/dS[i, c] = -1
        # for c != k_i; nothing depends on S[i, k_i]
        shift = torch.where(assigned, g_Dk + g_d, 0.0)
        g_S = g_D - shift[:, None]
        g_S.scatter_(1, kk, torch.where(assigned, 0.0, g_Dk)[:, None])
        return g_S, None, None


# --------------------------------------------------------------------------------------------
# per-graph products S_b^T Y_b
# --------------------------------------------------------------------------------------------


class _GraphBlocks:
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


class _Products(torch.autograd.Function):
    """(U [N, C], Y1 [N, K1], Y2 [N, K2]) -> (U_b^T Y1_b, U_b^T Y2_b) per graph, [B, C, K].

    One function for both products, so the backward writes U's gradient Y1 g1^T + Y2 g2^T
    into one contiguous buffer instead of summing two transposed [C, N] gradients."""

    @staticmethod
    def forward(ctx, U: Tensor, Y1: Tensor, Y2: Tensor, blocks: "_GraphBlocks"):
        ctx.blocks = blocks
        ctx.save_for_backward(U, Y1, Y2)
        return tuple(blocks.products(U, [Y1, Y2]))

    @staticmethod
    @_first_order
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


class _Gram64(torch.autograd.Function):
    """(D [N, C], slot [N], slots) -> (G, K): G = D_b^T D_b per graph [B, C, C] and K = the sums
    of D's rows per slot [slots, C], both in float64 from one pass that converts ``chunk_rows``
    rows at a time into one reused buffer; no float64 copy of D is kept."""

    @staticmethod
    def forward(ctx, D: Tensor, blocks: "_GraphBlocks", slot: Tensor, slots: int, chunk_rows: int = 1 << 15):
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
                if kind == "view":
                    p0 = data[0]
                    sl = slot[p0 + g0 * n : p0 + (g0 + u.shape[0]) * n]
                else:  # padding rows repeat a real row's slot and add 0 to it
                    sl = slot.index_select(0, data[0][g0 : g0 + step].reshape(-1))
                K.index_add_(0, sl, u.reshape(-1, C))
        return G, K

    @staticmethod
    @_first_order
    def backward(ctx, gG: Tensor, gK: Tensor):
        D, slot = ctx.saved_tensors
        g_D = gK.to(D.dtype).index_select(0, slot)
        ctx.blocks.times(D, (gG + gG.transpose(1, 2)).to(D.dtype), out=g_D)
        return g_D, None, None, None, None


def _per_graph_count(flag: Tensor, graph: Optional[Tensor], B: int) -> Tensor:
    """Per-graph counts of the true entries of ``flag`` [M], as float64 [B] (exact integers)."""
    if graph is None:
        out = flag.sum().to(torch.float64).reshape(1)
        return out if B == 1 else torch.cat([out, out.new_zeros(B - 1)])
    return torch.bincount(graph, weights=flag.to(torch.float64), minlength=B)


def _per_graph(v: Tensor, graph: Optional[Tensor], B: int) -> Tensor:
    """Per-graph float64 sums of v [M] with graph ids ``graph`` [M] (None: all in graph 0)."""
    if graph is None:
        out = v.sum(dtype=torch.float64).reshape(1)
        return out if B == 1 else torch.cat([out, out.new_zeros(B - 1)])
    v64 = v.to(torch.float64)
    return v64.new_zeros(B).index_add(0, graph, v64)


# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------


def sparse_diff_pool(
    x: Tensor,
    edge_index: Tensor,
    s: Tensor,
    batch: Optional[Tensor] = None,
    edge_weight: Optional[Tensor] = None,
    normalize: Union[bool, str] = True,
    *,
    num_graphs: Optional[int] = None,
    per_graph: bool = False,
    backend: str = "auto",
    num_clusters: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""DiffPool on a sparse PyG mini-batch; equals ``dense_diff_pool`` on its dense form.

    Returns ``(out [B, C, F], out_adj [B, C, C], link_loss, ent_loss)``, exactly what
    :func:`diffpool_fast.dense_diff_pool` (and ``torch_geometric.nn.dense_diff_pool``) return for
    ``to_dense_batch(x, batch)``, ``to_dense_adj(edge_index, batch, edge_weight)``,
    ``to_dense_batch(s, batch)`` and the mask of ``to_dense_batch``, every graph padded to the
    batch's largest (N_max nodes) -- but in O(E + N (C + F) + B C^2) memory, never N_max^2.
    ``normalize`` (``True``/``"numel"``: divide by B N_max^2; ``False``/``"none"``; ``"graph"``)
    and ``per_graph`` mean what they mean there. The module docstring gives the method.

    Args:
        x: node features [N, F].
        edge_index: [2, E] int64 (or int32); edge e sets A[edge_index[0, e], edge_index[1, e]]
            += edge_weight[e] (duplicate edges sum, as in ``to_dense_adj``). Both ends of an edge
            must lie in one graph.
        s: assignment logits [N, C]; the softmax over C is applied here.
        batch: [N] graph id of each node, sorted (as PyG's ``DataLoader`` gives it); None: one
            graph.
        edge_weight: [E] finite, non-negative weights (the adjacency's entries); None: 1.
        normalize: see :func:`diffpool_fast.dense_diff_pool`.
        num_graphs: B; default ``batch.max() + 1``. Larger values add graphs with no nodes
            (zero outputs, not counted by ``normalize="graph"``).
        per_graph: if True, ``link_loss`` and ``ent_loss`` are [B] tensors, one value per graph.
        num_clusters: [B] ints, 1 <= k_b <= C, or None: graph b's softmax runs over its first k_b
            columns and the rest of its S is 0, as in ``dense_diff_pool``.
        backend: ``"auto"`` or ``"torch"`` (the same code on CPU and CUDA). ``"triton"`` raises a
            ``ValueError``: the edge pass has no Triton kernel yet. ``DIFFPOOL_FAST_BACKEND``
            overrides the argument, as for ``dense_diff_pool``.

    Gradients flow to ``x``, ``s`` and ``edge_weight``; first order only (``create_graph=True``
    raises a ``RuntimeError``; ``dense_diff_pool(..., backend="torch")`` has a double backward).

    Errors: ``TypeError`` (wrong types or dtypes) and ``ValueError`` (shapes, node ids out of
    range, unsorted ``batch``, an edge joining two graphs, negative or non-finite weights, a
    ``num_graphs`` below ``batch.max() + 1``, tensors on different devices), naming the argument.
    """
    mode = _normalize_mode(normalize)
    if not isinstance(per_graph, bool):
        raise TypeError(f"per_graph must be a bool, got {type(per_graph).__name__}")
    _check_backend(backend)
    inp = _check_inputs(x, edge_index, s, batch, edge_weight, num_graphs)
    k = check_num_clusters(num_clusters, inp.B, inp.s.shape[1], inp.s.device)
    if k is not None:
        keep = cluster_mask(k, inp.s.shape[1])  # [B, C]
        graph = inp.batch if inp.batch is not None else inp.s.new_zeros(inp.s.shape[0], dtype=torch.long)
        rows = keep[graph]
        inp = inp._replace(s=inp.s.masked_fill(~rows, float("-inf")))
    out, out_adj, link_sq, ent_sum, n, N_max = _coarsen_sparse(inp)
    link, ent = finish_losses(link_sq, ent_sum, n, N_max, mode, per_graph)
    if mode != "graph":
        # finish_losses' square root maps a NaN sum to 0; a NaN input must not look like a 0 loss.
        bad = torch.isnan(link_sq) if per_graph else torch.isnan(link_sq).any()
        link = torch.where(bad, torch.full_like(link, float("nan")), link)
    result_dtype = torch.promote_types(inp.x.dtype, inp.s.dtype)
    return out.to(result_dtype), out_adj.to(result_dtype), link.to(result_dtype), ent.to(result_dtype)


def _coarsen_sparse(inp: _Inputs):
    """(out, out_adj, link_sq [B] float64, ent_sum [B] float64, n [B], N_max)."""
    x, s, batch, B = inp.x, inp.s, inp.batch, inp.B
    N, Fdim = x.shape
    C = s.shape[1]
    device = x.device
    dt = compute_dtype(x, s)
    f64 = torch.float64

    if batch is None:
        counts = torch.zeros(B, dtype=torch.int64, device=device)
        counts[0] = N
    else:
        counts = torch.bincount(batch, minlength=B)
    N_max = int(counts.max()) if B > 0 else 0
    if N == 0:
        z = torch.zeros(B, dtype=f64, device=device)
        zero = (x.sum() + s.sum()).to(dt) * 0  # keeps the autograd graph to x and s
        return (zero + x.new_zeros(B, C, Fdim, dtype=dt), zero + x.new_zeros(B, C, C, dtype=dt),
                z + zero.to(f64), z + zero.to(f64), counts, N_max)

    # ---- coalesce the edges: unique (row, col) sorted, their summed weights
    key = inp.row * N + inp.col
    w = inp.weight.to(dt) if inp.weight is not None else None
    if key.numel() < 2 or bool((key[1:] > key[:-1]).all()):
        ukey, inv = key, None
    else:
        ukey, inv = torch.unique(key, sorted=True, return_inverse=True)
    urow, ucol = (inp.row, inp.col) if inv is None else (ukey // N, ukey % N)
    E1 = ukey.numel()
    if inv is None:
        A_val = w if w is not None else torch.ones(E1, dtype=dt, device=device)
    elif w is not None:
        A_val = w.new_zeros(E1).index_add(0, inv, w)
    else:
        A_val = torch.bincount(inv, minlength=E1).to(dt)
    pattern = _Pattern(urow, ucol, N)
    graph = None if batch is None or B == 1 else batch  # graph of each node (None: all in graph 0)
    eg = None if graph is None else graph[urow]  # graph of each edge

    # ---- S, its hard assignment H and D = S - H without cancellation. H_i = one-hot(argmax S_i)
    # for a row more than half in one cluster, else 0: the identity holds for any such H, and
    # this choice keeps every entry of D within [-1/2, 1/2].
    S, top, k = _Softmax.apply(s.to(dt))
    assigned = top > 0.5
    D, d = _SplitHard.apply(S, k, assigned)  # d_i = D[i, k_i] = S[i, k_i] - 1 (assigned rows), else 0
    d64 = d.to(f64)

    # ---- out = S^T x, out_adj = S^T A S, G = D^T D, K = H^T D: per graph
    AS = _SpMM.apply(A_val, S, pattern)
    blocks = _GraphBlocks(counts, B, N)
    out, out_adj = _Products.apply(S, x.to(dt), AS, blocks)
    # (graph, hard cluster) of each assigned node; unassigned nodes go to a spare slot B*C
    gk = k if graph is None else graph * C + k
    gk = torch.where(assigned, gk, B * C)
    Gd, Kd = _Gram64.apply(D, blocks, gk, B * C + 1)  # G = D^T D, and K = H^T D as row sums; float64
    Kd = Kd[: B * C].view(B, C, C)
    m = torch.bincount(gk, minlength=B * C + 1)[: B * C].to(f64).view(B, C)
    K_diag64 = d64.new_zeros(B * C + 1).index_add(0, gk, d64)[: B * C].view(B, C)

    # ---- per-edge terms, on the coalesced edges
    k_r, k_c = k.index_select(0, urow), k.index_select(0, ucol)
    a_r, a_c = assigned.index_select(0, urow), assigned.index_select(0, ucol)
    same = (k_r == k_c) & a_r & a_c  # R_ij
    # V = sum over edges of (A - S S^T)^2 - T^2 - 2 R <D_i, D_j>, T = (S S^T - R)_ij
    V = _EdgeTerms.apply(D, A_val, pattern, k_r, k_c, a_r, a_c, same, eg, B)
    del k_r, k_c, a_r, a_c
    n_same = _per_graph_count(same, eg, B)
    # sum over same-cluster edges of d_i + d_j, as sum_i d_i (number of such edges at i): the
    # counts are exact, and d64's gradient meets K_diag64's in float64, where they cancel
    cnt_dt = torch.float32 if same.numel() < (1 << 24) else f64
    same_w = same.to(cnt_dt)
    cnt = torch.bincount(urow, weights=same_w, minlength=N).to(f64)
    cnt += torch.bincount(ucol, weights=same_w, minlength=N).to(f64)
    del same_w
    lin_same = _per_graph(d64 * cnt, graph, B)

    # ---- the non-edge pairs: all pairs minus the edges, of R, 2 R T and T^2
    G_diag = torch.diagonal(Gd, dim1=1, dim2=2)
    r_off = (m * m).sum(1) - n_same
    rt_all = 2.0 * (m * K_diag64).sum(1) - lin_same + Kd.square().sum((1, 2))  # the edges' dots are in V
    tt_all = (
        2.0 * (m * G_diag).sum(1)
        + 2.0 * (Kd * Kd.transpose(1, 2)).sum((1, 2))
        + 4.0 * (Kd * Gd).sum((1, 2))
        + Gd.square().sum((1, 2))
    )
    raw = V + r_off + 2.0 * rt_all + tt_all
    link_sq = raw.clamp_min(0.0)

    ent_rows = _RowEntropy.apply(S)
    ent_sum = _per_graph(ent_rows, graph, B)
    return out, out_adj, link_sq, ent_sum, counts, N_max
