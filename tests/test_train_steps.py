"""Training steps on a GPU (issue 20), the parts a CPU can check: the captured-step bookkeeping of
``train.steps.GraphSteps`` with a fake capture that has a CUDA graph's semantics (a capture
records without running; a replay reruns on whatever the static inputs hold now), the
deterministic-mode switch, and the command's options. ``tests/test_train_cuda.py`` runs the real
thing where CUDA is present."""
import json

import pytest
import torch

from diffpool_fast import cli
from diffpool_fast.data import load_dataset
from diffpool_fast.nn.model import DiffPoolClassifier
from diffpool_fast.sparse_data import Level0Loader
from diffpool_fast.train import loop
from diffpool_fast.train.steps import STEP_STATS, GraphSteps, deterministic, train_step


class FakeGraph:
    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())


class FakeCapture:
    """CudaCapture's three methods on the CPU: ``capture`` records ``fn`` and returns a static
    output it has not computed (NaN) until a replay."""

    def __init__(self, syncs=(), fail=None):
        self.sync_list, self.fail = list(syncs), fail
        self.graphs, self.warm_calls, self.sync_calls = [], 0, 0

    def warm(self, fn):
        self.warm_calls += 1
        return fn()

    def syncs(self, fn):
        self.sync_calls += 1
        return fn(), list(self.sync_list)

    def capture(self, fn):
        if self.fail:
            raise RuntimeError(self.fail)
        g = FakeGraph(fn, torch.full((len(STEP_STATS),), float("nan"), dtype=torch.float64))
        self.graphs.append(g)
        return g, g.out


@pytest.fixture(scope="module")
def ds():
    return load_dataset("synthetic", None, synthetic_graphs=80, seed=1)


def _setup(ds, **kw):
    torch.manual_seed(0)
    model = DiffPoolClassifier(ds.num_features, ds.num_classes, max_nodes=ds.max_nodes, hidden=8, layers=2,
                               batch_norm=kw.pop("norm", "none"), clusters_per_graph=True, adj_symmetric=True,
                               backend="torch")
    return model, loop._adam(model, 1e-2, 0.0)


def _loader(ds, **kw):
    return Level0Loader(ds, range(70), batch_size=8, shuffle=True, seed=3, pad_ladder=True, **kw)


def test_captured_steps_train_every_batch_once_like_plain_steps(ds):
    # plain steps on the same padded batches with static cluster widths: the reference
    ref, ref_opt = _setup(ds)
    ref.static_clusters = True
    model, opt = _setup(ds)
    fake = FakeCapture()
    steps = GraphSteps(model, opt, 2.0, fake, warmup=2)
    assert model.static_clusters
    n_batches = 0
    for epoch in range(3):
        want = loop._train_epoch(ref, ref_opt, _loader(ds), epoch, torch.device("cpu"), 2.0)
        got = loop._train_epoch(model, opt, _loader(ds), epoch, torch.device("cpu"), 2.0, steps=steps)
        assert got == want  # every metric, bit for bit
        n_batches += len(_loader(ds))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    c = steps.counts
    assert sum(c.values()) == n_batches and c["plain"] == 0
    assert c["captured"] == len(steps.graphs) == len(fake.graphs) > 0
    assert c["replayed"] == sum(g.replays for g in fake.graphs) - c["captured"]  # a capture is replayed once
    assert c["warmup"] == fake.warm_calls + fake.sync_calls and fake.sync_calls == len(steps.seen)
    assert all(steps.seen[k] == 3 for k in steps.graphs)  # captured at the shape's 3rd step (2 warm-ups)
    assert all(k[0][0][1] in (8, 12, 16, 24, 32, 48, 64) for k in steps.graphs)  # padded sizes
    s = steps.summary()
    assert s["graphs"] == len(steps.graphs) and s["plain_because"] == [] and s["steps"] == c


def test_a_host_sync_in_the_step_turns_capture_off(ds):
    model, opt = _setup(ds)
    logs = []
    fake = FakeCapture(syncs=["ops/inputs.py:193: called a synchronizing CUDA operation"])
    steps = GraphSteps(model, opt, 2.0, fake, log=logs.append)
    loop._train_epoch(model, opt, _loader(ds), 0, torch.device("cpu"), 2.0, steps=steps)
    assert steps.counts["captured"] == 0 and steps.counts["warmup"] == 1 and not fake.graphs
    assert steps.counts["plain"] == len(_loader(ds)) - 1
    assert len(logs) == 1 and "host sync" in logs[0] and "ops/inputs.py:193" in logs[0]
    assert steps.summary()["host_syncs"] == fake.sync_list


def test_a_failed_capture_falls_back_to_the_plain_step(ds):
    ref, ref_opt = _setup(ds)
    ref.static_clusters = True
    model, opt = _setup(ds)
    logs = []
    steps = GraphSteps(model, opt, 2.0, FakeCapture(fail="out of memory"), warmup=1, log=logs.append)
    for epoch in range(2):
        want = loop._train_epoch(ref, ref_opt, _loader(ds), epoch, torch.device("cpu"), 2.0)
        assert loop._train_epoch(model, opt, _loader(ds), epoch, torch.device("cpu"), 2.0, steps=steps) == want
    assert steps.counts["captured"] == 0 and steps.counts["plain"] > 0 and steps.off is None
    assert logs and all("capture failed (RuntimeError: out of memory)" in t for t in logs[:1])
    # a failure that says the capture itself broke (a sync inside it) stops capturing for the run
    model, opt = _setup(ds)
    steps = GraphSteps(model, opt, 2.0, FakeCapture(fail="operation not permitted when stream is capturing"),
                       warmup=1, log=lambda _: None)
    loop._train_epoch(model, opt, _loader(ds), 0, torch.device("cpu"), 2.0, steps=steps)
    assert steps.off and "capturing" in steps.off


