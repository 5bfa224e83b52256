"""Dense GNN layers against torch_geometric's DenseGCNConv / DenseSAGEConv / DenseGINConv."""
import pytest
import torch

from diffpool_fast.nn.layers import DenseGCN, DenseGIN, DenseSAGE, MaskedBatchNorm

pyg_dense = pytest.importorskip("torch_geometric.nn.dense")


def _batch(B=3, N=13, F=5, weighted=False, seed=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)
    sizes = torch.tensor([N, max(1, N - 4), 0][:B] + [N] * max(0, B - 3))
    mask = torch.arange(N)[None, :] < sizes[:, None]  # one full, one padded, one fully padded
    a = torch.rand(B, N, N, generator=g) < 0.3
    a = a | a.transpose(1, 2)
    a = a & mask[:, :, None] & mask[:, None, :]
    if weighted:  # pooled adjacencies: weighted, nonzero diagonal
        adj = torch.rand(B, N, N, generator=g, dtype=dtype) * a
        adj = adj + adj.transpose(1, 2)
    else:
        adj = a.to(dtype)
    x = torch.randn(B, N, F, generator=g, dtype=dtype)
    return x, adj, mask


def _grads(out, params):
    g = torch.Generator().manual_seed(1)
    up = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * up).sum(), params)


@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
@pytest.mark.parametrize("improved", [False, True])
@pytest.mark.parametrize("add_loop", [True, False])
def test_gcn_matches_pyg(weighted, improved, add_loop):
    x, adj, mask = _batch(weighted=weighted)
    ours = DenseGCN(5, 7, improved=improved).double()
    ref = pyg_dense.DenseGCNConv(5, 7, improved=improved).double()
    ref.lin.weight.data.copy_(ours.lin.weight.data)
    with torch.no_grad():
        ours.bias.normal_()
    ref.bias.data.copy_(ours.bias.data)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(xo, adj, mask, add_loop=add_loop)
    want = ref(xr, adj, mask, add_loop=add_loop)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(out, [xo, ours.lin.weight, ours.bias]), _grads(want, [xr, ref.lin.weight, ref.bias])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("widths", [(5, 7), (9, 4)], ids=["widen", "narrow"])
@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
def test_sage_matches_pyg(widths, weighted):
    fin, fout = widths
    x, adj, mask = _batch(F=fin, weighted=weighted)
    ours = DenseSAGE(fin, fout).double()
    ref = pyg_dense.DenseSAGEConv(fin, fout).double()
    ref.load_state_dict(ours.state_dict())
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = ours(xo, adj, mask), ref(xr, adj, mask)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    po = [xo, ours.lin_rel.weight, ours.lin_root.weight, ours.lin_root.bias]
    pr = [xr, ref.lin_rel.weight, ref.lin_root.weight, ref.lin_root.bias]
    for a, b in zip(_grads(out, po), _grads(want, pr)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sage_empty_rows_finite():
    # After pooling a cluster can have no edges: degree 0 clamps to 1, output stays finite.
    x = torch.randn(2, 6, 3)
    adj = torch.zeros(2, 6, 6)
    out = DenseSAGE(3, 4)(x, adj)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("train_eps", [False, True])
def test_gin_matches_pyg(train_eps):
    x, adj, mask = _batch()
    ours = DenseGIN(5, 6, hidden_channels=8, eps=0.3, train_eps=train_eps).double()
    ref = pyg_dense.DenseGINConv(ours.nn, eps=0.3, train_eps=train_eps).double()
    ref.eps.data.copy_(ours.eps.data)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = ours(xo, adj, mask), ref(xr, adj, mask)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grads(out, [xo])[0], _grads(want, [xr])[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", [DenseGCN, DenseSAGE, DenseGIN], ids=["gcn", "sage", "gin"])
@pytest.mark.parametrize("adj_dtype", [torch.bool, torch.uint8])
def test_byte_adjacency_same_as_float(layer, adj_dtype):
    x, adj, mask = _batch(dtype=torch.float32)
    mod = layer(5, 7)
    want = mod(x, adj, mask)
    got = mod(x, adj.to(adj_dtype), mask)
    torch.testing.assert_close(got, want)
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("layer", [DenseGCN, DenseSAGE, DenseGIN], ids=["gcn", "sage", "gin"])
def test_unbatched_input(layer):
    x, adj, mask = _batch(B=1, dtype=torch.float32)
    mod = layer(5, 3)
    # As PyG's dense layers: a 2-D input is a batch of one and comes back [1, N, F'].
    torch.testing.assert_close(mod(x[0], adj[0], mask[0]), mod(x, adj, mask))


def test_layer_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="adj"):
        DenseSAGE(5, 3)(torch.randn(2, 7, 5), torch.ones(2, 6, 6))


def test_masked_batch_norm_ignores_padding():
    x, _, mask = _batch(B=3, N=11, F=4, dtype=torch.float32)
    bn = MaskedBatchNorm(4)
    ref = torch.nn.BatchNorm1d(4)
    out = bn(x, mask)
    want = ref(x[mask])
    torch.testing.assert_close(out[mask], want)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    # Changing padded features changes nothing, in training and in eval mode.
    x2 = x.clone()
    x2[~mask] = 1e6
    torch.testing.assert_close(MaskedBatchNorm(4)(x2, mask), out)
    bn.eval()
    torch.testing.assert_close(bn(x2, mask), bn(x, mask))
    torch.testing.assert_close(bn(x, mask)[mask], ref.eval()(x[mask]))
