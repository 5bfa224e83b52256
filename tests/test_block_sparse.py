"""The block-diagonal CSR adjacency (diffpool_fast.ops.block_sparse) against the dense products, in
float64: the fused SAGE blocks and the torch coarsening that take it. The classifier's sparse level
0 is the edge list now (issue 12: one sparse level 0); its tests against the dense forward here
(loss, every parameter gradient, batch-norm running statistics) and in test_sparse_model.py."""
import copy

import pytest
import torch

from diffpool_fast.nn.model import DenseGNN, DiffPoolClassifier
from diffpool_fast.ops.block_sparse import BlockSparseAdj, worth_it
from diffpool_fast.ops.coarsen_torch import coarsen_torch


def _graphs(B, N, seed, symmetric, byte=False, full_pad=True):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, N + 1, (B,), generator=g)
    sizes[0] = N
    if full_pad:
        sizes[1] = 0  # a fully padded graph
    mask = torch.arange(N)[None, :] < sizes[:, None]
    a = torch.rand(B, N, N, generator=g) < 0.15
    if symmetric:
        a = a | a.transpose(1, 2)
    a = a & mask[:, :, None] & mask[:, None, :]
    return (a if byte else a.to(torch.float64)), mask


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_sparse_products_and_stats(symmetric):
    adj, _ = _graphs(4, 11, 0, symmetric)
    sp = BlockSparseAdj(adj, torch.float64, symmetric=symmetric)
    X = torch.randn(4, 11, 5, dtype=torch.float64)
    torch.testing.assert_close(sp.mm(X), adj @ X)
    torch.testing.assert_close(sp.tmm(X), adj.transpose(1, 2) @ X)
    torch.testing.assert_close(sp.deg, adj.sum(-1, keepdim=True))
    torch.testing.assert_close(sp.sq_norm, adj.flatten(1).square().sum(1))
    assert sp.nnz == int(adj.count_nonzero())
    with pytest.raises(TypeError, match="float64"):
        sp.mm(X.float())


@pytest.mark.parametrize("symmetric", [True, False])
def test_coarsen_with_sparse_adjacency(symmetric):
    B, N, F, C = 4, 13, 6, 5
    adj, mask = _graphs(B, N, 1, symmetric)
    x = torch.randn(B, N, F, dtype=torch.float64, requires_grad=True)
    s = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    outs = []
    for a in (adj, BlockSparseAdj(adj, torch.float64, symmetric=symmetric)):
        xx, ss = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
        res = coarsen_torch(xx, a, ss, mask, adj_symmetric=symmetric)
        w = [torch.randn_like(t, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(res)]
        sum((t * wi).sum() for t, wi in zip(res, w)).backward()
        outs.append((res, xx.grad, ss.grad))
    for t1, t2 in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(t2, t1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("F", [4, 23])  # layer 0 aggregate-first and product-after
@pytest.mark.parametrize("norm", [True, "none"])
def test_fused_block_with_sparse_adjacency(F, norm, monkeypatch):
    from diffpool_fast.nn.sage_blocks import sage_blocks

    B, N = 5, 12
    adj, mask = _graphs(B, N, 2, symmetric=False)
    torch.manual_seed(0)
    gnn = DenseGNN(F, 9, 6, layers=3, gnn="sage", jk=True, batch_norm=norm).double()
    other = copy.deepcopy(gnn)
    x = torch.randn(B, N, F, dtype=torch.float64)
    gout = torch.randn(B, N, gnn.out_channels, dtype=torch.float64)
    count = int(mask.sum())
    res = []
    for m, a in ((gnn, adj), (other, BlockSparseAdj(adj, torch.float64))):
        xx = x.clone().requires_grad_()
        out = sage_blocks(xx, a, mask, count, [(m.convs, m.norms)])[0]
        (out * gout).sum().backward()
        res.append((out, xx.grad, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-9, atol=1e-10)
    for g1, g2 in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-10)
    for b1, b2 in zip(res[0][3], res[1][3]):
        torch.testing.assert_close(b2, b1)


@pytest.mark.parametrize("norm", [True, "none"])
@pytest.mark.parametrize("symmetric", [True, None])
@pytest.mark.parametrize("byte", [False, True])
def test_classifier_edge_level0_matches_dense(norm, symmetric, byte):
    """The classifier's one sparse level 0 is the edge list (issue 12): the batch's adjacency
    as edges (its nonzeros, global ids) gives what the dense batch gives, incl. a fully padded
    graph (num_graphs), the loss, every parameter gradient and the running statistics."""
    B, N, F = 6, 17, 5
    adj, mask = _graphs(B, N, 3, symmetric=bool(symmetric), byte=byte)
    x = torch.randn(B, N, F, dtype=torch.float64) * mask[..., None]
    y = torch.randint(0, 3, (B,))
    torch.manual_seed(0)
    model = DiffPoolClassifier(F, 3, max_nodes=N, hidden=8, batch_norm=norm, backend="torch",
                               adj_symmetric=symmetric).double()
    other = copy.deepcopy(model)
    ids = torch.full((B, N), -1, dtype=torch.long)
    ids[mask] = torch.arange(int(mask.sum()))
    b, i, j = adj.nonzero(as_tuple=True)
    edge_index = torch.stack([ids[b, i], ids[b, j]])
    batch = torch.arange(B)[:, None].expand(B, N)[mask]
    res = []
    for m, args, kw in ((model, (x, adj, mask), {}), (other, (x[mask], edge_index, batch), {"num_graphs": B})):
        for _ in range(2):  # two steps: running statistics follow
            for p in m.parameters():
                p.grad = None
            logits, aux = m(*args, **kw)
            loss = torch.nn.functional.cross_entropy(logits, y) + aux
            loss.backward()
        res.append((loss.detach(), [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)
    for a, b in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_classifier_has_no_csr_level0(monkeypatch):
    """A dense batch runs dense whatever DIFFPOOL_FAST_SPARSE says: the variable now chooses
    between dense and edge-list batches in the loader (diffpool_fast.sparse_data.prefer_sparse)."""
    import diffpool_fast.nn.model as model_mod

    assert not hasattr(model_mod, "BlockSparseAdj")
    built = []
    orig = BlockSparseAdj.__init__

    def spy(self, *a, **k):
        built.append(a[0].shape)
        orig(self, *a, **k)

    monkeypatch.setattr(BlockSparseAdj, "__init__", spy)
    adj, mask = _graphs(3, 9, 4, symmetric=True)
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    m = DiffPoolClassifier(4, 2, max_nodes=9, hidden=8, backend="torch").double()
    for env in ("0", "auto", "1"):
        monkeypatch.setenv("DIFFPOOL_FAST_SPARSE", env)
        m(x, adj, mask)
    assert built == []


def test_worth_it_auto_rule(monkeypatch):
    from diffpool_fast.ops import block_sparse as sparse

    monkeypatch.setenv("DIFFPOOL_FAST_SPARSE", "auto")
    big = torch.zeros(2, sparse.MIN_NODES, sparse.MIN_NODES, dtype=torch.bool)
    big[:, 0, 1] = True
    assert worth_it(big)
    assert not worth_it(big[:, :-1, :-1])  # fewer nodes than the threshold
    dense = torch.ones(1, sparse.MIN_NODES, sparse.MIN_NODES)
    assert not worth_it(dense)  # too many nonzeros
    assert not worth_it(big.float().requires_grad_())  # a pooled adjacency with a gradient
