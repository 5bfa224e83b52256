"""Graph-classification data for DiffPool: TU datasets, a built-in generated dataset, dense
batches with a mask, size-bucketed batching and stratified folds.

Graphs are held as small per-graph tensors (features [n, F], edge list [2, E]); a batch is made
dense only when it is used: ``x`` [B, N, F] float, ``adj`` [B, N, N] **bool** (1 byte per entry;
the model converts it once), ``mask`` [B, N] bool, ``y`` [B]. N is the batch's own largest graph
unless ``pad_to`` fixes it.

TU datasets (``NAME_A.txt``, ``NAME_graph_indicator.txt``, ... in ``root/NAME/`` or
``root/NAME/raw/``) are parsed by ``torch_geometric.datasets.TUDataset``. The source folder may be
read-only: the raw files are linked into a writable cache (``cache_dir``, default
``$DIFFPOOL_FAST_CACHE`` or ``~/.cache/diffpool_fast``) where TUDataset writes its processed file.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import CACHE_ENV, DATA_ROOT_ENV, env
from .errors import DatasetError

__all__ = [
    "DatasetError", "GraphDataset", "DenseBatch", "collate", "DenseLoader", "load_tu",
    "make_synthetic", "load_dataset", "stratified_folds", "stratified_split",
    "default_data_root", "default_cache_dir", "fingerprint", "generator_seed", "DATA_ROOT_ENV",
    "CACHE_ENV",
]

def default_data_root() -> str:
    """``$DIFFPOOL_FAST_DATA`` if set, else ``./data``."""
    return env(DATA_ROOT_ENV) or "data"


def default_cache_dir() -> str:
    """``$DIFFPOOL_FAST_CACHE`` if set, else ``~/.cache/diffpool_fast``."""
    return env(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "diffpool_fast")


#: the seeds ``torch.Generator.manual_seed`` accepts: [-2**63, 2**64)
_TORCH_SEED_RANGE = (-(2**63), 2**64)


def generator_seed(value: int) -> int:
    """``value`` as a seed torch accepts: unchanged inside torch's range (so every seed that
    worked before keeps its stream), reduced modulo 2**64 outside it, where ``manual_seed``
    would raise an overflow error."""
    lo, hi = _TORCH_SEED_RANGE
    return value if lo <= value < hi else value % hi


def fingerprint(ds: "GraphDataset") -> dict:
    """What a training run's numbers depend on in a dataset, for telling later whether it is
    still the same data: counts, and SHA-256 digests (16 hex digits) of the graph labels, the
    node features and the edge lists, plus the raw files' digests of a TU dataset."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    return {
        "name": ds.name,
        "graphs": len(ds),
        "classes": ds.num_classes,
        "features": ds.num_features,
        "nodes": int(ds.num_nodes.sum()),
        "labels_sha256": digest([ds.y]),
        "features_sha256": digest(ds.xs),
        "edges_sha256": digest(ds.edges),
        "files": dict(ds.info.get("files") or {}),
    }


