"""Batches built on a device (issue 20): the dataset copied once, each batch built there from the
host's node counts (no host sync, no copy per batch), and the model's levels sized on the host
(``graph_sizes``) or from the padded shape (``static_clusters``, for captured CUDA graphs).

The device paths run on CPU tensors here: the same code, checked against the CPU collate and the
default forward pass."""
import pytest
import torch

from diffpool_fast.data import collate, load_dataset
from diffpool_fast.nn.model import DiffPoolClassifier, cluster_plan, graph_clusters
from diffpool_fast.sparse_data import Level0Loader, collate_on, collate_sparse, model_inputs, padded_size, resident
from diffpool_fast.train import loop
from diffpool_fast.train.steps import STEP_STATS


@pytest.fixture(scope="module")
def ds():
    return load_dataset("synthetic", None, synthetic_graphs=60, seed=3)


def _same(a, b):
    assert type(a) is type(b)
    for name, u, v in zip(a._fields, a, b):
        assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), name


@pytest.mark.parametrize("pad", [None, 64])
def test_a_batch_built_on_the_device_equals_the_cpu_batch(ds, pad):
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 17):
        idx = torch.randperm(len(ds), generator=g)[:n]
        _same(collate_on(ds, idx, pad, "cpu"), collate(ds, idx, pad))
        _same(collate_on(ds, idx, pad, "cpu", device_indices=idx.clone()), collate(ds, idx, pad))
        _same(collate_sparse(ds, idx, device="cpu"), collate_sparse(ds, idx))
    _same(collate_sparse(ds, [], device="cpu"), collate_sparse(ds, []))
    assert resident(ds, "cpu") is resident(ds, "cpu")  # copied once


def test_collate_on_refuses_a_pad_below_the_largest_graph(ds):
    with pytest.raises(ValueError, match="pad_to"):
        collate_on(ds, [0, 1, 2], 1, "cpu")


@pytest.mark.parametrize("level0", ["dense", "sparse"])
def test_a_resident_loader_gives_the_cpu_loader_batches(ds, level0):
    kw = dict(batch_size=7, shuffle=True, seed=4, level0=level0)
    host, dev = Level0Loader(ds, range(50), **kw), Level0Loader(ds, range(50), resident=True, **kw)
    for epoch in (0, 3):
        pairs = list(zip(host.epoch(epoch), dev.epoch(epoch)))
        assert len(pairs) == len(host)
        for a, b in pairs:
            _same(a, b)
    for a, b in zip(Level0Loader(ds, range(9), level0=level0).epoch(), Level0Loader(ds, range(9), level0=level0,
                                                                                  resident=True).epoch()):
        _same(a, b)


def test_padded_sizes_are_few_and_hold_the_graph():
    sizes = [padded_size(n) for n in range(1, 1025)]
    assert all(s >= n for n, s in zip(range(1, 1025), sizes))
    assert all(s <= max(8, 1.5 * n) for n, s in zip(range(1, 1025), sizes))
    assert sorted(set(sizes)) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]


def test_a_ladder_loader_pads_to_the_ladder(ds):
    L = Level0Loader(ds, range(40), batch_size=6, shuffle=True, pad_ladder=True)
    for b in L.epoch(1):
        assert b.x.shape[1] == padded_size(int(b.sizes.max()))
        assert torch.equal(b.mask.sum(1), b.sizes)


def test_cluster_plan_is_what_the_forward_pass_reads_from_the_tensors():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        B = int(torch.randint(1, 9, (1,), generator=g))
        sizes = torch.randint(0, 40, (B,), generator=g)
        if torch.rand((), generator=g) < 0.3:
            sizes[:] = int(sizes.max())
        C = [int(c) for c in torch.randint(1, 12, (2,), generator=g)]
        plan = cluster_plan(sizes, 0.25, C)
        # the device's way: masks level by level
        N = max(int(sizes.max()), 1)
        mask = torch.arange(N)[None, :] < sizes[:, None]
        for (K, all_real), c in zip(plan, C):
            k = graph_clusters(mask.sum(1), 0.25, c)
            has = mask.any(1)
            assert K == int(k.max())
            nxt = (torch.arange(K)[None, :] < k[:, None]) & has[:, None]
            assert all_real == bool(nxt.all())
            mask = nxt


def _model(ds, **kw):
    torch.manual_seed(0)
    return DiffPoolClassifier(ds.num_features, ds.num_classes, max_nodes=ds.max_nodes, hidden=8, layers=2,
                              batch_norm="none", clusters_per_graph=True, **kw).double()


