"""Batches in PyG's sparse form, for a level 0 that runs on edge lists (issue 12).

:class:`SparseBatch` holds a batch as ``x`` [N, F] (every graph's nodes, no padding),
``edge_index`` [2, E] (global node ids) and ``batch`` [N] (graph ids, sorted), the form
:class:`diffpool_fast.nn.model.DiffPoolClassifier` takes as ``model(x, edge_index, batch)``.
:func:`collate_sparse` builds it from the same graphs :func:`diffpool_fast.data.collate` would pad
into a dense batch: the model computes the same values from either (up to rounding).

The edge list is what the dense batch's bool adjacency holds: duplicate edges of the dataset
appear once (a dense entry is 0 or 1), every graph's edges sorted by (source, target), so the
batch's list is sorted and unique and the pooling (``sparse_diff_pool``) need not sort it. The
cleaned edges are computed once per dataset.

:class:`Level0Loader` is a :class:`diffpool_fast.data.DenseLoader` (the same graphs in every
batch, from ``batch_indices``: size buckets, shuffling and resume work as there) that yields, per
batch, a dense batch or a sparse one: ``level0="dense"`` always dense (exactly DenseLoader),
``"sparse"`` always sparse, ``"auto"`` by :func:`prefer_sparse` from the batch's padded size.
"""
from __future__ import annotations

import weakref
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import sparse_mode
from .data import DenseBatch, DenseLoader, GraphDataset, collate

__all__ = ["SparseBatch", "collate_sparse", "Level0Loader", "prefer_sparse", "model_inputs", "LEVEL0_MODES",
           "SPARSE_MIN_NODES", "SPARSE_MAX_DENSITY"]

LEVEL0_MODES = ("auto", "dense", "sparse")

#: Padded node count (the batch's largest graph) from which ``level0="auto"`` takes the edge
#: list on CPU. Measured for a training step (bench/scripts/level0_threshold.py,
#: bench/notes/dd_level0.md): below it the dense products cost no more than the edge pass.
SPARSE_MIN_NODES = 256
#: Largest fraction of nonzero adjacency entries (edges / (B N^2), N padded) for the edge list.
SPARSE_MAX_DENSITY = 0.05


class SparseBatch(NamedTuple):
    x: Tensor  # [N, F] float, every graph's nodes one after the other
    edge_index: Tensor  # [2, E] int64, global node ids, sorted by (source, target), unique
    batch: Tensor  # [N] int64 graph id of each node (sorted)
    y: Tensor  # [B] int64

    @property
    def num_graphs(self) -> int:
        return int(self.y.numel())

    def to(self, device) -> "SparseBatch":
        return SparseBatch(*(t.to(device, non_blocking=True) for t in self))


_CLEAN: "weakref.WeakKeyDictionary[GraphDataset, Tuple[Tensor, Tensor]]" = weakref.WeakKeyDictionary()


def _clean_edges(ds: GraphDataset) -> Tuple[Tensor, Tensor]:
    """Every graph's edges with duplicates removed, sorted by (source, target), graph-local ids,
    concatenated ([2, E']), and the first edge of each graph ([G + 1]); built once per dataset."""
    got = _CLEAN.get(ds)
    if got is not None:
        return got
    flat = ds.flat()
    G = len(ds)
    counts = flat.edge_ptr[1:] - flat.edge_ptr[:-1]
    graph = torch.repeat_interleave(torch.arange(G), counts)
    M = max(ds.max_nodes, 1)
    key = torch.unique((graph * M + flat.edges[0]) * M + flat.edges[1], sorted=True)
    col = key % M
    rest = torch.div(key, M, rounding_mode="floor")
    row, g = rest % M, torch.div(rest, M, rounding_mode="floor")
    ptr = torch.zeros(G + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(g, minlength=G), 0)
    got = (torch.stack([row, col]), ptr)
    _CLEAN[ds] = got
    return got