class GraphDataset:
    """Graphs as per-graph tensors: ``xs[i]`` [n_i, F] float32, ``edges[i]`` [2, E_i] int64
    (both directions of an undirected edge), ``y`` [G] int64."""

    def __init__(self, name: str, xs: List[Tensor], edges: List[Tensor], y: Tensor, num_classes: int,
                 info: Optional[dict] = None):
        if not (len(xs) == len(edges) == len(y)):
            raise ValueError(f"xs, edges and y disagree in length: {len(xs)}, {len(edges)}, {len(y)}")
        self.name = name
        self.xs, self.edges = xs, edges
        self.y = y.long()
        self.num_classes = int(num_classes)
        self.num_features = int(xs[0].shape[1]) if xs else 0
        self.num_nodes = torch.tensor([x.shape[0] for x in xs], dtype=torch.long)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.xs)

    def flat(self) -> "_FlatGraphs":
        """All graphs' node features and (graph-local) edges concatenated, built once."""
        if getattr(self, "_flat", None) is None:
            node_ptr = torch.zeros(len(self) + 1, dtype=torch.long)
            node_ptr[1:] = torch.cumsum(self.num_nodes, 0)
            e_counts = torch.tensor([e.shape[1] for e in self.edges], dtype=torch.long)
            edge_ptr = torch.zeros(len(self) + 1, dtype=torch.long)
            edge_ptr[1:] = torch.cumsum(e_counts, 0)
            x = torch.cat(self.xs) if self.xs else torch.zeros(0, 0)
            edges = torch.cat(self.edges, dim=1) if self.edges else torch.zeros(2, 0, dtype=torch.long)
            self._flat = _FlatGraphs(x, node_ptr, edges, edge_ptr)
        return self._flat

    @property
    def max_nodes(self) -> int:
        return int(self.num_nodes.max()) if len(self) else 0

    @property
    def undirected(self) -> bool:
        """True when every graph's edge set equals its reverse, i.e. every dense adjacency is
        symmetric: the model may then promise ``adj_symmetric`` to ``dense_diff_pool``."""
        if getattr(self, "_undirected", None) is None:
            def keys(src, dst, n):
                return torch.unique(src * n + dst)

            self._undirected = all(
                torch.equal(keys(e[0], e[1], int(n)), keys(e[1], e[0], int(n)))
                for e, n in zip(self.edges, self.num_nodes)
            )
        return self._undirected

    def subset(self, indices: Sequence[int]) -> "GraphDataset":
        idx = [int(i) for i in indices]
        return GraphDataset(self.name, [self.xs[i] for i in idx], [self.edges[i] for i in idx], self.y[idx],
                            self.num_classes, self.info)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "graphs": len(self),
            "nodes": int(self.num_nodes.sum()),
            "edges_directed": int(sum(e.shape[1] for e in self.edges)),
            "max_nodes": self.max_nodes,
            "mean_nodes": round(float(self.num_nodes.float().mean()), 2) if len(self) else 0.0,
            "classes": self.num_classes,
            "features": self.num_features,
            **self.info,
        }


class _FlatGraphs(NamedTuple):
    x: Tensor  # [total nodes, F]
    node_ptr: Tensor  # [G + 1] first node of each graph
    edges: Tensor  # [2, total edges], graph-local node ids
    edge_ptr: Tensor  # [G + 1] first edge of each graph


class DenseBatch(NamedTuple):
    x: Tensor  # [B, N, F] float
    adj: Tensor  # [B, N, N] bool
    mask: Tensor  # [B, N] bool
    y: Tensor  # [B] int64
    sizes: Optional[Tensor] = None  # [B] int64 real nodes, on the CPU (the host's knowledge; `to` keeps it)

    def to(self, device) -> "DenseBatch":
        return DenseBatch(*(t.to(device, non_blocking=True) for t in self[:4]), self.sizes)


def collate(ds: GraphDataset, indices: Sequence[int], pad_to: Optional[int] = None) -> DenseBatch:
    """Dense batch of graphs ``indices``, padded to the largest of them (or to ``pad_to``).

    Vectorised over the dataset's flat node and edge arrays: a few tensor ops per batch, no loop.
    """
    flat = ds.flat()
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    B, F = len(idx), ds.num_features
    sizes = ds.num_nodes[idx]
    N = int(sizes.max()) if B else 0
    if pad_to is not None:
        if N > pad_to:
            raise ValueError(f"a graph has {N} nodes, more than pad_to={pad_to}")
        N = pad_to
    x = torch.zeros(B, N, F)
    adj = torch.zeros(B, N, N, dtype=torch.bool)
    if B:
        g_of_node = torch.repeat_interleave(torch.arange(B), sizes)
        first = torch.cumsum(sizes, 0) - sizes
        pos = torch.arange(len(g_of_node)) - first[g_of_node]
        x[g_of_node, pos] = flat.x[flat.node_ptr[idx][g_of_node] + pos]
        e_sizes = flat.edge_ptr[idx + 1] - flat.edge_ptr[idx]
        g_of_edge = torch.repeat_interleave(torch.arange(B), e_sizes)
        e_first = torch.cumsum(e_sizes, 0) - e_sizes
        rows = flat.edge_ptr[idx][g_of_edge] + torch.arange(len(g_of_edge)) - e_first[g_of_edge]
        ei = flat.edges[:, rows]
        adj[g_of_edge, ei[0], ei[1]] = True
    mask = torch.arange(N)[None, :] < sizes[:, None]
    return DenseBatch(x, adj, mask, ds.y[idx], sizes)


