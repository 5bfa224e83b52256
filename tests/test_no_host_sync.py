"""Issue 19 items 1 and 2: one forward + backward reads nothing back from the device and launches
few kernels.

On a GPU, reading a tensor's value (``.item()``, ``bool(t)``, ``.tolist()``, ``.nonzero()``, ...)
stalls the host until the device has drained, so launches never run ahead; and every launch
costs host time. Both are checked here on the CPU, where they cost nothing but can be counted:
the Triton path under the interpreter, and the torch path with its GPU branch switched on
(``coarsen_torch.reads_stall``). Only calls made from the package's own files count (the
interpreter itself reads values to emulate the GPU).
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton_cases import DEVICE, fresh_generator, make_inputs, two_cliques

import diffpool_fast
from diffpool_fast import dense_diff_pool
from diffpool_fast.ops import coarsen_torch

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

def _folder(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__)) + os.sep


import diffpool_fast.kernels  # noqa: E402  (installed from kernels/, outside the package folder)

_ROOTS = (_folder(diffpool_fast), _folder(diffpool_fast.kernels))


def _from_package(depth: int = 2) -> bool:
    """Whether the caller ``depth`` frames up is a file of the package (or its kernels)."""
    return os.path.abspath(sys._getframe(depth).f_code.co_filename).startswith(_ROOTS)


class _ReadCounter:
    """Wraps the value-reading methods of torch.Tensor (and torch.nonzero); counts the calls made
    from package code."""

    def __init__(self, monkeypatch):
        self.calls: Counter = Counter()
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
            self._wrap(monkeypatch, name)
        real_nonzero = torch.Tensor.nonzero

        def nonzero(t, *a, **k):
            if _from_package():
                self.calls["nonzero"] += 1
            return real_nonzero(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, "nonzero", nonzero)
        real_fn = torch.nonzero

        def nonzero_fn(*a, **k):
            if _from_package():
                self.calls["torch.nonzero"] += 1
            return real_fn(*a, **k)
        monkeypatch.setattr(torch, "nonzero", nonzero_fn)

    def _wrap(self, monkeypatch, name):
        real = getattr(torch.Tensor, name)
        counter = self.calls

        def wrapper(t, *a, **k):
            if _from_package():
                counter[name] += 1
            return real(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)


def _inputs(kind: str, g):
    if kind == "converged":
        x, adj, s = two_cliques(12.0)  # a near-exact fit: every graph's identity cancels
        B = 3
        x, adj, s = (t.expand(B, *t.shape[1:]).clone().to(DEVICE) for t in (x, adj, s))
        mask = torch.ones(B, x.shape[1], dtype=torch.bool, device=DEVICE)
        mask[1, -3:] = False
        return x, adj * (mask[:, :, None] & mask[:, None, :]), s, mask
    return make_inputs(3, 40, 11, 9, torch.float32, torch.float32, "pad", kind, g)


def _step(x, adj, s, mask, backend, **kw):
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, backend=backend, **kw)
    (out.square().sum() + out_adj.sum() + 3.0 * link.sum() + ent.sum()).backward()
    return x.grad, s.grad


@pytest.mark.parametrize("kind", ["sym", "asym", "converged"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("opts", [{}, {"normalize": "graph", "per_graph": True}], ids=["default", "graph-per-graph"])
def test_forward_backward_reads_no_value_back(kind, backend, opts, monkeypatch):
    if backend == "torch":  # the torch path's GPU branch: every graph recomputed, nothing read back
        monkeypatch.setattr(coarsen_torch, "reads_stall", lambda device: True)
    g = fresh_generator()
    x, adj, s, mask = _inputs(kind, g)
    _step(x, adj, s, mask, backend, **opts)  # warm-up: kernel compiles, first-call caches
    counter = _ReadCounter(monkeypatch)
    gx, gs = _step(x, adj, s, mask, backend, **opts)
    assert torch.isfinite(gs).all() and torch.isfinite(gx).all()
    assert not counter.calls, f"values read back from the device by package code: {dict(counter.calls)}"


def test_the_counter_catches_a_read(monkeypatch):
    """The check can fail: the torch path's CPU branch reads its cancellation flags (bool(any)),
    which is allowed there (no device to wait for) and counted."""
    x, adj, s = two_cliques(12.0)
    counter = _ReadCounter(monkeypatch)
    _step(x, adj, s, None, "torch")
    assert counter.calls["__bool__"] >= 1, dict(counter.calls)


class _LaunchCounter(TorchDispatchMode):
    """Counts aten operators that compute (views, allocations and metadata excluded)."""

    _FREE = ("empty", "empty_like", "new_empty", "view", "_unsafe_view", "as_strided", "expand", "t",
             "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "detach", "alias",
             "lift_fresh", "_to_copy_noop", "diagonal", "reshape", "unbind", "split", "empty_strided",
             "new_empty_strided", "is_same_size", "_reshape_alias", "set_", "contiguous", "promote_types")

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self._FREE and not _inside_interpreter():
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _inside_interpreter() -> bool:
    """Whether Triton's interpreter made this call (it copies arguments to NumPy and back to
    emulate a launch; on a GPU there is no such copy)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("triton", "runtime", "interpreter.py")):
            return True
        frame = frame.f_back
    return False


