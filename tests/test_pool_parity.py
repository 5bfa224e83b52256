"""The torch path of ``dense_diff_pool`` against PyG's function and the float64 reference."""
import pytest
import torch

from diffpool_fast import dense_diff_pool
from diffpool_fast.ops.reference import dense_diff_pool_reference, per_graph_link_reference

pyg = pytest.importorskip("torch_geometric.nn")


def _gen():
    # Fresh inputs every run; the seed is printed by pytest on failure through the id below.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def make_inputs(B, N, F, C, *, masked, dtype=torch.float64, symmetric=True, empty_graph=True):
    g = _gen()
    x = torch.randn(B, N, F, dtype=dtype, generator=g)
    s = torch.randn(B, N, C, dtype=dtype, generator=g) * 2
    a = torch.rand(B, N, N, generator=g) < 0.3
    if symmetric:
        a = a | a.transpose(1, 2)
    adj = a.to(dtype)
    mask = None
    if masked:
        sizes = torch.randint(1, N + 1, (B,), generator=g)
        if empty_graph and B > 1:
            sizes[-1] = 0  # a graph whose nodes are all padding
        mask = torch.arange(N)[None, :] < sizes[:, None]
        adj = adj * (mask[:, :, None] & mask[:, None, :]).to(dtype)
    return x, adj, s, mask


def _outputs_and_grads(fn, x, adj, s, mask, normalize, weights):
    x = x.clone().requires_grad_()
    adj = adj.clone().requires_grad_()
    s = s.clone().requires_grad_()
    outs = fn(x, adj, s, mask, normalize)
    # A random upstream gradient for every output, the same for both implementations.
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, (x, adj, s))
    return [o.detach() for o in outs], grads


SHAPES = [
    # B, N, F, C
    (4, 37, 9, 7),
    (3, 63, 17, 10),
    (2, 1, 3, 1),  # N = 1, C = 1
    (5, 23, 4, 1),  # C = 1
    (1, 50, 5, 13),  # B = 1
]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-F{}-C{}".format(*s))
def test_parity_with_pyg_float64(shape, masked, normalize):
    B, N, F, C = shape
    x, adj, s, mask = make_inputs(B, N, F, C, masked=masked)
    g = _gen()
    weights = [torch.randn(B, C, F, dtype=x.dtype, generator=g), torch.randn(B, C, C, dtype=x.dtype, generator=g),
               torch.randn((), dtype=x.dtype, generator=g), torch.randn((), dtype=x.dtype, generator=g)]
    theirs = _outputs_and_grads(pyg.dense_diff_pool, x, adj, s, mask, normalize, weights)
    ours = _outputs_and_grads(
        lambda *a: dense_diff_pool(*a, backend="torch"), x, adj, s, mask, normalize, weights
    )
    for name, o, t in zip(["out", "out_adj", "link", "ent"], ours[0], theirs[0]):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
        assert torch.isfinite(o).all()
    for name, o, t in zip(["dx", "dadj", "ds"], ours[1], theirs[1]):
        torch.testing.assert_close(o, t, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_two_dimensional_inputs_are_a_batch_of_one():
    x, adj, s, _ = make_inputs(1, 19, 5, 6, masked=False)
    ours = dense_diff_pool(x[0], adj[0], s[0], backend="torch")
    theirs = pyg.dense_diff_pool(x[0], adj[0], s[0])
    assert ours[0].shape == (1, 6, 5) and ours[1].shape == (1, 6, 6)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12)


