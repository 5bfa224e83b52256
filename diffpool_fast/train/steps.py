"""A training step of ``diffpool-fast train``: the plain one, the same captured as a CUDA graph,
and deterministic sums on a GPU (issue 20).

**The plain step** (:func:`train_step`): forward, backward, clipping, optimizer step, and the
step's statistics (:func:`step_stats`) computed on the device, with no host sync; the epoch
(``loop._train_epoch``) sums them there and reads them once.

**Deterministic mode** (``--deterministic on``, the default). On CUDA, ``index_add_``,
``scatter_add_`` and the backward passes of ``index_select`` and ``gather`` add with atomics, in
an order that changes from run to run; the edge-list level 0 (``--level0 sparse``) and the edge
layers sum every node's messages that way, so two runs with one seed differed from the first
epoch (the 2026-12-04 GPU run). :func:`deterministic` turns on
``torch.use_deterministic_algorithms`` for the run on CUDA: those sums become sorted segment
sums (the same order every run) and an op with no deterministic form raises instead of
drifting; ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS's own variable) is set to ``:4096:8`` unless
given, as cuBLAS needs for repeatable products. The edge-list code counts per graph with
``index_add_`` on CUDA (``sparse_blocks.per_graph_count``, ``sparse_pool``), since a weighted
``bincount`` has no deterministic CUDA kernel. On the CPU the mode changes nothing: the CPU
kernels already sum in a fixed order for a fixed thread count (``train`` fixes the count).
``--deterministic off`` lets CUDA runs differ at rounding level from run to run (and a resumed
run from the uninterrupted one), for whatever the atomics save.

**CUDA graphs** (``--cuda-graphs on``; off by default until a GPU run measures it, see
``bench/scripts/gpu_train.py``). At DiffPool's sizes a training step is hundreds of small
kernels and the GPU waits for the host launching them. :class:`GraphSteps` captures a whole
step (forward, backward, clipping, Adam) as one CUDA graph per batch shape and replays it, so
that a step costs one launch. What it needs, and what ``train`` sets up for it:

- few shapes: dense batches are padded to :func:`diffpool_fast.sparse_data.padded_size` of
  their largest graph (8, 12, 16, 24, ...), and with clusters per graph the model sizes its
  levels from that padded shape (``DiffPoolClassifier.static_clusters``), never from the values;
- no host sync inside the step (a capture fails on one): statistics stay on the device
  (:func:`step_stats`), batches are built on the device (``Level0Loader(resident=True)``);
- Adam with ``capturable=True`` (fused on CUDA).

A shape's first ``warmup`` steps run eagerly on a side stream (cuBLAS and Triton set up there,
and Adam's state exists before any capture), the first of them watched for host syncs
(``torch.cuda.set_sync_debug_mode``); the next one is captured and replayed, and every later
one replayed after copying the batch into the graph's inputs. Every step trains once, captured
or not: a capture records, its replay computes. Sparse (edge-list) batches, models with batch
norm (whose statistics divide by a count read on the host) and any shape whose capture fails
(the reason is printed once, and a host sync inside the step turns capture off for the run)
take the plain step; so does every shape past ``max_graphs`` (each graph keeps its own memory).
The numbers equal the plain steps' on the same padded batches, up to the rounding of the
kernels cuBLAS picks per stream.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

#: entries of a training step's statistics vector (float64, on the device): the step's loss,
#: cross-entropy, link and entropy terms each times its graphs, its correct predictions, its
#: graphs, and 1 when its loss is not finite
STEP_STATS = ("loss", "ce", "link", "ent", "correct", "graphs", "nonfinite")


def step_stats(loss, ce, terms, logits, y):
    """The :data:`STEP_STATS` vector of one step, computed on the device (no host sync). The
    products and sums are the float64 arithmetic ``float(loss) * n`` did on the host, so the
    epoch's numbers are bit for bit the same."""
    import torch

    n = y.numel()
    parts = torch.stack([t.detach().to(torch.float64) for t in (loss, ce, terms["link"], terms["ent"])])
    correct = (logits.detach().argmax(-1) == y).sum().to(torch.float64)
    bad = (~torch.isfinite(loss.detach())).to(torch.float64)
    return torch.cat([parts * n, torch.stack([correct, correct.new_full((), n), bad])])