class DenseLoader:
    """Dense batches over ``indices`` of a dataset.

    - ``shuffle``: a new order every epoch, drawn from ``(seed, epoch)`` only, so an epoch's
      batches are the same whether or not the run was interrupted before it.
    - ``bucket``: size-bucketed batches. Training: the shuffled graphs are cut into chunks of
      ``bucket_chunk`` batches, each chunk sorted by size and cut into batches, and the batch
      order shuffled; evaluation: all graphs sorted by size. A batch then pads to its own
      largest graph, not the dataset's.
    - ``pad_to``: pad every batch to this many nodes (PyG's ``ToDense``); None pads each batch to
      its own largest graph.

    Batches of an unshuffled loader are built once and kept.
    """

    def __init__(
        self,
        ds: GraphDataset,
        indices: Optional[Sequence[int]] = None,
        *,
        batch_size: int = 20,
        shuffle: bool = False,
        bucket: bool = True,
        bucket_chunk: int = 16,
        seed: int = 0,
        pad_to: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ds = ds
        self.indices = torch.as_tensor(list(range(len(ds))) if indices is None else list(indices), dtype=torch.long)
        self.batch_size, self.shuffle, self.bucket = batch_size, shuffle, bucket
        self.bucket_chunk, self.seed, self.pad_to = bucket_chunk, seed, pad_to
        self._cached: Optional[List[DenseBatch]] = None

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_graphs(self) -> int:
        return len(self.indices)

    def batch_indices(self, epoch: int = 0) -> List[Tensor]:
        idx, bs = self.indices, self.batch_size
        sizes = self.ds.num_nodes
        if not self.shuffle:
            if self.bucket:
                idx = idx[torch.argsort(sizes[idx], stable=True)]
            return list(idx.split(bs))
        g = torch.Generator().manual_seed(generator_seed(int(self.seed) * 1_000_003 + int(epoch)))
        idx = idx[torch.randperm(len(idx), generator=g)]
        if not self.bucket:
            return list(idx.split(bs))
        batches: List[Tensor] = []
        for chunk in idx.split(bs * self.bucket_chunk):
            chunk = chunk[torch.argsort(sizes[chunk], stable=True)]
            batches.extend(chunk.split(bs))
        order = torch.randperm(len(batches), generator=g)
        return [batches[i] for i in order]

    def epoch(self, epoch: int = 0) -> Iterator[DenseBatch]:
        if not self.shuffle:
            if self._cached is None:
                self._cached = [collate(self.ds, b, self.pad_to) for b in self.batch_indices()]
            yield from self._cached
            return
        for b in self.batch_indices(epoch):
            yield collate(self.ds, b, self.pad_to)

    def __iter__(self) -> Iterator[DenseBatch]:
        return self.epoch(0)


# --------------------------------------------------------------------------- TU datasets

_TU_REQUIRED = ("A", "graph_indicator", "graph_labels")
#: the files of a TU dataset this package reads, with what each line holds: (kind, columns);
#: columns None = any number, the same on every line. Edge labels and attributes and graph
#: attributes are not used, so they are neither copied nor read (PyG's TUDataset would take
#: graph attributes as regression targets in place of the graph labels).
_TU_FILES = {
    "A": ("int", 2),
    "graph_indicator": ("int", 1),
    "graph_labels": ("int", 1),
    "node_labels": ("int", None),
    "node_attributes": ("float", None),
}
#: bumped when the staged files or their processing change, so that old cache entries are not used
_TU_CACHE_FORMAT = "tu-2"


def _find_tu_source(root: Path, name: str) -> Optional[Path]:
    for cand in (root / name / "raw", root / name, root):
        if (cand / f"{name}_A.txt").is_file():
            return cand
    return None


def _available(root: Path) -> List[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _find_tu_source(root, p.name) is not None)


def _link_raw(src: Path, raw: Path, name: str) -> None:
    """Link (or copy) every ``NAME_*.txt`` of ``src`` into ``raw`` (for tools that hand the raw
    files to PyG themselves; :func:`load_tu` copies and checks them instead)."""
    raw.mkdir(parents=True, exist_ok=True)
    for f in src.glob(f"{name}_*.txt"):
        dst = raw / f.name
        if f.is_file() and not (dst.exists() or dst.is_symlink()):
            try:
                os.symlink(f.resolve(), dst)
            except OSError:  # filesystems without symlinks
                shutil.copyfile(f, dst)


def _read_tu_files(src: Path, name: str) -> dict:
    """``{part: bytes}`` of the files of ``_TU_FILES`` present in ``src``, each read once: the
    cache key, the checks and the cached copy all come from these same bytes, so a file that
    changes while it is read cannot end up cached under another content's key."""
    out = {}
    for part in _TU_FILES:
        path = src / f"{name}_{part}.txt"
        if path.is_file():
            try:
                out[part] = path.read_bytes()
            except OSError as err:
                raise DatasetError(f"dataset {name!r}: cannot read {path}: {err.strerror or err}") from None
    return out


def _parse_tu_file(name: str, part: str, data: bytes) -> np.ndarray:
    """One raw file as a [lines, columns] array, or a DatasetError that names the file and line."""
    fname = f"{name}_{part}.txt"
    kind, cols = _TU_FILES[part]
    body = data.rstrip()
    if not body:
        raise DatasetError(f"dataset {name!r}: {fname} is empty")
    # PyG's reader fails on a blank line with an unrelated message; numpy's would skip it.
    blank = re.search(rb"(?m)^[ \t\r]*$", body)
    if blank is not None:
        line = body.count(b"\n", 0, blank.start()) + 1
        raise DatasetError(f"dataset {name!r}: {fname} line {line} is blank")
    try:
        arr = np.loadtxt(io.BytesIO(body), delimiter=",", dtype=np.int64 if kind == "int" else np.float64,
                         ndmin=2, comments=None)
    except Exception as err:  # malformed numbers, ragged lines, undecodable bytes
        raise DatasetError(f"dataset {name!r}: {fname} is malformed: {_loadtxt_reason(err, kind)} "
                           "(truncated, or not a TU file?)") from None
    if cols is not None and arr.shape[1] != cols:
        raise DatasetError(f"dataset {name!r}: {fname} has {arr.shape[1]} value(s) per line, expected {cols}")
    if kind == "float" and not np.isfinite(arr).all():
        row = int(np.nonzero(~np.isfinite(arr).all(1))[0][0])
        raise DatasetError(f"dataset {name!r}: {fname} line {row + 1} holds a non-finite value")
    return arr


def _loadtxt_reason(err: Exception, kind: str) -> str:
    """numpy's message about a bad line, with 1-based line numbers (numpy counts a bad number's
    row from 0 and a ragged row from 1)."""
    text = str(err)
    m = re.search(r"could not convert string (.*) to \w+ at row (\d+), column (\d+)", text)
    if m:
        what = "an integer" if kind == "int" else "a number"
        return f"line {int(m.group(2)) + 1}, value {m.group(3)}: {m.group(1)} is not {what}"
    m = re.search(r"number of columns changed from (\d+) to (\d+) at row (\d+)", text)
    if m:
        return f"line {m.group(3)} has {m.group(2)} value(s), the lines before it {m.group(1)}"
    return text.split("; use `usecols`")[0]


def _check_tu_files(name: str, files: dict) -> None:
    """The consistency PyG's TUDataset assumes without checking. Broken, it either fails with an
    unrelated index error or, worse, silently mixes graphs up (nodes not grouped by graph, edges
    between graphs)."""
    arr = {part: _parse_tu_file(name, part, data) for part, data in files.items()}
    f = {part: f"{name}_{part}.txt" for part in _TU_FILES}
    labels, indicator, edges = arr["graph_labels"][:, 0], arr["graph_indicator"][:, 0], arr["A"]
    n_graphs, n_nodes = len(labels), len(indicator)
    if indicator.min() < 1 or indicator.max() != n_graphs:
        raise DatasetError(
            f"dataset {name!r}: {f['graph_indicator']} names graphs {indicator.min()}..{indicator.max()}, "
            f"but {f['graph_labels']} has {n_graphs} labels (truncated, or files of different datasets?)")
    if (np.diff(indicator) < 0).any():
        row = int(np.nonzero(np.diff(indicator) < 0)[0][0]) + 2
        raise DatasetError(f"dataset {name!r}: {f['graph_indicator']} is not sorted by graph (line {row}); "
                           "the TU format lists each graph's nodes together")
    per_graph = np.bincount(indicator, minlength=n_graphs + 1)[1:]
    if (per_graph == 0).any():
        raise DatasetError(f"dataset {name!r}: graph {int(np.nonzero(per_graph == 0)[0][0]) + 1} has no nodes "
                           f"in {f['graph_indicator']}")
    for part in ("node_labels", "node_attributes"):
        if part in arr and len(arr[part]) != n_nodes:
            raise DatasetError(f"dataset {name!r}: {f[part]} has {len(arr[part])} lines, but "
                               f"{f['graph_indicator']} has {n_nodes} nodes (truncated?)")
    if edges.min() < 1 or edges.max() > n_nodes:
        bad = int(np.nonzero((edges < 1).any(1) | (edges > n_nodes).any(1))[0][0])
        raise DatasetError(f"dataset {name!r}: {f['A']} line {bad + 1} names node {edges[bad].tolist()}, "
                           f"outside 1..{n_nodes} (the nodes of {f['graph_indicator']})")
    cross = indicator[edges[:, 0] - 1] != indicator[edges[:, 1] - 1]
    if cross.any():
        bad = int(np.nonzero(cross)[0][0])
        last = " (the last line: truncated?)" if bad == len(edges) - 1 else ""
        raise DatasetError(f"dataset {name!r}: {f['A']} line {bad + 1} joins nodes of two graphs "
                           f"(graphs {indicator[edges[bad, 0] - 1]} and {indicator[edges[bad, 1] - 1]}){last}")
    loops = edges[:, 0] == edges[:, 1]
    if not (indicator[edges[~loops, 0] - 1] == n_graphs).any():  # PyG would drop (or misalign) it
        raise DatasetError(f"dataset {name!r}: the last graph ({n_graphs}) has no edges in {f['A']} "
                           "(truncated?), which torch_geometric's TUDataset cannot read")


def _stage_tu(cache: Path, name: str, files: dict) -> Path:
    """The cache folder of exactly this content: ``cache/tu/NAME-<hash>/NAME/raw/`` holds checked
    copies of the raw files, beside PyG's processed file. It is built in a temporary folder and
    renamed into place, so a folder under a key is always complete; a change of any byte of the
    raw files gives another key, so stale processed data is never read."""
    import torch_geometric

    digest = hashlib.sha256(f"{_TU_CACHE_FORMAT}\0{name}\0{torch_geometric.__version__}".encode())
    for part in sorted(files):
        digest.update(f"\0{part}\0{hashlib.sha256(files[part]).hexdigest()}".encode())
    base = cache / "tu"
    final = base / f"{name}-{digest.hexdigest()[:20]}"
    if (final / name / "raw").is_dir():
        return final
    _check_tu_files(name, files)
    try:
        base.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(base)
        tmp = base / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        raw = tmp / name / "raw"
        raw.mkdir(parents=True)
        for part, data in files.items():
            # PyG's reader drops a last line that has no newline: add it in the copy.
            (raw / f"{name}_{part}.txt").write_bytes(data.rstrip() + b"\n")
        _process_tu(tmp, name)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same key first: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / name / "raw").is_dir():
                raise
    except OSError as err:
        raise DatasetError(f"dataset {name!r}: cannot write the cache folder {base}: {err.strerror or err} "
                           "(choose another with --cache-dir)") from None
    return final


