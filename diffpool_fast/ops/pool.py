"""``dense_diff_pool``: a drop-in for ``torch_geometric.nn.dense_diff_pool``."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .dispatch import coarsen
from .inputs import check_pool_inputs, node_counts

NORMALIZE_MODES = ("numel", "none", "graph")


def _normalize_mode(normalize) -> str:
    if normalize is True:
        return "numel"
    if normalize is False or normalize is None:
        return "none"
    if isinstance(normalize, str) and normalize in NORMALIZE_MODES:
        return normalize
    raise ValueError(
        f"normalize must be True, False or one of {NORMALIZE_MODES}, got {normalize!r}"
    )


def _safe_sqrt(q: Tensor) -> Tensor:
    """sqrt with gradient 0 (not NaN) at q == 0, as torch.norm has at a zero residual."""
    pos = q > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, q, torch.ones_like(q))), torch.zeros_like(q))


def dense_diff_pool(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Optional[Tensor] = None,
    normalize: Union[bool, str] = True,
    *,
    backend: str = "auto",
    per_graph: bool = False,
    adj_symmetric: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""DiffPool coarsening (Ying et al. 2018), a drop-in for PyG's ``dense_diff_pool``.

    With S = mask * softmax(s) (rows of padded nodes exactly 0) returns
    ``(out, out_adj, link_loss, ent_loss)``:

    - ``out = S^T x`` [B, C, F] and ``out_adj = S^T adj S`` [B, C, C];
    - ``link_loss``: the link-prediction loss ||A - S S^T||, by ``normalize``:

      * ``True`` or ``"numel"`` (PyG's default): ||A - S S^T||_F over the whole batch divided by
        ``adj.numel()`` (B * N * N);
      * ``False`` or ``"none"``: ||A - S S^T||_F over the whole batch;
      * ``"graph"``: each graph's *squared* error over its own n_b^2 real node pairs,
        ||A_b - S_b S_b^T||_F^2 / n_b^2, averaged over the graphs that have a real node. This is
        the per-pair average of the original DiffPool code; PyG's division by ``adj.numel()``
        makes the loss so small that clusters can collapse (PyG PR #4847).

    - ``ent_loss``: mean over all B * N rows (padded rows add 0) of -sum_c S log(S + 1e-15).

    Args:
        x: node features [B, N, F] (or [N, F]).
        adj: adjacency [B, N, N] (or [N, N]); floating point, or bool/uint8 for a binary graph.
        s: assignment logits [B, N, C] (or [N, C]); the softmax is applied here.
        mask: [B, N], True (or 1) for real nodes; None when no node is padding.
        normalize: see ``link_loss`` above.
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or
            ``"triton"``. The environment variable ``DIFFPOOL_FAST_BACKEND`` overrides it.
        per_graph: if True, ``link_loss`` and ``ent_loss`` are [B] tensors, one value per graph:
            link as ||A_b - S_b S_b^T||_F (``"none"``), the same divided by N*N (``"numel"``), or
            ||A_b - S_b S_b^T||_F^2 / n_b^2 (``"graph"``); entropy as the mean row entropy over the
            graph's n_b real nodes. Graphs with no real node give 0 for both.
        adj_symmetric: ``True`` promises that every ``adj[b]`` equals its transpose (undirected
            graphs, and every ``out_adj`` of a symmetric adjacency up to rounding): the backward
            pass then uses A^T S = A S and never reads adj. ``None`` (default): unknown, always
            correct. Passing ``True`` for a non-symmetric adj gives wrong gradients.

    Errors: ``TypeError``/``ValueError`` naming the argument and shapes for bad inputs.
    """
    return pool_with_adj_op(x, adj, s, mask, normalize, backend=backend, per_graph=per_graph,
                            adj_symmetric=adj_symmetric)


def pool_with_adj_op(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Optional[Tensor] = None,
    normalize: Union[bool, str] = True,
    *,
    backend: str = "auto",
    per_graph: bool = False,
    adj_symmetric: Optional[bool] = None,
    adj_op=None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`dense_diff_pool`, with the products over A optionally taken from ``adj_op``.

    ``adj_op``: a :class:`diffpool_fast.ops.block_sparse.BlockSparseAdj` of ``adj``, which the
    torch path multiplies with (``adj`` itself is then only checked, not read). The model's
    level 0 uses it; the public drop-in has no such argument.
    """
    mode = _normalize_mode(normalize)
    if not isinstance(per_graph, bool):
        raise TypeError(f"per_graph must be a bool, got {type(per_graph).__name__}")
    if adj_symmetric not in (None, True, False):
        raise TypeError(f"adj_symmetric must be None, True or False, got {adj_symmetric!r}")
    inp = check_pool_inputs(x, adj, s, mask)
    B, N = inp.x.shape[0], inp.x.shape[1]
    out, out_adj, link_sq, ent_sum = coarsen(inp.x, inp.adj, inp.s, inp.mask, backend, adj_symmetric, adj_op)

    n = node_counts(inp.mask, B, N, link_sq.device)
    link, ent = finish_losses(link_sq, ent_sum, n, N, mode, per_graph)
    result_dtype = torch.promote_types(inp.x.dtype, inp.s.dtype)
    return (
        out.to(result_dtype),
        out_adj.to(result_dtype),
        link.to(result_dtype),
        ent.to(result_dtype),
    )


def finish_losses(
    link_sq: Tensor, ent_sum: Tensor, n: Tensor, N: int, mode: str, per_graph: bool
) -> Tuple[Tensor, Tensor]:
    """The link and entropy losses from the per-graph sums every backend returns.

    ``link_sq`` [B]: ||A_b - S_b S_b^T||_F^2; ``ent_sum`` [B]: the summed row entropies of S_b;
    ``n`` [B]: real nodes per graph; ``N``: the padded node count (PyG's ``adj.numel()`` is
    B * N * N); ``mode``: ``"numel"``, ``"none"`` or ``"graph"`` (:func:`dense_diff_pool`).
    """
    B = link_sq.shape[0]
    n = n.to(link_sq.dtype)
    has_nodes = n > 0
    n_safe = n.clamp_min(1)
    if per_graph:
        if mode == "graph":
            link = torch.where(has_nodes, link_sq / n_safe**2, torch.zeros_like(link_sq))
        else:
            link = _safe_sqrt(link_sq)
            if mode == "numel":
                link = link / float(max(N * N, 1))
        ent = torch.where(has_nodes, ent_sum / n_safe, torch.zeros_like(ent_sum))
        return link, ent
    if mode == "graph":
        per = torch.where(has_nodes, link_sq / n_safe**2, torch.zeros_like(link_sq))
        link = per.sum() / has_nodes.sum().clamp_min(1)
    else:
        link = _safe_sqrt(link_sq.sum())
        if mode == "numel":
            link = link / float(max(B * N * N, 1))
    ent = ent_sum.sum() / float(B * N) if B * N > 0 else ent_sum.sum()
    return link, ent
