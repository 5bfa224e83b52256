"""Inputs and entry points: bad inputs raise clear errors naming the argument and the shapes;
masks (and their check inside torch.compile); what padding means for each normalisation;
TorchScript. The long table of bad inputs is tests/test_bad_inputs.py."""
import warnings
from typing import Optional

import pytest
import torch
from torch import Tensor

from diffpool_fast import dense_diff_pool


def ok(B=2, N=6, F=3, C=4):
    return torch.randn(B, N, F), torch.rand(B, N, N), torch.randn(B, N, C), torch.ones(B, N, dtype=torch.bool)


def call(x, adj, s, mask=None, **kw):
    return dense_diff_pool(x, adj, s, mask, backend="torch", **kw)


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda x, a, s, m: (x[:1], a, s, m), ValueError, r"batch sizes disagree.*x \[1, 6, 3\].*adj \[2, 6, 6\]"),
        (lambda x, a, s, m: (x, a[:, :5, :5], s, m), ValueError, r"node counts disagree.*adj \[2, 5, 5\]"),
        (lambda x, a, s, m: (x, a, s[:, :5], m), ValueError, r"node counts disagree.*s \[2, 5, 4\]"),
        (lambda x, a, s, m: (x, a[:, :, :5], s, m), ValueError, r"adj must be square.*\[2, 6, 5\]"),
        (lambda x, a, s, m: (x, a, s, m[:, :5]), ValueError, r"mask must have shape \[B, N\] = \[2, 6\].*\[2, 5\]"),
        (lambda x, a, s, m: (x, a, s, m.float() * 0.5), ValueError,
         r"mask of dtype torch.float32 must hold only 0 and 1"),
        (lambda x, a, s, m: (x, a, s, torch.ones(2, 6, dtype=torch.complex64)), TypeError, r"mask must be bool"),
        (lambda x, a, s, m: (x.long(), a, s, m), TypeError,
         r"x must be a floating-point tensor, got dtype torch.int64"),
        (lambda x, a, s, m: (x, a, s.int(), m), TypeError, r"s \(assignment logits\) must be a floating-point"),
        (lambda x, a, s, m: (x, a.long(), s, m), TypeError,
         r"adj must be floating point, bool or uint8, got dtype torch.int64"),
        (lambda x, a, s, m: (x[0, 0], a, s, m), ValueError, r"x must be \[B, N, F\].*1-D tensor of shape \[3\]"),
        (lambda x, a, s, m: (x, a.unsqueeze(0), s, m), ValueError, r"adj must be \[B, N, N\].*4-D"),
        (lambda x, a, s, m: (x.numpy(), a, s, m), TypeError, r"x must be a torch.Tensor, got ndarray"),
        (lambda x, a, s, m: (x, a, s, m.tolist()), TypeError, r"mask must be a torch.Tensor or None, got list"),
        (lambda x, a, s, m: (x, a, s, m.to("meta")), ValueError, r"one device.*mask on meta"),
        (lambda x, a, s, m: (x, a, s[..., :0], m), ValueError, r"at least one cluster"),
    ],
    ids=[
        "batch", "adj-nodes", "s-nodes", "adj-square", "mask-shape", "mask-fraction", "mask-complex",
        "x-int", "s-int", "adj-int", "x-1d", "adj-4d", "x-numpy", "mask-list", "device", "no-cluster",
    ],
)
def test_bad_input_errors(mutate, exc, pattern):
    args = mutate(*ok())
    with pytest.raises(exc, match=pattern):
        call(*args)


def test_bad_normalize_and_per_graph():
    x, a, s, m = ok()
    with pytest.raises(ValueError,
                       match=r"normalize must be True, False or one of \('numel', 'none', 'graph'\), got 'mean'"):
        call(x, a, s, m, normalize="mean")
    with pytest.raises(TypeError, match="per_graph must be a bool"):
        call(x, a, s, m, per_graph="yes")


def test_accepted_mask_forms_agree():
    x, a, s, _ = ok()
    m = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    want = call(x, a, s, m)
    for form in (m.to(torch.uint8), m.float(), m.long(), m.unsqueeze(-1)):
        for got, w in zip(call(x, a, s, form), want):
            torch.testing.assert_close(got, w)
    # a 1-D mask for a batch of one (2-D inputs)
    got = call(x[0], a[0], s[0], m[0])
    for g1, w in zip(got, call(x[:1], a[:1], s[:1], m[:1])):
        torch.testing.assert_close(g1, w)