def _remove_stale_staging(base: Path) -> None:
    """Temporary folders of killed processes (``.tmp-KEY-PID`` whose PID is not running)."""
    for p in base.glob(".tmp-*"):
        pid = p.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; our own PID counts as not (a leftover of an earlier process
    that had it: containers reuse PIDs)."""
    try:
        return pid != os.getpid() and os.kill(pid, 0) is None
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True


def _process_tu(root: Path, name: str, node_attr: bool = False):
    """PyG's TUDataset on a staged folder; any failure is a DatasetError."""
    from torch_geometric.datasets import TUDataset

    try:
        return TUDataset(str(root), name, use_node_attr=node_attr)
    except Exception as err:  # parse errors PyG meets that the checks above do not catch
        raise DatasetError(f"could not read TU dataset {name!r}: {type(err).__name__}: {err}") from err


def _degree_onehot(edges: Tensor, n: int, cap: int) -> Tensor:
    deg = torch.bincount(edges[0], minlength=n).clamp_max(cap) if edges.numel() else torch.zeros(n, dtype=torch.long)
    return torch.nn.functional.one_hot(deg, cap + 1).float()


def load_tu(
    name: str,
    root: str,
    *,
    cache_dir: Optional[str] = None,
    node_attr: bool = False,
    download: bool = False,
) -> GraphDataset:
    """A TU dataset from ``root`` (``root/NAME/NAME_A.txt`` or ``root/NAME/raw/NAME_A.txt``).

    Node features: one-hot node labels; with ``node_attr``, also the continuous node attributes,
    standardised per column over all nodes of the dataset (no class labels involved); for a
    dataset without node labels or attributes (IMDB-BINARY), one-hot degree capped at the
    dataset's maximum degree. ``download`` lets TUDataset fetch a dataset missing from ``root``
    (into ``cache_dir/tu-download``).

    The cache is keyed on the content of the raw files read (``NAME_A``, ``_graph_indicator``,
    ``_graph_labels``, ``_node_labels``, ``_node_attributes``), not on their folder: fixed,
    truncated or relabelled files are read afresh. A new content is checked first (numbers,
    line counts that agree, nodes grouped by graph, edges inside one graph); a malformed file is
    a :class:`DatasetError` naming it. ``info["files"]`` holds each file's SHA-256 (16 hex
    digits), so that a run can tell later which file changed.
    """
    try:
        import torch_geometric  # noqa: F401
    except ImportError as err:  # pragma: no cover - dev extra installs it
        raise DatasetError(f"TU datasets need torch_geometric ({err}); pip install torch_geometric") from err
    rootp = Path(root).expanduser()
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    src = _find_tu_source(rootp, name)
    if src is None and download:
        fetched = cache / "tu-download"
        _process_tu(fetched, name)  # downloads the raw files (and processes them once there)
        src = _find_tu_source(fetched, name)
    if src is None:
        have = _available(rootp)
        where = f"{rootp}/{name}/{name}_A.txt (or {rootp}/{name}/raw/)"
        hint = f"; datasets there: {', '.join(have)}" if have else (
            f"; {rootp} does not exist" if not rootp.exists() else f"; no TU dataset found in {rootp}"
        )
        raise DatasetError(
            f"dataset {name!r} not found: expected {where}{hint}. Point --data-root at a folder of "
            "TU datasets, or pass --download to fetch it"
        )
    for part in _TU_REQUIRED:
        if not (src / f"{name}_{part}.txt").is_file():
            raise DatasetError(f"dataset {name!r}: missing file {src / f'{name}_{part}.txt'}")
    files = _read_tu_files(src, name)
    staged = _stage_tu(cache, name, files)
    try:
        tu = _process_tu(staged, name, node_attr)
    except DatasetError:
        # A processed file that no longer loads (a torch_geometric update, a damaged disk):
        # the raw copies are checked, so processing them again is safe.
        shutil.rmtree(staged / name / "processed", ignore_errors=True)
        tu = _process_tu(staged, name, node_attr)
    try:
        return _from_pyg(tu, name, node_attr, files)
    except Exception as err:  # the checks should leave nothing here; if not, still one line
        raise DatasetError(f"could not read TU dataset {name!r} from {src}: {type(err).__name__}: {err}") from err