def collate_sparse(ds: GraphDataset, indices: Sequence[int]) -> SparseBatch:
    """Graphs ``indices`` as one sparse batch, in that order (see the module docstring)."""
    flat = ds.flat()
    edges, eptr = _clean_edges(ds)
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    B = len(idx)
    sizes = ds.num_nodes[idx]
    first = torch.cumsum(sizes, 0) - sizes  # each graph's first node in the batch
    g_of_node = torch.repeat_interleave(torch.arange(B), sizes)
    pos = torch.arange(len(g_of_node)) - first[g_of_node]
    x = flat.x[flat.node_ptr[idx][g_of_node] + pos] if B else torch.zeros(0, ds.num_features)
    e_sizes = eptr[idx + 1] - eptr[idx]
    g_of_edge = torch.repeat_interleave(torch.arange(B), e_sizes)
    e_first = torch.cumsum(e_sizes, 0) - e_sizes
    rows = eptr[idx][g_of_edge] + torch.arange(len(g_of_edge)) - e_first[g_of_edge]
    edge_index = edges[:, rows] + first[g_of_edge]
    return SparseBatch(x, edge_index, g_of_node, ds.y[idx])


def prefer_sparse(padded_nodes: int, num_graphs: int, edges: int, device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ``level0="auto"`` takes the edge list for a batch of ``num_graphs`` graphs that
    would pad to ``padded_nodes`` nodes with ``edges`` (unique) edges.

    ``DIFFPOOL_FAST_SPARSE=0`` never, ``=1`` always; otherwise on CPU from
    :data:`SPARSE_MIN_NODES` padded nodes when at most :data:`SPARSE_MAX_DENSITY` of the dense
    adjacency would be nonzero. CUDA keeps the dense batch (its fused kernels read A once; the
    edge path has not been measured there).
    """
    mode = sparse_mode()
    if mode in ("0", "1"):
        return mode == "1"
    if torch.device(device).type != "cpu" or padded_nodes < SPARSE_MIN_NODES:
        return False
    return edges <= SPARSE_MAX_DENSITY * num_graphs * padded_nodes * padded_nodes


class Level0Loader(DenseLoader):
    """A :class:`~diffpool_fast.data.DenseLoader` whose batches are dense or sparse (module doc).

    ``level0``: ``"dense"``, ``"sparse"`` or ``"auto"``; ``device``: where the model runs (the
    automatic choice is per device). ``pad_to`` applies to the dense batches only.
    """

    def __init__(self, ds: GraphDataset, indices: Optional[Sequence[int]] = None, *, level0: str = "dense",
                 device: Union[str, torch.device] = "cpu", **kw):
        if level0 not in LEVEL0_MODES:
            raise ValueError(f"level0 must be one of {LEVEL0_MODES}, got {level0!r}")
        super().__init__(ds, indices, **kw)
        self.level0, self.device = level0, torch.device(device)
        #: batches built so far per form, {"dense": n, "sparse": n}
        self.counts = {"dense": 0, "sparse": 0}

    def form(self, idx: Tensor) -> str:
        """``"dense"`` or ``"sparse"`` for the batch of graphs ``idx``."""
        if self.level0 != "auto":
            return self.level0
        if len(idx) == 0:
            return "dense"
        _, eptr = _clean_edges(self.ds)
        edges = int((eptr[idx + 1] - eptr[idx]).sum())
        padded = int(self.ds.num_nodes[idx].max()) if self.pad_to is None else self.pad_to
        return "sparse" if prefer_sparse(padded, len(idx), edges, self.device) else "dense"

    def _collate(self, idx: Tensor) -> Union[DenseBatch, SparseBatch]:
        form = self.form(idx)
        self.counts[form] += 1
        return collate_sparse(self.ds, idx) if form == "sparse" else collate(self.ds, idx, self.pad_to)

    def epoch(self, epoch: int = 0) -> Iterator[Union[DenseBatch, SparseBatch]]:
        if not self.shuffle:
            if self._cached is None:
                self._cached = [self._collate(b) for b in self.batch_indices()]
            yield from self._cached
            return
        for b in self.batch_indices(epoch):
            yield self._collate(b)


def model_inputs(b: Union[DenseBatch, SparseBatch]) -> Tuple[List, dict]:
    """``(args, kwargs)`` of ``DiffPoolClassifier.forward`` for a dense or a sparse batch."""
    if isinstance(b, SparseBatch):
        return [b.x, b.edge_index], {"batch": b.batch, "num_graphs": b.num_graphs}
    return [b.x, b.adj, b.mask], {}