def train_step(model, opt, b, clip):
    """One training step on batch ``b`` (already on the model's device): forward, backward,
    clipping, optimizer step. Returns its :data:`STEP_STATS` vector (on the device). A
    non-finite loss is not checked here (that would be a host sync per step): the epoch reads
    the flags once at its end."""
    import torch
    import torch.nn.functional as F

    from ..sparse_data import model_inputs

    opt.zero_grad(set_to_none=True)
    inputs, kw = model_inputs(b)  # a dense or a sparse (edge-list) batch: --level0
    logits, aux, terms = model(*inputs, **kw, return_terms=True)
    ce = F.cross_entropy(logits, b.y)
    loss = ce + aux
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return step_stats(loss, ce, terms, logits, b.y)


#: cuBLAS's own variable; ``:4096:8`` is what cuBLAS documents for reproducible results
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"

#: what ``torch.cuda.set_sync_debug_mode("warn")`` says at a host sync (it also warns once that
#: the mode is a prototype: not a sync)
SYNC_WARNING = "called a synchronizing CUDA operation"

#: ``--deterministic`` and ``--cuda-graphs`` choices
MODES = ("on", "off")


@contextlib.contextmanager
def deterministic(device, on: bool, fill_uninitialized: bool = False):
    """Deterministic algorithms for the run on a CUDA ``device`` when ``on`` (module docstring);
    the previous settings are restored on exit. On the CPU, or when off, nothing changes.

    ``fill_uninitialized``: torch's mode also fills every ``torch.empty`` with NaN (one more
    kernel per allocation), for code that reads memory it never wrote; this code does not (the
    tests poison fresh allocations to check), so the fill is off unless asked for."""
    import torch
    import torch.utils.deterministic as td

    if not on or getattr(device, "type", str(device)) != "cuda":
        yield
        return
    os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              td.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    td.fill_uninitialized_memory = bool(fill_uninitialized)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        td.fill_uninitialized_memory = before[2]


