"""DiffPool models: one coarsening level (:class:`DiffPool`) and a hierarchical graph classifier
(:class:`DiffPoolClassifier`), built on :func:`diffpool_fast.dense_diff_pool`.

Shapes: x [B, N, F], adj [B, N, N] (float, or bool/uint8 for a binary input graph), mask [B, N]
(True = real node, or None). With a fixed number of clusters every one of the C clusters is a
real node after a pooling level, so levels >= 1 run without a mask; with clusters per graph
(``clusters_per_graph=True``) graph b keeps k_b of them and levels >= 1 run with that cluster
mask (masked batch norm, masked readout).

The classifier also takes a batch in PyG's sparse form, ``(x [N, F], edge_index [2, E], batch
[N])``: level 0 then runs on the edge list (:mod:`diffpool_fast.nn.edge_layers` and
:func:`diffpool_fast.ops.sparse_pool.sparse_diff_pool`), with no N x N tensor and no padding, and
computes what the dense form of the same batch computes (``to_dense_batch``/``to_dense_adj``,
each graph padded to the batch's largest), up to rounding. Levels >= 1 are dense either way.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import fused_enabled
from ..ops.inputs import cluster_mask
from ..ops.pool import pool_with_adj_op
from ..ops.sparse_pool import sparse_diff_pool
from .edge_layers import check_edges, edge_forward
from .layers import LAYER_TYPES, DenseSAGE, MaskedBatchNorm, _batched, make_layer
from .sage_blocks import sage_blocks

__all__ = ["DenseGNN", "DiffPool", "DiffPoolOutput", "DiffPoolClassifier", "cluster_counts", "graph_clusters",
           "READOUTS"]

READOUTS = ("mean", "max", "sum")


def cluster_counts(max_nodes: int, num_levels: int, ratio: float = 0.25) -> List[int]:
    """Clusters per level from the padded node count: C_1 = ceil(ratio * max_nodes),
    C_{l+1} = ceil(ratio * C_l), at least 1 (PyG's example and the DiffPool paper)."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    counts, n = [], max_nodes
    for _ in range(num_levels):
        n = max(1, math.ceil(ratio * n))
        counts.append(n)
    return counts


def graph_clusters(nodes: Tensor, ratio: float, max_clusters: int) -> Tensor:
    """Clusters per graph from its real node count: k_b = ceil(ratio * n_b), at least 1, at
    most ``max_clusters`` (the level's C), [B] int64. The same float arithmetic as
    :func:`cluster_counts`, so a graph of the largest size gets the level's C."""
    k = torch.ceil(nodes.to(torch.float64) * float(ratio)).to(torch.int64)
    return k.clamp(1, int(max_clusters))


def _cut_to_clusters(s: Tensor, num_clusters: Optional[Tensor], has_nodes: Optional[Tensor],
                     plan: Optional[Tuple[int, bool]] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Logits s [..., C] cut to K = max k_b columns, and the next level's [B, K] node mask (the
    real clusters; none for a graph without real nodes, ``has_nodes`` [B] or None = all have).
    The mask is None when every cluster is real (one k_b for the whole batch): the unmasked path.
    Without ``num_clusters``: s unchanged and no mask. ``plan``: ``(K, all_real)`` decided on the
    host (:func:`cluster_plan` or ``static_plan``); None reads both from the tensors (host syncs)."""
    if num_clusters is None:
        return s, None
    if plan is not None:
        K, all_real = plan
    else:
        K = int(num_clusters.max()) if num_clusters.numel() else 1
    mask = cluster_mask(num_clusters, K)
    if has_nodes is not None:
        mask = mask & has_nodes[:, None]
    if plan is None:
        all_real = bool(mask.all())
    return s[..., :K], None if all_real else mask


def cluster_plan(sizes: Tensor, ratio: float, level_clusters: Sequence[int]) -> List[Tuple[int, bool]]:
    """Per pooling level, ``(K, all_real)`` for graphs of ``sizes`` real nodes (CPU, [B]): K =
    max_b k_b, and whether every graph has a node and k_b = K (the next mask is then dropped). The
    forward pass's arithmetic (:func:`graph_clusters`, level by level), done on the host."""
    nodes = torch.as_tensor(sizes, dtype=torch.int64).cpu()
    has = nodes > 0
    plan = []
    for C in level_clusters:
        k = graph_clusters(nodes, ratio, C)
        K = int(k.max()) if k.numel() else 1
        plan.append((K, bool((k == K).all()) and bool(has.all())))
        nodes = torch.where(has, k, torch.zeros_like(k))  # a level's real nodes are its real clusters
    return plan


def _real_nodes(x: Tensor, mask: Optional[Tensor]) -> int:
    """Real nodes of a [B, N, F] batch: B * N without a mask."""
    return x.shape[0] * x.shape[1] if mask is None else int(mask.sum())


#: Normalisation after each GNN layer: True/"batch" = batch norm over real nodes, "layer" = layer
#: norm per node (independent of the batch), False/"none" = none.
NORMS = (True, False, "batch", "layer", "none")


class _NodeLayerNorm(nn.LayerNorm):
    """Layer norm over each node's features; padded rows stay 0."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        out = super().forward(x)
        return out if mask is None else out * mask.unsqueeze(-1).to(out.dtype)


class DenseGNN(nn.Module):
    """``layers`` dense GNN layers, each followed by ReLU and batch norm over real nodes.

    Widths: in -> hidden -> ... -> hidden -> out. With ``jk`` (jumping knowledge, as in the
    DiffPool paper and PyG's example) the output is the concatenation of every layer's output,
    ``hidden * (layers - 1) + out`` channels; otherwise the last layer's. ``lin_out`` adds a
    final linear map to that many channels (used for assignment logits; no activation after it).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        *,
        layers: int = 3,
        gnn: str = "sage",
        jk: bool = True,
        batch_norm: Union[bool, str] = True,
        lin_out: Optional[int] = None,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        if gnn not in LAYER_TYPES:
            raise ValueError(f"gnn must be one of {LAYER_TYPES}, got {gnn!r}")
        widths = [in_channels] + [hidden] * (layers - 1) + [out_channels]
        self.convs = nn.ModuleList(make_layer(gnn, a, b) for a, b in zip(widths[:-1], widths[1:]))
        if batch_norm not in NORMS:
            raise ValueError(f"batch_norm must be one of {NORMS}, got {batch_norm!r}")
        if batch_norm is True or batch_norm == "batch":
            self.norms = nn.ModuleList(MaskedBatchNorm(b) for b in widths[1:])
        elif batch_norm == "layer":
            self.norms = nn.ModuleList(_NodeLayerNorm(b) for b in widths[1:])
        else:
            self.norms = None
        self.jk = jk
        cat = sum(widths[1:]) if jk else out_channels
        self.lin = nn.Linear(cat, lin_out) if lin_out is not None else None
        self.out_channels = lin_out if lin_out is not None else cat
        #: Run SAGE blocks with JK as one autograd node (diffpool_fast.nn.sage_blocks) where it applies;
        #: False (or DIFFPOOL_FAST_FUSED=0 in the environment) always runs the layer modules.
        self.fused = True

    def _fusable(self, x: Tensor, adj: Tensor) -> bool:
        """Whether the fused SAGE block (diffpool_fast.nn.sage_blocks) can compute this block's call."""
        if not self.fused or not (self.jk or len(self.convs) == 1):
            return False
        if not fused_enabled():
            return False
        if not all(type(c) is DenseSAGE and not c.normalize and c.lin_root.bias is not None for c in self.convs):
            return False
        if self.norms is not None and not (self.training and all(type(n) is MaskedBatchNorm and n.affine
                                                                 for n in self.norms)):
            return False
        return x.dim() == 3 and adj.shape[0] == x.shape[0] and x.is_floating_point()

    def _fused_count(self, x: Tensor, adj: Tensor, mask: Optional[Tensor],
                     count: Optional[int] = None) -> Optional[int]:
        """The real-node count when the fused SAGE block computes this call, else None
        (``count``: the count if the caller already has it)."""
        if not self._fusable(x, adj):
            return None
        if self.norms is None:
            return x.shape[0] * x.shape[1]  # the count only enters batch norm: not read (no host sync)
        if count is None:
            count = _real_nodes(x, mask)
        if self.norms is not None and count < 2:
            return None  # batch statistics of fewer than two rows: the modules use running ones
        return count

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x, adj, mask = _batched(x, adj, mask)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask != 0
        count = self._fused_count(x, adj, mask)
        if count is not None:
            return self._finish(sage_blocks(x, adj, mask, count, [(self.convs, self.norms)])[0], mask)
        outs = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x, adj, mask))
            if self.norms is not None:
                x = self.norms[i](x, mask)
            outs.append(x)
        x = torch.cat(outs, dim=-1) if self.jk and len(outs) > 1 else outs[-1]
        return self._finish(x, mask)

    def _finish(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The optional linear map after the (concatenated) layer outputs."""
        if self.lin is not None:
            x = self.lin(x)
            if mask is not None:
                x = x * mask.unsqueeze(-1).to(x.dtype)
        return x

    def forward_edges(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None, *,
                      check: bool = True) -> Tensor:
        """:meth:`forward` on an edge list: x [N, F] over all graphs' nodes, ``edge_index`` [2, E]
        (see :func:`diffpool_fast.nn.edge_layers.edge_forward`); returns [N, out_channels].
        Every node is real, so batch norm takes its statistics over all N rows -- what the dense
        forward takes over the real rows of the padded form."""
        if check:
            check_edges(x, edge_index, edge_weight)
        outs = []
        for i, conv in enumerate(self.convs):
            x = F.relu(edge_forward(conv, x, edge_index, edge_weight, check=False))
            if self.norms is not None:
                norm = self.norms[i]
                x = norm(x.unsqueeze(0)).squeeze(0) if isinstance(norm, MaskedBatchNorm) else norm(x)
            outs.append(x)
        x = torch.cat(outs, dim=-1) if self.jk and len(outs) > 1 else outs[-1]
        return self._finish(x, None)


class DiffPoolOutput(NamedTuple):
    x: Tensor  # pooled features S^T Z [B, C, F]
    adj: Tensor  # pooled adjacency S^T A S [B, C, C]
    link_loss: Tensor  # scalar (see DiffPool.link_norm)
    ent_loss: Tensor  # scalar, mean row entropy of S
    embedding: Tensor  # Z [B, N, F], before pooling
    assignment: Tensor  # assignment logits [B, N, C] (softmax is applied inside the pooling)
    #: with clusters per graph: [B, K] bool, the real clusters (the next level's node mask; x and
    #: adj are then [B, K, F] and [B, K, K], K = max_b k_b); None with a fixed number of clusters,
    #: or when every cluster of the batch is real
    mask: Optional[Tensor] = None


class DiffPool(nn.Module):
    """One DiffPool level: an embedding GNN gives Z, an assignment GNN gives logits s, and
    ``dense_diff_pool`` coarsens to X' = S^T Z, A' = S^T A S with S = mask * softmax(s).

    Args:
        in_channels: input node features.
        clusters: C, the number of clusters (fixed: it is the assignment head's width).
        hidden: width of the hidden GNN layers (and of the embedding GNN's last layer).
        gnn, layers, jk, batch_norm: see :class:`DenseGNN`.
        link_norm: scaling of the auxiliary losses. ``"graph"`` (default): per graph,
            ||A_b - S_b S_b^T||_F^2 / n_b^2 (squared error per real node pair) and the mean row
            entropy over its n_b real nodes, each averaged over the graphs of the batch that have
            a node; independent of padding. ``True``/``"numel"`` or ``False``/``"none"``: PyG's
            batch-wide losses (``dense_diff_pool``'s ``normalize``), which depend on padding.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``dense_diff_pool``).
        adj_symmetric: passed to ``dense_diff_pool``: True promises a symmetric adjacency, so
            the backward pass needs no pass over it; None (default) is always correct.
        link_loss: ``"frobenius"`` (default) or ``"bce"`` (the DiffPool authors' cross-entropy,
            ``dense_diff_pool``'s ``link_loss``), scaled by ``link_norm`` as that function says.

    ``forward(x, adj, mask, num_clusters=None)`` returns a :class:`DiffPoolOutput`. With
    ``num_clusters`` ([B] ints, 1 <= k_b <= C) graph b pools into its first k_b clusters: the
    logits are cut to K = max k_b columns, the outputs are [B, K, .], and ``mask`` of the output
    marks the real clusters (none for a graph with no real node).
    """

    def __init__(
        self,
        in_channels: int,
        clusters: int,
        *,
        hidden: int = 64,
        gnn: str = "sage",
        layers: int = 3,
        jk: bool = True,
        batch_norm: Union[bool, str] = True,
        link_norm: Union[bool, str] = "graph",
        backend: str = "auto",
        adj_symmetric: Optional[bool] = None,
        link_loss: str = "frobenius",
    ):
        super().__init__()
        if clusters < 1:
            raise ValueError(f"clusters must be at least 1, got {clusters}")
        kw = dict(layers=layers, gnn=gnn, jk=jk, batch_norm=batch_norm)
        self.embed = DenseGNN(in_channels, hidden, hidden, **kw)
        # As in the DiffPool code and PyG's example: the assignment GNN's last layer already has
        # C channels, then a linear map of the concatenated layers gives the logits.
        self.assign = DenseGNN(in_channels, hidden, clusters, lin_out=clusters, **kw)
        self.clusters = clusters
        self.out_channels = self.embed.out_channels
        self.link_norm = link_norm
        self.backend = backend
        self.adj_symmetric = adj_symmetric
        self.link_loss = link_loss
        #: Run the two GNNs side by side as one fused node where both are fusable SAGE blocks.
        self.pair_gnns = True

    def _gnns(self, x: Tensor, adj: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Assignment logits and embedding. Where both GNNs are fused SAGE blocks with one layer
        count and norm choice, they run side by side as one autograd node (diffpool_fast.nn.sage_blocks)."""
        a, e = self.assign, self.embed
        x3, adj3, mask3 = _batched(x, adj, mask)
        if mask3 is not None and mask3.dtype != torch.bool:
            mask3 = mask3 != 0
        count = a._fused_count(x3, adj3, mask3) if self.pair_gnns else None
        if (count is not None and e._fused_count(x3, adj3, mask3, count) is not None and len(a.convs) == len(e.convs)
                and (a.norms is None) == (e.norms is None)
                and (a.norms is None or len({n.eps for n in list(a.norms) + list(e.norms)}) == 1)):
            z, s = sage_blocks(x3, adj3, mask3, count, [(e.convs, e.norms), (a.convs, a.norms)])
            return a._finish(s, mask3), z
        if not adj.is_floating_point():
            adj = adj.to(x.dtype)
        return a(x, adj, mask), e(x, adj, mask)

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None,
                num_clusters: Optional[Tensor] = None, plan: Optional[Tuple[int, bool]] = None) -> DiffPoolOutput:
        s, z = self._gnns(x, adj, mask)
        has_nodes = None if mask is None or num_clusters is None else mask.reshape(num_clusters.shape[0], -1).any(dim=1)
        s, next_mask = _cut_to_clusters(s, num_clusters, has_nodes, plan)
        if self.link_norm == "graph":
            # Per-graph losses averaged over the graphs that have nodes: unlike the batch-wide
            # entropy (divided by B*N, padding included), this does not change with how far a
            # batch is padded, so size-bucketed and fully padded batches train the same model.
            out, out_adj, link_g, ent_g = pool_with_adj_op(
                z, adj, s, mask, normalize="graph", backend=self.backend, per_graph=True,
                adj_symmetric=self.adj_symmetric, num_clusters=num_clusters, link_loss=self.link_loss,
            )
            if mask is None:
                link, ent = link_g.mean(), ent_g.mean()
            else:
                real = mask.any(dim=1).to(link_g.dtype)
                count = real.sum().clamp_min(1.0)
                link, ent = (link_g * real).sum() / count, (ent_g * real).sum() / count
        else:
            out, out_adj, link, ent = pool_with_adj_op(
                z, adj, s, mask, normalize=self.link_norm, backend=self.backend,
                adj_symmetric=self.adj_symmetric, num_clusters=num_clusters, link_loss=self.link_loss,
            )
        return DiffPoolOutput(out, out_adj, link, ent, z, s, next_mask)

    def forward_edges(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int,
                      edge_weight: Optional[Tensor] = None, num_clusters: Optional[Tensor] = None,
                      plan: Optional[Tuple[int, bool]] = None) -> DiffPoolOutput:
        """:meth:`forward` on a sparse batch: x [N, F], ``edge_index`` [2, E], ``batch`` [N] (sorted
        graph ids), ``num_graphs`` B. Returns the same outputs as the dense form of the batch
        (each graph padded to the largest): x [B, C, F] and adj [B, C, C] dense, the losses as
        :meth:`forward` scales them; ``embedding`` [N, F] and ``assignment`` [N, C] per node."""
        if self.link_loss != "frobenius":
            raise ValueError(f"link_loss={self.link_loss!r} needs every node pair and has no edge-list form: "
                             "run level 0 on the dense batch (diffpool-fast train --level0 dense)")
        check_edges(x, edge_index, edge_weight)
        s = self.assign.forward_edges(x, edge_index, edge_weight, check=False)
        z = self.embed.forward_edges(x, edge_index, edge_weight, check=False)
        has_nodes = None if num_clusters is None else torch.bincount(batch, minlength=num_graphs) > 0
        s, next_mask = _cut_to_clusters(s, num_clusters, has_nodes, plan)
        # The edge pass has no Triton kernel: level 0 runs the torch one under backend="triton".
        backend = "torch" if self.backend == "triton" else self.backend
        if self.link_norm == "graph":
            out, out_adj, link_g, ent_g = sparse_diff_pool(
                z, edge_index, s, batch, edge_weight, normalize="graph", num_graphs=num_graphs,
                per_graph=True, backend=backend, num_clusters=num_clusters,
            )
            real = (torch.bincount(batch, minlength=num_graphs) > 0).to(link_g.dtype)
            count = real.sum().clamp_min(1.0)
            link, ent = (link_g * real).sum() / count, (ent_g * real).sum() / count
        else:
            out, out_adj, link, ent = sparse_diff_pool(
                z, edge_index, s, batch, edge_weight, normalize=self.link_norm, num_graphs=num_graphs,
                backend=backend, num_clusters=num_clusters,
            )
        return DiffPoolOutput(out, out_adj, link, ent, z, s, next_mask)


def _segment_readout(x: Tensor, batch: Tensor, num_graphs: int, how: str) -> Tensor:
    """:func:`_readout` of the dense form of a sparse batch: per graph over its rows of x [N, F]
    (``batch`` [N] graph ids); a graph without nodes reads out 0."""
    count = torch.bincount(batch, minlength=num_graphs)
    if how == "max":
        # Start from -inf: scatter_reduce's backward counts the initial value as a tie even with
        # include_self=False, so a start of 0 would take a share of the gradient of a 0 maximum.
        # Tied maxima share the gradient where the dense max gives it all to one of them: both
        # are subgradients, and the same one where tied rows are equal functions of the
        # parameters (a channel that ReLU zeroes for every node, then normalised).
        vals = x.new_full((num_graphs, x.shape[-1]), float("-inf")).scatter_reduce(
            0, batch.unsqueeze(-1).expand_as(x), x, "amax", include_self=False)
        return torch.where((count > 0).unsqueeze(-1), vals, torch.zeros_like(vals))
    total = x.new_zeros(num_graphs, x.shape[-1]).index_add(0, batch, x)
    if how == "sum":
        return total
    return total / count.clamp_min(1).to(x.dtype).unsqueeze(-1)


def _is_edge_list(x: Tensor, adj: Tensor) -> bool:
    """Whether ``forward(x, adj)`` got an edge list: x [N, F] with an integer [2, E] tensor that
    is not an [N, N] adjacency (pass ``batch=`` to settle N = E = 2)."""
    return (x.dim() == 2 and adj.dim() == 2 and adj.shape[0] == 2 and adj.dtype in (torch.int64, torch.int32)
            and tuple(adj.shape) != (x.shape[0], x.shape[0]))


def _readout(x: Tensor, mask: Optional[Tensor], how: str) -> Tensor:
    if mask is None:
        if how == "mean":
            return x.mean(dim=1)
        if how == "sum":
            return x.sum(dim=1)
        return x.max(dim=1).values
    m = mask.unsqueeze(-1)
    if how == "max":
        vals = x.masked_fill(~m, float("-inf")).max(dim=1).values
        return torch.where(mask.any(dim=1, keepdim=True), vals, torch.zeros_like(vals))
    total = (x * m.to(x.dtype)).sum(dim=1)
    if how == "sum":
        return total
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)


class DiffPoolClassifier(nn.Module):
    """Hierarchical DiffPool graph classifier.

    Architecture: ``num_levels`` :class:`DiffPool` levels, then an embedding GNN on the last
    coarsened graph, a readout, and an MLP head ``Linear(d, hidden) -> ReLU -> dropout ->
    Linear(hidden, num_classes)``. With ``num_levels=2, ratio=0.25, hidden=64, layers=3,
    gnn="sage", jk=True, readout="mean", readout_levels="last"`` it is PyG's DiffPool example
    (``examples/proteins_diff_pool.py``), except that batch norm ignores padding rows, the
    assignment logits have no ReLU, and the auxiliary losses are used.

    Args:
        in_channels: node input features; num_classes: classes.
        max_nodes: the padded node count the cluster counts derive from (the largest graph the
            model is meant for, e.g. the dataset's maximum). Cluster counts are fixed at
            construction because they are parameter shapes; a batch may pad to fewer nodes
            (size-bucketed batching) and still pools into the same C clusters.
        num_levels: pooling levels (>= 0; 0 gives a plain GNN with readout).
        ratio: C_1 = ceil(ratio * max_nodes), C_{l+1} = ceil(ratio * C_l). Ignored when
            ``clusters`` is given.
        clusters: explicit clusters per level (its length sets ``num_levels``).
        hidden: GNN and head width. gnn: ``"sage"``, ``"gcn"`` or ``"gin"``. layers: GNN layers
            per block. jk: concatenate the layer outputs of each GNN block.
        readout: ``"mean"``, ``"max"`` or ``"sum"`` over nodes. readout_levels: ``"last"`` reads
            out only the final embedding; ``"all"`` concatenates the readouts of the input
            level's embedding and of every coarsened level (the DiffPool code's ``concat``).
        dropout: dropout on the readout and in the head. batch_norm: normalisation after every
            GNN layer: True/"batch" (batch norm over real nodes; statistics from the batch, so
            batches of one graph size bias them when the class correlates with size), "layer"
            (per-node layer norm) or False/"none". The default here is batch norm (True), as in
            PyG's example; ``diffpool-fast train`` defaults to ``--norm none`` instead, because
            its default batching is size-bucketed: pass ``batch_norm="none"`` to build the model
            that command trains by default.
        link_weight, ent_weight: weights of the auxiliary losses.
        link_norm: link-loss scaling passed to ``dense_diff_pool`` (default ``"graph"``).
        backend: coarsening backend, ``"auto"``, ``"torch"`` or ``"triton"``.
        adj_symmetric: True promises undirected input graphs (symmetric adjacency); every level
            then passes ``adj_symmetric=True`` to ``dense_diff_pool``, whose backward makes no
            pass over the adjacency. The coarsened S^T A S is symmetric only up to rounding, so
            deeper levels' gradients then use A S for A^T S: a rounding-level difference.
        clusters_per_graph: False (default, the paper's): every graph pools into the level's C
            clusters. True: graph b gets k_b = ceil(ratio * n_b) clusters (n_b: its real nodes
            at that level), at least 1 and at most the level's C (so with explicit ``clusters``
            they cap k_b, and ``ratio`` still sets it); a batch's level is as wide as its largest
            k_b, and levels >= 1 run with the cluster mask (masked batch norm and readout).
            ``diffpool-fast train`` defaults to True (``--fixed-clusters`` for False), as its
            declared accuracy study decided (bench/accuracy/clusters/RESULTS.md).
        link_loss: ``"frobenius"`` (default) or ``"bce"``: level 0 then uses the DiffPool
            authors' binary cross-entropy of min(S S^T, 1) against the input adjacency
            (``dense_diff_pool``'s ``link_loss``; its entries must lie in [0, 1]), and levels >= 1
            keep the Frobenius loss, since a coarsened S^T A S is a weighted graph, which is no
            cross-entropy target (the authors' code has the loss at its one pooling level). With
            ``"bce"`` the edge-list form below is refused (the loss needs every node pair).

    ``forward(x, adj, mask=None)`` returns ``(logits [B, num_classes], aux)`` with
    ``aux = link_weight * sum_l link_l + ent_weight * sum_l ent_l`` summed over the pooling
    levels (a 0-dim tensor; 0 when ``num_levels == 0``). The training loss is
    ``cross_entropy(logits, y) + aux``. ``forward(..., return_terms=True)`` also returns a dict
    with the unweighted ``link`` and ``ent`` sums (tensors).

    PyG-style sparse batches: ``forward(x, edge_index, batch)`` with x [N, F] (all graphs' nodes),
    ``edge_index`` [2, E] int64 (global node ids, edge i -> j sets A[i, j]; duplicates sum their
    ``edge_weight``, default 1) and ``batch`` [N] sorted graph ids (None: one graph); the third
    positional argument is then ``batch``, not a mask, or pass ``batch=`` (needed when N = E = 2,
    where [2, 2] would read as a dense adjacency). ``num_graphs=`` gives B when trailing graphs
    have no nodes (default ``batch.max() + 1``). Level 0 (its GNNs, the level-0 readout and the
    pooling, or with no pooling level the final GNN and readout) runs on the edge list in
    O(E F + N (C + F)) memory; the result is the dense forward of ``to_dense_batch(x, batch)``,
    ``to_dense_adj(edge_index, batch, edge_weight)`` and its mask, up to rounding (the dense
    path's fused SAGE blocks sum in another order).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        max_nodes: int,
        num_levels: int = 2,
        ratio: float = 0.25,
        clusters: Optional[Sequence[int]] = None,
        hidden: int = 64,
        gnn: str = "sage",
        layers: int = 3,
        jk: bool = True,
        readout: str = "mean",
        readout_levels: str = "last",
        dropout: float = 0.0,
        batch_norm: Union[bool, str] = True,
        link_weight: float = 1.0,
        ent_weight: float = 1.0,
        link_norm: Union[bool, str] = "graph",
        backend: str = "auto",
        adj_symmetric: Optional[bool] = None,
        clusters_per_graph: bool = False,
        link_loss: str = "frobenius",
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if readout_levels not in ("last", "all"):
            raise ValueError(f"readout_levels must be 'last' or 'all', got {readout_levels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if clusters is None:
            if num_levels < 0:
                raise ValueError(f"num_levels must be >= 0, got {num_levels}")
            clusters = cluster_counts(max_nodes, num_levels, ratio)
        else:
            clusters = [int(c) for c in clusters]
            if any(c < 1 for c in clusters):
                raise ValueError(f"clusters must all be >= 1, got {clusters}")
        if link_loss not in ("frobenius", "bce"):
            raise ValueError(f"link_loss must be 'frobenius' or 'bce', got {link_loss!r}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.clusters = list(clusters)
        self.max_nodes = max_nodes
        self.ratio = float(ratio)
        self.clusters_per_graph = bool(clusters_per_graph)
        self.link_loss = link_loss
        kw = dict(hidden=hidden, gnn=gnn, layers=layers, jk=jk, batch_norm=batch_norm)
        self.levels = nn.ModuleList()
        width = in_channels
        for i, c in enumerate(self.clusters):
            # S^T A S of a symmetric A is symmetric (up to rounding), so the promise carries
            # down the levels. BCE needs a 0/1 target: the input graph's, at level 0 only.
            level = DiffPool(width, c, link_norm=link_norm, backend=backend, adj_symmetric=adj_symmetric,
                             link_loss=link_loss if i == 0 else "frobenius", **kw)
            self.levels.append(level)
            width = level.out_channels
        self.final = DenseGNN(width, hidden, hidden, layers=layers, gnn=gnn, jk=jk, batch_norm=batch_norm)
        self.readout, self.readout_levels = readout, readout_levels
        read_dim = self.final.out_channels
        if readout_levels == "all":
            read_dim += sum(level.out_channels for level in self.levels)
        self.head = nn.Sequential(
            nn.Linear(read_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
        self.dropout = dropout
        self.link_weight, self.ent_weight = float(link_weight), float(ent_weight)
        #: Clusters per graph: False makes a level as wide as its batch's largest k_b; True as
        #: wide as the padded size N allows (:meth:`static_plan`), mask kept: shapes that depend on
        #: the batch's shape alone, as a captured CUDA graph needs (train --cuda-graphs on). The
        #: same function up to rounding (the extra clusters are masked out).
        self.static_clusters = False

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None, *, batch: Optional[Tensor] = None,
                edge_weight: Optional[Tensor] = None, num_graphs: Optional[int] = None,
                return_terms: bool = False, graph_sizes: Optional[Tensor] = None):
        """See the class docstring. ``graph_sizes``: optional, the graphs' real node counts as a
        CPU tensor [B] (the loader knows them): clusters per graph then size the levels on the
        host (:func:`cluster_plan`), with no host sync; same results. Checked against ``mask`` or
        ``batch`` only when the batch is on the CPU."""
        if batch is not None or _is_edge_list(x, adj):
            if batch is None:
                batch = mask  # forward(x, edge_index, batch): the third argument is the batch vector
            elif mask is not None:
                raise ValueError("pass the batch vector once: as the third argument or as batch=, not both")
            return self._forward_edges(x, adj, batch, edge_weight, num_graphs, return_terms, graph_sizes)
        if edge_weight is not None or num_graphs is not None:
            raise ValueError("edge_weight and num_graphs belong to the edge-list form forward(x, edge_index, batch)")
        if x.dim() == 2:
            x, adj = x.unsqueeze(0), adj.unsqueeze(0)
            mask = mask.reshape(1, -1) if mask is not None else None
        if mask is not None and mask.dtype != torch.bool:
            mask = mask != 0
        # One conversion of a byte adjacency for all the layers and the pooling of level 0.
        if not adj.is_floating_point():
            adj = adj.to(x.dtype)
        plan = self._plan(x.shape[0], x.shape[1], graph_sizes, mask)
        reads = []
        link = x.new_zeros(())
        ent = x.new_zeros(())
        return self._levels(x, adj, mask, self.levels, reads, link, ent, return_terms, plan=plan)

    def static_plan(self, N: int) -> List[Tuple[int, bool]]:
        """``(K_l, False)`` per level under :attr:`static_clusters` at N padded nodes: the largest
        k_b a graph of at most N nodes gets (K_1 = ceil(ratio N) at most C_1, and so on)."""
        plan, n = [], torch.tensor([N], dtype=torch.int64)
        for level in self.levels:
            n = graph_clusters(n, self.ratio, level.clusters)
            plan.append((int(n[0]), False))
        return plan

    def _plan(self, B: int, N: Optional[int], graph_sizes, device_sizes: Optional[Tensor]):
        """Per level ``(K, all_real)`` decided on the host, or None (decided from the tensors).
        ``device_sizes``: the mask [B, N] or node counts [B] ``graph_sizes`` must match (on CPU)."""
        if not self.clusters_per_graph or (graph_sizes is None and not (self.static_clusters and N is not None)):
            return None
        if self.static_clusters and N is not None:
            return self.static_plan(N)
        if isinstance(graph_sizes, Tensor) and graph_sizes.device.type != "cpu":
            raise ValueError(f"graph_sizes must be a CPU tensor (it spares reading the device), got one on "
                             f"{graph_sizes.device}")
        sizes = torch.as_tensor(graph_sizes, dtype=torch.int64)
        if sizes.shape != (B,) or (N is not None and B and int(sizes.max()) > N):
            raise ValueError(f"graph_sizes must hold the {B} graphs' real node counts (at most {N}), got "
                             f"{sizes.tolist()}")
        counts = None if device_sizes is None or device_sizes.device.type != "cpu" else (
            device_sizes.sum(dim=1) if device_sizes.dim() == 2 else device_sizes)
        if counts is not None and not torch.equal(counts, sizes):
            raise ValueError(f"graph_sizes {sizes.tolist()} disagree with the batch's real node counts {counts.tolist()}")
        return cluster_plan(sizes, self.ratio, [level.clusters for level in self.levels])

    def _levels(self, x: Tensor, adj: Tensor, mask: Optional[Tensor], levels, reads: List[Tensor],
                link: Tensor, ent: Tensor, return_terms: bool, final_read: Optional[Tensor] = None,
                plan: Optional[List[Tuple[int, bool]]] = None):
        """The dense levels ``levels``, the final GNN (unless ``final_read`` already holds its
        readout), the readout and the head. ``plan``: the levels' ``(K, all_real)`` (``_plan``)."""
        for i, level in enumerate(levels):
            out = level(x, adj, mask, self._graph_clusters(level, x, mask), None if plan is None else plan[i])
            if self.readout_levels == "all":
                reads.append(_readout(out.embedding, mask, self.readout))
            x, adj, mask = out.x, out.adj, out.mask
            link = link + out.link_loss
            ent = ent + out.ent_loss
        if final_read is None:
            z = self.final(x, adj, mask)
            final_read = _readout(z, mask, self.readout)
        reads.append(final_read)
        h = torch.cat(reads, dim=-1) if len(reads) > 1 else reads[0]
        h = F.dropout(h, self.dropout, self.training)
        logits = self.head(h)
        aux = self.link_weight * link + self.ent_weight * ent
        if return_terms:
            return logits, aux, {"link": link, "ent": ent}
        return logits, aux

    def _graph_clusters(self, level: DiffPool, x: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
        """k_b for ``level`` from the real nodes of x [B, N, F] (None: fixed clusters)."""
        if not self.clusters_per_graph:
            return None
        nodes = mask.sum(dim=1) if mask is not None else torch.full((x.shape[0],), x.shape[1], device=x.device)
        return graph_clusters(nodes, self.ratio, level.clusters)

    def _forward_edges(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor],
                       edge_weight: Optional[Tensor], num_graphs: Optional[int], return_terms: bool,
                       graph_sizes=None):
        """Level 0 on the edge list, then the dense levels (see the class docstring)."""
        check_edges(x, edge_index, edge_weight)
        n = x.shape[0]
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=x.device)
        if not isinstance(batch, Tensor) or batch.dim() != 1 or batch.shape[0] != n:
            raise ValueError(f"batch must be a [N] = [{n}] tensor of graph ids, got {getattr(batch, 'shape', batch)}")
        if batch.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"batch must hold int64 graph ids, got dtype {batch.dtype}")
        batch = batch.long()
        on_cpu = x.device.type == "cpu"
        B = None if num_graphs is None else int(num_graphs)
        if on_cpu or graph_sizes is None or B is None:  # a loader's CUDA batch is not checked: no host sync
            needed = int(batch.max()) + 1 if n else 1
            B = needed if B is None else B
            if B < needed:
                raise ValueError(f"num_graphs={num_graphs} is smaller than batch.max() + 1 = {needed}")
        counts = torch.bincount(batch, minlength=B) if on_cpu and graph_sizes is not None else None
        plan = self._plan(B, None, graph_sizes, counts)
        reads: List[Tensor] = []
        link = x.new_zeros(())
        ent = x.new_zeros(())
        if not self.levels:
            z = self.final.forward_edges(x, edge_index, edge_weight, check=False)
            read = _segment_readout(z, batch, B, self.readout)
            return self._levels(x, None, None, [], reads, link, ent, return_terms, final_read=read)
        k = None
        if self.clusters_per_graph:
            k = graph_clusters(torch.bincount(batch, minlength=B), self.ratio, self.levels[0].clusters)
        out = self.levels[0].forward_edges(x, edge_index, batch, B, edge_weight, num_clusters=k,
                                           plan=None if plan is None else plan[0])
        if self.readout_levels == "all":
            reads.append(_segment_readout(out.embedding, batch, B, self.readout))
        link = link + out.link_loss
        ent = ent + out.ent_loss
        return self._levels(out.x, out.adj, out.mask, self.levels[1:], reads, link, ent, return_terms,
                            plan=None if plan is None else plan[1:])