def test_what_is_never_captured(ds):
    model, opt = _setup(ds)
    steps = GraphSteps(model, opt, 2.0, FakeCapture(), warmup=1, max_graphs=1, log=lambda _: None)
    loop._train_epoch(model, opt, _loader(ds, level0="sparse"), 0, torch.device("cpu"), 2.0, steps=steps)
    assert steps.counts == {"plain": len(_loader(ds)), "warmup": 0, "captured": 0, "replayed": 0}
    for epoch in (1, 2, 3):
        loop._train_epoch(model, opt, _loader(ds), epoch, torch.device("cpu"), 2.0, steps=steps)
    assert len(steps.graphs) == 1 and any("more than 1 batch shapes" in r for r in steps.reasons.values())
    model, opt = _setup(ds, norm="batch")
    steps = GraphSteps(model, opt, 2.0, FakeCapture())
    assert steps.off and "batch norm" in steps.off
    batch = next(iter(_loader(ds).epoch(0)))
    assert steps.step(batch).shape == (len(STEP_STATS),) and steps.counts["plain"] == 1


def test_a_non_finite_loss_is_reported_at_the_epochs_end(ds):
    model, opt = _setup(ds)
    with torch.no_grad():
        model.head[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss in \d+ step\(s\) of epoch 3, first at step 1"):
        loop._train_epoch(model, opt, _loader(ds), 2, torch.device("cpu"), 2.0)


def test_step_stats_are_the_host_arithmetic():
    loss, ce = torch.tensor(1.2345678, dtype=torch.float32), torch.tensor(0.3, dtype=torch.float32)
    terms = {"link": torch.tensor(0.1), "ent": torch.tensor(2.5)}
    logits, y = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]), torch.tensor([1, 1, 1])
    from diffpool_fast.train.steps import step_stats

    got = step_stats(loss, ce, terms, logits, y).tolist()
    assert got == [float(loss) * 3, float(ce) * 3, float(terms["link"]) * 3, float(terms["ent"]) * 3, 2.0, 3.0, 0.0]


def test_deterministic_mode_is_for_cuda_and_restored():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic(torch.device("cpu"), True):
        assert not torch.are_deterministic_algorithms_enabled()  # CPU kernels are deterministic already
    with deterministic(torch.device("cuda"), False):
        assert not torch.are_deterministic_algorithms_enabled()
    import os

    import torch.utils.deterministic as td

    fill = td.fill_uninitialized_memory
    with deterministic(torch.device("cuda"), True):  # only flags: nothing here touches a GPU
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") and td.fill_uninitialized_memory is False
    assert not torch.are_deterministic_algorithms_enabled() and td.fill_uninitialized_memory == fill
    with deterministic(torch.device("cuda"), True, fill_uninitialized=True):
        assert td.fill_uninitialized_memory is True
    assert td.fill_uninitialized_memory == fill


@pytest.mark.parametrize("level0", ["dense", "sparse"])
def test_a_training_epoch_runs_under_torchs_deterministic_mode(ds, level0):
    # what the mode refuses on the CPU is refused here; the CUDA-only refusals (a weighted bincount)
    # are kept out of the code by sparse_blocks.weighted_count (tests/test_train_cuda.py runs them)
    model, opt = _setup(ds)
    plain = loop._train_epoch(model, opt, _loader(ds, level0=level0), 0, torch.device("cpu"), 2.0)
    model, opt = _setup(ds)
    torch.use_deterministic_algorithms(True)
    try:
        got = loop._train_epoch(model, opt, _loader(ds, level0=level0), 0, torch.device("cpu"), 2.0)
    finally:
        torch.use_deterministic_algorithms(False)
    assert got == plain


SMALL = ["train", "--synthetic-graphs", "48", "--epochs", "2", "--folds", "2", "--hidden", "8", "--layers", "2",
         "--batch-size", "8", "--progress", "off", "--seed", "4", "--threads", "1"]


def test_the_options_are_recorded_and_inert_on_cpu(tmp_path, capsys):
    rows = {}
    for name, extra in (("a", []), ("b", ["--cuda-graphs", "on", "--deterministic", "off"])):
        out = tmp_path / name
        assert cli.main(SMALL + ["--device", "cpu", "--out", str(out)] + extra) == 0
        rows[name] = [{k: v for k, v in r.items() if "seconds" not in k}
                      for r in __import__("csv").DictReader(open(out / "metrics.csv"))]
        cfg = json.loads((out / "results.json").read_text())["config"]
        assert (cfg["cuda_graphs"], cfg["deterministic"]) == (("off", "on") if name == "a" else ("on", "off"))
    assert "--cuda-graphs on: no CUDA device" in capsys.readouterr().err
    assert rows["a"] == rows["b"]
    # a resume keeps them: another value is refused
    out = tmp_path / "c"
    assert cli.main(SMALL + ["--device", "cpu", "--out", str(out), "--stop-after", "1"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--cuda-graphs", "on"]) == 2
    assert "--cuda-graphs: 'off' -> 'on'" in capsys.readouterr().err


def test_train_step_is_the_epochs_step(ds):
    model, opt = _setup(ds)
    b = next(iter(_loader(ds).epoch(0)))
    stats = train_step(model, opt, b, 2.0)
    assert stats.dtype == torch.float64 and stats[STEP_STATS.index("graphs")] == b.y.numel()
