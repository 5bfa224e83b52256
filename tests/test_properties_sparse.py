"""Property-based check of ``sparse_diff_pool``: any batch of edge lists against ``dense_diff_pool``
(torch path) on its dense form, float64 -- outputs and the gradients of x, s and edge_weight.

Drawn: 1-5 graphs of 0-20 nodes (empty graphs between others and after them), 1-9 clusters,
edges from none to three per node, with duplicates, self-loops, a symmetric pattern or not,
unit or random weights; the logit regime (spread out: no row of S above 1/2, which skips the
hard split; random; near one-hot; a mix of near one-hot and spread rows), every ``normalize``
mode, ``per_graph`` and ``num_clusters``.

Budget: a few dozen examples in CI; ``DIFFPOOL_FAST_PROPERTY_EXAMPLES=N`` raises it, as in
tests/test_properties.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffpool_fast import dense_diff_pool, sparse_diff_pool

_LONG = int(os.environ.get("DIFFPOOL_FAST_PROPERTY_EXAMPLES", "0") or 0)
_SET = dict(deadline=None, derandomize=False, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
F64 = torch.float64


@st.composite
def cases(draw):
    B = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(0, 20), min_size=B, max_size=B))
    C = draw(st.integers(1, 9))
    per_node = draw(st.sampled_from([0.0, 0.5, 1.5, 3.0]))  # edges drawn per node
    symmetric = draw(st.booleans())
    weighted = draw(st.booleans())
    regime = draw(st.sampled_from(["spread", "random", "converged", "mixed"]))
    normalize = draw(st.sampled_from([True, False, "graph"]))
    per_graph = draw(st.booleans())
    with_k = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, sizes, C, per_node, symmetric, weighted, regime, normalize, per_graph, with_k, seed


def _build(case):
    B, sizes, C, per_node, symmetric, weighted, regime, _, _, with_k, seed = case
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(sizes)
    N = int(counts.sum())
    batch = torch.repeat_interleave(torch.arange(B), counts)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rows, cols = [], []
    for b, n in enumerate(sizes):
        m = int(per_node * n)
        if n == 0 or m == 0:
            continue
        r = torch.randint(0, n, (m,), generator=g) + ptr[b]
        c = torch.randint(0, n, (m,), generator=g) + ptr[b]
        rows += [r, r[: m // 4]]  # a quarter of the edges twice
        cols += [c, c[: m // 4]]
    row = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
    if symmetric:
        row, col = torch.cat([row, col]), torch.cat([col, row])
    perm = torch.randperm(row.numel(), generator=g)
    ei = torch.stack([row[perm], col[perm]])
    E = ei.shape[1]
    w = torch.rand(E, generator=g, dtype=F64) * 2 if weighted else torch.ones(E, dtype=F64)
    x = torch.randn(N, 3, generator=g, dtype=F64)
    if regime == "spread":  # logits in [-0.5, 0.5]: no row of S reaches 1/2 once C >= 3
        s = 0.5 * torch.randn(N, C, generator=g, dtype=F64).clamp(-1.0, 1.0)
    elif regime == "random":
        s = 2.0 * torch.randn(N, C, generator=g, dtype=F64)
    else:
        hard = torch.randint(0, C, (N,), generator=g)
        s = 9.0 * torch.nn.functional.one_hot(hard, C).to(F64) + 0.3 * torch.randn(N, C, generator=g, dtype=F64)
        if regime == "mixed":
            s[torch.rand(N, generator=g) < 0.5] *= 0.05
    k = torch.randint(1, C + 1, (B,), generator=g) if with_k else None
    return x, ei, s, batch, w, k, counts


def _dense(x, ei, s, batch, w, counts):
    B, Nmax = counts.numel(), max(1, int(counts.max()))
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    loc = torch.arange(batch.numel()) - ptr[batch]
    xd = x.new_zeros(B, Nmax, x.shape[1]).index_put((batch, loc), x)
    sd = s.new_zeros(B, Nmax, s.shape[1]).index_put((batch, loc), s)
    ad = w.new_zeros(B, Nmax, Nmax).index_put((batch[ei[0]], loc[ei[0]], loc[ei[1]]), w, accumulate=True)
    mask = torch.zeros(B, Nmax, dtype=torch.bool).index_put((batch, loc), torch.ones(batch.numel(), dtype=torch.bool))
    return xd, ad, sd, mask


@settings(max_examples=_LONG or 40, **_SET)
@given(case=cases())
def test_sparse_matches_dense_float64(case):
    normalize, per_graph = case[7], case[8]
    x, ei, s, batch, w, k, counts = _build(case)
    B = counts.numel()
    g = torch.Generator().manual_seed(case[-1] + 1)
    xs, ss, ws = (t.clone().requires_grad_(True) for t in (x, s, w))
    ours = sparse_diff_pool(xs, ei, ss, batch, ws, normalize, num_graphs=B, per_graph=per_graph, num_clusters=k)
    xd, ad, sd, mask = _dense(x, ei, s, batch, w, counts)
    xd, ad, sd = (t.requires_grad_(True) for t in (xd, ad, sd))
    ref = dense_diff_pool(xd, ad, sd, mask, normalize, per_graph=per_graph, num_clusters=k, backend="torch")
    cot = [torch.randn(o.shape, generator=g, dtype=F64) for o in ours]
    for name, a, b in zip(("out", "out_adj", "link", "ent"), ours, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m} (case {case})")
    gx, gs, gw = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ours, cot)), (xs, ss, ws), allow_unused=True)
    gxd, gsd, gad = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ref, cot)), (xd, sd, ad), allow_unused=True)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    loc = torch.arange(batch.numel()) - ptr[batch]
    want_w = gad[batch[ei[0]], loc[ei[0]], loc[ei[1]]] if ei.shape[1] else w.new_zeros(0)
    for name, a, b in (("grad x", gx, gxd[mask]), ("grad s", gs, gsd[mask]), ("grad w", gw, want_w)):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m} (case {case})")
