"""``dense_diff_pool``: a drop-in for ``torch_geometric.nn.dense_diff_pool``."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..config import CONVERT_CHUNK_BYTES
from . import dispatch_table
from .block_sparse import BlockSparseAdj
from .coarsen_torch import compute_dtype
from .dispatch import check_backend, coarsen, resolve_backend
from .inputs import check_num_clusters, check_pool_inputs, mask_logits, node_counts
from .link_bce import bce_link_sums

NORMALIZE_MODES = ("numel", "none", "graph")
LINK_LOSSES = ("frobenius", "bce")


def _kind(value) -> str:
    """``int 1``, ``numpy.bool np.True_``, ``torch.Tensor tensor(True)``: for error messages."""
    cls = type(value)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"
    return f"{name} {value!r}"


def _normalize_mode(normalize) -> str:
    if normalize is True:
        return "numel"
    if normalize is False or normalize is None:
        return "none"
    if isinstance(normalize, str):
        if normalize in NORMALIZE_MODES:
            return normalize
        raise ValueError(
            f"normalize must be True, False or one of {NORMALIZE_MODES}, got {normalize!r}"
        )
    # An int, a tensor, a numpy bool: PyG's ``normalize is True`` would silently not normalise.
    raise TypeError(
        f"normalize must be True, False or one of {NORMALIZE_MODES}, "
        f"got {_kind(normalize)}"
    )


def _check_options(backend, per_graph, adj_symmetric, link_loss="frobenius") -> None:
    """TypeError/ValueError for keyword options of the wrong kind (1 is not a bool here)."""
    check_backend(backend)
    if not isinstance(link_loss, str):
        raise TypeError(f"link_loss must be one of {LINK_LOSSES}, got {_kind(link_loss)}")
    if link_loss not in LINK_LOSSES:
        raise ValueError(f"link_loss must be one of {LINK_LOSSES}, got {link_loss!r}")
    if not isinstance(per_graph, bool):
        raise TypeError(f"per_graph must be a bool, got {_kind(per_graph)}")
    if adj_symmetric is not None and not isinstance(adj_symmetric, bool):
        raise TypeError(
            f"adj_symmetric must be None, True or False, got {_kind(adj_symmetric)}"
        )


def _safe_sqrt(q: Tensor) -> Tensor:
    """sqrt with gradient 0 (not NaN) at q == 0, as torch.norm has at a zero residual.

    Only q <= 0 is guarded: a NaN (which compares False with everything) or inf passes through
    to the result and its gradient, so a diverging run sees it as PyG's torch.norm shows it.
    """
    zero = q <= 0
    return torch.where(zero, torch.zeros_like(q), torch.sqrt(torch.where(zero, torch.ones_like(q), q)))


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
    num_clusters: Optional[Tensor] = None,
    link_loss: str = "frobenius",
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
        makes the loss so small that clusters can collapse (PyG PR #4847). Entries of adj at a
        pair with a padded node are not counted (nor differentiated), whatever finite value they hold.

      ``"numel"`` and ``"none"`` are PyG's: the norm runs over all N^2 pairs of each graph, so
      nonzero adjacency entries at padded positions count there, as in PyG.

    - ``ent_loss``: mean over all B * N rows (padded rows add 0) of -sum_c S log(S + 1e-15).

    Args:
        x: node features [B, N, F] (or [N, F]).
        adj: adjacency [B, N, N] (or [N, N]); floating point, or bool/uint8 for a binary graph.
        s: assignment logits [B, N, C] (or [N, C]); the softmax is applied here.
        mask: [B, N], True (or 1) for real nodes; None when no node is padding. A float or
            integer mask must hold only 0 and 1 (anything else is a ValueError, not a weight).
            Inside ``torch.compile`` that check cannot raise a Python error without a graph
            break, so it is a tensor-side assertion there (``torch._assert_async``): a
            RuntimeError on CPU, a device-side assert on CUDA. A bool mask is never checked.
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
        num_clusters: None (default: every graph uses all C clusters), or a [B] integer tensor
            (or a list of B ints) with 1 <= k_b <= C: graph b has k_b clusters. Its softmax runs
            over the first k_b columns of ``s[b]``, the other columns of S_b are exactly 0 (and
            ``s[b]`` there gets no gradient), so the rows and columns of ``out[b]`` and
            ``out_adj[b]`` past k_b are 0 and both losses count real clusters only. The next
            level's mask is ``diffpool_fast.ops.inputs.cluster_mask(num_clusters, C)``.
        link_loss: ``"frobenius"`` (default, PyG's ||A - S S^T||_F as above) or ``"bce"``: the
            DiffPool authors' binary cross-entropy of min(S S^T, 1) against A over real node
            pairs (definition, clamp gradient and cost in ``diffpool_fast/ops/link_bce.py``).
            Scaling by ``normalize``: ``True``/``"numel"`` divides the batch's sum by
            sum_b n_b^2 (the authors' mean over real pairs), ``"graph"`` averages each graph's
            mean over its n_b^2 pairs over the graphs with a node, ``False``/``"none"`` is the
            plain sum; with ``per_graph`` each graph's sum over n_b^2 (``"numel"``, ``"graph"``)
            or its sum (``"none"``). Entries of adj at padded pairs are never read as links.

    Errors: ``TypeError``/``ValueError`` naming the argument and shapes for bad inputs.

    TorchScript: ``torch.jit.script`` (of this function, or of a module that calls it) compiles
    a scripted version of the plain formulas instead, with the same arguments, values, gradients
    and shape, dtype and mask checks, but PyG's speed and memory (it builds the B x N x N
    residual); it has no Triton path (``backend="triton"`` is an error there) and does not read
    ``DIFFPOOL_FAST_BACKEND``.
    """
    return pool_with_adj_op(x, adj, s, mask, normalize, backend=backend, per_graph=per_graph,
                            adj_symmetric=adj_symmetric, num_clusters=num_clusters, link_loss=link_loss)


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
    num_clusters: Optional[Tensor] = None,
    link_loss: str = "frobenius",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`dense_diff_pool`, with the products over A optionally taken from ``adj_op``.

    ``adj_op``: a :class:`diffpool_fast.ops.block_sparse.BlockSparseAdj` of ``adj``, which the
    torch path multiplies with (``adj`` itself is then only checked, not read). The model's
    level 0 uses it; the public drop-in has no such argument.
    """
    mode = _normalize_mode(normalize)
    _check_options(backend, per_graph, adj_symmetric, link_loss)
    inp = check_pool_inputs(x, adj, s, mask)
    B, N, C = inp.s.shape
    k = check_num_clusters(num_clusters, B, C, inp.s.device)
    result_dtype = torch.promote_types(inp.x.dtype, inp.s.dtype)
    if link_loss == "frobenius" and adj_op is None:
        fused = _fused_triton(inp, backend, mode, per_graph, adj_symmetric, k, result_dtype)
        if fused is not None:
            return fused
    # the BCE link loss discards link_sq: no direct recompute of graphs whose identity terms cancel
    out, out_adj, link_sq, ent_sum = coarsen(inp.x, inp.adj, inp.s, inp.mask, backend, adj_symmetric, adj_op, k,
                                             exact_link=link_loss != "bce")
    n = node_counts(inp.mask, B, N, link_sq.device)
    if link_loss == "bce":
        S = assignment(inp.s, inp.mask, k, compute_dtype(inp.x, inp.s))
        bce = bce_link_sums(inp.adj if adj_op is None else adj_op, S, inp.mask)
        link = finish_bce(bce, n, mode, per_graph)
        _, ent = finish_losses(link_sq, ent_sum, n, N, mode, per_graph)
        return out.to(result_dtype), out_adj.to(result_dtype), link.to(result_dtype), ent.to(result_dtype)
    if mode == "graph" and inp.mask is not None:
        # The backends sum ||A_b - S_b S_b^T||^2 over all N^2 pairs. S is 0 on padded rows, so
        # at a pair with a padded node the residual is A's entry itself: take those out.
        pad_sq = padded_pair_sq(inp.adj if adj_op is None else adj_op, inp.mask)
        link_sq = (link_sq - pad_sq).clamp_min(0.0)

    link, ent = finish_losses(link_sq, ent_sum, n, N, mode, per_graph)
    return (
        out.to(result_dtype),
        out_adj.to(result_dtype),
        link.to(result_dtype),
        ent.to(result_dtype),
    )


def _fused_triton(inp, backend: str, mode: str, per_graph: bool, adj_symmetric, k, result_dtype):
    """The whole step on the Triton kernels, losses included (``coarsen_triton.pool_triton``:
    eight launches forward and backward, no torch arithmetic around them), when the dispatch
    picks Triton for these inputs and the kernels take them; else None (the caller's path warns
    about a fallback once, through ``dispatch.coarsen``)."""
    if resolve_backend(backend, inp.x.device, dispatch_table.bucket_of(inp.x, inp.adj, inp.s)) != "triton":
        return None
    from . import coarsen_triton

    if coarsen_triton.unsupported_reason(inp.x, inp.adj, inp.s, inp.mask) is not None:
        return None
    out, out_adj, link, ent = coarsen_triton.pool_triton(
        inp.x, inp.adj, inp.s, inp.mask, mode, per_graph, adj_symmetric=adj_symmetric, num_clusters=k,
        result_dtype=result_dtype)
    if result_dtype != torch.float32:
        out, out_adj = out.to(result_dtype), out_adj.to(result_dtype)
    return out, out_adj, link, ent


def assignment(s: Tensor, mask: Optional[Tensor], num_clusters: Optional[Tensor], dt: torch.dtype) -> Tensor:
    """S = m * softmax(s) over each graph's first k_b columns, in ``dt`` (the step's compute dtype,
    ``coarsen_torch.compute_dtype``), with plain autograd: [B, N, C] (what the backends compute
    inside their ops)."""
    S = torch.softmax(mask_logits(s, num_clusters).to(dt), dim=-1)
    if mask is not None:
        S = S * mask.unsqueeze(-1).to(dt)
    return S


def finish_bce(bce: Tensor, n: Tensor, mode: str, per_graph: bool) -> Tensor:
    """The BCE link loss from its per-graph sums ``bce`` [B] and node counts ``n`` [B]
    (scalings in :func:`dense_diff_pool`, ``link_loss``)."""
    n2 = n.to(bce.dtype) ** 2
    has_nodes = n2 > 0
    per = torch.where(has_nodes, bce / n2.clamp_min(1), torch.zeros_like(bce))
    if per_graph:
        return bce if mode == "none" else per
    if mode == "none":
        return bce.sum()
    if mode == "graph":
        return per.sum() / has_nodes.sum().clamp_min(1)
    return bce.sum() / n2.sum().clamp_min(1)


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


#: bytes of adjacency (in the summing dtype) one step of :func:`padded_pair_sq` holds on the CPU,
#: small enough to stay in cache; on other devices CONVERT_CHUNK_BYTES (fewer launches)
_PAD_CHUNK_BYTES_CPU = 4 << 20


def _padded_pair_sq_dense(adj: Tensor, mask: Tensor) -> Tensor:
    B, N = mask.shape
    if adj.dtype in (torch.float32, torch.float64):
        wide = adj.dtype
    elif adj.is_floating_point():
        wide = torch.float32  # fp16/bf16: square in fp32, no overflow at 256
    elif adj.dtype == torch.bool or N * 255 * 255 < 2**24:
        wide = torch.float32  # integer squares and row sums below 2^24: exact in fp32
    else:
        wide = torch.float64  # uint8 weights of a large graph: exact in fp64
    itemsize = torch.empty((), dtype=wide).element_size()
    budget = _PAD_CHUNK_BYTES_CPU if adj.device.type == "cpu" else CONVERT_CHUNK_BYTES
    rows = max(1, budget // max(1, N * itemsize))  # rows of A held at once (as A and as A∘A)
    graphs, rows = (max(1, rows // N), N) if rows >= N else (1, rows)
    pad = (~mask).to(wide)  # [B, N], 1 at padded nodes
    total = torch.zeros(B, dtype=torch.float64, device=adj.device)
    for b0 in range(0, B, graphs):
        b1 = min(B, b0 + graphs)
        p = pad[b0:b1]
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            sq = adj[b0:b1, r0:r1].to(wide)
            if adj.dtype != torch.bool:
                sq = sq * sq
            # A padded row i pairs with every j; a real row only with the padded columns.
            row_all = sq.sum(dim=2)  # [g, r]
            row_pad = torch.bmm(sq, p[:, :, None]).squeeze(2)  # [g, r]: sum_j A_ij^2 pad_j
            p_rows = p[:, r0:r1]
            part = (p_rows * row_all + (1 - p_rows) * row_pad).sum(dim=1, dtype=torch.float64)
            total[b0:b1] += part
    return total


class _PaddedPairSq(torch.autograd.Function):
    """sum_{(i, j): i or j padded} A_ij^2 per graph; d/dA = 2 A at those pairs, 0 elsewhere."""

    @staticmethod
    def forward(ctx, adj: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(adj, mask)
        return _padded_pair_sq_dense(adj, mask)

    @staticmethod
    def backward(ctx, g: Tensor):
        adj, mask = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        real_pair = mask[:, :, None] & mask[:, None, :]
        scale = (2.0 * g).to(adj.dtype)[:, None, None]
        # written with differentiable ops, so a double backward through it works
        return torch.where(real_pair, torch.zeros_like(adj), adj * scale), None


def padded_pair_sq(adj, mask: Tensor) -> Tensor:
    """Per graph, the squared adjacency entries at pairs that involve a padded node, [B] float64.

    ``adj``: [B, N, N] (any accepted dtype; differentiable when floating) or the same as a
    :class:`~diffpool_fast.ops.block_sparse.BlockSparseAdj` (its stored entries are read:
    O(nnz)). ``mask``: [B, N] bool. The dense adjacency is read a few graphs (or rows) at a time,
    never converted or masked whole: no B x N x N temporary. An adjacency whose padding is 0
    gives exactly 0.
    """
    if isinstance(adj, BlockSparseAdj):
        B, N, _ = adj.shape
        flat = mask.reshape(-1)
        r, c, val = adj.entries()
        at_pad = ~(flat[r] & flat[c])
        sq = torch.where(at_pad, val.to(torch.float64).square(), torch.zeros((), dtype=torch.float64,
                                                                             device=val.device))
        graph = torch.div(r, N, rounding_mode="floor")
        return torch.zeros(B, dtype=torch.float64, device=val.device).index_add_(0, graph, sq)
    if adj.requires_grad:
        return _PaddedPairSq.apply(adj, mask)
    return _padded_pair_sq_dense(adj, mask)


# --------------------------------------------------------------------------------------------
# TorchScript. The fast paths cannot be scripted (a Python autograd.Function, Triton kernels,
# keyword-only arguments), so ``torch.jit.script`` compiles this function in their place
# (``dense_diff_pool.__prepare_scriptable__``), also when it scripts a module that calls
# ``dense_diff_pool``. It computes the same values and gradients from the plain formulas, with
# the same option, shape, dtype and mask-value checks (raised as torch.jit.Error in TorchScript),
# but builds the B x N x N residual A - S S^T as PyG does: PyG's speed and memory, not ours. The
# DIFFPOOL_FAST_BACKEND variable is not read; backend="triton" is refused.


def _script_dense_diff_pool(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Optional[Tensor] = None,
    normalize: Union[bool, str, None] = True,
    backend: str = "auto",
    per_graph: bool = False,
    adj_symmetric: Optional[bool] = None,
    num_clusters: Optional[Tensor] = None,
    link_loss: str = "frobenius",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if link_loss != "frobenius" and link_loss != "bce":
        raise ValueError("link_loss must be one of ('frobenius', 'bce'), got '" + link_loss + "'")
    if normalize is None:
        mode = "none"
    elif isinstance(normalize, bool):
        mode = "numel" if normalize else "none"
    else:
        mode = normalize
    if mode != "numel" and mode != "none" and mode != "graph":
        raise ValueError("normalize must be True, False or one of ('numel', 'none', 'graph'), got '"
                         + mode + "'")
    if backend == "triton":
        raise ValueError("backend='triton' is not available in TorchScript: a scripted "
                         "dense_diff_pool runs the plain PyTorch formulas; use backend='auto' or 'torch'")
    if backend != "auto" and backend != "torch":
        raise ValueError("backend must be one of ('auto', 'torch', 'triton'), got '" + backend + "'")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if adj.dim() == 2:
        adj = adj.unsqueeze(0)
    if s.dim() == 2:
        s = s.unsqueeze(0)
    if x.dim() != 3 or adj.dim() != 3 or s.dim() != 3:
        raise ValueError(f"x, adj and s must be [B, N, F], [B, N, N] and [B, N, C] (or 2-D), got "
                         f"{x.dim()}-D, {adj.dim()}-D and {s.dim()}-D tensors")
    # (TorchScript formats a dtype as its enum number: the messages leave it out)
    if not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not s.is_floating_point():
        raise TypeError("s (assignment logits) must be a floating-point tensor")
    if not (adj.is_floating_point() or adj.dtype == torch.bool or adj.dtype == torch.uint8):
        raise TypeError("adj must be floating point, bool or uint8")
    B, N = x.shape[0], x.shape[1]
    if adj.shape[1] != adj.shape[2]:
        raise ValueError(f"adj must be square in its last two dimensions, got shape {adj.shape}")
    if adj.shape[0] != B or s.shape[0] != B:
        raise ValueError(f"batch sizes disagree: x {x.shape}, adj {adj.shape}, s {s.shape}")
    if adj.shape[1] != N or s.shape[1] != N:
        raise ValueError(f"node counts disagree: x {x.shape}, adj {adj.shape}, s {s.shape}")
    C = s.shape[2]
    if C < 1:
        raise ValueError(f"s must have at least one cluster, got shape {s.shape}")
    result_dtype = torch.promote_types(x.dtype, s.dtype)
    dt = result_dtype
    if dt == torch.float16 or dt == torch.bfloat16:
        dt = torch.float32
    if num_clusters is not None:
        if num_clusters.dim() != 1 or num_clusters.shape[0] != B or num_clusters.is_floating_point():
            raise ValueError(f"num_clusters must be a [B] = [{B}] integer tensor, got shape {num_clusters.shape}")
        if bool(((num_clusters < 1) | (num_clusters > C)).any()):
            raise ValueError(f"num_clusters must lie in [1, C] with C={C}")
        keep = torch.arange(C, device=s.device).unsqueeze(0) < num_clusters.unsqueeze(1)
        s = s.masked_fill(~keep.unsqueeze(1), float("-inf"))
    S = torch.softmax(s.to(dt), dim=-1)
    m = torch.ones(B, N, dtype=torch.bool, device=x.device)
    if mask is not None:
        if mask.numel() != B * N or mask.is_complex():
            raise ValueError(f"mask must have shape [B, N] = [{B}, {N}] and be bool (or 0/1 integers "
                             f"or floats), got shape {mask.shape}")
        mb = mask.reshape(B, N)
        if mb.dtype != torch.bool:
            if bool(((mb != 0) & (mb != 1)).any()):
                raise ValueError("mask of a non-bool dtype must hold only 0 and 1, "
                                 "pass a bool tensor (True = real node)")
            mb = mb != 0
        m = mb
        S = S * mb.unsqueeze(-1).to(dt)
    St = S.transpose(1, 2)
    A = adj.to(dt)
    out = St @ x.to(dt)
    out_adj = St @ A @ S
    R = A - S @ St
    n = m.sum(dim=1).to(dt)
    has_nodes = n > 0
    # 1e-15: config.EPS, as PyG (TorchScript reads no module-level floats)
    ent_rows = -(S * torch.log(S + 1e-15)).sum(dim=-1)  # [B, N], 0 on padded rows
    if link_loss == "bce":
        P = torch.minimum(S @ St, torch.ones(1, dtype=dt, device=x.device))
        terms = -A * torch.log(P + 1e-7) - (1.0 - A) * torch.log(1.0 - P + 1e-7)  # link_bce.EPS_BCE
        terms = torch.where(m.unsqueeze(2) & m.unsqueeze(1), terms, torch.zeros_like(terms))
        bce = terms.sum(dim=(1, 2))
        n2 = n * n
        per_b = torch.where(has_nodes, bce / n2.clamp_min(1.0), torch.zeros_like(bce))
        if per_graph:
            link = bce if mode == "none" else per_b
        elif mode == "none":
            link = bce.sum()
        elif mode == "graph":
            link = per_b.sum() / has_nodes.sum().clamp_min(1).to(dt)
        else:
            link = bce.sum() / n2.sum().clamp_min(1.0)
    elif mode == "graph":
        if mask is not None:
            R = R * (m.unsqueeze(2) & m.unsqueeze(1)).to(dt)
        per = torch.where(has_nodes, (R * R).sum(dim=(1, 2)) / n.clamp_min(1.0) ** 2,
                          torch.zeros_like(n))
        if per_graph:
            link = per
        else:
            link = per.sum() / has_nodes.sum().clamp_min(1).to(dt)
    elif per_graph:
        link = torch.linalg.vector_norm(R.flatten(1), dim=1)
        if mode == "numel":
            link = link / float(max(N * N, 1))
    else:
        link = torch.linalg.vector_norm(R)
        if mode == "numel":
            link = link / float(max(B * N * N, 1))
    if per_graph:
        ent = torch.where(has_nodes, ent_rows.sum(dim=1) / n.clamp_min(1.0), torch.zeros_like(n))
    elif B * N > 0:
        ent = ent_rows.sum() / float(B * N)
    else:
        ent = ent_rows.sum()
    return (out.to(result_dtype), out_adj.to(result_dtype), link.to(result_dtype),
            ent.to(result_dtype))


def _prepare_scriptable():
    return _script_dense_diff_pool


# torch.jit.script(dense_diff_pool), and the recursive scripting of a module that calls it, ask
# the function for what to compile.
dense_diff_pool.__prepare_scriptable__ = _prepare_scriptable  # type: ignore[attr-defined]