class CudaCapture:
    """What :class:`GraphSteps` needs from CUDA: a side stream for the warm-up steps, the host
    syncs a step makes, a capture. Tests use a fake with the same three methods."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.stream = torch.cuda.Stream(device)

    def warm(self, fn: Callable):
        """``fn()`` on the side stream (ordered after the work queued so far, and before what follows)."""
        cuda = self.torch.cuda
        self.stream.wait_stream(cuda.current_stream())
        with cuda.stream(self.stream):
            out = fn()
        cuda.current_stream().wait_stream(self.stream)
        return out

    def syncs(self, fn: Callable) -> Tuple[object, List[str]]:
        """``fn()`` on the side stream, and the host syncs it made (``file:line: message``)."""
        cuda = self.torch.cuda
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cuda.set_sync_debug_mode("warn")
            try:
                out = self.warm(fn)
            finally:
                cuda.set_sync_debug_mode("default")
        return out, [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in seen
                     if SYNC_WARNING in str(w.message)]

    def capture(self, fn: Callable):
        """``(graph, fn's output)``: ``fn`` recorded as one CUDA graph (not run: ``graph.replay()`` runs it)."""
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            out = fn()
        return graph, out


class GraphSteps:
    """Training steps as captured CUDA graphs, one per batch shape (module docstring).

    ``step(b)`` trains on batch ``b`` once and returns its :data:`STEP_STATS` vector (on the
    device), like :func:`train_step`. ``capture``: a :class:`CudaCapture` (a fake in tests).
    ``counts``: steps by kind (``plain``, ``warmup``, ``captured``, ``replayed``); ``reasons``:
    why shapes were not captured; ``syncs``: the host syncs seen in a watched step."""

    def __init__(self, model, opt, clip: float, capture, *, warmup: int = 2, max_graphs: int = 24,
                 log: Optional[Callable[[str], None]] = None):
        self.model, self.opt, self.clip, self.capture = model, opt, clip, capture
        self.warmup, self.max_graphs = max(1, int(warmup)), int(max_graphs)
        self.log = log or (lambda text: print(f"diffpool-fast train: {text}", file=sys.stderr))
        self.graphs: Dict[tuple, tuple] = {}  # key -> (graph, static batch, static stats)
        self.seen: Dict[tuple, int] = {}
        self.counts = {"plain": 0, "warmup": 0, "captured": 0, "replayed": 0}
        self.reasons: Dict[object, str] = {}
        self.syncs: List[str] = []
        self.off: Optional[str] = None
        if any(type(m).__name__ == "MaskedBatchNorm" for m in model.modules()):
            self.off = "batch norm divides by the real-node count, read on the host: plain steps"
        if getattr(model, "clusters_per_graph", False):
            model.static_clusters = True  # level widths from the padded shape alone

    def key(self, b) -> Optional[tuple]:
        """The shape a captured graph of batch ``b`` is for, or None (not capturable)."""
        from ..data import DenseBatch

        if not isinstance(b, DenseBatch):
            return None
        return tuple((tuple(t.shape), t.dtype) for t in b[:4])

    def _plain(self, b):
        self.counts["plain"] += 1
        return train_step(self.model, self.opt, b, self.clip)

    def _note(self, key, reason: str, everywhere: bool = False) -> None:
        if everywhere:
            self.off = reason
        if reason not in self.reasons.values():
            self.log(f"--cuda-graphs: {reason}; {'every step' if everywhere else 'that shape'} runs plain")
        self.reasons["all" if everywhere else key] = reason

    def step(self, b):
        key = None if self.off else self.key(b)
        if key is None:
            return self._plain(b)
        got = self.graphs.get(key)
        if got is not None:
            graph, static, stats = got
            for dst, src in zip(static[:4], b[:4]):
                dst.copy_(src)
            graph.replay()
            self.counts["replayed"] += 1
            return stats
        if key in self.reasons:
            return self._plain(b)
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        if n >= self.warmup:
            if len(self.graphs) >= self.max_graphs:
                self._note(key, f"more than {self.max_graphs} batch shapes")
                return self._plain(b)
            return self._capture(key, b)
        self.counts["warmup"] += 1

        def run():
            return train_step(self.model, self.opt, b, self.clip)

        if n > 0:
            return self.capture.warm(run)
        out, syncs = self.capture.syncs(run)  # the shape's first step: does it wait for the GPU?
        if syncs:
            self.syncs = syncs
            self._note(key, f"the step waits for the GPU ({len(syncs)} host sync(s), first at {syncs[0]})",
                       everywhere=True)
        return out

    def _capture(self, key, b):
        self.opt.zero_grad(set_to_none=True)
        try:
            graph, stats = self.capture.capture(lambda: train_step(self.model, self.opt, b, self.clip))
        except Exception as err:  # noqa: BLE001 - any failure falls back to the plain step, with its reason
            text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            self.opt.zero_grad(set_to_none=True)
            self._note(key, f"capture failed ({type(err).__name__}: {text})", everywhere="captur" in text)
            return self._plain(b)
        self.graphs[key] = (graph, b, stats)
        graph.replay()  # the capture recorded this step; the replay trains on it
        self.counts["captured"] += 1
        return stats

    def summary(self) -> dict:
        """For results.json: steps by kind, graphs held, reasons for plain steps."""
        return {"steps": dict(self.counts), "graphs": len(self.graphs),
                "plain_because": sorted(set(self.reasons.values())), "host_syncs": self.syncs[:20]}