def test_float32_is_close_to_float64_and_not_worse_than_pyg():
    x, adj, s, mask = make_inputs(4, 200, 16, 30, masked=True)
    ref = dense_diff_pool_reference(x, adj, s, mask)
    ours = dense_diff_pool(x.float(), adj.float(), s.float(), mask, backend="torch")
    theirs = pyg.dense_diff_pool(x.float(), adj.float(), s.float(), mask)
    for o, t, r in zip(ours, theirs, ref):
        assert o.dtype == torch.float32
        err_ours = (o.double() - r).abs().max().item()
        err_theirs = (t.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err_ours <= 1e-5 * scale + 1e-12
        assert err_ours <= 4 * err_theirs + 1e-6 * scale


@pytest.mark.parametrize("adj_dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_adjacency_dtypes(adj_dtype):
    x, adj, s, mask = make_inputs(3, 41, 8, 11, masked=True, dtype=torch.float32)
    ref = dense_diff_pool_reference(x.double(), adj.double(), s.double(), mask)
    ours = dense_diff_pool(x, adj.to(adj_dtype), s, mask, backend="torch")
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=2e-5, atol=2e-6)


def test_uint8_weighted_adjacency():
    g = _gen()
    x, _, s, mask = make_inputs(2, 21, 4, 5, masked=True)
    adj = torch.randint(0, 256, (2, 21, 21), dtype=torch.uint8, generator=g)
    ref = dense_diff_pool_reference(x, adj.double(), s, mask, normalize=False)
    ours = dense_diff_pool(x, adj, s, mask, normalize=False, backend="torch")
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_return_their_dtype(dtype):
    x, adj, s, mask = make_inputs(2, 30, 8, 7, masked=True, dtype=torch.float32)
    ref = dense_diff_pool_reference(x.to(dtype).double(), adj.double(), s.to(dtype).double(), mask)
    xs, ss = x.to(dtype).requires_grad_(), s.to(dtype).requires_grad_()
    ours = dense_diff_pool(xs, adj.to(dtype), ss, mask, backend="torch")
    for o, r in zip(ours, ref):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), r, rtol=2e-2, atol=2e-2)
    sum(o.float().sum() for o in ours).backward()
    assert xs.grad.dtype == dtype and torch.isfinite(ss.grad.float()).all()


def test_fully_padded_batch_gives_zeros_and_finite_losses():
    x, adj, s, _ = make_inputs(3, 12, 4, 5, masked=False)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    adj = torch.zeros_like(adj)
    xs, adjs, ss = (t.clone().requires_grad_() for t in (x, adj, s))
    for normalize in (True, False, "graph"):
        for per_graph in (False, True):
            out, out_adj, link, ent = dense_diff_pool(
                xs, adjs, ss, mask, normalize, backend="torch", per_graph=per_graph
            )
            assert (out == 0).all() and (out_adj == 0).all()
            assert (link == 0).all() and (ent == 0).all()
            grads = torch.autograd.grad(out.sum() + out_adj.sum() + link.sum() + ent.sum(), (xs, adjs, ss))
            for gr in grads:
                assert torch.isfinite(gr).all()