def _from_pyg(tu, name: str, node_attr: bool, files: dict) -> GraphDataset:
    y = tu.y.view(-1).long()
    num_attr = tu.num_node_attributes if node_attr else 0
    xs: List[Tensor] = []
    edges: List[Tensor] = []
    for i in range(len(tu)):
        d = tu[i]
        edges.append(d.edge_index.long())
        xs.append(None if d.x is None else d.x.float())
    info = {"node_input": "labels" + ("+attributes" if num_attr else ""),
            "files": {f"{name}_{part}.txt": hashlib.sha256(data).hexdigest()[:16]
                      for part, data in sorted(files.items())}}
    if xs[0] is None or xs[0].shape[1] == 0:
        cap = max(int(torch.bincount(e[0]).max()) if e.numel() else 0 for e in edges)
        xs = [_degree_onehot(e, int(tu[i].num_nodes), cap) for i, e in enumerate(edges)]
        info["node_input"] = f"one-hot degree (cap {cap})"
    elif num_attr:
        allx = torch.cat([x[:, :num_attr] for x in xs])
        mean, std = allx.mean(0), allx.std(0).clamp_min(1e-6)
        xs = [torch.cat([(x[:, :num_attr] - mean) / std, x[:, num_attr:]], dim=1) for x in xs]
    num_classes = int(y.max()) + 1
    return GraphDataset(name, xs, edges, y, num_classes, info)


