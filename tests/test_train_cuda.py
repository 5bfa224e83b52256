"""Training on CUDA (issue 20): reproducible runs and exact resume on both level-0 kinds with the
default ``--deterministic on``, batches built on the GPU, and captured steps (``--cuda-graphs``)
with a real CUDA graph. Skipped without CUDA (the CPU checks of the same code paths are in
tests/test_train_steps.py and tests/test_device_batches.py)."""
import csv
import json

import pytest
import torch

from diffpool_fast import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = ["train", "--synthetic-graphs", "48", "--epochs", "3", "--folds", "2", "--hidden", "8", "--layers", "2",
         "--batch-size", "8", "--dropout", "0.2", "--progress", "off", "--seed", "4", "--device", "cuda"]
SKIP = {"train_seconds", "epoch_seconds"}


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in SKIP} for r in csv.DictReader(f)]


def _last_model(out):
    return torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")["last_model"]


def _same_models(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra", [["--level0", "dense"], ["--level0", "sparse"],
                                   ["--level0", "dense", "--cuda-graphs", "on"]], ids=["dense", "sparse", "graphs"])
def test_two_runs_and_a_resumed_run_are_bit_identical(tmp_path, extra):
    runs = {}
    for name in ("a", "b"):
        runs[name] = tmp_path / name
        assert cli.main(SMALL + extra + ["--out", str(runs[name])]) == 0
    assert _rows(runs["a"]) == _rows(runs["b"])
    _same_models(_last_model(runs["a"]), _last_model(runs["b"]))
    out = tmp_path / "resumed"
    assert cli.main(SMALL + extra + ["--out", str(out), "--stop-after", "2"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 0
    assert _rows(out) == _rows(runs["a"])
    _same_models(_last_model(out), _last_model(runs["a"]))
    res = json.loads((runs["a"] / "results.json").read_text())
    assert res["config"]["deterministic"] == "on"
    if "--cuda-graphs" in extra:
        summary = res["folds"][0]["cuda_graphs"]
        print(json.dumps(summary, indent=1))  # what was captured, or why not (the host syncs left)
        assert sum(summary["steps"].values()) > 0


def test_resident_batches_equal_the_cpu_batches():
    from diffpool_fast.data import collate, load_dataset
    from diffpool_fast.sparse_data import collate_on, collate_sparse

    ds = load_dataset("synthetic", None, synthetic_graphs=40, seed=0)
    for idx in ([0], [3, 1, 7, 20, 5]):
        for a, b in ((collate_on(ds, idx, None, "cuda"), collate(ds, idx)),
                     (collate_sparse(ds, idx, device="cuda"), collate_sparse(ds, idx))):
            for u, v in zip(a[:4], b[:4]):
                assert u.is_cuda and torch.equal(u.cpu(), v)
            assert torch.equal(a.sizes, b.sizes) and a.sizes.device.type == "cpu"


def test_the_edge_list_pooling_is_bit_identical_under_deterministic_mode():
    from diffpool_fast import sparse_diff_pool

    g = torch.Generator().manual_seed(0)
    N, C, F, B = 3000, 12, 16, 8
    batch = torch.sort(torch.randint(0, B, (N,), generator=g)).values
    src, dst = torch.randint(0, N, (2, 40000), generator=g)
    keep = batch[src] == batch[dst]
    ei = torch.stack([src[keep], dst[keep]]).cuda()
    x, s = torch.randn(N, F, generator=g).cuda(), torch.randn(N, C, generator=g).cuda()
    w = torch.rand(ei.shape[1], generator=g).cuda()
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            xr, sr, wr = x.clone().requires_grad_(), s.clone().requires_grad_(), w.clone().requires_grad_()
            out = sparse_diff_pool(xr, ei, sr, batch.cuda(), wr, per_graph=True)
            total = sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), device="cuda", dtype=torch.float64)
                         .view_as(o)).sum() for o in out)
            grads = torch.autograd.grad(total, [xr, sr, wr])
            results.append([o.detach().cpu() for o in out] + [t.cpu() for t in grads])
    finally:
        torch.use_deterministic_algorithms(False)
    for u, v in zip(*results):
        assert torch.equal(u, v)


class _Toy(torch.nn.Module):
    """A classifier with DiffPoolClassifier's call and outputs and no host sync: the capture
    mechanics on a real GPU, whatever the coarsening ops still read from the device."""

    def __init__(self, f, classes):
        super().__init__()
        self.lin = torch.nn.Linear(f, 16)
        self.out = torch.nn.Linear(16, classes)

    def forward(self, x, adj, mask, graph_sizes=None, return_terms=False):
        h = torch.relu(self.lin(torch.bmm(adj.to(x.dtype), x) + x)) * mask.unsqueeze(-1)
        logits = self.out(h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
        link, ent = h.square().mean(), h.abs().mean()
        return logits, 0.01 * (link + ent), {"link": link, "ent": ent}


def test_real_captured_steps_equal_plain_steps():
    from diffpool_fast.data import load_dataset
    from diffpool_fast.sparse_data import Level0Loader
    from diffpool_fast.train import loop
    from diffpool_fast.train.steps import CudaCapture, GraphSteps

    ds = load_dataset("synthetic", None, synthetic_graphs=80, seed=1)
    dev = torch.device("cuda")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = _Toy(ds.num_features, ds.num_classes).to(dev)
        models.append((m, loop._adam(m, 1e-2, 0.0, capturable=True)))
    steps = GraphSteps(*models[1], 2.0, CudaCapture(dev), warmup=2)

    def loader():
        return Level0Loader(ds, range(70), batch_size=8, shuffle=True, seed=3, pad_ladder=True, resident=True,
                            device=dev)

    for epoch in range(4):
        want = loop._train_epoch(*models[0], loader(), epoch, dev, 2.0)
        got = loop._train_epoch(*models[1], loader(), epoch, dev, 2.0, steps=steps)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert steps.counts["captured"] > 0 and steps.counts["replayed"] > 0, steps.summary()
    assert not steps.syncs, steps.syncs
    for p, q in zip(models[0][0].parameters(), models[1][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