def test_zero_residual_has_finite_gradient():
    # A = S S^T exactly: the link loss is 0 and its gradient must not be NaN (sqrt at 0).
    g = _gen()
    s = torch.randn(2, 9, 4, dtype=torch.float64, generator=g)
    S = torch.softmax(s, -1)
    adj = (S @ S.transpose(1, 2)).requires_grad_()
    x = torch.randn(2, 9, 3, dtype=torch.float64, generator=g)
    ss = s.clone().requires_grad_()
    _, _, link, _ = dense_diff_pool(x, adj, ss, normalize=False, backend="torch")
    assert link.item() < 1e-6
    grads = torch.autograd.grad(link, (adj, ss))
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_graph_normalisation_and_per_graph_losses():
    x, adj, s, mask = make_inputs(5, 31, 4, 6, masked=True)
    per_ref = per_graph_link_reference(adj, s, mask)
    n = mask.sum(1).double()
    _, _, link_pg, ent_pg = dense_diff_pool(x, adj, s, mask, "graph", backend="torch", per_graph=True)
    torch.testing.assert_close(link_pg, per_ref, rtol=1e-10, atol=1e-12)
    # batch value: the mean over graphs that have a real node
    _, _, link, ent = dense_diff_pool(x, adj, s, mask, "graph", backend="torch")
    torch.testing.assert_close(link, per_ref[n > 0].mean(), rtol=1e-10, atol=1e-12)
    # per-graph entropy: mean row entropy over each graph's real nodes
    S = torch.softmax(s, -1) * mask[..., None]
    h = (-S * torch.log(S + 1e-15)).sum(-1).sum(-1)
    want = torch.where(n > 0, h / n.clamp_min(1), torch.zeros_like(h))
    torch.testing.assert_close(ent_pg, want, rtol=1e-10, atol=1e-12)
    # the batch entropy is PyG's whatever the link normalisation
    torch.testing.assert_close(ent, pyg.dense_diff_pool(x, adj, s, mask)[3], rtol=1e-10, atol=1e-12)
    # per-graph "none"/"numel" are the per-graph Frobenius norms
    R = adj - S @ S.transpose(1, 2)
    norms = R.flatten(1).norm(dim=1)
    _, _, l_none, _ = dense_diff_pool(x, adj, s, mask, False, backend="torch", per_graph=True)
    _, _, l_numel, _ = dense_diff_pool(x, adj, s, mask, True, backend="torch", per_graph=True)
    torch.testing.assert_close(l_none, norms, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(l_numel, norms / 31**2, rtol=1e-9, atol=1e-12)


def test_non_contiguous_inputs():
    x, adj, s, mask = make_inputs(3, 26, 7, 9, masked=True)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    adjt = adj.transpose(1, 2).contiguous().transpose(1, 2)
    st = s.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous() and not st.is_contiguous()
    for o, r in zip(dense_diff_pool(xt, adjt, st, mask, backend="torch"), dense_diff_pool_reference(x, adj, s, mask)):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_gradcheck_float64(masked):
    x, adj, s, mask = make_inputs(2, 7, 3, 4, masked=masked, empty_graph=False)
    inputs = tuple(t.clone().requires_grad_() for t in (x, adj, s))
    for normalize in (True, False, "graph"):
        def fn(x, adj, s, normalize=normalize):
            return dense_diff_pool(x, adj, s, mask, normalize, backend="torch")

        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_symmetric_promise_gives_the_same_gradients(masked):
    x, adj, s, mask = make_inputs(3, 33, 6, 7, masked=masked, symmetric=True)
    inputs = tuple(t.clone().requires_grad_() for t in (x, adj, s))
    for normalize in (True, "graph"):
        def fn(x, adj, s, sym):
            return dense_diff_pool(x, adj, s, mask, normalize, backend="torch", adj_symmetric=sym)

        g = _gen()
        w = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in fn(*inputs, None)]
        grads = [
            torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(fn(*inputs, sym), w)), inputs)
            for sym in (None, True)
        ]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the promise is what it says: for a non-symmetric adj the s gradient differs
    adj_ns = adj.clone()
    adj_ns[:, 0, 1:] = 0.0
    adj_ns[:, 1:, 0] = 1.0
    ss = s.clone().requires_grad_()
    d = [torch.autograd.grad(
        dense_diff_pool(x, adj_ns, ss, mask, backend="torch", adj_symmetric=sym)[1].pow(2).sum(), ss)[0]
        for sym in (None, True)]
    assert not torch.allclose(d[0], d[1])


def test_symmetric_promise_skips_the_backward_pass_over_adj():
    from torch.utils._python_dispatch import TorchDispatchMode

    class BmmOperands(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
                self.shapes.append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
            return func(*args, **(kwargs or {}))

    B, N, C = 2, 40, 5
    x, adj, s, mask = make_inputs(B, N, 3, C, masked=True, dtype=torch.float32)
    for sym, expect in ((None, 1), (True, 0)):
        ss = s.clone().requires_grad_()
        o = dense_diff_pool(x, adj, ss, mask, backend="torch", adj_symmetric=sym)
        with BmmOperands() as rec:
            (o[1].sum() + o[2]).backward()
        assert sum((B, N, N) in shapes for shapes in rec.shapes) == expect