# --------------------------------------------------------------------------- generated dataset

SYNTHETIC_CLASSES = ("chain", "star", "all-to-all")


def make_synthetic(
    num_graphs: int = 600,
    *,
    seed: int = 0,
    communities=(6, 8),
    community_size=(4, 8),
    p_in: float = 0.7,
    bridges=(2, 3),
    degree_cap: int = 16,
) -> GraphDataset:
    """Graphs with planted communities whose class is how the communities are connected.

    Each graph has k communities (k uniform in ``communities``) of ``community_size`` nodes,
    dense inside (each pair an edge with probability ``p_in``, plus a path so a community is
    connected). Communities are joined by bundles of ``bridges`` random edges along a
    community-level graph that sets the class: 0 = chain (a path of communities), 1 = star (one
    hub community joined to all others), 2 = all-to-all. Chain and star have the same number of
    bundles, so telling them apart needs the arrangement of the communities (which community
    carries the bundles), not the edge count. Node features: one-hot degree capped at
    ``degree_cap``; node order is shuffled. Classes are balanced; a seed gives one dataset.
    """
    rng = np.random.default_rng(seed)
    xs, edges, ys = [], [], []
    for gi in range(num_graphs):
        cls = gi % len(SYNTHETIC_CLASSES)
        k = int(rng.integers(communities[0], communities[1] + 1))
        sizes = rng.integers(community_size[0], community_size[1] + 1, size=k)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        n = int(sizes.sum())
        und = set()
        for s0, sz in zip(starts, sizes):
            nodes = np.arange(s0, s0 + sz)
            for a in range(sz - 1):
                und.add((int(nodes[a]), int(nodes[a + 1])))
            iu, ju = np.triu_indices(sz, 1)
            keep = rng.random(len(iu)) < p_in
            for a, b in zip(iu[keep], ju[keep]):
                und.add((int(nodes[a]), int(nodes[b])))
        if cls == 0:
            pairs = [(c, c + 1) for c in range(k - 1)]
        elif cls == 1:
            pairs = [(0, c) for c in range(1, k)]
        else:
            pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
        perm = rng.permutation(k)  # which community plays which role
        for a, b in pairs:
            ca, cb = perm[a], perm[b]
            for _ in range(int(rng.integers(bridges[0], bridges[1] + 1))):
                u = int(starts[ca] + rng.integers(sizes[ca]))
                v = int(starts[cb] + rng.integers(sizes[cb]))
                und.add((min(u, v), max(u, v)))
        relabel = rng.permutation(n)  # node order carries no community information
        e = torch.tensor(sorted(und), dtype=torch.long).t()
        e = torch.from_numpy(relabel)[e]
        e = torch.cat([e, e.flip(0)], dim=1)
        edges.append(e)
        deg = torch.bincount(e[0], minlength=n).clamp_max(degree_cap)
        xs.append(torch.nn.functional.one_hot(deg, degree_cap + 1).float())
        ys.append(cls)
    info = {"node_input": f"one-hot degree (cap {degree_cap})", "classes_meaning": list(SYNTHETIC_CLASSES),
            "seed": seed}
    return GraphDataset("synthetic", xs, edges, torch.tensor(ys), len(SYNTHETIC_CLASSES), info)


