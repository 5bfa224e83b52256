"""Property-based parity of ``dense_diff_pool`` with PyG and with the plain formulas.

Hypothesis draws the shapes (B 1..4, N 1..23, C 1..9, F 1..7), the mask (none, bool, float 0/1,
int 0/1, any pattern, graphs with no real node), the adjacency (float64, float32, bool, uint8
with small integer weights; symmetric or not; zero or nonzero at padded positions), the memory
layout of every input (contiguous, transposed or sliced views, 2-D for a batch of one) and the
options (every ``normalize`` x ``per_graph`` x ``adj_symmetric``, True only for a symmetric adj).
The values come from a torch generator seeded by a drawn integer, so a failure shrinks to a
small shape and prints its seed.

Oracles, in float64:
- ``torch_geometric.nn.dense_diff_pool`` for the batch losses of ``"numel"``/``"none"`` (which
  count adjacency entries at padded positions, as PyG does);
- the plain formulas below for ``per_graph`` and ``"graph"`` (whose link loss runs over each
  graph's real node pairs only), cross-checked with ``diffpool_fast.ops.reference`` where the
  padding is zero.
Outputs and the gradients of x, s (and of a float64 adj) are compared.

Budgets: the ``ci`` profile (default) keeps the file well under a minute on 2 cores. Set
``DIFFPOOL_FAST_PROPERTY_EXAMPLES=2000`` for a long run (the Triton and TorchScript properties
get a tenth of it). Examples are random (``derandomize=False``); a failure prints the example and
a ``@reproduce_failure`` blob.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from diffpool_fast import dense_diff_pool
from diffpool_fast.ops.reference import per_graph_link_reference

pyg = pytest.importorskip("torch_geometric.nn")

_EXAMPLES_ENV = "DIFFPOOL_FAST_PROPERTY_EXAMPLES"
_LONG = int(os.environ.get(_EXAMPLES_ENV, "0") or 0)
_COMMON = dict(deadline=None, derandomize=False, print_blob=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("diffpool-ci", **_COMMON)
settings.register_profile("diffpool-long", **_COMMON)
settings.load_profile("diffpool-long" if _LONG else "diffpool-ci")


def _examples(ci: int, share: float = 1.0) -> int:
    return max(1, int(_LONG * share)) if _LONG else ci


F64 = torch.float64
NORMALIZE = (True, False, "numel", "none", "graph")
MODE = {True: "numel", False: "none", "numel": "numel", "none": "none", "graph": "graph"}


@dataclass
class Case:
    """One drawn input (values are regenerated from ``seed``) and one option combination."""

    B: int
    N: int
    F: int
    C: int
    seed: int
    mask_kind: str  # none | bool | float | int
    real: Optional[list]  # B*N flags when masked
    adj_dtype: torch.dtype
    symmetric: bool
    dirty_padding: bool  # nonzero adjacency entries at pairs with a padded node
    density: float
    logit_scale: float
    layouts: tuple  # for x, adj, s, mask: contiguous | transposed | sliced
    two_d: bool  # pass 2-D inputs (B == 1)
    normalize: object
    per_graph: bool
    adj_symmetric: Optional[bool]


@st.composite
def cases(draw, adj_dtypes=(F64, torch.float32, torch.bool, torch.uint8), max_n=23, *,
          normalize=None, per_graph=None, padding=None):
    """A Case; ``normalize``, ``per_graph`` and ``padding`` (none: no mask; clean: zero adj at
    padded pairs; dirty: nonzero there) fixed where given, so that parametrised tests cover
    every combination whatever hypothesis prefers to draw."""
    B = draw(st.integers(1, 4))
    N = draw(st.integers(1, max_n))
    F = draw(st.integers(1, 7))
    C = draw(st.integers(1, 9))
    if padding is None:
        padding = draw(st.sampled_from(["none", "clean", "dirty"]))
    mask_kind = "none" if padding == "none" else draw(st.sampled_from(["bool", "float", "int"]))
    real = None
    if mask_kind != "none":
        real = draw(st.lists(st.booleans(), min_size=B * N, max_size=B * N))
        if draw(st.booleans()):  # graphs whose nodes are all padding, often
            for b in draw(st.sets(st.integers(0, B - 1))):
                real[b * N:(b + 1) * N] = [False] * N
    symmetric = draw(st.booleans())
    if normalize is None:
        normalize = draw(st.sampled_from(NORMALIZE))
    if per_graph is None:
        per_graph = draw(st.booleans())
    return Case(
        B=B, N=N, F=F, C=C,
        seed=draw(st.integers(0, 2**32 - 1)),
        mask_kind=mask_kind, real=real,
        adj_dtype=draw(st.sampled_from(adj_dtypes)),
        symmetric=symmetric,
        dirty_padding=padding == "dirty",
        density=draw(st.sampled_from([0.0, 0.3, 1.0])),
        logit_scale=draw(st.sampled_from([0.0, 0.5, 2.0])),
        layouts=tuple(draw(st.sampled_from(["contiguous", "transposed", "sliced"])) for _ in range(4)),
        two_d=B == 1 and draw(st.booleans()),
        normalize=normalize,
        per_graph=per_graph,
        adj_symmetric=draw(st.sampled_from([None, False, True] if symmetric else [None, False])),
    )


def _view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout (a non-contiguous view)."""
    if layout == "transposed" and t.dim() >= 2:
        v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        big[..., 1::2] = t
        v = big[..., 1::2]
    else:
        return t
    assert torch.equal(v, t)
    return v


