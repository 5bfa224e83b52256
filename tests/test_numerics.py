"""Numerics of the torch path that must never be silently wrong (issue 11 items 2, 3 and 4).

- Non-finite inputs propagate to the losses (PyG's behaviour), never a plausible 0.
- The link loss and its gradient stay as accurate as PyG's float32 formula from random
  assignments to near-exact fits, where the three-term identity cancels (``ops.link_exact``).
- float64 x/s with a lower-precision adjacency accumulate ||A||^2 in float64.

The Triton path's versions of these are in test_triton_coarsen.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from triton_cases import two_cliques

from diffpool_fast import dense_diff_pool
from diffpool_fast.ops.reference import dense_diff_pool_reference

f32, f64 = torch.float32, torch.float64
U32 = 2.0 ** -24


def link_and_grad(fn, x, adj, s, mask=None, normalize=False, **kw):
    s = s.detach().clone().requires_grad_()
    link = fn(x, adj, s, mask, normalize=normalize, **kw)[2]
    (g,) = torch.autograd.grad(link.sum(), [s])
    return link.detach().double(), g.double()


def exact_from_float32_s(adj, s):
    """(link, d link/d s) evaluated exactly (float64) from the float32-rounded S = softmax(s): what
    the rounding of S alone leaves, for every float32 implementation (PyG's included)."""
    P = torch.softmax(s.float(), -1).double().requires_grad_()
    link = torch.linalg.vector_norm(adj.double() - P @ P.mT)
    (gP,) = torch.autograd.grad(link, [P])
    P = P.detach()
    return link.detach(), P * (gP - (P * gP).sum(-1, keepdim=True))


def errors(got, want):
    (val, g), (val_w, gw) = got, want
    return (val - val_w).abs().max().item(), ((g - gw).norm() / gw.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------- item 2: non-finite inputs

def _small(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, N, F, C = 3, 9, 4, 3
    x = torch.randn(B, N, F, generator=g)
    s = torch.randn(B, N, C, generator=g)
    adj = (torch.rand(B, N, N, generator=g) < 0.4).float()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 6:] = False
    return x, adj, s, mask


POISON = [("s", 0, (2, 1), math.nan), ("s", 0, (2, 1), math.inf), ("s", 0, (2, 1), -math.inf),
          ("adj", 2, (3, 4), math.nan), ("adj", 2, (3, 4), math.inf), ("adj", 2, (3, 4), -math.inf),
          ("s", 1, (7, 0), math.nan),  # a padded row of graph 1
          ("adj", 1, (7, 8), math.nan),  # a pair of padded nodes
          ("x", 0, (1, 1), math.nan), ("x", 0, (1, 1), math.inf)]


@pytest.mark.parametrize("normalize", [True, False], ids=lambda n: f"normalize={n}")
@pytest.mark.parametrize("poison", POISON, ids=lambda p: f"{p[0]}{p[1]}-{p[3]}")
def test_non_finite_inputs_propagate_like_pyg(poison, normalize):
    name, b, (i, j), value = poison
    x, adj, s, mask = _small()
    {"x": x, "adj": adj, "s": s}[name][b, i, j] = value
    ours = dense_diff_pool(x, adj, s, mask, normalize, backend="torch")
    ref = dense_diff_pool_reference(x, adj, s, mask, normalize)
    for k, (a, r) in enumerate(zip(ours, ref)):
        assert torch.equal(torch.isfinite(a), torch.isfinite(r)), (k, a, r)
    # -inf logits are a valid softmax input (probability 0): finite for both
    expect_finite = name == "x" or (name == "s" and value == -math.inf)
    assert bool(torch.isfinite(ours[2])) == expect_finite, f"link loss {ours[2].item()} ({name})"
    # per graph: only the poisoned graph's link loss is non-finite
    per = dense_diff_pool(x, adj, s, mask, normalize, backend="torch", per_graph=True)[2]
    assert torch.isfinite(per).tolist() == [expect_finite or k != b for k in range(3)], per


@pytest.mark.parametrize("mode", ["graph", "numel", "none"])
def test_nan_reaches_the_gradient(mode):
    x, adj, s, mask = _small(1)
    s[0, 3, 2] = math.nan
    s.requires_grad_()
    link = dense_diff_pool(x, adj, s, mask, mode, backend="torch")[2]
    link.backward()
    assert not torch.isfinite(link)
    assert not torch.isfinite(s.grad[0]).all()


def test_safe_sqrt_guards_zero_only():
    from diffpool_fast.ops.pool import _safe_sqrt

    q = torch.tensor([0.0, 4.0, math.nan, math.inf], requires_grad=True)
    r = _safe_sqrt(q)
    v = r.detach()
    assert v[:2].tolist() == [0.0, 2.0] and math.isnan(v[2]) and math.isinf(v[3])
    r.sum().backward()
    assert q.grad[0] == 0.0 and q.grad[1] == 0.25 and math.isnan(q.grad[2])


# ------------------------------------------------- item 3: accuracy where the identity cancels

SCALES = [0.5 * k for k in range(41)]  # 0, 0.5, ..., 20


@pytest.mark.parametrize("s_dtype", [f32, torch.float16, torch.bfloat16],
                         ids=["s_fp32", "s_fp16", "s_bf16"])
def test_link_loss_as_accurate_as_pyg_float32_from_random_to_exact_fit(s_dtype):
    """Against float64, at every logit scale 0..20 (step 0.5): the link error and the relative
    error of d link/d s at most a few times the larger of PyG's float32 formula's and what the
    float32 rounding of S alone leaves (which PyG's error sometimes undercuts by luck), plus
    float32 noise (16 u relative)."""
    worst = []
    for scale in SCALES:
        x, adj, s = two_cliques(scale)
        s = s.to(s_dtype)  # scale * one-hot is exact in every dtype at these scales
        want = link_and_grad(dense_diff_pool_reference, x.double(), adj.double(), s.double())
        ours = link_and_grad(dense_diff_pool, x, adj, s, backend="torch")
        pyg = link_and_grad(dense_diff_pool_reference, x, adj, s.float())
        (el, eg), (pl, pg) = errors(ours, want), errors(pyg, want)
        sl, sg = errors(exact_from_float32_s(adj, s), want)
        pl, pg = max(pl, sl), max(pg, sg)
        floor = 16 * U32 * want[0].item()
        # the gradient comes back in s's dtype: its own rounding
        g_floor = 16 * U32
        if s_dtype != f32:  # rounding, and underflow of gradients below the dtype's normal range
            g_floor += torch.finfo(s_dtype).eps + torch.finfo(s_dtype).tiny / max(want[1].abs().max().item(), 1e-300)
        assert el <= 3 * pl + floor, f"scale {scale}: link error {el:.2e}, PyG float32 {pl:.2e}"
        assert eg <= 3 * pg + g_floor, f"scale {scale}: grad error {eg:.2e}, PyG float32 {pg:.2e}"
        worst.append((scale, el, pl, eg, pg))
    # the case of issue 11: scale 12 has a true link loss of 4.9e-4, which the identity lost
    assert any(w[0] == 12 and w[1] < 1e-5 for w in worst)


def _per_graph_float32_formula(adj, s, mask, normalize):
    """PyG's float32 formula graph by graph: R = A - S S^T built in float32, then each mode's
    per-graph value (``"graph"``: real node pairs only, over n_b^2)."""
    S = torch.softmax(s, -1) * mask[..., None].float()
    R = adj - S @ S.mT
    N = adj.shape[-1]
    if normalize == "graph":
        real = (mask[:, :, None] & mask[:, None, :]).float()
        n = mask.sum(1).float()
        return torch.where(n > 0, ((R * real) ** 2).sum((1, 2)) / n.clamp_min(1) ** 2, 0 * n)
    link = torch.linalg.vector_norm(R, dim=(1, 2))
    return link / (N * N) if normalize is True else link


@pytest.mark.parametrize("normalize", [True, False, "graph"], ids=lambda n: f"normalize={n}")
def test_near_fit_batch_with_padding_and_random_graphs(normalize):
    """A batch mixing near-exact fits (flagged graphs, recomputed directly) with a random graph
    (identity) and a fully padded graph: per-graph values and gradients against float64, within
    twice the error of the float32 formula (which the float32 rounding of S dominates)."""
    g = torch.Generator().manual_seed(5)
    B, N, C, F = 4, 30, 3, 2
    lab = torch.randint(0, C, (B, N), generator=g)
    oh = torch.nn.functional.one_hot(lab, C).float()
    adj = oh @ oh.transpose(1, 2)  # planted partition, self-loops included
    s = 11.0 * oh + 0.05 * torch.randn(B, N, C, generator=g)
    adj[2] = (torch.rand(N, N, generator=g) < 0.3).float()  # a random graph ...
    s[2] = torch.randn(N, C, generator=g)  # ... and assignment
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 20:] = False
    mask[3] = False
    adj = adj * (mask[:, :, None] & mask[:, None, :])  # no edges at padded nodes (to_dense_adj)
    x = torch.randn(B, N, F, generator=g)
    kw = dict(backend="torch", per_graph=True)
    want = link_and_grad(dense_diff_pool, x.double(), adj.double(), s.double(), mask, normalize, **kw)
    ours = link_and_grad(dense_diff_pool, x, adj, s, mask, normalize, **kw)
    ref = link_and_grad(lambda x, a, s, m, normalize: (None, None, _per_graph_float32_formula(a, s, m, normalize)),
                        x, adj, s, mask, normalize)
    for b in range(B):
        lw = want[0][b].item()
        e_ours, e_ref = abs(ours[0][b].item() - lw), abs(ref[0][b].item() - lw)
        assert e_ours <= 2 * e_ref + 16 * U32 * abs(lw) + 1e-30, (b, e_ours, e_ref, lw)
    e_ours, e_ref = errors(ours, want)[1], errors(ref, want)[1]
    assert e_ours <= 2 * e_ref + 16 * U32, (e_ours, e_ref)
    # the float64 per-graph values are PyG's formula's, graph by graph
    if normalize != "graph":
        for b in (0, 2):
            r = dense_diff_pool_reference(x[b:b + 1].double(), adj[b:b + 1].double(),
                                          s[b:b + 1].double(), mask[b:b + 1], normalize)[2]
            assert abs(r.item() - want[0][b].item()) <= 1e-10 * r.item()


def test_flags_leave_random_assignments_alone_and_catch_fits():
    from diffpool_fast.ops import link_exact

    g = torch.Generator().manual_seed(0)
    for N, C, p in ((64, 8, 0.1), (200, 4, 0.5), (512, 128, 0.05)):
        adj = (torch.rand(2, N, N, generator=g) < p).float()
        S = torch.softmax(torch.randn(2, N, C, generator=g), -1)
        a2 = adj.double().square().sum((1, 2))
        sts = (S.mT @ S).double().square().sum((1, 2))
        q = ((adj - S @ S.mT).double() ** 2).sum((1, 2))
        assert not link_exact.cancellation_flags(a2, sts, q).any(), (N, C)
    x, adj, s = two_cliques(6.0, dtype=f64)
    S = torch.softmax(s, -1)
    a2 = adj.square().sum((1, 2))
    sts = (S.mT @ S).square().sum((1, 2))
    q = ((adj - S @ S.mT) ** 2).sum((1, 2))
    assert link_exact.cancellation_flags(a2, sts, q).all()
    nan = torch.tensor([math.nan], dtype=f64)
    assert not link_exact.cancellation_flags(nan, sts[:1], q[:1]).any()


def test_exact_link_matches_the_residual_with_small_chunks():
    from diffpool_fast.ops import link_exact

    g = torch.Generator().manual_seed(3)
    B, N, C = 3, 23, 4
    adj = (torch.rand(B, N, N, generator=g) < 0.4).to(torch.uint8)
    S = torch.softmax(torch.randn(B, N, C, generator=g), -1)
    idx = torch.tensor([0, 2])
    R = adj.double() - S.double() @ S.double().mT
    for dt, tol in ((f32, 1e-5), (f64, 1e-10)):  # D comes in S's dtype; Q in float64
        Sd = S.to(dt)
        for chunk in (8 * N, 8 * N * 5, 8 * N * N * 2, 1 << 20):  # 1 row, 5 rows, 2 graphs, all
            q, D = link_exact.exact_link(adj, Sd, idx, want_d=True, chunk_bytes=chunk)
            assert q.dtype == f64 and D.dtype == dt
            torch.testing.assert_close(q, (R[idx] ** 2).sum((1, 2)), rtol=1e-12, atol=0)
            torch.testing.assert_close(D.double(), (R[idx] + R[idx].mT) @ S[idx].double(),
                                       rtol=tol, atol=tol * 1e-2)
        a64 = adj.double()
        before = a64.clone()
        link_exact.exact_link(a64, Sd, idx, want_d=True, chunk_bytes=8 * N * 5)
        assert torch.equal(a64, before)  # a float64 adjacency is read, never written
        sym = adj | adj.mT
        Rs = sym.double() - S.double() @ S.double().mT
        _, D = link_exact.exact_link(sym, Sd, idx, want_d=True, symmetric=True, chunk_bytes=8 * N * 5)
        torch.testing.assert_close(D.double(), 2 * Rs[idx] @ S[idx].double(), rtol=tol, atol=tol * 1e-2)


def test_block_sparse_adjacency_near_fit():
    from diffpool_fast.ops.block_sparse import BlockSparseAdj
    from diffpool_fast.ops.coarsen_torch import coarsen_torch

    x, adj, s = two_cliques(12.0)
    adj = adj.repeat(2, 1, 1)
    s = s.repeat(2, 1, 1)
    s[1] = torch.randn(s.shape[1:], generator=torch.Generator().manual_seed(0))
    x = x.repeat(2, 1, 1)
    sp = BlockSparseAdj(adj, torch.float32)
    sd = s.clone().requires_grad_()
    got = coarsen_torch(x, sp, s.requires_grad_())
    dense = coarsen_torch(x, adj, sd)
    torch.testing.assert_close(got[2], dense[2], rtol=1e-6, atol=0)  # both direct at graph 0
    got[2].sum().backward()
    dense[2].sum().backward()
    torch.testing.assert_close(s.grad, sd.grad, rtol=1e-5, atol=1e-9)


# ------------------------------------------------ item 4: float64 x/s, lower-precision adj

@pytest.mark.parametrize("adj_dtype", [f32, torch.float16, torch.bfloat16, torch.bool, torch.uint8],
                         ids=["adj_fp32", "adj_fp16", "adj_bf16", "adj_bool", "adj_u8"])
def test_float64_inputs_accumulate_adjacency_norm_in_float64(adj_dtype):
    g = torch.Generator().manual_seed(7)
    B, N, C, F = 2, 33, 5, 3
    a = (torch.rand(B, N, N, generator=g) < 0.5).float()
    if adj_dtype.is_floating_point:
        a = a * torch.rand(B, N, N, generator=g)  # weights not exact in float32 squares
    adj = a.to(adj_dtype)
    x = torch.randn(B, N, F, generator=g, dtype=f64)
    s = torch.randn(B, N, C, generator=g, dtype=f64, requires_grad=True)
    link = dense_diff_pool(x, adj, s, None, False, backend="torch", per_graph=True)[2]
    want = dense_diff_pool_reference(x, adj.to(f64), s.detach(), None, False)[2]
    assert link.dtype == f64
    torch.testing.assert_close(link.norm(), want, rtol=1e-13, atol=0)


def test_float64_fifteen_ones():
    """Issue 11: 15 ones in a float32 adjacency gave ||A||^2 = 15.0000008 under float64 x/s, and
    a link loss accurate to 1e-7 only."""
    N, C = 15, 15
    adj = torch.eye(N, dtype=f32)[None]
    s = 30.0 * torch.eye(N, C, dtype=f64)[None]  # S ~ I: the identity's terms are ~15 each
    s[0, 0, 1] = 29.0
    x = torch.ones(1, N, 1, dtype=f64)
    link = dense_diff_pool(x, adj, s, None, False, backend="torch")[2]
    want = dense_diff_pool_reference(x, adj.double(), s, None, False)[2]
    torch.testing.assert_close(link, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["symmetric", "one_entry_off", "nan", "bool", "strided"])
def test_torch_path_symmetry_check_is_exact(case, monkeypatch):
    """With adj_symmetric=None and C >= SYM_CHECK_MIN_C the torch path checks symmetry itself and
    skips A^T S only when every graph is symmetric: gradients equal PyG's in float64 either way."""
    from torch_geometric.nn import dense_diff_pool as pyg_pool

    from diffpool_fast.ops import coarsen_torch as ct

    g = torch.Generator().manual_seed(11)
    B, N, C, F = 3, 150, ct.SYM_CHECK_MIN_C + 3, 5
    a = torch.rand(B, N, N, generator=g, dtype=torch.float64) * (torch.rand(B, N, N, generator=g) < 0.1)
    adj = a + a.transpose(1, 2)
    want = True
    if case == "one_entry_off":
        adj[2, 140, 3] += 0.5
        want = False
    elif case == "nan":
        adj[1, 7, 7] = float("nan")
        want = False
    elif case == "bool":
        adj = adj > 0
    elif case == "strided":
        adj = adj.transpose(1, 2)  # a symmetric view with other strides
    seen = []
    real = ct.all_symmetric
    monkeypatch.setattr(ct, "all_symmetric", lambda A: seen.append(real(A)) or seen[-1])
    x = torch.randn(B, N, F, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(B, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    ours = dense_diff_pool(x, adj, s, backend="torch")
    assert seen == [want]
    if case == "nan":
        assert torch.isnan(ours[2])
        return
    ref = pyg_pool(x, adj.double() if adj.dtype == torch.bool else adj, s)
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref]
    g1 = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ours, w)), [x, s])
    g2 = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ref, w)), [x, s])
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


