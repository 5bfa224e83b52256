"""The classifier on PyG-style sparse batches (x, edge_index, batch) against its dense forward on
the same batch (to_dense_batch / to_dense_adj), in float64: logits, auxiliary loss, the loss
terms, every parameter's gradient and the batch-norm running statistics, for every GNN, norm,
JK, readout and readout level; with isolated nodes, single-node graphs, graphs without edges,
duplicate edges, self loops and graphs with no nodes. Also the sparse loader (the same graphs
per batch as the dense one) and training with --level0."""
from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from diffpool_fast.data import DenseLoader, collate, make_synthetic
from diffpool_fast.nn.model import DiffPoolClassifier
from diffpool_fast.sparse_data import Level0Loader, SparseBatch, collate_sparse, model_inputs, prefer_sparse


def _batch(seed=0, sizes=(6, 1, 9, 3, 4, 1), edgeless=(3,), weighted=False):
    """A sparse batch: graph 1 and 5 of one node (5 with a self loop), graph 3 without edges,
    isolated nodes, a duplicate edge and self loops elsewhere."""
    g = torch.Generator().manual_seed(seed)
    eis, off = [], 0
    for k, n in enumerate(sizes):
        if k in edgeless:
            e = torch.zeros(2, 0, dtype=torch.long)
        elif n == 1:
            e = torch.zeros(2, 1 if k == 5 else 0, dtype=torch.long)
        else:
            m = 2 * n
            e = torch.randint(0, n - 1, (2, m), generator=g)  # node n-1: isolated
            e = torch.cat([e, e[:, :1], torch.tensor([[0], [0]])], 1)  # a duplicate, a self loop
        eis.append(e + off)
        off += n
    x = torch.randn(off, 5, generator=g, dtype=torch.float64)
    ei = torch.cat(eis, 1)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    w = (torch.rand(ei.shape[1], generator=g, dtype=torch.float64) + 0.5) if weighted else None
    return x, ei, batch, w


def _dense(x, ei, batch, w, B):
    from torch_geometric.utils import to_dense_adj, to_dense_batch

    xd, mask = to_dense_batch(x, batch, batch_size=B)
    adj = to_dense_adj(ei, batch, w, max_num_nodes=xd.shape[1], batch_size=B).to(torch.float64)
    return xd, adj, mask


def _compare(model, x, ei, batch, w=None, B=None, steps=2, rtol=1e-9, atol=1e-10):
    B = B or int(batch.max()) + 1
    xd, adj, mask = _dense(x, ei, batch, w, B)
    y = torch.arange(B) % 3
    other = copy.deepcopy(model)
    res = []
    for m, args, kw in ((model, (xd, adj, mask), {}),
                        (other, (x, ei, batch), {"edge_weight": w, "num_graphs": B})):
        for _ in range(steps):  # the second step runs on updated running statistics
            for p in m.parameters():
                p.grad = None
            logits, aux, terms = m(*args, **kw, return_terms=True)
            (F.cross_entropy(logits, y) + aux).backward()
        res.append((logits.detach(), aux.detach(), {k: v.detach() for k, v in terms.items()},
                    [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    (l1, a1, t1, g1, b1), (l2, a2, t2, g2, b2) = res
    torch.testing.assert_close(l2, l1, rtol=rtol, atol=atol)
    torch.testing.assert_close(a2, a1, rtol=rtol, atol=atol)
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], rtol=rtol, atol=atol)
    names = [n for n, _ in model.named_parameters()]
    for n, p, q in zip(names, g1, g2):
        assert (p is None) == (q is None), n
        if p is not None:
            torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=lambda s, n=n: f"{n}: {s}")
    for p, q in zip(b1, b2):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)


