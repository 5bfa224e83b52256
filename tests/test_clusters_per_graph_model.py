"""The classifier with clusters per graph (and with the BCE link loss): a graph's logits do not
depend on the batch it is in, dense and edge-list level 0 agree, and levels >= 1 are masked."""
from __future__ import annotations

import pytest
import torch

from diffpool_fast.nn.model import DiffPoolClassifier, graph_clusters


def _graphs(sizes, F, g):
    out = []
    for n in sizes:
        a = (torch.rand(n, n, generator=g, dtype=torch.float64) < 0.3).double()
        a = torch.triu(a, 1)
        out.append((torch.randn(n, F, generator=g, dtype=torch.float64), a + a.T))
    return out


def _dense(graphs):
    N = max(x.shape[0] for x, _ in graphs)
    B, F = len(graphs), graphs[0][0].shape[1]
    X = torch.zeros(B, N, F, dtype=torch.float64)
    A = torch.zeros(B, N, N, dtype=torch.float64)
    M = torch.zeros(B, N, dtype=torch.bool)
    for b, (x, a) in enumerate(graphs):
        n = x.shape[0]
        X[b, :n], A[b, :n, :n], M[b, :n] = x, a, True
    return X, A, M


def _model(link_loss="frobenius", readout="mean", levels=2):
    torch.manual_seed(0)
    return DiffPoolClassifier(3, 2, max_nodes=23, num_levels=levels, ratio=0.3, hidden=8, batch_norm="none",
                              clusters_per_graph=True, link_loss=link_loss, readout=readout,
                              readout_levels="all", backend="torch").double().eval()


def test_graph_clusters_rule():
    k = graph_clusters(torch.tensor([0, 1, 4, 10, 23]), 0.3, 7)
    assert k.tolist() == [1, 1, 2, 3, 7]
    assert graph_clusters(torch.tensor([100]), 0.3, 7).tolist() == [7]


@pytest.mark.parametrize("link_loss", ["frobenius", "bce"])
@pytest.mark.parametrize("readout", ["mean", "max", "sum"])
def test_logits_do_not_depend_on_the_batch(link_loss, readout):
    g = torch.Generator().manual_seed(1)
    graphs = _graphs([23, 5, 11, 1, 17], 3, g)
    model = _model(link_loss, readout)
    X, A, M = _dense(graphs)
    logits, aux, terms = model(X, A, M, return_terms=True)
    alone, auxes = [], []
    for x, a in graphs:
        lo, ax = model(x[None], a[None])
        alone.append(lo[0])
        auxes.append(ax)
    torch.testing.assert_close(logits, torch.stack(alone), rtol=1e-10, atol=1e-12)
    # per-graph loss scaling: the batch's aux is the mean of the graphs' own
    torch.testing.assert_close(aux, torch.stack(auxes).mean(), rtol=1e-10, atol=1e-12)


def test_level_widths_follow_the_largest_graph_of_the_batch():
    g = torch.Generator().manual_seed(2)
    model = _model()
    X, A, M = _dense(_graphs([5, 4, 3], 3, g))
    widths = []
    hooks = [lv.register_forward_hook(lambda m, i, o: widths.append(
        (o.x.shape[1], o.mask.sum(1).tolist() if o.mask is not None else None)))
             for lv in model.levels]
    model(X, A, M)
    for h in hooks:
        h.remove()
    # level 1: ceil(0.3 * [5, 4, 3]) = [2, 2, 1], width 2; level 2: ceil(0.3 * [2, 2, 1]) = 1 for
    # every graph, so no mask (all real)
    assert widths == [(2, [2, 2, 1]), (1, None)]


def test_edge_list_level0_matches_dense():
    g = torch.Generator().manual_seed(3)
    graphs = _graphs([9, 3, 14], 3, g)
    model = _model()
    X, A, M = _dense(graphs)
    dense = model(X, A, M)
    xs = torch.cat([x for x, _ in graphs])
    batch = torch.cat([torch.full((x.shape[0],), b) for b, (x, _) in enumerate(graphs)])
    off, edges = 0, []
    for x, a in graphs:
        edges.append(a.nonzero().T + off)
        off += x.shape[0]
    sparse = model(xs, torch.cat(edges, 1), batch)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-9, atol=1e-11)


def test_bce_refuses_the_edge_list_form():
    g = torch.Generator().manual_seed(4)
    (x, a), = _graphs([6], 3, g)
    model = _model("bce")
    with pytest.raises(ValueError, match="level0 dense"):
        model(x, a.nonzero().T, torch.zeros(6, dtype=torch.long))


def test_fixed_clusters_unchanged_by_the_option_default():
    """clusters_per_graph=False is the paper's model: levels >= 1 unmasked, width C."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    m = DiffPoolClassifier(3, 2, max_nodes=23, ratio=0.3, hidden=8, batch_norm="none", backend="torch").double()
    X, A, M = _dense(_graphs([23, 5], 3, g))
    out = m.levels[0](X, A, M)
    assert out.mask is None and out.x.shape[1] == m.clusters[0]


def test_gradients_reach_every_parameter_and_are_finite():
    g = torch.Generator().manual_seed(6)
    model = _model("bce").train()
    X, A, M = _dense(_graphs([12, 7, 2], 3, g))
    logits, aux = model(X, A, M)
    (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1])) + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bce_only_at_level_0():
    m = _model("bce")
    assert [lv.link_loss for lv in m.levels] == ["bce", "frobenius"]