def make(case: Case, float_dtype=F64):
    """Contiguous values (x, adj, s, mask as given to us, real [B, N] bool or None) for a case."""
    g = torch.Generator().manual_seed(case.seed)
    B, N, F, C = case.B, case.N, case.F, case.C
    x = torch.randn(B, N, F, generator=g, dtype=F64).to(float_dtype)
    s = (torch.randn(B, N, C, generator=g, dtype=F64) * case.logit_scale).to(float_dtype)
    present = torch.rand(B, N, N, generator=g) < case.density
    if case.adj_dtype == torch.bool:
        w = torch.ones(B, N, N, dtype=F64)
    elif case.adj_dtype == torch.uint8:
        w = torch.randint(1, 4, (B, N, N), generator=g).to(F64)  # small integer weights
    else:
        w = torch.rand(B, N, N, generator=g, dtype=F64) * 2 - 0.5
    a = torch.where(present, w, torch.zeros((), dtype=F64))
    if case.symmetric:
        a = torch.triu(a) + torch.triu(a, 1).transpose(1, 2)
    real = None
    if case.real is not None:
        real = torch.tensor(case.real, dtype=torch.bool).view(B, N)
        if not case.dirty_padding:
            a = a * (real[:, :, None] & real[:, None, :]).to(F64)
    adj = a.to(case.adj_dtype) if case.adj_dtype != torch.bool else a != 0
    mask = None
    if real is not None:
        mask = {"bool": real, "float": real.to(torch.float32), "int": real.to(torch.int64)}[case.mask_kind]
    return x, adj, s, mask, real


def oracle(x, adj, s, real, mode: str, per_graph: bool):
    """The published formulas, float64, differentiable; ``real`` [B, N] bool or None."""
    B, N, _ = x.shape
    m = torch.ones(B, N, dtype=torch.bool) if real is None else real
    S = torch.softmax(s, dim=-1) * m[..., None].to(s.dtype)
    A = adj.to(s.dtype)
    out = S.transpose(1, 2) @ x
    out_adj = S.transpose(1, 2) @ A @ S
    R = A - S @ S.transpose(1, 2)
    n = m.sum(1).to(s.dtype)
    has = n > 0
    h = (-S * torch.log(S + 1e-15)).sum(-1)  # [B, N]
    if mode == "graph":
        Rr = R * (m[:, :, None] & m[:, None, :]).to(s.dtype)
        per = torch.where(has, Rr.square().sum((1, 2)) / n.clamp_min(1) ** 2, torch.zeros_like(n))
        link = per if per_graph else per.sum() / has.sum().clamp_min(1)
    elif per_graph:
        link = torch.linalg.vector_norm(R.flatten(1), dim=1) / (N * N if mode == "numel" else 1)
    else:
        link = torch.linalg.vector_norm(R) / (B * N * N if mode == "numel" else 1)
    if per_graph:
        ent = torch.where(has, h.sum(1) / n.clamp_min(1), torch.zeros_like(n))
    else:
        ent = h.mean()
    return out, out_adj, link, ent


def _weights(outs, seed):
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    return [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]


