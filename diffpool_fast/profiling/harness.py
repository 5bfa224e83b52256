"""The benchmark harness of ``diffpool-fast profile``: inputs, backends, one step, its timer.

Backends: ``torch`` (our lean path, ``dense_diff_pool(..., backend="torch")``), ``pyg``
(``torch_geometric.nn.dense_diff_pool``), ``pyg-compiled`` (``torch.compile`` of PyG's function,
compiled afresh for every shape by :func:`compile_for`, which times the compile;
``compile`` is its older name), ``triton`` (``dense_diff_pool(..., backend="triton")``), ``auto``
(``dense_diff_pool(..., backend="auto")``: what a user gets by default; :func:`auto_path` says
which path it runs). A backend that cannot run here is a :class:`Backend` without ``fn`` and with
the reason, so the profile reports it as skipped and still runs the others.

Inputs (:func:`make_inputs`): ``random`` logits are standard normal and the adjacency random
symmetric 0/1; ``converged`` ones are 12 · one-hot(cluster) + 0.1 · noise with the adjacency of
the same-cluster pattern (S Sᵀ close to A: the link loss's cancelling regime).

Modes: ``fwd`` (forward with x and s requiring grad, as in training), ``bwd`` (backward only,
after an untimed forward), ``full`` (forward + backward). The adjacency does not require grad
(the first level of a model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from ..config import triton_importable
from .costmodel import Shape

BACKEND_LABELS = {
    "torch": "ours (torch)",
    "triton": "ours (triton)",
    "auto": "ours (auto)",
    "pyg": "PyG",
    "pyg-compiled": "torch.compile(PyG)",
    "compile": "torch.compile(PyG)",
}


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: a skip or error reason that
    fits in a table cell."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------------------------
# Workload


@dataclass
class Inputs:
    """One batch of the coarsening inputs and the upstream gradients its backward is fed."""

    x: "object"
    adj: "object"
    s: "object"
    mask: "object"
    grads: Tuple  # upstream gradients of (out, out_adj, link, ent)

    def nbytes(self, mode: str = "full") -> int:
        ts = [self.x, self.adj, self.s] + ([self.mask] if self.mask is not None else [])
        if mode != "fwd":
            ts += list(self.grads)
        return sum(t.numel() * t.element_size() for t in ts)


def make_inputs(shape: Shape, device: str, seed: int = 0, density: float = 0.05) -> Inputs:
    """Random padded graphs: symmetric adjacency, graph sizes in [N/2, N] (the first has N).

    ``shape.logits == "converged"``: each node gets a random cluster, s = 12 · one-hot + 0.1 ·
    noise, and adj links the nodes of the same cluster (self-loops included); ``density`` is
    then not used. The adjacency is filled one graph at a time, so building it needs no
    B x N x N temporary.
    """
    import torch

    B, N, C, F = shape.batch, shape.nodes, shape.clusters, shape.features
    dt = getattr(torch, shape.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, F, generator=g, device=device).to(dt).requires_grad_()
    labels = None
    if shape.logits == "converged":
        labels = torch.randint(0, C, (B, N), generator=g, device=device)
        s = 12.0 * torch.nn.functional.one_hot(labels, C).float()
        s = (s + 0.1 * torch.randn(B, N, C, generator=g, device=device)).to(dt).requires_grad_()
    else:
        s = torch.randn(B, N, C, generator=g, device=device).to(dt).requires_grad_()
    mask = None
    if shape.masked:
        sizes = torch.randint((N + 1) // 2, N + 1, (B,), generator=g, device=device)
        sizes[0] = N
        mask = torch.arange(N, device=device)[None, :] < sizes[:, None]
    adj = torch.empty(B, N, N, dtype=getattr(torch, shape.adj_dtype), device=device)
    for b in range(B):
        if labels is not None:
            a = labels[b][:, None] == labels[b][None, :]
        else:
            a = torch.rand(N, N, generator=g, device=device) < density
            a = a | a.transpose(0, 1)
        if mask is not None:
            a &= mask[b][:, None] & mask[b][None, :]
        adj[b].copy_(a)
        del a
    g_out = torch.randn(B, C, F, generator=g, device=device).to(dt)
    g_adj = torch.randn(B, C, C, generator=g, device=device).to(dt)
    one = torch.ones((), dtype=dt, device=device)
    return Inputs(x, adj, s, mask, (g_out, g_adj, one, one))


# ----------------------------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    name: str
    fn: Optional[Callable] = None
    reason: str = ""  # why it is skipped, when fn is None
    #: pyg-compiled: the function it compiles (afresh per shape and precision, ``compile_for``)
    base: Optional[Callable] = None

    @property
    def available(self) -> bool:
        return self.fn is not None


def triton_unavailable(device: str) -> Optional[str]:
    """Why the Triton path cannot be benchmarked here, or None."""
    if not triton_importable():
        return "triton is not installed (pip install 'diffpool_fast[triton]')"
    if device != "cuda":
        return "needs a CUDA GPU (on CPU Triton only runs under its interpreter, which is not a benchmark)"
    return None


def make_backend(name: str, device: str, shape: Optional[Shape] = None) -> Backend:
    """The callable ``fn(x, adj, s, mask) -> (out, out_adj, link, ent)`` of a backend, or the
    reason it cannot run here."""
    import torch

    from ..ops.pool import dense_diff_pool

    sym = True if (shape is not None and shape.promise_symmetric) else None
    if name == "torch":
        return Backend(name, lambda x, adj, s, mask: dense_diff_pool(x, adj, s, mask, backend="torch",
                                                                     adj_symmetric=sym))
    if name == "auto":
        return Backend(name, lambda x, adj, s, mask: dense_diff_pool(x, adj, s, mask, backend="auto",
                                                                     adj_symmetric=sym))
    if name == "triton":
        reason = triton_unavailable(device)
        if reason:
            return Backend(name, reason=reason)
        try:
            from ..ops import coarsen_triton  # noqa: F401  (availability check)
        except ImportError as err:
            return Backend(name, reason=f"the Triton path is not in this build ({first_line(err)})")
        return Backend(name, lambda x, adj, s, mask: dense_diff_pool(x, adj, s, mask, backend="triton",
                                                                     adj_symmetric=sym))
    if name in ("pyg", "pyg-compiled", "compile"):
        try:
            from torch_geometric.nn import dense_diff_pool as pyg_pool
        except ImportError as err:
            return Backend(name, reason=f"torch_geometric is not installed ({first_line(err)})")

        def pyg(x, adj, s, mask):
            # PyG multiplies adj with S, so a bool/uint8/half adjacency must be converted first;
            # the copy is part of its cost.
            if adj.dtype != x.dtype:
                adj = adj.to(x.dtype)
            return pyg_pool(x, adj, s, mask)

        if name == "pyg":
            return Backend(name, pyg)
        try:
            compiled = torch.compile(pyg, dynamic=False)
            _smoke(compiled, device, shape)
        except Exception as err:  # compile needs a C++ toolchain on CPU, Triton on CUDA, ...
            return Backend(name, reason=f"torch.compile failed: {first_line(err)}")
        return Backend(name, compiled, base=pyg)
    raise ValueError(f"unknown backend {name!r}")


def compile_for(backend: Backend, inp: "Inputs", device: str, fresh: bool = True) -> float:
    """pyg-compiled: the seconds of the first forward+backward on these inputs, which compiles.

    ``fresh``: compile PyG's function afresh (dynamo's caches reset first, so that the compile is
    counted whole and dynamo's limit of recompilations per function, after which it silently runs
    eagerly, is never reached). Otherwise keep the function compiled for these inputs before
    (under another matmul precision): what the first step costs then is a recompile if dynamo's
    guards ask for one, else just the step."""
    import torch

    if fresh or backend.fn is None:
        torch._dynamo.reset()
        fn = torch.compile(backend.base, dynamic=False)
    else:
        fn = backend.fn
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(fn, inp, "full")
    if device == "cuda":
        torch.cuda.synchronize()
    backend.fn = fn
    return time.perf_counter() - t0


def auto_path(inp: "Inputs") -> Tuple[str, str]:
    """``(path, why)``: the path ``backend="auto"`` takes for these inputs here, and why."""
    from ..ops.dispatch import explain_auto

    return explain_auto(inp.x, inp.adj, inp.s, inp.mask)


def _smoke(fn, device: str, shape: Optional[Shape]) -> None:
    """One forward+backward at a tiny shape, to find out now whether a backend runs at all."""
    dtype = shape.dtype if shape else "float32"
    adj_dtype = shape.adj_dtype if shape else "float32"
    tiny = Shape(2, 8, 2, 4, dtype, adj_dtype)
    inp = make_inputs(tiny, device)
    step(fn, inp, "full")


def triton_unsupported(shape: Shape, inp: Inputs) -> Optional[str]:
    """Why the Triton path would fall back to torch for this shape (None = it runs)."""
    from ..ops import coarsen_triton

    return coarsen_triton.unsupported_reason(inp.x, inp.adj, inp.s, inp.mask)


# ----------------------------------------------------------------------------------------------
# One step and its timer


def forward(fn, inp: Inputs):
    return fn(inp.x, inp.adj, inp.s, inp.mask)


def backward(outs, inp: Inputs) -> None:
    import torch

    torch.autograd.backward(outs, inp.grads)


def step(fn, inp: Inputs, mode: str) -> None:
    """One untimed run of ``mode`` (for warm-up and memory measurement)."""
    inp.x.grad = inp.s.grad = None
    outs = forward(fn, inp)
    if mode != "fwd":
        backward(outs, inp)
    del outs
    inp.x.grad = inp.s.grad = None


def step_keep(fn, inp: Inputs, mode: str):
    """A step that returns its outputs (so they are alive at the peak, as in training)."""
    inp.x.grad = inp.s.grad = None
    outs = forward(fn, inp)
    if mode != "fwd":
        backward(outs, inp)
    return outs


class Timer:
    """Seconds of one call: CUDA events on a GPU, the wall clock on CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.torch = torch

    def time(self, fn: Callable, pre: Optional[Callable] = None) -> float:
        torch = self.torch
        arg = pre() if pre else None
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(arg)
        return time.perf_counter() - t0


def time_once(timer: Timer, fn, inp: Inputs, mode: str) -> float:
    """Seconds of one ``mode`` step; for ``bwd`` the forward runs first, outside the timing."""
    inp.x.grad = inp.s.grad = None
    if mode == "fwd":
        holder = []
        t = timer.time(lambda _: holder.append(forward(fn, inp)))
    elif mode == "bwd":
        t = timer.time(lambda outs: backward(outs, inp), pre=lambda: forward(fn, inp))
    else:
        t = timer.time(lambda _: backward(forward(fn, inp), inp))
    inp.x.grad = inp.s.grad = None
    return t