def load_dataset(
    name: str,
    root: Optional[str] = None,
    *,
    cache_dir: Optional[str] = None,
    node_attr: bool = False,
    download: bool = False,
    synthetic_graphs: int = 600,
    seed: int = 0,
) -> GraphDataset:
    """``"synthetic"`` (generated, from ``seed``) or a TU dataset by name from ``root``."""
    if name.lower() == "synthetic":
        return make_synthetic(synthetic_graphs, seed=seed)
    return load_tu(name, root or default_data_root(), cache_dir=cache_dir, node_attr=node_attr, download=download)


# --------------------------------------------------------------------------- splits

def stratified_folds(y: Tensor, k: int, seed: int = 0) -> List[Tensor]:
    """K disjoint test folds covering every graph, each with (nearly) the class proportions of y.

    Each class's graphs are shuffled and dealt round-robin, continuing where the previous class
    stopped so the fold sizes differ by at most one.
    """
    y = torch.as_tensor(y).long()
    if k < 2:
        raise ValueError(f"k must be at least 2 for cross-validation, got {k}")
    if k > len(y):
        raise ValueError(f"k={k} folds need at least {k} graphs, got {len(y)}")
    g = torch.Generator().manual_seed(generator_seed(int(seed)))
    fold_of = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for c in torch.unique(y):
        members = torch.nonzero(y == c).view(-1)
        members = members[torch.randperm(len(members), generator=g)]
        fold_of[members] = (torch.arange(len(members)) + offset) % k
        offset = (offset + len(members)) % k
    return [torch.nonzero(fold_of == f).view(-1) for f in range(k)]


def stratified_split(indices: Tensor, y: Tensor, fraction: float, seed: int = 0):
    """Split ``indices`` into (rest, held_out) with about ``fraction`` of each class held out
    (at least one graph of a class with two or more)."""
    indices = torch.as_tensor(indices).long()
    y = torch.as_tensor(y).long()
    g = torch.Generator().manual_seed(generator_seed(int(seed)))
    held, rest = [], []
    for c in torch.unique(y[indices]):
        members = indices[y[indices] == c]
        members = members[torch.randperm(len(members), generator=g)]
        m = int(round(fraction * len(members)))
        if len(members) >= 2:
            m = min(max(m, 1), len(members) - 1)
        else:
            m = 0
        held.append(members[:m])
        rest.append(members[m:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(held)).values