@pytest.mark.parametrize("gnn", ["sage", "gcn", "gin"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("jk", [True, False])
def test_sparse_batch_matches_dense(gnn, norm, jk):
    x, ei, batch, _ = _batch(1)
    torch.manual_seed(0)
    model = DiffPoolClassifier(5, 3, max_nodes=9, hidden=8, gnn=gnn, jk=jk, batch_norm=norm,
                               readout_levels="all", backend="torch").double()
    _compare(model, x, ei, batch)


@pytest.mark.parametrize("readout", ["mean", "max", "sum"])
@pytest.mark.parametrize("levels", ["last", "all"])
@pytest.mark.parametrize("num_levels", [0, 1, 2])
def test_readouts_and_levels(readout, levels, num_levels):
    x, ei, batch, _ = _batch(2)
    torch.manual_seed(1)
    model = DiffPoolClassifier(5, 3, max_nodes=9, num_levels=num_levels, hidden=8, readout=readout,
                               readout_levels=levels, batch_norm="batch", backend="torch").double()
    _compare(model, x, ei, batch)


@pytest.mark.parametrize("link_norm", ["graph", "numel", "none"])
def test_link_norms_weights_and_empty_graphs(link_norm):
    """Weighted edges (duplicates sum, as to_dense_adj does) and two trailing graphs without
    nodes (num_graphs): the per-graph losses average over the graphs that have nodes."""
    x, ei, batch, w = _batch(3, weighted=True)
    B = int(batch.max()) + 3
    torch.manual_seed(2)
    model = DiffPoolClassifier(5, 3, max_nodes=9, hidden=8, gnn="gcn", link_norm=link_norm, readout="max",
                               readout_levels="all", batch_norm="none", backend="torch").double()
    _compare(model, x, ei, batch, w, B=B)


def test_fused_sage_training_path_agrees():
    """The dense path's fused SAGE blocks (training, bool adjacency as the loader gives it) agree
    with the edge level 0 up to rounding."""
    x, ei, batch, _ = _batch(4)
    key = torch.unique(ei[0] * x.shape[0] + ei[1])  # a bool adjacency holds a duplicate edge once
    ei = torch.stack([key // x.shape[0], key % x.shape[0]])
    torch.manual_seed(3)
    model = DiffPoolClassifier(5, 3, max_nodes=9, hidden=8, batch_norm="batch", backend="torch").double()
    xd, adj, mask = _dense(x, ei, batch, None, int(batch.max()) + 1)
    a = model(xd, adj.bool(), mask)[0]
    b = copy.deepcopy(model)(x, ei, batch)[0]
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_call_forms_and_errors():
    x, ei, batch, _ = _batch(5)
    torch.manual_seed(4)
    model = DiffPoolClassifier(5, 2, max_nodes=9, hidden=8).double().eval()
    ref = model(x, ei, batch)[0]
    torch.testing.assert_close(model(x, ei, batch=batch)[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(model(x, ei.int(), batch)[0], ref, rtol=0, atol=0)
    one = batch == 0
    n0 = int(one.sum())
    e0 = ei[:, (ei[0] < n0)]
    torch.testing.assert_close(model(x[one], e0)[0], ref[:1], rtol=1e-12, atol=1e-12)  # one graph, no batch
    with pytest.raises(ValueError, match="once"):
        model(x, ei, batch, batch=batch)
    with pytest.raises(ValueError, match="num_graphs"):
        model(x, ei, batch, num_graphs=2)
    with pytest.raises(ValueError, match="outside"):
        model(x, ei + 100, batch)
    with pytest.raises(TypeError, match="int64"):
        model(x, ei, batch.double())
    with pytest.raises(ValueError, match="edge-list form"):
        model(x[None], torch.zeros(1, x.shape[0], x.shape[0]), edge_weight=torch.ones(3))


def _dataset():
    ds = make_synthetic(40, seed=3)
    # a duplicate edge and a self loop in graph 0: the bool dense batch holds them once
    ds.edges[0] = torch.cat([ds.edges[0], ds.edges[0][:, :2], torch.tensor([[0], [0]])], 1)
    return ds


def test_collate_sparse_is_the_dense_batch():
    from torch_geometric.utils import to_dense_adj, to_dense_batch

    ds = _dataset()
    idx = [5, 0, 17, 3]
    sb, db = collate_sparse(ds, idx), collate(ds, idx)
    xd, mask = to_dense_batch(sb.x, sb.batch, batch_size=4)
    assert torch.equal(xd, db.x) and torch.equal(mask, db.mask) and torch.equal(sb.y, db.y)
    assert torch.equal(to_dense_adj(sb.edge_index, sb.batch, max_num_nodes=xd.shape[1], batch_size=4).bool(), db.adj)
    key = sb.edge_index[0] * sb.x.shape[0] + sb.edge_index[1]
    assert bool((key[1:] > key[:-1]).all())  # sorted and unique: the pooling needs no sort
    assert sb.num_graphs == 4 and sb.to("cpu").x is not None


@pytest.mark.parametrize("shuffle", [True, False])
def test_level0_loader_same_batches_as_dense(shuffle, monkeypatch):
    ds = _dataset()
    kw = dict(batch_size=6, shuffle=shuffle, bucket=True, seed=11)
    dense = DenseLoader(ds, list(range(3, 40)), **kw)
    for level0 in ("dense", "sparse", "auto"):
        loader = Level0Loader(ds, list(range(3, 40)), level0=level0, **kw)
        for e in (0, 1):
            got, want = list(loader.epoch(e)), list(dense.epoch(e))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert torch.equal(g.y, w.y)
                if isinstance(g, SparseBatch):
                    assert torch.equal(g.x, w.x[w.mask])
                else:
                    assert all(torch.equal(a, b) for a, b in zip(g, w))
    monkeypatch.setenv("DIFFPOOL_FAST_SPARSE", "1")
    assert prefer_sparse(10, 2, 100)
    monkeypatch.setenv("DIFFPOOL_FAST_SPARSE", "0")
    assert not prefer_sparse(10_000, 2, 100)
    monkeypatch.setenv("DIFFPOOL_FAST_SPARSE", "auto")
    from diffpool_fast import sparse_data

    n = sparse_data.SPARSE_MIN_NODES
    assert prefer_sparse(n, 20, 20 * n * 3)
    assert not prefer_sparse(n - 1, 20, 20 * n)
    assert not prefer_sparse(n, 1, n * n)  # dense
    assert not prefer_sparse(n, 20, 20 * n * 3, device="cuda")
    with pytest.raises(ValueError, match="level0"):
        Level0Loader(ds, level0="csr")


def test_model_inputs_forms():
    ds = _dataset()
    args, kw = model_inputs(collate(ds, [0, 1]))
    assert len(args) == 3 and kw.keys() == {"graph_sizes"}
    assert kw["graph_sizes"].tolist() == ds.num_nodes[[0, 1]].tolist()
    args, kw = model_inputs(collate_sparse(ds, [0, 1]))
    assert len(args) == 2 and kw["num_graphs"] == 2 and kw["graph_sizes"].tolist() == ds.num_nodes[[0, 1]].tolist()
    args, kw = model_inputs(collate(ds, [0, 1])._replace(sizes=None))  # without the host's node counts
    assert kw == {}


def _train(tmp_path, name, *extra):
    from diffpool_fast import cli

    out = tmp_path / name
    argv = ["train", "--dataset", "synthetic", "--synthetic-graphs", "48", "--epochs", "2", "--hidden", "8",
            "--batch-size", "8", "--threads", "1", "--progress", "off", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    with open(out / "metrics.csv") as f:
        return out, list(csv.DictReader(f))


def test_train_level0_sparse_and_resume(tmp_path):
    import json

    _, dense = _train(tmp_path, "dense", "--level0", "dense")
    out, sparse = _train(tmp_path, "sparse", "--level0", "sparse")
    assert json.loads((out / "results.json").read_text())["config"]["level0"] == "sparse"
    for a, b in zip(dense, sparse):  # float32: the same training up to rounding
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-3)
    # an interrupted sparse run resumes to the same numbers
    out2, _ = _train(tmp_path, "sparse2", "--level0", "sparse", "--stop-after", "1")
    from diffpool_fast import cli

    assert cli.main(["train", "--resume", "--out", str(out2), "--progress", "off"]) == 0
    with open(out2 / "metrics.csv") as f:
        again = list(csv.DictReader(f))
    skip = {"train_seconds", "epoch_seconds"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in again] == \
        [{k: v for k, v in r.items() if k not in skip} for r in sparse]