def test_empty_shapes_give_finite_losses():
    for B, N in ((2, 0), (0, 5)):
        out, out_adj, link, ent = call(torch.randn(B, N, 3), torch.zeros(B, N, N), torch.randn(B, N, 4))
        assert out.shape == (B, 4, 3) and out_adj.shape == (B, 4, 4)
        assert torch.isfinite(link) and torch.isfinite(ent)


# --- normalize="graph" counts real node pairs only; "numel"/"none" are PyG's, padding included --

def _dirty_padding_inputs():
    g = torch.Generator().manual_seed(11)
    B, N, F, C = 3, 9, 4, 3
    x = torch.randn(B, N, F, dtype=torch.float64, generator=g)
    s = torch.randn(B, N, C, dtype=torch.float64, generator=g)
    mask = torch.arange(N)[None] < torch.tensor([9, 5, 0])[:, None]
    mask[0, 3] = False  # not only a prefix
    real_pair = mask[:, :, None] & mask[:, None, :]
    clean = torch.rand(B, N, N, dtype=torch.float64, generator=g) * real_pair
    dirty = clean + 2.0 * (~real_pair)  # 2 at every pair with a padded node
    return x, clean, dirty, s, mask


@pytest.mark.parametrize("per_graph", [False, True])
def test_graph_normalisation_ignores_adjacency_entries_at_padded_pairs(per_graph):
    x, clean, dirty, s, mask = _dirty_padding_inputs()
    results = []
    for adj in (clean, dirty):
        a = adj.clone().requires_grad_()
        ss = s.clone().requires_grad_()
        out = dense_diff_pool(x, a, ss, mask, "graph", backend="torch", per_graph=per_graph)
        g_s, g_a = torch.autograd.grad(out[2].sum(), (ss, a))
        results.append((out[2].detach(), g_s, g_a))
    (l1, gs1, ga1), (l2, gs2, ga2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs2, gs1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga2, ga1, rtol=1e-10, atol=1e-12)
    real_pair = mask[:, :, None] & mask[:, None, :]
    assert (ga2[~real_pair] == 0).all()
    # the value itself: each graph's squared residual over its n_b^2 real pairs
    S = torch.softmax(s, -1) * mask[..., None]
    q = ((dirty - S @ S.mT) * real_pair).square().sum((1, 2))
    n = mask.sum(1).double()
    per = torch.where(n > 0, q / n.clamp_min(1) ** 2, torch.zeros_like(q))
    torch.testing.assert_close(l2, per if per_graph else per[n > 0].mean(), rtol=1e-10, atol=1e-12)


def test_graph_normalisation_ignores_padding_on_the_block_sparse_path():
    from diffpool_fast.ops.block_sparse import BlockSparseAdj
    from diffpool_fast.ops.pool import pool_with_adj_op

    x, clean, dirty, s, mask = _dirty_padding_inputs()
    want = dense_diff_pool(x, clean, s, mask, "graph", backend="torch", per_graph=True)
    got = pool_with_adj_op(x, dirty, s, mask, "graph", backend="torch", per_graph=True,
                           adj_op=BlockSparseAdj(dirty, torch.float64))
    torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_pyg_normalisations_count_adjacency_entries_at_padded_pairs(normalize):
    pyg = pytest.importorskip("torch_geometric.nn")
    x, clean, dirty, s, mask = _dirty_padding_inputs()
    ours = dense_diff_pool(x, dirty, s, mask, normalize, backend="torch")
    theirs = pyg.dense_diff_pool(x, dirty, s, mask, normalize)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12)
    assert ours[2] > dense_diff_pool(x, clean, s, mask, normalize, backend="torch")[2]


# --- float and int masks inside torch.compile(fullgraph=True) -------------------------------

