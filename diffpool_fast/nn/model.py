"""DiffPool models: one coarsening level (:class:`DiffPool`) and a hierarchical graph classifier
(:class:`DiffPoolClassifier`), built on :func:`diffpool_fast.dense_diff_pool`.

Shapes: x [B, N, F], adj [B, N, N] (float, or bool/uint8 for a binary input graph), mask [B, N]
(True = real node, or None). After a pooling level every one of the C clusters is a real node,
so levels >= 1 run without a mask.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import fused_enabled
from ..ops.block_sparse import BlockSparseAdj
from ..ops.block_sparse import worth_it as sparse_worth_it
from ..ops.pool import pool_with_adj_op
from .layers import LAYER_TYPES, DenseSAGE, MaskedBatchNorm, _batched, make_layer
from .sage_blocks import sage_blocks

__all__ = ["DenseGNN", "DiffPool", "DiffPoolOutput", "DiffPoolClassifier", "cluster_counts", "READOUTS"]

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


class DiffPoolOutput(NamedTuple):
    x: Tensor  # pooled features S^T Z [B, C, F]
    adj: Tensor  # pooled adjacency S^T A S [B, C, C]
    link_loss: Tensor  # scalar (see DiffPool.link_norm)
    ent_loss: Tensor  # scalar, mean row entropy of S
    embedding: Tensor  # Z [B, N, F], before pooling
    assignment: Tensor  # assignment logits [B, N, C] (softmax is applied inside the pooling)


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

    ``forward(x, adj, mask)`` returns a :class:`DiffPoolOutput`.
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
        #: Run the two GNNs side by side as one fused node where both are fusable SAGE blocks.
        self.pair_gnns = True

    def _gnns(self, x: Tensor, adj: Tensor, mask: Optional[Tensor],
              sparse_adj: Optional[BlockSparseAdj] = None) -> Tuple[Tensor, Tensor]:
        """Assignment logits and embedding. Where both GNNs are fused SAGE blocks with one layer
        count and norm choice, they run side by side as one autograd node (diffpool_fast.nn.sage_blocks),
        with ``sparse_adj`` (the same adjacency as a BlockSparseAdj) for the products where given."""
        a, e = self.assign, self.embed
        x3, adj3, mask3 = _batched(x, adj, mask)
        if mask3 is not None and mask3.dtype != torch.bool:
            mask3 = mask3 != 0
        count = a._fused_count(x3, adj3, mask3) if self.pair_gnns else None
        if (count is not None and e._fused_count(x3, adj3, mask3, count) is not None and len(a.convs) == len(e.convs)
                and (a.norms is None) == (e.norms is None)
                and (a.norms is None or len({n.eps for n in list(a.norms) + list(e.norms)}) == 1)):
            z, s = sage_blocks(x3, adj3 if sparse_adj is None else sparse_adj, mask3, count,
                               [(e.convs, e.norms), (a.convs, a.norms)])
            return a._finish(s, mask3), z
        if not adj.is_floating_point():
            adj = adj.to(x.dtype)
        return a(x, adj, mask), e(x, adj, mask)

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None, *,
                sparse_adj: Optional[BlockSparseAdj] = None) -> DiffPoolOutput:
        """``sparse_adj``: ``adj`` as a :class:`diffpool_fast.ops.block_sparse.BlockSparseAdj` (input graphs
        only, no gradient for adj): the fused GNNs and the torch coarsening multiply with it."""
        s, z = self._gnns(x, adj, mask, sparse_adj)
        if self.link_norm == "graph":
            # Per-graph losses averaged over the graphs that have nodes: unlike the batch-wide
            # entropy (divided by B*N, padding included), this does not change with how far a
            # batch is padded, so size-bucketed and fully padded batches train the same model.
            out, out_adj, link_g, ent_g = pool_with_adj_op(
                z, adj, s, mask, normalize="graph", backend=self.backend, per_graph=True,
                adj_symmetric=self.adj_symmetric, adj_op=sparse_adj,
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
                adj_symmetric=self.adj_symmetric, adj_op=sparse_adj,
            )
        return DiffPoolOutput(out, out_adj, link, ent, z, s)


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

    ``forward(x, adj, mask=None)`` returns ``(logits [B, num_classes], aux)`` with
    ``aux = link_weight * sum_l link_l + ent_weight * sum_l ent_l`` summed over the pooling
    levels (a 0-dim tensor; 0 when ``num_levels == 0``). The training loss is
    ``cross_entropy(logits, y) + aux``. ``forward(..., return_terms=True)`` also returns a dict
    with the unweighted ``link`` and ``ent`` sums (tensors).
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
        self.clusters = list(clusters)
        self.max_nodes = max_nodes
        kw = dict(hidden=hidden, gnn=gnn, layers=layers, jk=jk, batch_norm=batch_norm)
        self.levels = nn.ModuleList()
        width = in_channels
        for c in self.clusters:
            # S^T A S of a symmetric A is symmetric (up to rounding), so the promise carries
            # down the levels.
            level = DiffPool(width, c, link_norm=link_norm, backend=backend,
                             adj_symmetric=adj_symmetric, **kw)
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

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None, *, return_terms: bool = False):
        if x.dim() == 2:
            x, adj = x.unsqueeze(0), adj.unsqueeze(0)
            mask = mask.reshape(1, -1) if mask is not None else None
        if mask is not None and mask.dtype != torch.bool:
            mask = mask != 0
        # Large sparse input graphs: level 0 multiplies with a block-diagonal CSR matrix instead
        # (diffpool_fast.ops.block_sparse); a byte adjacency is then not converted to a dense float copy.
        sparse_adj = None
        if self.levels and x.dtype in (torch.float32, torch.float64) and sparse_worth_it(adj):
            sparse_adj = BlockSparseAdj(adj, x.dtype, symmetric=bool(self.levels[0].adj_symmetric))
        # One conversion of a byte adjacency for all the layers and the pooling of level 0.
        elif not adj.is_floating_point():
            adj = adj.to(x.dtype)
        reads = []
        link = x.new_zeros(())
        ent = x.new_zeros(())
        for level in self.levels:
            out = level(x, adj, mask, sparse_adj=sparse_adj)
            sparse_adj = None
            if self.readout_levels == "all":
                reads.append(_readout(out.embedding, mask, self.readout))
            x, adj, mask = out.x, out.adj, None
            link = link + out.link_loss
            ent = ent + out.ent_loss
        z = self.final(x, adj, mask)
        reads.append(_readout(z, mask, self.readout))
        h = torch.cat(reads, dim=-1) if len(reads) > 1 else reads[0]
        h = F.dropout(h, self.dropout, self.training)
        logits = self.head(h)
        aux = self.link_weight * link + self.ent_weight * ent
        if return_terms:
            return logits, aux, {"link": link, "ent": ent}
        return logits, aux