def _run(fn, x, adj, s, want_adj_grad, weights=None):
    """Outputs of fn(x, adj, s) and the gradients of x, s (and adj) for random upstream weights."""
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    leaves = [x, s]
    if want_adj_grad:
        adj = adj.detach().clone().requires_grad_()
        leaves.append(adj)
    outs = fn(x, adj, s)
    if weights is None:
        weights = _weights(outs, 0)
    loss = sum((o.to(F64) * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], [None if gr is None else gr.detach() for gr in grads], weights


def _close(name, got, want, rtol, atol_rel, case, scale=1.0):
    scale = max(scale, want.abs().max().item()) if want.numel() else scale
    torch.testing.assert_close(
        got.to(F64), want.to(F64), rtol=rtol, atol=atol_rel * scale,
        msg=lambda m: f"{name} differs for {case}: {m}",
    )


def _ours(case: Case, x, adj, s, mask, backend="torch"):
    """dense_diff_pool on the drawn layouts (and 2-D inputs), as a function of x, adj, s."""
    lx, la, ls, lm = case.layouts

    def fn(x, adj, s):
        xv, av, sv = _view(x, lx), _view(adj, la), _view(s, ls)
        mv = None if mask is None else _view(mask, lm)
        if case.two_d:
            xv, av, sv = xv[0], av[0], sv[0]
            mv = None if mv is None else mv[0]
        return dense_diff_pool(xv, av, sv, mv, case.normalize, backend=backend,
                               per_graph=case.per_graph, adj_symmetric=case.adj_symmetric)

    return fn


def _check_case(case: Case, backend="torch", float_dtype=F64, rtol=None, atol_rel=None):
    x, adj, s, mask, real = make(case, float_dtype)
    mode = MODE[case.normalize]
    adj_grad = adj.dtype == F64 or (backend == "triton" and adj.dtype == torch.float32)
    ours, our_grads, w = _run(_ours(case, x, adj, s, mask, backend), x, adj, s, adj_grad)
    assert ours[0].dtype == float_dtype and all(o.dtype == float_dtype for o in ours)
    shapes = [(case.B, case.C, case.F), (case.B, case.C, case.C)]
    assert [tuple(o.shape) for o in ours[:2]] == shapes
    assert ours[2].shape == ((case.B,) if case.per_graph else ())
    x64, s64 = x.to(F64), s.to(F64)
    adj64 = adj.to(F64)
    if mode != "graph" and not case.per_graph:
        # PyG itself: its mask may be bool, float or int; it needs a float adjacency.
        def theirs_fn(x, a, s):
            return pyg.dense_diff_pool(x, a, s, mask, normalize=mode == "numel")
    else:
        def theirs_fn(x, a, s):
            return oracle(x, a, s, real, mode, case.per_graph)
    theirs, their_grads, _ = _run(theirs_fn, x64, adj64, s64, adj_grad, w)
    if mode == "graph" and case.per_graph:
        cross = per_graph_link_reference(adj64, s64, real)
        _close("link vs reference", theirs[2], cross, 1e-12, 1e-12, case)
    if rtol is None:
        # float32 adjacency: ||A||^2 is summed in float32 on the torch path
        rtol, atol_rel = (1e-6, 1e-7) if adj.dtype == torch.float32 else (1e-8, 1e-10)
    # link_sq = ||A||^2 - 2 tr(S^T A S) + ||S^T S||^2: its rounding is relative to ||A||^2
    a2 = max(1.0, adj64.square().sum().item())
    for name, o, t in zip(("out", "out_adj", "link", "ent"), ours, theirs):
        assert torch.isfinite(o).all(), f"{name} not finite for {case}"
        _close(name, o, t, rtol, atol_rel, case, a2 if name == "link" else 1.0)
    for name, o, t in zip(("dx", "ds", "dadj"), our_grads, their_grads):
        if t is None:
            continue
        assert o is not None, f"{name}: no gradient for {case}"
        if name == "dadj" and mode == "graph" and real is not None:
            pad = ~(real[:, :, None] & real[:, None, :])
            assert (o[pad] == 0).all(), f"graph mode: nonzero adj gradient at padded pairs for {case}"
        _close(name, o, t, rtol * 10, atol_rel * 10, case)


def _events(case):
    event(f"mask={case.mask_kind}")
    event(f"adj={case.adj_dtype}")
    event(f"density={case.density}")


@pytest.mark.parametrize("padding", ["none", "clean", "dirty"])
@pytest.mark.parametrize("per_graph", [False, True], ids=["batch", "per_graph"])
@pytest.mark.parametrize("normalize", NORMALIZE, ids=str)
@settings(max_examples=_examples(10, 1 / 30))
@given(data=st.data())
def test_torch_path_matches_pyg_and_the_formulas(normalize, per_graph, padding, data):
    case = data.draw(cases(normalize=normalize, per_graph=per_graph, padding=padding), label="case")
    _events(case)
    _check_case(case)


@settings(max_examples=_examples(40, 0.1))
@given(case=cases(padding="dirty"), data=st.data())
def test_graph_normalisation_ignores_padding_and_pyg_modes_count_it(case, data):
    """``"graph"``: the same losses and x/s gradients whatever adj holds at padded pairs;
    ``"numel"``/``"none"``: PyG's, which change when padded entries do."""
    assume(not all(case.real))
    clean = Case(**{**case.__dict__, "dirty_padding": False, "density": 1.0})
    dirty = Case(**{**clean.__dict__, "dirty_padding": True})
    x, adj_clean, s, mask, real = make(clean)
    _, adj_dirty, _, _, _ = make(dirty)
    pad = ~(real[:, :, None] & real[:, None, :])
    assert (adj_dirty.to(F64)[pad] != 0).any()  # density 1: every padded pair is an edge
    per_graph = data.draw(st.booleans())
    results = {}
    for name, adj in (("clean", adj_clean), ("dirty", adj_dirty)):
        for normalize in ("graph", "none"):
            results[name, normalize] = _run(
                lambda x, a, s, n=normalize: dense_diff_pool(x, a, s, mask, n, backend="torch",
                                                             per_graph=per_graph),
                x, adj, s, False)[:2]
    # a float32 adjacency has ||A||^2 summed in float32: errors relative to it, not to the loss
    a2 = adj_dirty.to(F64).square().sum().item()
    tol = dict(rtol=1e-6, atol=1e-6 * max(1.0, a2)) if adj_dirty.dtype == torch.float32 else \
        dict(rtol=1e-9, atol=1e-10 * max(1.0, a2))
    (o1, g1), (o2, g2) = results["clean", "graph"], results["dirty", "graph"]
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, **tol)
    # PyG's modes see the dirty entries: the residual there is A's entry itself
    link_clean, link_dirty = results["clean", "none"][0][2], results["dirty", "none"][0][2]
    extra = (adj_dirty.to(F64) * pad).square().flatten(1).sum(1)
    want = link_clean.square() + (extra if per_graph else extra.sum())
    torch.testing.assert_close(link_dirty.square(), want, **tol)


