"""The fused SAGE block (diffpool_fast.nn.sage_blocks) against the layer modules it replaces, in float64:
outputs, every gradient (x, adj, weights, biases, batch-norm affine), running statistics."""
import copy

import pytest
import torch

from diffpool_fast.nn.model import DenseGNN, DiffPoolClassifier


def _inputs(B, N, F, seed, masked, adj_grad, full_pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, F, generator=g, dtype=torch.float64)
    if masked:
        sizes = torch.randint(1, N + 1, (B,), generator=g)
        sizes[-1] = N
        if full_pad and B > 2:
            sizes[1] = 0  # a fully padded graph
        mask = torch.arange(N)[None, :] < sizes[:, None]
    else:
        mask = None
    if adj_grad:  # a weighted adjacency like a pooled S^T A S: rows with degree < 1 exist
        adj = torch.rand(B, N, N, generator=g, dtype=torch.float64) * 0.3
        adj = adj + adj.transpose(1, 2)
    else:
        adj = (torch.rand(B, N, N, generator=g) < 0.3).to(torch.float64)
        adj = ((adj + adj.transpose(1, 2)) > 0).to(torch.float64)
    if mask is not None:
        mm = (mask[:, :, None] & mask[:, None, :]).to(adj.dtype)
        adj = adj * mm
    x = x.requires_grad_(True)
    adj = adj.requires_grad_(adj_grad)
    return x, adj, mask


def _run(gnn, x, adj, mask, gout):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    adj = adj.detach().clone().requires_grad_(adj.requires_grad)
    out = gnn(x, adj, mask)
    (out * gout).sum().backward()
    grads = {"x": x.grad, "adj": adj.grad}
    grads.update({n: p.grad for n, p in gnn.named_parameters()})
    return out, grads