@pytest.mark.parametrize("level0", ["dense", "sparse"])
def test_graph_sizes_give_the_same_forward_and_backward(ds, level0):
    model = _model(ds)
    L = Level0Loader(ds, range(len(ds)), batch_size=9, shuffle=True, seed=2, level0=level0)
    for b in L.epoch(0):
        b = b._replace(x=b.x.double())
        args, kw = model_inputs(b)
        assert "graph_sizes" in kw
        out = []
        for k in (kw, {n: v for n, v in kw.items() if n != "graph_sizes"}):
            model.zero_grad()
            logits, aux = model(*args, **k)
            (logits.square().sum() + aux).backward()
            out.append([logits, aux] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        for u, v in zip(*out):
            assert torch.equal(u, v)  # bit for bit: the same K and masks, decided on the host


def test_wrong_graph_sizes_are_refused_on_cpu(ds):
    model = _model(ds)
    b = collate(ds, [0, 1, 2])
    x = b.x.double()
    with pytest.raises(ValueError, match="disagree"):
        model(x, b.adj, b.mask, graph_sizes=b.sizes - 1)
    with pytest.raises(ValueError, match="graph_sizes"):
        model(x, b.adj, b.mask, graph_sizes=b.sizes[:2])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU tensor"):
            model(x, b.adj, b.mask, graph_sizes=b.sizes.cuda())


def test_static_clusters_compute_the_same_function_in_float64(ds):
    # the padded shape alone sizes the levels (the extra clusters are masked out): same values,
    # same gradients, up to rounding; shapes depend on N only
    model = _model(ds)
    L = Level0Loader(ds, range(len(ds)), batch_size=9, shuffle=True, seed=2, pad_ladder=True)
    for b in L.epoch(0):
        args, kw = model_inputs(b._replace(x=b.x.double()))
        res = []
        for static in (False, True):
            model.static_clusters = static
            model.zero_grad()
            logits, aux, terms = model(*args, **kw, return_terms=True)
            (logits.square().sum() + aux).backward()
            res.append([logits, aux, terms["link"], terms["ent"]] + [p.grad.clone() for p in model.parameters()])
        model.static_clusters = False
        for u, v in zip(*res):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    assert model.static_plan(64) == [(16, False), (4, False)][:len(model.levels)] or model.levels[0].clusters < 16


def test_a_training_epoch_makes_no_host_sync_in_the_loop_or_the_model(ds, monkeypatch):
    """One epoch's steps on the CPU, every op that would wait for a GPU recorded with where it was
    called from: none in the training loop, the loaders or the model's own code (the coarsening
    ops' remaining checks are listed apart, for the op issue). The epoch's one read is at its end."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "equal",
               "is_nonzero", "item"}
    here = ("train/loop.py", "nn/model.py", "nn/sage_blocks.py", "nn/layers.py", "sparse_data.py", "data.py")
    # functions that compute on the host's own CPU tensors by design (the node counts, the batch
    # order): not a wait for the device on CUDA, where their operands stay on the CPU
    host_side = {"cluster_plan", "_plan", "static_plan", "collate_on", "_collate_sparse_on", "pad_for", "form",
                 "batch_indices", "_batches", "padded_size"}

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mine, self.others = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            bool_index = name == "index" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                 for t in (args[1] if len(args) > 1 else ()) if t is not None)
            if name in syncing or bool_index or (name == "repeat_interleave" and "output_size" not in (kwargs or {})):
                frames = [f for f in traceback.extract_stack() if "diffpool_fast" in f.filename]
                if any(f.name in host_side for f in frames):
                    return func(*args, **(kwargs or {}))
                where = f"{frames[-1].filename.split('diffpool_fast/')[-1]}:{frames[-1].lineno}" if frames else "?"
                (self.mine if where.startswith(here) else self.others).append((name, where))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = DiffPoolClassifier(ds.num_features, ds.num_classes, max_nodes=ds.max_nodes, hidden=8, layers=2,
                               batch_norm="none", clusters_per_graph=True, adj_symmetric=True, backend="torch")
    opt = loop._adam(model, 1e-3, 0.0)
    loader = Level0Loader(ds, range(40), batch_size=8, shuffle=True, resident=True, level0="dense")
    steps = len(loader)
    reads = []
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        reads.append(t.numel())
        return real_tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    spy = Spy()
    with spy:
        metrics = loop._train_epoch(model, opt, loader, 0, torch.device("cpu"), 2.0)
    assert reads == [len(STEP_STATS)]  # the epoch's one read of its sums
    assert not spy.mine, spy.mine
    assert 0 <= metrics["acc"] <= 1 and steps == 5
    # what is left comes from the coarsening ops' checks (not this issue's files), at most a few per step
    assert len(spy.others) <= 4 * steps, sorted(set(spy.others))