@pytest.fixture(scope="module")
def scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
        return torch.jit.script(dense_diff_pool)


@pytest.mark.parametrize("per_graph", [False, True], ids=["batch", "per_graph"])
@pytest.mark.parametrize("normalize", NORMALIZE, ids=str)
@settings(max_examples=_examples(4, 1 / 100))
@given(data=st.data())
def test_scripted_entry_point_matches_the_eager_function(scripted, normalize, per_graph, data):
    case = data.draw(cases(normalize=normalize, per_graph=per_graph), label="case")
    x, adj, s, mask, _ = make(case)
    adj_grad = adj.dtype == F64
    kw = dict(per_graph=case.per_graph, adj_symmetric=case.adj_symmetric)
    eager = _run(lambda x, a, s: dense_diff_pool(x, a, s, mask, case.normalize, backend="torch", **kw),
                 x, adj, s, adj_grad)
    script = _run(lambda x, a, s: scripted(x, a, s, mask, case.normalize, **kw), x, adj, s, adj_grad,
                  eager[2])
    rtol, atol = (2e-6, 2e-7) if adj.dtype == torch.float32 else (1e-8, 1e-10)
    for name, o, t in zip(("out", "out_adj", "link", "ent", "dx", "ds", "dadj"),
                          script[0] + script[1], eager[0] + eager[1]):
        if t is not None:
            _close(name, o, t, rtol * 10, atol * 10, case)


def _triton_ready():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_ready(), reason="needs triton and CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("normalize", ["numel", "none", "graph"])
@settings(max_examples=_examples(5, 1 / 60))
@given(data=st.data())
def test_triton_path_under_the_interpreter_matches_the_formulas(normalize, data):
    case = data.draw(cases(adj_dtypes=(torch.float32, torch.bool, torch.uint8), max_n=12,
                           normalize=normalize), label="case")
    _events(case)
    # fp32 inputs, exact fp32 products under the interpreter, fp32 accumulation
    if torch.cuda.is_available():
        pytest.skip("the interpreter property runs on CPU tensors")
    _check_case(case, backend="triton", float_dtype=torch.float32, rtol=2e-4, atol_rel=2e-5)
