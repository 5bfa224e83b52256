"""sparse_diff_pool on PyG's sparse batch format against the dense ops on the dense form.

Every random test draws a fresh seed and prints it (pytest shows it on failure); rerun one case
with ``SPARSE_POOL_SEED=<seed>``.
"""
import os
import re
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffpool_fast import BACKEND_ENV, dense_diff_pool
from diffpool_fast.ops.sparse_pool import sparse_diff_pool

tg_utils = pytest.importorskip("torch_geometric.utils")
tg_nn = pytest.importorskip("torch_geometric.nn")

MODES = [True, False, "numel", "none", "graph"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def _seed() -> int:
    seed = int(os.environ.get("SPARSE_POOL_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    return seed


def random_batch(gen, dtype=F64, sizes=None, C=None, F=None):
    """A PyG-style batch with isolated nodes, single-node and edgeless graphs, duplicate edges,
    self-loops and weighted edges; sizes, C and F are rarely powers of two."""
    if sizes is None:
        nb = int(torch.randint(3, 7, (1,), generator=gen))
        sizes = [int(v) for v in torch.randint(1, 14, (nb,), generator=gen)]
        sizes[int(torch.randint(0, nb, (1,), generator=gen))] = 1  # a single-node graph
    C = C or int(torch.randint(2, 8, (1,), generator=gen))
    F = F or int(torch.randint(1, 6, (1,), generator=gen))
    batch = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(sizes)])
    N = batch.numel()
    ptr = [0]
    for n in sizes:
        ptr.append(ptr[-1] + n)
    edgeless = max(range(len(sizes)), key=lambda b: sizes[b])  # the largest graph has no edges
    rows, cols = [], []
    for b, n in enumerate(sizes):
        if b == edgeless and len(sizes) > 1:
            continue
        m = int(torch.randint(0, 2 * n + 1, (1,), generator=gen))
        # nodes n-1 (and beyond) stay isolated in every graph of 3+ nodes
        span = max(1, n - 1) if n >= 3 else n
        r = torch.randint(0, span, (m,), generator=gen) + ptr[b]
        c = torch.randint(0, span, (m,), generator=gen) + ptr[b]
        rows += [r, r[: m // 3]]  # duplicates of a third of the edges
        cols += [c, c[: m // 3]]
        rows.append(torch.tensor([ptr[b]]))  # a self-loop
        cols.append(torch.tensor([ptr[b]]))
    row, col = torch.cat(rows), torch.cat(cols)
    perm = torch.randperm(row.numel(), generator=gen)  # unsorted, as a user may give them
    edge_index = torch.stack([row[perm], col[perm]])
    w = torch.rand(edge_index.shape[1], generator=gen, dtype=F64).to(dtype) * 2
    x = torch.randn(N, F, generator=gen, dtype=F64).to(dtype)
    s = (torch.randn(N, C, generator=gen, dtype=F64) * 2).to(dtype)
    return x, edge_index, s, batch, w


def dense_form(x, edge_index, s, batch, w, B):
    xd, mask = tg_utils.to_dense_batch(x, batch, batch_size=B)
    sd, _ = tg_utils.to_dense_batch(s, batch, batch_size=B)
    adj = tg_utils.to_dense_adj(edge_index, batch, w, batch_size=B)
    return xd, adj, sd, mask


def _weights(outs, gen):
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]


def _objective(outs, cot):
    return sum((o * c).sum() for o, c in zip(outs, cot))


def _edge_grad(g_adj, edge_index, batch):
    """d/dw_e of a loss through the dense adjacency: dL/dA[graph, i - ptr, j - ptr]."""
    counts = torch.bincount(batch)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    i, j = edge_index
    b = batch[i]
    return g_adj[b, i - ptr[b], j - ptr[b]]


def _check_equals_dense(x, ei, s, batch, w, B, gen, normalize=True, per_graph=False):
    """sparse_diff_pool against dense_diff_pool (torch path) on the dense form, float64: the four
    outputs and the gradients of x, s and edge_weight for random cotangents."""
    xs, ss, ws = (t.detach().clone().requires_grad_(True) for t in (x, s, w))
    ours = sparse_diff_pool(xs, ei, ss, batch, ws, normalize, num_graphs=B, per_graph=per_graph)
    xd, adj, sd, mask = dense_form(x.detach(), ei, s.detach(), batch, w.detach(), B)
    xd, adj, sd = (t.clone().requires_grad_(True) for t in (xd, adj, sd))
    ref = dense_diff_pool(xd, adj, sd, mask, normalize, per_graph=per_graph, backend="torch")
    for name, a, b in zip(("out", "out_adj", "link", "ent"), ours, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")

    cot = _weights(ours, gen)
    gx, gs, gw = torch.autograd.grad(_objective(ours, cot), (xs, ss, ws))
    gxd, gsd, gadj = torch.autograd.grad(_objective(ref, cot), (xd, sd, adj))
    torch.testing.assert_close(gx, gxd[mask], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gs, gsd[mask], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, _edge_grad(gadj, ei, batch), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("per_graph", [False, True])
def test_equals_dense_diff_pool_float64(normalize, per_graph):
    gen = torch.Generator().manual_seed(_seed())
    for trial in range(3):
        x, ei, s, batch, w = random_batch(gen)
        extra = trial  # trailing graphs with no nodes
        B = int(batch.max()) + 1 + extra
        _check_equals_dense(x, ei, s, batch, w, B, gen, normalize, per_graph)


@pytest.mark.parametrize("normalize", [True, False])
def test_equals_pyg_dense_diff_pool_float64(normalize):
    gen = torch.Generator().manual_seed(_seed())
    for _ in range(3):
        x, ei, s, batch, w = random_batch(gen)
        B = int(batch.max()) + 1
        x, s, w = (t.clone().requires_grad_(True) for t in (x, s, w))
        ours = sparse_diff_pool(x, ei, s, batch, w, normalize)
        # PyG's dense form, differentiated through to_dense_adj (d/dw_e = dL/dA[i_e, j_e])
        xd, mask = tg_utils.to_dense_batch(x, batch, batch_size=B)
        sd, _ = tg_utils.to_dense_batch(s, batch, batch_size=B)
        adj = tg_utils.to_dense_adj(ei, batch, w, batch_size=B)
        ref = tg_nn.dense_diff_pool(xd, adj, sd, mask, normalize)
        for name, a, b in zip(("out", "out_adj", "link", "ent"), ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
        cot = _weights(ours, gen)
        g1 = torch.autograd.grad(_objective(ours, cot), (x, s, w))
        g2 = torch.autograd.grad(_objective(ref, cot), (x, s, w))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_unbatched_and_int32_indices():
    gen = torch.Generator().manual_seed(_seed())
    x, ei, s, batch, w = random_batch(gen, sizes=[11])
    a = sparse_diff_pool(x, ei, s, None, w, "graph")
    b = sparse_diff_pool(x, ei.int(), s, batch.int(), w, "graph")
    xd, adj, sd, mask = dense_form(x, ei, s, batch, w, 1)
    c = dense_diff_pool(xd, adj, sd, mask, "graph", backend="torch")
    for u, v, r in zip(a, b, c):
        torch.testing.assert_close(u, r, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(v, r, rtol=1e-9, atol=1e-11)
    # no edge_weight: every edge counts 1 (duplicates 2, ...), like to_dense_adj without weights
    d = sparse_diff_pool(x, ei, s, batch)
    e = dense_diff_pool(xd, tg_utils.to_dense_adj(ei, batch, batch_size=1), sd, mask, backend="torch")
    for u, r in zip(d, e):
        torch.testing.assert_close(u, r, rtol=1e-9, atol=1e-11)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(_seed())
    x, ei, s, batch, w = random_batch(gen, sizes=[5, 5, 5, 3], C=4, F=3)
    ref = sparse_diff_pool(x, ei, s, batch, w)
    xt = x.t().contiguous().t()  # column-major
    st = torch.stack([s, -s], 2).reshape(s.shape[0], -1)[:, ::2]  # every other column: s, strided
    eit = ei.t().contiguous().t()
    assert not (xt.is_contiguous() or st.is_contiguous() or eit.is_contiguous())
    assert torch.equal(st, s)
    for u, v in zip(sparse_diff_pool(xt, eit, st, batch, w[::1]), ref):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_no_edges_at_all():
    gen = torch.Generator().manual_seed(_seed())
    x, _, s, batch, _ = random_batch(gen, sizes=[4, 1, 6])
    ei = torch.zeros(2, 0, dtype=torch.int64)
    for normalize in MODES:
        ours = sparse_diff_pool(x, ei, s, batch, torch.zeros(0, dtype=F64), normalize)
        xd, mask = tg_utils.to_dense_batch(x, batch)
        sd, _ = tg_utils.to_dense_batch(s, batch)
        ref = dense_diff_pool(xd, torch.zeros(3, 6, 6, dtype=F64), sd, mask, normalize, backend="torch")
        for u, r in zip(ours, ref):
            torch.testing.assert_close(u, r, rtol=1e-9, atol=1e-11)


# graph sizes that make every kind of size bucket: a lone graph ("slice": 1, 3, 17, 40), equal
# sizes one after the other ("view": the three 5s) and mixed sizes gathered with padding ("pad":
# 9 and 12)
BUCKET_SIZES = [5, 5, 5, 3, 9, 17, 12, 1, 40]


@pytest.mark.parametrize("regime", ["near_converged", "spread"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bucket_kinds_float64(symmetric, regime):
    """Every bucket kind: float64 equality with the dense op, outputs and the gradients of x, s
    and edge_weight. ``near_converged``: S near one-hot on most rows (the hard-cluster split of
    the link loss is active) and spread out on the rest; ``spread``: no row above 1/2 (the split
    is skipped, H = 0). ``symmetric``: every edge also reversed, with its own weight (a symmetric
    pattern, whose backward takes one pass for G + G^T; A itself is not symmetric)."""
    gen = torch.Generator().manual_seed(_seed())
    x, ei, _, batch, w = random_batch(gen, sizes=BUCKET_SIZES, C=6, F=3)
    if symmetric:
        ei = torch.cat([ei, ei.flip(0)], 1)
        w = torch.cat([w, torch.rand(w.shape, generator=gen, dtype=F64)])
    N, C = x.shape[0], 6
    if regime == "near_converged":
        hard = torch.randint(0, C, (N,), generator=gen)
        s = 9.0 * torch.nn.functional.one_hot(hard, C).to(F64) + 0.3 * torch.randn(N, C, generator=gen, dtype=F64)
        s[torch.rand(N, generator=gen) < 0.25] *= 0.05  # about a quarter of the rows spread out
    else:
        s = 0.5 * torch.randn(N, C, generator=gen, dtype=F64).clamp(-1.0, 1.0)  # max P <= e / (e + 5) < 1/2
        assert float(s.softmax(-1).max()) < 0.5
    B = len(BUCKET_SIZES)
    for per_graph in (False, True):
        _check_equals_dense(x, ei, s, batch, w, B, gen, per_graph=per_graph)


def test_gram_in_chunks_every_bucket_kind():
    """The float64 Gram D_b^T D_b and the per-slot row sums, converted a few rows at a time (7,
    so every graph of 8+ nodes spans several chunks), against float64 sums; and their
    gradient against autograd of the float64 formula."""
    from diffpool_fast.ops.sparse_blocks import Gram64, GraphBlocks

    gen = torch.Generator().manual_seed(_seed())
    counts = torch.tensor(BUCKET_SIZES)
    N, B, C, slots = int(counts.sum()), len(BUCKET_SIZES), 5, 11
    batch = torch.repeat_interleave(torch.arange(B), counts)
    D = torch.randn(N, C, generator=gen, requires_grad=True)
    slot = torch.randint(0, slots, (N,), generator=gen)
    G, K = Gram64.apply(D, GraphBlocks(counts, B, N), slot, slots, 7)
    D64 = D.detach().double().requires_grad_(True)
    G_ref = torch.stack([D64[batch == b].t() @ D64[batch == b] for b in range(B)])
    K_ref = D64.new_zeros(slots, C).index_add(0, slot, D64)
    assert G.dtype == K.dtype == F64
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K, K_ref, rtol=1e-12, atol=1e-12)
    wG, wK = torch.randn(G.shape, generator=gen, dtype=F64), torch.randn(K.shape, generator=gen, dtype=F64)
    (g,) = torch.autograd.grad((G * wG).sum() + (K * wK).sum(), D)
    (g_ref,) = torch.autograd.grad((G_ref * wG).sum() + (K_ref * wK).sum(), D64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-5)


def test_double_backward_refuses():
    """The hand-written backward passes are not differentiable: a second derivative must be an
    error, never a wrong value."""
    gen = torch.Generator().manual_seed(_seed())
    x, ei, s, batch, w = random_batch(gen, sizes=[4, 6])
    x, s, w = (t.clone().requires_grad_(True) for t in (x, s, w))
    for wrt in ((x,), (s,), (w,), (x, s, w)):
        out, out_adj, link, ent = sparse_diff_pool(x, ei, s, batch, w)
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(out.sum() + out_adj.sum() + link + ent, wrt, create_graph=True)
    out, out_adj, link, ent = sparse_diff_pool(x, ei, s, batch, w)  # first order still works
    assert all(g is not None for g in torch.autograd.grad(out.sum() + link + ent, (x, s, w)))


@pytest.mark.parametrize("normalize", [True, "graph"])
def test_gradcheck(normalize):
    gen = torch.Generator().manual_seed(_seed())
    x, ei, s, batch, w = random_batch(gen, sizes=[3, 1, 4], C=3, F=2)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, s, w))

    def fn(x, s, w):
        return sparse_diff_pool(x, ei, s, batch, w, normalize, num_graphs=4)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float32_random_assignments_accurate():
    """Spread-out S: float32 within a few float32 ulps of float64, like PyG's float32."""
    gen = torch.Generator().manual_seed(_seed())
    for _ in range(5):
        x, ei, s, batch, w = random_batch(gen, sizes=[int(v) for v in torch.randint(20, 60, (4,), generator=gen)])
        exact = sparse_diff_pool(x, ei, s, batch, w, False)
        got = sparse_diff_pool(x.float(), ei, s.float(), batch, w.float(), False)
        for a, b in zip(got, exact):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-5)


def _two_cliques(self_loops: bool, nodes: int = 20):
    N = 2 * nodes
    cluster = torch.arange(N) // nodes
    A = (cluster[:, None] == cluster[None, :]).to(F64)
    if not self_loops:
        A.fill_diagonal_(0)
    return cluster, A, A.nonzero().t().contiguous()


@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("C", [2, 3])
def test_near_converged_link_loss_float32(self_loops, C):
    """Two 20-node cliques (A = block-diagonal ones, with or without the diagonal), logits =
    scale * one-hot of the node's clique: as S -> one-hot, A - S S^T -> 0 (with self-loops) and
    the identity ||A||^2 - 2 tr(S^T A S) + ||S^T S||^2 cancels. Our float32 link loss must be at
    least as close to the float64 value as PyG's float32 dense formula, and its gradient must
    not vanish where the float64 gradient does not."""
    cluster, A, ei = _two_cliques(self_loops)
    N = A.shape[0]
    x = torch.ones(N, 1)
    errs = []
    for scale in range(21):
        s64 = (scale * torch.nn.functional.one_hot(cluster, C).to(F64)).requires_grad_(True)
        exact = tg_nn.dense_diff_pool(x.double()[None], A[None], s64[None], normalize=False)[2]
        (g64,) = torch.autograd.grad(exact, s64)
        s_pyg = s64.detach().float().requires_grad_(True)
        pyg = tg_nn.dense_diff_pool(x[None], A.float()[None], s_pyg[None], normalize=False)[2]
        s32 = s64.detach().float().requires_grad_(True)
        ours = sparse_diff_pool(x, ei, s32, normalize=False)[2]
        (g32,) = torch.autograd.grad(ours, s32)
        exact, ours, pyg = exact.item(), ours.item(), pyg.item()
        e_ours, e_pyg = abs(ours - exact), abs(pyg - exact)
        errs.append((scale, exact, e_ours, e_pyg))
        # as accurate as PyG's float32, or within 4 float32 ulps of the value where both are at
        # rounding level (small scales)
        assert e_ours <= max(e_pyg, 4 * torch.finfo(torch.float32).eps * exact), errs[-1]
        if scale >= 8:  # where PyG's float32 formula loses digits, we must not
            assert e_ours <= 1e-3 * exact, errs[-1]
        big = g64.abs() > 1e-3 * float(g64.abs().max())
        if float(g64.abs().max()) > 1e-12:
            assert bool((g32[big] != 0).all()), (scale, g32, g64)
            assert bool((torch.sign(g32[big]) == torch.sign(g64[big].float())).all()), (scale, g32, g64)
            rel = float((g32.double() - g64).norm() / g64.norm())
            assert rel < 1e-4, (scale, rel)
    print("scale, exact, |ours - exact|, |pyg32 - exact|")
    for row in errs:
        print(*row)


def test_half_precision_inputs():
    gen = torch.Generator().manual_seed(_seed())
    x, ei, s, batch, w = random_batch(gen, sizes=[9, 5, 12])
    exact = sparse_diff_pool(x, ei, s, batch, w)
    got = sparse_diff_pool(x.bfloat16(), ei, s.bfloat16(), batch, w.bfloat16())
    for a, b in zip(got, exact):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2)


def test_nan_inputs_propagate():
    gen = torch.Generator().manual_seed(_seed())
    x, ei, s, batch, w = random_batch(gen, sizes=[6, 5, 7])
    s_bad = s.clone()
    s_bad[7, 1] = float("nan")  # graph 1
    for normalize in MODES:
        for per_graph in (False, True):
            out, out_adj, link, ent = sparse_diff_pool(x, ei, s_bad, batch, w, normalize, per_graph=per_graph)
            assert bool(out[1].isnan().any()) and bool(out_adj[1].isnan().any())
            if per_graph:
                assert bool(link[1].isnan()) and bool(ent[1].isnan())
                assert bool(link[[0, 2]].isfinite().all()), "a NaN in graph 1 leaked into others"
            else:
                assert bool(link.isnan()) and bool(ent.isnan()), (normalize, link, ent)
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    out = sparse_diff_pool(x_bad, ei, s, batch, w)[0]
    assert bool(out[0].isnan().any()) and bool(out[1:].isfinite().all())
    for bad in (float("nan"), float("inf")):
        w_bad = w.clone()
        w_bad[3] = bad
        with pytest.raises(ValueError, match="edge_weight"):
            sparse_diff_pool(x, ei, s, batch, w_bad)


def _base():
    gen = torch.Generator().manual_seed(0)
    return dict(zip(("x", "edge_index", "s", "batch", "edge_weight"), random_batch(gen, sizes=[4, 3, 5])))


def _bad_inputs():
    b = _base()
    ei, batch, w = b["edge_index"], b["batch"], b["edge_weight"]
    N = b["x"].shape[0]
    cross = ei.clone()
    cross[1, 0] = N - 1 if int(batch[ei[0, 0]]) != int(batch[N - 1]) else 0
    unsorted = batch.flip(0)
    return [
        ("edge_index float", dict(edge_index=ei.double()), TypeError, "edge_index"),
        ("edge_index int16", dict(edge_index=ei.short()), TypeError, "edge_index"),
        ("edge_index [3, E]", dict(edge_index=torch.cat([ei, ei[:1]])), ValueError, "edge_index"),
        ("edge_index 1-D", dict(edge_index=ei[0]), ValueError, "edge_index"),
        ("edge_index too large", dict(edge_index=torch.cat([ei, torch.tensor([[0], [N]])], 1),
                                      edge_weight=torch.cat([w, w[:1]])), ValueError, "edge_index"),
        ("edge_index negative", dict(edge_index=torch.cat([ei, torch.tensor([[-1], [0]])], 1),
                                     edge_weight=torch.cat([w, w[:1]])), ValueError, "edge_index"),
        ("edge joins graphs", dict(edge_index=cross), ValueError, "joins two graphs"),
        ("edge_index list", dict(edge_index=ei.tolist()), TypeError, "edge_index"),
        ("batch unsorted", dict(batch=unsorted), ValueError, "batch must be sorted"),
        ("batch too short", dict(batch=batch[:-1]), ValueError, "batch"),
        ("batch float", dict(batch=batch.double()), TypeError, "batch"),
        ("batch negative", dict(batch=batch - 1), ValueError, "batch"),
        ("s rows", dict(s=b["s"][:-1]), ValueError, "x and s must have one row per node"),
        ("x rows", dict(x=b["x"][:-1]), ValueError, "x and s must have one row per node"),
        ("x and s rows", dict(x=b["x"][:-1], s=b["s"][:-1]), ValueError, "batch must have shape [N]"),
        ("x 1-D", dict(x=b["x"][:, 0]), ValueError, "x must be [N, F]"),
        ("s 3-D", dict(s=b["s"][None]), ValueError, "s must be [N, C]"),
        ("x int", dict(x=b["x"].long()), TypeError, "x must be a floating"),
        ("s int", dict(s=b["s"].long()), TypeError, "s (assignment logits)"),
        ("s no clusters", dict(s=b["s"][:, :0]), ValueError, "cluster"),
        ("edge_weight negative", dict(edge_weight=w - 5.0), ValueError, "edge_weight"),
        ("edge_weight nan", dict(edge_weight=w * float("nan")), ValueError, "edge_weight"),
        ("edge_weight inf", dict(edge_weight=w + float("inf")), ValueError, "edge_weight"),
        ("edge_weight length", dict(edge_weight=w[:-1]), ValueError, "edge_weight"),
        ("edge_weight int", dict(edge_weight=w.long()), TypeError, "edge_weight"),
        ("edge_weight on meta", dict(edge_weight=w.to("meta")), ValueError, "device"),
        ("num_graphs too small", dict(num_graphs=2), ValueError, "num_graphs"),
        ("num_graphs float", dict(num_graphs=3.0), TypeError, "num_graphs"),
        ("normalize bad", dict(normalize="mean"), ValueError, "normalize"),
        ("per_graph not bool", dict(per_graph=1), TypeError, "per_graph"),
        ("backend triton", dict(backend="triton"), ValueError, "no Triton kernel"),
        ("backend unknown", dict(backend="cuda"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, change, exc, text = case
    kwargs = {**_base(), **change}
    with pytest.raises(exc, match=re.escape(text)):
        sparse_diff_pool(**kwargs)


def test_backend_choice(monkeypatch):
    b = _base()
    ref = sparse_diff_pool(**b)
    for backend in ("auto", "torch"):
        for u, v in zip(sparse_diff_pool(**b, backend=backend), ref):
            torch.testing.assert_close(u, v)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        sparse_diff_pool(**b)
    monkeypatch.setenv(BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        sparse_diff_pool(**b)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    for u, v in zip(sparse_diff_pool(**b, backend="auto"), ref):
        torch.testing.assert_close(u, v)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements, and bytes) any ATen op returns."""

    def __init__(self):
        super().__init__()
        self.numel = self.nbytes = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout == torch.strided:
                n, nb = t.numel(), t.numel() * t.element_size()
            else:  # a sparse result: its stored values
                n = t._nnz()
                nb = n * t.element_size()
            if n > self.numel:
                self.numel, self.op = n, func
            self.nbytes = max(self.nbytes, nb)
        return out


def test_memory_past_the_n_squared_wall():
    """N = 200,000 nodes, ~2M edges, C=16, F=8: forward + backward on the CPU with no tensor of
    N_max^2 / 1000 elements (N_max^2 float32 would be 160 GB)."""
    gen = torch.Generator().manual_seed(_seed())
    N, E, C, F = 200_000, 2_000_000, 16, 8
    row = torch.randint(0, N, (E,), generator=gen)
    col = (row + torch.randint(-200, 201, (E,), generator=gen)).clamp(0, N - 1)
    ei = torch.stack([row, col])
    x = torch.randn(N, F, generator=gen, requires_grad=True)
    s = torch.randn(N, C, generator=gen, requires_grad=True)
    w = torch.rand(E, generator=gen, requires_grad=True)
    t0 = time.perf_counter()
    with LargestTensor() as rec:
        out, out_adj, link, ent = sparse_diff_pool(x, ei, s, None, w, "graph")
        (out.sum() + out_adj.sum() + link + ent).backward()
    print(f"{time.perf_counter() - t0:.2f} s; largest tensor {rec.numel} elements, {rec.nbytes} bytes ({rec.op})")
    assert rec.numel < N * N / 1000
    assert rec.nbytes <= 8 * max(2 * E, N * (C + F)), (rec.nbytes, rec.op)
    assert x.grad is not None and s.grad is not None and w.grad is not None
    assert bool(torch.isfinite(link)) and link.item() > 0


@pytest.mark.parametrize("normalize", [True, "graph"])
def test_num_clusters_equals_dense_float64(normalize):
    """Per-graph cluster counts on the edge list: the dense op's values and gradients."""
    gen = torch.Generator().manual_seed(_seed())
    for trial in range(3):
        x, ei, s, batch, w = random_batch(gen, C=7)
        B = int(batch.max()) + 1 + trial
        k = torch.randint(1, 8, (B,), generator=gen)
        k[0] = 1
        x, s, w = (t.clone().requires_grad_(True) for t in (x, s, w))
        ours = sparse_diff_pool(x, ei, s, batch, w, normalize, num_graphs=B, per_graph=True, num_clusters=k)
        xd, adj, sd, mask = dense_form(x.detach(), ei, s.detach(), batch, w.detach(), B)
        xd, adj, sd = (t.clone().requires_grad_(True) for t in (xd, adj, sd))
        ref = dense_diff_pool(xd, adj, sd, mask, normalize, per_graph=True, backend="torch", num_clusters=k)
        for name, a, b in zip(("out", "out_adj", "link", "ent"), ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
        real = torch.arange(7)[None, :] < k[:, None]
        assert (ours[0].detach()[~real] == 0).all()
        cot = _weights(ours, gen)
        gx, gs, gw = torch.autograd.grad(_objective(ours, cot), (x, s, w))
        gxd, gsd, gadj = torch.autograd.grad(_objective(ref, cot), (xd, sd, adj))
        torch.testing.assert_close(gx, gxd[mask], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gs, gsd[mask], rtol=1e-9, atol=1e-11)
        assert (gs[~real[batch]] == 0).all()
        torch.testing.assert_close(gw, _edge_grad(gadj, ei, batch), rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="num_clusters"):
        sparse_diff_pool(x, ei, s, batch, w, num_graphs=B, num_clusters=torch.zeros(B, dtype=torch.long))