@pytest.mark.parametrize("norm", [True, "none"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("adj_grad", [False, True])
@pytest.mark.parametrize("layers,lin_out", [(3, None), (3, 11), (1, None), (2, 5)])
@pytest.mark.parametrize("F", [7, 23])  # layer 0 narrower (A x first) and wider than its output
def test_fused_block_matches_modules(norm, masked, adj_grad, layers, lin_out, F):
    B, N, H, out = 5, 13, 9, 6
    torch.manual_seed(0)
    ref = DenseGNN(F, H, out, layers=layers, gnn="sage", jk=True, batch_norm=norm, lin_out=lin_out).double()
    # non-trivial affine parameters and running statistics
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.fused = False
    fused = copy.deepcopy(ref)
    fused.fused = True
    assert fused._fused_count(*_inputs(B, N, F, 1, masked, adj_grad)) is not None
    for seed in (1, 2):  # two steps: running statistics and num_batches_tracked follow
        x, adj, mask = _inputs(B, N, F, seed, masked, adj_grad)
        gout = torch.randn(B, N, ref.out_channels, dtype=torch.float64)
        # poison: the fused path must not read the gradient's padded rows differently
        o1, g1 = _run(ref, x, adj, mask, gout)
        o2, g2 = _run(fused, x, adj, mask, gout)
        assert torch.isfinite(o2).all()
        torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
        for k in g1:
            if g1[k] is None:
                assert g2[k] is None, k
                continue
            assert g2[k] is not None, k
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-8, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
        for (n, b1), (_, b2) in zip(ref.named_buffers(), fused.named_buffers()):
            torch.testing.assert_close(b2, b1, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
        for p in list(ref.parameters()) + list(fused.parameters()):
            p.grad = None


def test_fused_not_used_where_it_does_not_apply():
    gnn = DenseGNN(4, 8, 8, gnn="gcn")
    x, adj = torch.randn(2, 5, 4), torch.ones(2, 5, 5)
    assert gnn._fused_count(x, adj, None) is None
    gnn = DenseGNN(4, 8, 8, gnn="sage")
    assert gnn._fused_count(x, adj, None) == 10
    gnn.eval()  # running statistics: the module path
    assert gnn._fused_count(x, adj, None) is None
    gnn.train()
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[0, 0] = True
    assert gnn._fused_count(x, adj, one) is None  # one real row: running statistics
    nobn = DenseGNN(4, 8, 8, gnn="sage", batch_norm="none").eval()
    assert nobn._fused_count(x, adj, None) == 10


@pytest.mark.parametrize("norm", [True, "none"])
def test_classifier_same_with_and_without_fusion(norm, monkeypatch):
    torch.manual_seed(0)
    B, N, F = 6, 19, 5
    x, adj, mask = _inputs(B, N, F, 3, True, False)
    y = torch.randint(0, 3, (B,))
    model = DiffPoolClassifier(F, 3, max_nodes=N, hidden=8, batch_norm=norm, backend="torch").double()
    other = copy.deepcopy(model)
    res = []
    for m, env in ((model, "1"), (other, "0")):
        monkeypatch.setenv("DIFFPOOL_FAST_FUSED", env)
        logits, aux = m(x.detach(), adj, mask)
        loss = torch.nn.functional.cross_entropy(logits, y) + aux
        loss.backward()
        res.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm", [True, "none"])
def test_classifier_fusion_on_cuda(norm, monkeypatch):
    """The fused blocks on CUDA (strided mm outputs, ATen batch norm) against the modules there."""
    torch.manual_seed(0)
    B, N, F = 6, 19, 5
    x, adj, mask = _inputs(B, N, F, 3, True, False)
    x, adj, mask = x.detach().cuda(), adj.cuda(), mask.cuda()
    y = torch.randint(0, 3, (B,), device="cuda")
    model = DiffPoolClassifier(F, 3, max_nodes=N, hidden=8, batch_norm=norm, backend="torch").double().cuda()
    other = copy.deepcopy(model)
    res = []
    for m, env in ((model, "1"), (other, "0")):
        monkeypatch.setenv("DIFFPOOL_FAST_FUSED", env)
        logits, aux = m(x, adj, mask)
        (torch.nn.functional.cross_entropy(logits, y) + aux).backward()
        res.append([p.grad for p in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_levels_run_their_two_gnns_as_one_node(monkeypatch):
    import diffpool_fast.nn.sage_blocks as fused

    groups = []
    orig = fused.SageBlocksFunction.apply

    def spy(*args):
        groups.append(args[6])  # n_groups
        return orig(*args)

    monkeypatch.setattr(fused.SageBlocksFunction, "apply", spy)
    x, adj, mask = _inputs(4, 11, 3, 5, True, False)
    model = DiffPoolClassifier(3, 2, max_nodes=11, hidden=8, backend="torch")
    logits, aux = model(x.detach().float(), adj.float(), mask)
    (logits.sum() + aux).backward()
    assert groups == [2, 2, 1]  # level 0 and level 1 pairs, then the final embedding block


@pytest.mark.parametrize("adj_dtype", [torch.bool, torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64])
def test_fused_block_adjacency_of_another_dtype(adj_dtype, x_dtype):
    """An adjacency whose dtype is not x's: the fused block takes the inverse degree in x's dtype,
    as the layer modules do (it was in A's dtype: half-precision error for a float16 A, a dtype
    error for a float64 A with float32 x). Weighted float16 entries make the degree inexact in
    float16, so a degree rounded differently on the two paths would show."""
    B, N, F = 3, 11, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, F, generator=g, dtype=torch.float64).to(x_dtype)
    a = torch.rand(B, N, N, generator=g) < 0.4
    adj = (a * torch.rand(B, N, N, generator=g)).to(adj_dtype) if adj_dtype.is_floating_point else a.to(adj_dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 7:] = False
    torch.manual_seed(0)
    ref = DenseGNN(F, 8, 6, layers=2, gnn="sage", jk=True, batch_norm="none").to(x_dtype)
    ref.fused = False
    fused = copy.deepcopy(ref)
    fused.fused = True
    gout = torch.randn(B, N, ref.out_channels, generator=g, dtype=torch.float64).to(x_dtype)
    (o1, g1), (o2, g2) = _run(ref, x, adj, mask, gout), _run(fused, x, adj, mask, gout)
    tol = dict(rtol=1e-5, atol=1e-6) if x_dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o2, o1, **tol)
    for name in g1:
        if g1[name] is not None:
            torch.testing.assert_close(g2[name], g1[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
