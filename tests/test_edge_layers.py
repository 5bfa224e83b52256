"""The dense layers run on an edge list (diffpool_fast.nn.edge_layers) against their dense
forward on the same adjacency, in float64: isolated nodes, self loops, duplicate and weighted
edges, several graphs in one edge list, gradients of x, the edge weights and every parameter."""
from __future__ import annotations

import pytest
import torch

from diffpool_fast.nn.edge_layers import edge_forward
from diffpool_fast.nn.layers import DenseGCN, DenseGIN, DenseSAGE


def _gen() -> torch.Generator:
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _graph(g, n=23, e=57, weighted=True):
    """An edge list over n nodes with self loops, duplicates and isolated nodes (the last 4)."""
    row = torch.randint(0, n - 4, (e,), generator=g)
    col = torch.randint(0, n - 4, (e,), generator=g)
    row = torch.cat([row, torch.tensor([0, 0, 3, 5])])  # a duplicate pair and self loops
    col = torch.cat([col, torch.tensor([1, 1, 3, 5])])
    ei = torch.stack([row, col])
    w = (torch.rand(ei.shape[1], generator=g, dtype=torch.float64) + 0.2) if weighted else None
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense.index_put_((row, col), torch.ones_like(row, dtype=torch.float64) if w is None else w, accumulate=True)
    return ei, w, dense


def _layers(fi, fo):
    return [
        ("sage", DenseSAGE(fi, fo)), ("sage-norm", DenseSAGE(fi, fo, normalize=True)),
        ("gcn", DenseGCN(fi, fo)), ("gcn-improved", DenseGCN(fi, fo, improved=True)),
        ("gin", DenseGIN(fi, fo, train_eps=True, eps=0.3)),
    ]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("fi,fo", [(7, 5), (5, 9)])  # narrower output, then wider
@pytest.mark.parametrize("idx", range(5))
def test_edge_forward_equals_dense_forward(idx, fi, fo, weighted):
    g = _gen()
    name, layer = _layers(fi, fo)[idx]
    layer = layer.double()
    if hasattr(layer, "bias") and layer.bias is not None:
        torch.nn.init.normal_(layer.bias)  # a zero bias would hide a missing one
    ei, w, dense = _graph(g, weighted=weighted)
    x = torch.randn(dense.shape[0], fi, generator=g, dtype=torch.float64, requires_grad=True)
    wg = w.clone().requires_grad_() if w is not None else None
    dg = dense.clone().requires_grad_()
    got = edge_forward(layer, x, ei, wg)
    want = layer(x, dg)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    params = list(layer.parameters())
    g_got = torch.autograd.grad(got, [x, *params] + ([wg] if wg is not None else []), up, allow_unused=True)
    g_want = torch.autograd.grad(want, [x, *params, dg], up, allow_unused=True)
    names = ["x"] + [f"param{i}" for i in range(len(params))]
    for a, b, what in zip(g_got[: len(params) + 1], g_want[: len(params) + 1], names):
        if b is None:
            assert a is None or not a.abs().any(), f"{name}: {what}"
            continue
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m: f"{name} {what}: {m}")
    if wg is not None:
        # d/dw_e = dL/dA[row_e, col_e]: the dense gradient gathered at the edges
        torch.testing.assert_close(g_got[-1], g_want[-1][ei[0], ei[1]], rtol=1e-11, atol=1e-11)


def test_isolated_nodes_keep_finite_rows():
    g = _gen()
    ei, w, dense = _graph(g)
    x = torch.randn(dense.shape[0], 4, generator=g, dtype=torch.float64)
    for _, layer in _layers(4, 3):
        out = edge_forward(layer.double(), x, ei, w)
        assert torch.isfinite(out).all()


def test_several_graphs_in_one_edge_list_stay_apart():
    """Two graphs side by side: each output row depends only on its own graph's rows."""
    g = _gen()
    ei1, w1, d1 = _graph(g, n=11, e=20)
    ei2, w2, d2 = _graph(g, n=13, e=30)
    ei = torch.cat([ei1, ei2 + 11], 1)
    w = torch.cat([w1, w2])
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    layer = DenseGCN(6, 4).double()
    both = edge_forward(layer, x, ei, w)
    torch.testing.assert_close(both[:11], layer(x[:11], d1)[0])
    torch.testing.assert_close(both[11:], layer(x[11:], d2)[0])


@pytest.mark.parametrize("bad,err,word", [
    (dict(edge_index=torch.zeros(3, 4, dtype=torch.long)), ValueError, "edge_index"),
    (dict(edge_index=torch.zeros(2, 4)), TypeError, "edge_index"),
    (dict(edge_index=torch.tensor([[0, 9], [1, 2]])), ValueError, "edge_index"),
    (dict(edge_index=torch.tensor([[0, -1], [1, 2]])), ValueError, "edge_index"),
    (dict(edge_weight=torch.ones(5)), ValueError, "edge_weight"),
    (dict(x=torch.ones(1, 4, 3)), ValueError, "x"),
])
def test_bad_edge_inputs_name_the_argument(bad, err, word):
    args = dict(x=torch.ones(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]]), edge_weight=None)
    args.update(bad)
    with pytest.raises(err, match=word):
        edge_forward(DenseSAGE(3, 2), args["x"], args["edge_index"], args["edge_weight"])


def test_other_modules_are_refused():
    with pytest.raises(TypeError, match="layer"):
        edge_forward(torch.nn.Linear(3, 2), torch.ones(4, 3), torch.tensor([[0, 1], [1, 2]]))