def _count_triton_launches(monkeypatch):
    import triton.runtime.interpreter as interp

    seen: Counter = Counter()
    real = interp.InterpretedFunction.run

    def run(self, *a, **k):
        seen[self.fn.__name__] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(interp.InterpretedFunction, "run", run)
    return seen


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's launches")
@pytest.mark.parametrize("kind", ["sym", "converged"])
def test_forward_backward_launches_few_kernels(kind, monkeypatch):
    """The headline call (fp32, bool mask, adj without grad): 5 Triton launches forward and 3
    backward, and no aten operator that computes inside dense_diff_pool's forward and backward
    (the caller's loss and its backward are outside the count)."""
    g = fresh_generator()
    x, adj, s, mask = _inputs(kind, g)
    x, s = x.requires_grad_(), s.requires_grad_()
    dense_diff_pool(x, adj, s, mask, backend="triton")  # warm-up
    out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, backend="triton")
    grads = (torch.ones_like(out), torch.ones_like(out_adj), torch.ones_like(link), torch.ones_like(ent))
    launches = _count_triton_launches(monkeypatch)
    with _LaunchCounter() as counter:
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, backend="triton")
        torch.autograd.grad((out, out_adj, link, ent), (x, s), grads)
    assert dict(launches) == {
        "assignment_fwd_kernel": 1, "adjacency_fwd_kernel": 2, "gram_fwd_kernel": 1, "link_residual_kernel": 1,
        "finish_kernel": 1, "link_residual_bwd_kernel": 1, "assignment_bwd_kernel": 1}, dict(launches)
    assert not counter.ops, f"aten operators that compute around the kernels: {dict(counter.ops)}"


class _AllocationLog(TorchDispatchMode):
    """Records (operator, shape, dtype) of every allocation."""

    def __init__(self):
        super().__init__()
        self.allocs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.startswith(("empty", "new_empty", "zeros", "ones", "full")) and not _inside_interpreter():
            self.allocs.append((name, tuple(out.shape), out.dtype))
        return out


@pytest.mark.skipif(DEVICE != "cpu", reason="logs the interpreter's run")
def test_allocations_do_not_depend_on_values():
    """Issue 19 item 5: what a CUDA graph capture needs besides no syncs. One forward+backward
    allocates the same tensors (shapes, dtypes, order) for random and for near-converged inputs
    (where the residual passes do their work), so a captured step replays for any values."""
    g = fresh_generator()
    x, adj, s, mask = _inputs("sym", g)
    xc, adjc, sc, maskc = _inputs("converged", g)
    B, N = xc.shape[:2]
    x, adj, s, mask = x[:B, :N].contiguous(), adj[:B, :N, :N].contiguous(), s[:B, :N].contiguous(), mask[:B, :N]
    s = s[..., : sc.shape[2]].contiguous()
    x = x[..., : xc.shape[2]].contiguous()
    logs = []
    for inputs in ((x, adj, s, mask), (xc, adjc, sc, maskc)):
        with _AllocationLog() as log:
            _step(*inputs, "triton")
        logs.append(log.allocs)
    assert logs[0] == logs[1]
    assert len(logs[0]) > 5