def test_torch_path_symmetry_check_only_where_it_pays(monkeypatch):
    from diffpool_fast.ops import coarsen_torch as ct

    calls = []
    monkeypatch.setattr(ct, "all_symmetric", lambda A: calls.append(A.shape) or True)
    adj = torch.ones(2, 6, 6)
    for C, grad, sym in ((ct.SYM_CHECK_MIN_C - 1, True, None), (ct.SYM_CHECK_MIN_C, False, None),
                         (ct.SYM_CHECK_MIN_C, True, False), (ct.SYM_CHECK_MIN_C, True, True)):
        s = torch.randn(2, 6, C, requires_grad=grad)
        dense_diff_pool(torch.randn(2, 6, 3), adj, s, backend="torch", adj_symmetric=sym)
    assert calls == []
    dense_diff_pool(torch.randn(2, 6, 3), adj, torch.randn(2, 6, ct.SYM_CHECK_MIN_C, requires_grad=True),
                    backend="torch")
    assert calls == [(2, 6, 6)]
    big = torch.ones(1, ct.SYM_CHECK_MAX_N + 1, ct.SYM_CHECK_MAX_N + 1)
    dense_diff_pool(torch.randn(1, big.shape[1], 2), big, torch.randn(1, big.shape[1], 64, requires_grad=True),
                    backend="torch")
    assert len(calls) == 1
