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
  backward passes (``SpMM``, ``EdgeTerms`` in ``sparse_edges.py``) are the same two kernels,
  ``A^T Y`` on the transposed pattern (one stable argsort of the columns, made on the first
  backward that needs it); on a symmetric pattern (G + G^T) Y is one pass.
* **Per-graph products** S_b^T Y_b ([B, C, K]): out = S^T x, out_adj = S^T (A S), and the Gram
  D^T D below (``sparse_blocks.py``). Graphs are grouped by size into buckets [2^l, 2^(l+1)), at most
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

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ..config import BACKEND_ENV, EPS, POOL_BACKENDS, backend_override
from .coarsen_torch import compute_dtype
from .inputs import check_num_clusters, cluster_mask
from .pool import _normalize_mode, finish_losses
from .sparse_blocks import Gram64, GraphBlocks, Products, per_graph, per_graph_count, weighted_count
from .sparse_edges import EdgeTerms, Pattern, SpMM, first_order

_INDEX_DTYPES = (torch.int64, torch.int32)


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
    @first_order
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
    @first_order
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
    @first_order
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
    pattern = Pattern(urow, ucol, N)
    graph = None if batch is None or B == 1 else batch  # graph of each node (None: all in graph 0)
    eg = None if graph is None else graph[urow]  # graph of each edge

    # ---- S, its hard assignment H and D = S - H without cancellation. H_i = one-hot(argmax S_i)
    # for a row more than half in one cluster, else 0: the identity holds for any such H, and
    # this choice keeps every entry of D within [-1/2, 1/2].
    S, top, k = _Softmax.apply(s.to(dt))
    assigned = top > 0.5

    # ---- out = S^T x, out_adj = S^T A S: per graph
    AS = SpMM.apply(A_val, S, pattern)
    blocks = GraphBlocks(counts, B, N)
    out, out_adj = Products.apply(S, x.to(dt), AS, blocks)

    if not bool(assigned.any()):
        # no row has a hard cluster (a spread-out S, as at the start of training): H = 0, so
        # D = S, R = 0, K = 0, and of the sums below only the edges' part and ||G||^2 remain
        Gd, _ = Gram64.apply(S, blocks, None, 1)
        V = EdgeTerms.apply(S, A_val, pattern, None, eg, B)
        raw = V + Gd.square().sum((1, 2))
    else:
        raw = _hard_split_terms(S, k, assigned, A_val, pattern, blocks, graph, eg, B, urow, ucol)
    link_sq = raw.clamp_min(0.0)

    ent_rows = _RowEntropy.apply(S)
    ent_sum = per_graph(ent_rows, graph, B)
    return out, out_adj, link_sq, ent_sum, counts, N_max


def _hard_split_terms(S, k, assigned, A_val, pattern, blocks, graph, eg, B, urow, ucol):
    """||A_b - S_b S_b^T||^2 per graph (float64 [B], before the clamp at 0) through the hard
    split of the module docstring: D = S - H, K = H^T D, G = D^T D, the edges' terms and the
    non-edge pairs as "all pairs minus the edges"."""
    N, C = S.shape
    f64 = torch.float64
    D, d = _SplitHard.apply(S, k, assigned)  # d_i = D[i, k_i] = S[i, k_i] - 1 (assigned rows), else 0
    d64 = d.to(f64)
    # (graph, hard cluster) of each assigned node; unassigned nodes go to a spare slot B*C
    gk = k if graph is None else graph * C + k
    gk = torch.where(assigned, gk, B * C)
    Gd, Kd = Gram64.apply(D, blocks, gk, B * C + 1)  # G = D^T D, and K = H^T D as row sums; float64
    Kd = Kd[: B * C].view(B, C, C)
    m = torch.bincount(gk, minlength=B * C + 1)[: B * C].to(f64).view(B, C)
    K_diag64 = d64.new_zeros(B * C + 1).index_add(0, gk, d64)[: B * C].view(B, C)

    # ---- per-edge terms, on the coalesced edges
    k_r, k_c = k.index_select(0, urow), k.index_select(0, ucol)
    a_r, a_c = assigned.index_select(0, urow), assigned.index_select(0, ucol)
    same = (k_r == k_c) & a_r & a_c  # R_ij
    # V = sum over edges of (A - S S^T)^2 - T^2 - 2 R <D_i, D_j>, T = (S S^T - R)_ij
    V = EdgeTerms.apply(D, A_val, pattern, (k_r, k_c, a_r, a_c, same), eg, B)
    del k_r, k_c, a_r, a_c
    n_same = per_graph_count(same, eg, B)
    # sum over same-cluster edges of d_i + d_j, as sum_i d_i (number of such edges at i): the
    # counts are exact, and d64's gradient meets K_diag64's in float64, where they cancel
    cnt_dt = torch.float32 if same.numel() < (1 << 24) else f64
    same_w = same.to(cnt_dt)
    cnt = weighted_count(urow, same_w, N).to(f64)
    cnt += weighted_count(ucol, same_w, N).to(f64)
    del same_w
    lin_same = per_graph(d64 * cnt, graph, B)

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
    return V + r_off + 2.0 * rt_all + tt_all