def test_every_accepted_mask_dtype_compiles_without_a_graph_break():
    torch._dynamo.reset()
    x, a, s, _ = ok()
    m = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    # aot_eager: Dynamo's full capture and AOT autograd without Inductor's C++ compile time
    compiled = torch.compile(dense_diff_pool, fullgraph=True, backend="aot_eager")
    for mask in (m.bool(), m.float(), m):
        for normalize in (True, "graph"):
            ss = s.clone().requires_grad_()
            got = compiled(x, a, ss, mask, normalize, backend="torch")
            want = call(x, a, s, m.bool(), normalize=normalize)
            for g1, w in zip(got, want):
                torch.testing.assert_close(g1, w)
            torch.autograd.grad(got[2] + got[3], ss)
    # a mask value other than 0/1 is still refused, by a tensor-side assertion in the graph
    with pytest.raises(RuntimeError, match="mask of a non-bool dtype must hold only 0 and 1"):
        compiled(x, a, s, m.float() * 0.5, backend="torch")


def test_the_input_checks_and_the_padding_correction_compile_without_a_graph_break():
    # the part of the op before and after the backend, whatever the backend does inside
    from diffpool_fast.ops.inputs import check_pool_inputs
    from diffpool_fast.ops.pool import padded_pair_sq

    def checked(x, a, s, m):
        inp = check_pool_inputs(x, a, s, m)
        return padded_pair_sq(inp.adj, inp.mask)

    torch._dynamo.reset()
    compiled = torch.compile(checked, fullgraph=True, backend="aot_eager")
    x, a, s, _ = ok()
    m = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    for mask in (m.bool(), m.float(), m):
        torch.testing.assert_close(compiled(x, a, s, mask), checked(x, a, s, m.bool()))
    with pytest.raises(RuntimeError, match="mask of a non-bool dtype must hold only 0 and 1"):
        compiled(x, a, s, m.float() * 0.5)


# --- TorchScript -----------------------------------------------------------------------------

@pytest.fixture(autouse=False)
def quiet_jit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
        yield


def _script(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(obj)


class _PoolingModel(torch.nn.Module):
    """A PyG-style model that calls our dense_diff_pool, with keyword options."""

    def __init__(self):
        super().__init__()
        self.assign = torch.nn.Linear(3, 4)

    def forward(self, x: Tensor, adj: Tensor, mask: Optional[Tensor] = None):
        s = self.assign(x)
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, "graph", per_graph=True,
                                                  adj_symmetric=None)
        return out.sum(1), link.mean() + ent.mean()


def test_a_module_calling_dense_diff_pool_can_be_scripted_saved_and_loaded(tmp_path, quiet_jit):
    model = _PoolingModel().double()
    scripted = _script(model)
    x, a, _, m = ok()
    x, a = x.double(), a.double()
    m = m.clone()
    m[1, 4:] = False
    want = model(x, a, m)
    got = scripted(x, a, m)
    for g1, w in zip(got, want):
        torch.testing.assert_close(g1, w)
    torch.jit.save(scripted, str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    for g1, w in zip(loaded(x, a, m), want):
        torch.testing.assert_close(g1, w)
    # gradients flow through the scripted formulas as through ours
    sum(o.sum() for o in loaded(x, a, m)).backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_scripted_function_is_a_drop_in_for_pygs_scripted_function():
    pyg = pytest.importorskip("torch_geometric.nn")
    ours = _script(dense_diff_pool)
    x, a, s, m = ok()
    for o, t in zip(ours(x, a, s, m), pyg.dense_diff_pool(x, a, s, m)):
        torch.testing.assert_close(o, t)


def test_scripted_function_refuses_what_it_cannot_do_with_a_clear_message():
    ours = _script(dense_diff_pool)
    x, a, s, m = ok()
    with pytest.raises(Exception, match="backend='triton' is not available in TorchScript"):
        ours(x, a, s, m, backend="triton")
    with pytest.raises(Exception, match="mask of a non-bool dtype must hold only 0 and 1"):
        ours(x, a, s, m.float() * 0.5)
    with pytest.raises(Exception, match=r"node counts disagree: x \[2, 6, 3\], adj \[2, 5, 5\]"):
        ours(x, a[:, :5, :5], s, m)
    with pytest.raises(Exception, match=r"normalize must be True, False or one of .*got 'mean'"):
        ours(x, a, s, m, "mean")
