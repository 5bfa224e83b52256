"""DiffPool level and classifier: shapes, gradients, mask handling, loss falling on generated data."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffpool_fast.data import DenseLoader, make_synthetic
from diffpool_fast.nn.model import DiffPool, DiffPoolClassifier, cluster_counts
from diffpool_fast.ops.reference import dense_diff_pool_reference


def _random_batch(B=4, N=17, F=6, seed=None):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)
    sizes = torch.randint(2, N + 1, (B,), generator=g)
    sizes[0] = N
    sizes[-1] = 0  # a fully padded graph
    mask = torch.arange(N)[None, :] < sizes[:, None]
    a = torch.rand(B, N, N, generator=g) < 0.25
    adj = (a | a.transpose(1, 2)) & mask[:, :, None] & mask[:, None, :]
    x = torch.randn(B, N, F, generator=g) * mask[..., None]
    y = torch.randint(0, 3, (B,), generator=g)
    return x, adj, mask, y


def test_cluster_counts():
    assert cluster_counts(150, 2, 0.25) == [38, 10]
    assert cluster_counts(620, 3, 0.1) == [62, 7, 1]
    with pytest.raises(ValueError, match="ratio"):
        cluster_counts(10, 1, 0.0)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("gnn", ["sage", "gcn", "gin"])
def test_forward_backward_every_layer_and_depth(gnn, levels):
    x, adj, mask, y = _random_batch()
    # ratio 0.5: 17 -> 9 -> 5 -> 3 clusters (one cluster would make the assignment constant)
    model = DiffPoolClassifier(6, 3, max_nodes=17, num_levels=levels, ratio=0.5, hidden=8, gnn=gnn, layers=2,
                               dropout=0.1)
    assert model.clusters == [9, 5, 3][:levels]
    logits, aux, terms = model(x, adj, mask, return_terms=True)
    assert logits.shape == (4, 3)
    assert torch.isfinite(logits).all() and torch.isfinite(aux)
    torch.testing.assert_close(aux, model.link_weight * terms["link"] + model.ent_weight * terms["ent"])
    (F.cross_entropy(logits, y) + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # Every level's assignment head learns from the loss.
    for level in model.levels:
        assert level.assign.lin.weight.grad.abs().sum() > 0


def test_plain_gnn_without_pooling():
    x, adj, mask, _ = _random_batch()
    model = DiffPoolClassifier(6, 2, max_nodes=17, num_levels=0, hidden=8)
    logits, aux = model(x, adj, mask)
    assert logits.shape == (4, 2) and float(aux) == 0.0


@pytest.mark.parametrize("readout, readout_levels, norm", [
    ("mean", "last", True), ("max", "all", True), ("sum", "all", "layer"), ("mean", "all", "none"),
])
def test_padding_does_not_change_the_model(readout, readout_levels, norm):
    """Masks are honoured everywhere: padding a batch further changes neither logits nor loss
    (training mode too, since batch norm counts real nodes only)."""
    x, adj, mask, y = _random_batch()
    model = DiffPoolClassifier(6, 3, max_nodes=40, hidden=8, readout=readout, readout_levels=readout_levels,
                               batch_norm=norm)
    pad = 9
    xp = F.pad(x, (0, 0, 0, pad), value=0.0)
    xp[:, -pad:] = 5.0  # garbage in padded rows must not leak
    adjp = F.pad(adj, (0, pad, 0, pad))
    maskp = F.pad(mask, (0, pad))
    for train in (True, False):
        model.train(train)
        a = model(x, adj, mask)
        b = model(xp, adjp, maskp)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


def test_byte_adjacency_same_as_float():
    x, adj, mask, _ = _random_batch()
    model = DiffPoolClassifier(6, 3, max_nodes=17, hidden=8).eval()
    ref = model(x, adj.float(), mask)
    for dt in (torch.bool, torch.uint8):
        out = model(x, adj.to(dt), mask)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("link_norm", ["graph", True])
def test_diffpool_level_matches_reference_pooling(link_norm):
    x, adj, mask, _ = _random_batch(N=19)
    x, adj_f = x.double(), adj.double()
    level = DiffPool(6, 7, hidden=5, layers=2, link_norm=link_norm).double()
    out = level(x, adj, mask)
    assert out.x.shape == (4, 7, level.out_channels) and out.adj.shape == (4, 7, 7)
    assert out.assignment.shape == (4, 19, 7)
    want = dense_diff_pool_reference(out.embedding, adj_f, out.assignment, mask)
    torch.testing.assert_close(out.x, want[0])
    torch.testing.assert_close(out.adj, want[1])
    if link_norm is True:
        torch.testing.assert_close(out.link_loss, want[2])
        torch.testing.assert_close(out.ent_loss, want[3])
    else:
        # Per-graph averages over the graphs with nodes (the last graph is fully padded).
        S = torch.softmax(out.assignment, -1) * mask[..., None]
        n = mask.sum(1).double()
        real = n > 0
        resid = adj_f - S @ S.transpose(1, 2)
        link = (resid.square().sum((1, 2))[real] / n[real] ** 2).mean()
        ent = (-(S * torch.log(S + 1e-15)).sum((1, 2))[real] / n[real]).mean()
        torch.testing.assert_close(out.link_loss, link)
        torch.testing.assert_close(out.ent_loss, ent)


def test_explicit_clusters_and_bad_arguments():
    model = DiffPoolClassifier(3, 2, max_nodes=100, clusters=[11, 3])
    assert model.clusters == [11, 3] and model.num_levels == 2
    assert model.levels[0].assign.lin.out_features == 11
    with pytest.raises(ValueError, match="readout"):
        DiffPoolClassifier(3, 2, max_nodes=10, readout="median")
    with pytest.raises(ValueError, match="gnn"):
        DiffPoolClassifier(3, 2, max_nodes=10, gnn="gat")
    with pytest.raises(ValueError, match="clusters"):
        DiffPoolClassifier(3, 2, max_nodes=10, clusters=[4, 0])
    with pytest.raises(ValueError, match="batch_norm"):
        DiffPoolClassifier(3, 2, max_nodes=10, batch_norm="group")


def test_pyg_baseline_runs():
    pytest.importorskip("torch_geometric")
    from diffpool_fast.nn.baselines import PyGDiffPoolNet

    x, adj, mask, y = _random_batch(N=30)
    net = PyGDiffPoolNet(6, 3, max_nodes=30, hidden=16)
    assert net.clusters == [8, 2]
    logp, link, ent = net(x, adj.float(), mask)
    assert logp.shape == (4, 3)
    F.nll_loss(logp, y).backward()


def test_loss_falls_on_generated_dataset():
    torch.manual_seed(0)
    ds = make_synthetic(120, seed=3)
    loader = DenseLoader(ds, batch_size=15, shuffle=True, seed=0)
    model = DiffPoolClassifier(ds.num_features, ds.num_classes, max_nodes=ds.max_nodes, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ce_per_epoch, total_per_epoch = [], []
    for epoch in range(4):
        ce_sum = tot_sum = 0.0
        for b in loader.epoch(epoch):
            opt.zero_grad()
            logits, aux = model(b.x, b.adj, b.mask)
            ce = F.cross_entropy(logits, b.y)
            (ce + aux).backward()
            opt.step()
            ce_sum += float(ce.detach()) * len(b.y)
            tot_sum += float((ce + aux).detach()) * len(b.y)
        ce_per_epoch.append(ce_sum / len(ds))
        total_per_epoch.append(tot_sum / len(ds))
    assert total_per_epoch[-1] < 0.8 * total_per_epoch[0], total_per_epoch
    # The classification part learns too (chance is ln 3 = 1.10).
    assert ce_per_epoch[-1] < min(ce_per_epoch[0], math.log(3)) - 0.1, ce_per_epoch


def test_symmetric_promise_gives_the_same_training_signal():
    # Undirected input graphs: promising adj_symmetric changes only how the backward gets A^T S
    # (levels >= 1 are symmetric up to rounding), so gradients agree to rounding.
    x, adj, mask, y = _random_batch(seed=None)
    grads = []
    for sym in (None, True):
        torch.manual_seed(0)
        model = DiffPoolClassifier(6, 3, max_nodes=17, num_levels=2, ratio=0.5, hidden=8,
                                   layers=2, backend="torch", adj_symmetric=sym).double()
        logits, aux = model(x.double(), adj, mask)
        (F.cross_entropy(logits, y) + aux).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
