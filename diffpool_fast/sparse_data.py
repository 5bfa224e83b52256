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

Batches on a device (issue 20): :func:`resident` copies a dataset's arrays to a device once, and
:func:`collate_on` / ``collate_sparse(device=...)`` build a batch there with the same values as
on the CPU and no copy per batch; ``Level0Loader(resident=True)`` uploads an epoch's order in one
copy. Every batch carries its graphs' node counts on the host (``sizes``), which
:func:`model_inputs` hands to the model, so that nothing reads the device to size the levels.
"""
from __future__ import annotations

import weakref
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import sparse_mode
from .data import DenseBatch, DenseLoader, GraphDataset, collate

__all__ = ["SparseBatch", "collate_sparse", "Level0Loader", "prefer_sparse", "model_inputs", "LEVEL0_MODES",
           "SPARSE_MIN_NODES", "SPARSE_MAX_DENSITY", "DeviceGraphs", "resident", "collate_on", "padded_size"]

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
    sizes: Optional[Tensor] = None  # [B] int64 real nodes, on the CPU (the host's knowledge; `to` keeps it)

    @property
    def num_graphs(self) -> int:
        return int(self.y.numel())

    def to(self, device) -> "SparseBatch":
        return SparseBatch(*(t.to(device, non_blocking=True) for t in self[:4]), self.sizes)


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


def collate_sparse(ds: GraphDataset, indices: Sequence[int], *, device=None,
                   device_indices: Optional[Tensor] = None) -> SparseBatch:
    """Graphs ``indices`` as one sparse batch, in that order (see the module docstring).
    ``device``, ``device_indices``: built on that device, as :func:`collate_on`."""
    if device is not None:
        return _collate_sparse_on(ds, torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu(),
                                  torch.device(device), device_indices)
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
    return SparseBatch(x, edge_index, g_of_node, ds.y[idx], sizes)


# --------------------------------------------------------------------------- batches built on a device

class DeviceGraphs(NamedTuple):
    """A dataset's flat arrays, labels and cleaned edge lists, copied to one device once."""
    x: Tensor
    node_ptr: Tensor
    edges: Tensor
    edge_ptr: Tensor
    num_nodes: Tensor
    y: Tensor
    clean_edges: Tensor
    clean_ptr: Tensor


_RESIDENT: "weakref.WeakKeyDictionary[GraphDataset, dict]" = weakref.WeakKeyDictionary()


def resident(ds: GraphDataset, device) -> DeviceGraphs:
    """``ds``'s arrays on ``device``, copied at the first call and kept (per dataset and device;
    a TU dataset is megabytes), so that batches are built there with no copy per batch."""
    device = torch.device(device)
    per = _RESIDENT.setdefault(ds, {})
    got = per.get(str(device))
    if got is None:
        flat = ds.flat()
        host = (flat.x, flat.node_ptr, flat.edges, flat.edge_ptr, ds.num_nodes, ds.y) + _clean_edges(ds)
        got = per[str(device)] = DeviceGraphs(*(t.to(device) for t in host))
    return got


def _gather_plan(sizes: Tensor, di: Tensor, ptr: Tensor, total: int):
    """For the graphs ``di`` (on the device) with ``sizes`` items each from a CSR-like ``ptr``:
    each item's graph in the batch and its row in the flat array. ``total`` (their sum, from the
    host) sizes the outputs, so that nothing waits for the device."""
    dev = di.device
    graph = torch.repeat_interleave(torch.arange(len(di), device=dev), sizes, output_size=total)
    pos = torch.arange(total, device=dev) - (torch.cumsum(sizes, 0) - sizes)[graph]
    return graph, pos, ptr[di][graph] + pos


def collate_on(ds: GraphDataset, indices: Sequence[int], pad_to: Optional[int], device,
               device_indices: Optional[Tensor] = None) -> DenseBatch:
    """:func:`diffpool_fast.data.collate` built on ``device`` from the dataset's arrays there
    (:func:`resident`): the same values, no host-to-device copy of the batch. ``device_indices``:
    ``indices`` already on the device (a loader uploads an epoch's order in one copy), else
    copied. Shapes and output lengths come from the host's node and edge counts."""
    flat, g, device = ds.flat(), resident(ds, device), torch.device(device)
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
    B, sizes = len(idx), ds.num_nodes[idx]
    N = int(sizes.max()) if B else 0
    if pad_to is not None:
        if N > pad_to:
            raise ValueError(f"a graph has {N} nodes, more than pad_to={pad_to}")
        N = pad_to
    di = device_indices if device_indices is not None else idx.to(device, non_blocking=True)
    dsz = g.num_nodes[di]
    x = torch.zeros(B, N, ds.num_features, device=device)
    adj = torch.zeros(B, N, N, dtype=torch.bool, device=device)
    if B:
        graph, pos, rows = _gather_plan(dsz, di, g.node_ptr, int(sizes.sum()))
        x[graph, pos] = g.x[rows]
        n_edges = int((flat.edge_ptr[idx + 1] - flat.edge_ptr[idx]).sum())
        graph, _, rows = _gather_plan(g.edge_ptr[di + 1] - g.edge_ptr[di], di, g.edge_ptr, n_edges)
        ei = g.edges[:, rows]
        adj[graph, ei[0], ei[1]] = True
    mask = torch.arange(N, device=device)[None, :] < dsz[:, None]
    return DenseBatch(x, adj, mask, g.y[di], sizes)


def _collate_sparse_on(ds: GraphDataset, idx: Tensor, device: torch.device,
                       device_indices: Optional[Tensor]) -> SparseBatch:
    """:func:`collate_sparse` built on ``device`` (as :func:`collate_on`)."""
    g = resident(ds, device)
    _, eptr = _clean_edges(ds)
    sizes = ds.num_nodes[idx]
    di = device_indices if device_indices is not None else idx.to(device, non_blocking=True)
    dsz = g.num_nodes[di]
    if not len(idx):
        return SparseBatch(torch.zeros(0, ds.num_features, device=device), torch.zeros(2, 0, dtype=torch.long,
                           device=device), torch.zeros(0, dtype=torch.long, device=device), g.y[di], sizes)
    g_of_node, _, rows = _gather_plan(dsz, di, g.node_ptr, int(sizes.sum()))
    first = torch.cumsum(dsz, 0) - dsz
    n_edges = int((eptr[idx + 1] - eptr[idx]).sum())
    g_of_edge, _, erows = _gather_plan(g.clean_ptr[di + 1] - g.clean_ptr[di], di, g.clean_ptr, n_edges)
    return SparseBatch(g.x[rows], g.clean_edges[:, erows] + first[g_of_edge], g_of_node, g.y[di], sizes)


def padded_size(n: int) -> int:
    """The smallest of 8, 12, 16, 24, 32, 48, 64, ... (2^k and 1.5 x 2^k) that holds ``n``: batches
    padded to it (``Level0Loader(pad_ladder=True)``) have few shapes, at most 1.5x their largest
    graph, so that a CUDA graph captured per shape is reused (train --cuda-graphs on)."""
    size = 8
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


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
    ``resident``: build the batches on ``device`` from the dataset's arrays copied there once
    (:func:`resident`), each epoch's order uploaded in one copy: no copy per batch (the training
    loop does so on CUDA). ``pad_ladder``: pad each dense batch to :func:`padded_size` of its
    largest graph (unless ``pad_to``), so that batches have few shapes.
    """

    def __init__(self, ds: GraphDataset, indices: Optional[Sequence[int]] = None, *, level0: str = "dense",
                 device: Union[str, torch.device] = "cpu", resident: bool = False, pad_ladder: bool = False, **kw):
        if level0 not in LEVEL0_MODES:
            raise ValueError(f"level0 must be one of {LEVEL0_MODES}, got {level0!r}")
        super().__init__(ds, indices, **kw)
        self.level0, self.device = level0, torch.device(device)
        self.resident, self.pad_ladder = bool(resident), bool(pad_ladder)
        #: batches built so far per form, {"dense": n, "sparse": n}
        self.counts = {"dense": 0, "sparse": 0}

    def pad_for(self, idx: Tensor) -> Optional[int]:
        """The node count a dense batch of graphs ``idx`` is padded to (None: its largest graph)."""
        if self.pad_to is not None or not self.pad_ladder or len(idx) == 0:
            return self.pad_to
        return padded_size(int(self.ds.num_nodes[idx].max()))

    def form(self, idx: Tensor) -> str:
        """``"dense"`` or ``"sparse"`` for the batch of graphs ``idx``."""
        if self.level0 != "auto":
            return self.level0
        if len(idx) == 0:
            return "dense"
        _, eptr = _clean_edges(self.ds)
        edges = int((eptr[idx + 1] - eptr[idx]).sum())
        pad = self.pad_for(idx)
        padded = int(self.ds.num_nodes[idx].max()) if pad is None else pad
        return "sparse" if prefer_sparse(padded, len(idx), edges, self.device) else "dense"

    def _collate(self, idx: Tensor, device_idx: Optional[Tensor] = None) -> Union[DenseBatch, SparseBatch]:
        form = self.form(idx)
        self.counts[form] += 1
        if form == "sparse":
            return collate_sparse(self.ds, idx, device=self.device if self.resident else None,
                                  device_indices=device_idx)
        if self.resident:
            return collate_on(self.ds, idx, self.pad_for(idx), self.device, device_idx)
        return collate(self.ds, idx, self.pad_for(idx))

    def _batches(self, epoch: int) -> Iterator[Union[DenseBatch, SparseBatch]]:
        parts = self.batch_indices(epoch)
        if not self.resident or not parts:
            return (self._collate(b) for b in parts)
        on_device = torch.cat(parts).to(self.device, non_blocking=True).split([len(b) for b in parts])
        return (self._collate(b, d) for b, d in zip(parts, on_device))

    def epoch(self, epoch: int = 0) -> Iterator[Union[DenseBatch, SparseBatch]]:
        if not self.shuffle:
            if self._cached is None:
                self._cached = list(self._batches(0))
            yield from self._cached
            return
        yield from self._batches(epoch)


def model_inputs(b: Union[DenseBatch, SparseBatch]) -> Tuple[List, dict]:
    """``(args, kwargs)`` of ``DiffPoolClassifier.forward`` for a dense or a sparse batch (with
    its host-side node counts, when it has them: the model then sizes its levels without reading
    the device)."""
    kw = {} if b.sizes is None else {"graph_sizes": b.sizes}
    if isinstance(b, SparseBatch):
        return [b.x, b.edge_index], {"batch": b.batch, "num_graphs": b.num_graphs, **kw}
    return [b.x, b.adj, b.mask], kw
