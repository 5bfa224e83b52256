"""Data-parallel training (diffpool_fast.train.distributed): the shards, the float64 equality of
2 gloo ranks with one process at twice the batch, and a killed rank (a clear stop, then --resume)."""
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from diffpool_fast.cli import build_parser, main
from diffpool_fast.train import distributed, loop

# 33 training graphs at global batch 8: four full batches and one of a single graph, which
# leaves rank 1 without a graph (the zero-weighted placeholder).
PER_RANK, WORLD, N_TRAIN, EPOCHS = 4, 2, 33, 2


def _setup():
    from diffpool_fast.data import load_dataset

    args = build_parser().parse_args(["train", "--hidden", "8", "--layers", "2", "--synthetic-graphs", "40",
                                      "--dropout", "0", "--norm", "none"])
    cfg = loop._run_config(args)
    ds = load_dataset("synthetic", None, synthetic_graphs=40, seed=0)
    torch.manual_seed(3)
    model = loop._build_model(cfg, ds).double()
    return ds, list(range(N_TRAIN)), model, loop._adam(model, 1e-2, 0.0)


def _rank(rank, tmp):
    import torch.distributed as td

    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                          timeout=timedelta(seconds=60))
    try:
        ds, idx, model, opt = _setup()
        dist = distributed.Dist(WORLD, rank, 0)
        loader = dist.loader(ds, idx, batch_size=PER_RANK, shuffle=True, seed=5)
        metrics = [dist.train_epoch(model, opt, loader, e, torch.device("cpu"), 2.0, dtype=torch.float64)
                   for e in range(EPOCHS)]
        torch.save({"params": model.state_dict(), "metrics": metrics}, Path(tmp) / f"rank{rank}.pt")
    finally:
        td.destroy_process_group()


class _Double:
    def __init__(self, loader):
        self.loader = loader

    def epoch(self, e=0):
        for b in self.loader.epoch(e):
            yield b._replace(x=b.x.double())


def test_two_gloo_ranks_equal_one_process_at_twice_the_batch(tmp_path):
    import torch.multiprocessing as mp

    from diffpool_fast.data import DenseLoader

    mp.spawn(_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ds, idx, model, opt = _setup()
    loader = DenseLoader(ds, idx, batch_size=PER_RANK * WORLD, shuffle=True, seed=5)
    assert len(loader.batch_indices(0)[-1]) == 1 or any(len(b) < WORLD for b in loader.batch_indices(1))
    ref = [loop._train_epoch(model, opt, _Double(loader), e, torch.device("cpu"), 2.0) for e in range(EPOCHS)]
    steps = EPOCHS * len(loader)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, p in model.state_dict().items():
            q = got["params"][name]
            assert q.dtype == torch.float64
            assert (q - p).abs().max().item() <= 1e-10, (rank, name, steps)
        for m, r in zip(got["metrics"], ref):
            for k in r:
                assert m[k] == pytest.approx(r[k], rel=1e-10, abs=1e-12), k
    assert any((p != q).any() for p, q in zip(model.state_dict().values(), _setup()[2].state_dict().values()))


def test_shards_are_deterministic_disjoint_complete_and_balanced():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 200, (500,), generator=g)
    for world in (1, 2, 3, 4, 7):
        for _ in range(20):
            n = int(torch.randint(1, 40, (1,), generator=g))
            batch = torch.randperm(500, generator=g)[:n]
            parts = distributed.shard(batch, sizes, world)
            assert parts == distributed.shard(batch, sizes, world)
            flat = [i for p in parts for i in p]
            assert sorted(flat) == sorted(batch.tolist())
            assert len(flat) == len(set(flat))
            pos = {int(i): k for k, i in enumerate(batch)}
            assert all([pos[i] for i in p] == sorted(pos[i] for i in p) for p in parts)  # batch order kept
            if n >= world:
                assert all(parts)
            loads = [int(sizes[p].sum()) if p else 0 for p in parts]
            assert max(loads) - min(loads) <= int(sizes[batch].max())


def test_the_sharded_loader_splits_the_one_process_batches():
    from diffpool_fast.data import DenseLoader, load_dataset

    ds = load_dataset("synthetic", None, synthetic_graphs=40, seed=0)
    whole = DenseLoader(ds, range(37), batch_size=6, shuffle=True, seed=2)
    ranks = [distributed.Dist(3, r).loader(ds, range(37), batch_size=2, shuffle=True, seed=2) for r in range(3)]
    for epoch in (0, 4):
        per_rank = [r.shards(epoch) for r in ranks]
        for k, b in enumerate(whole.batch_indices(epoch)):
            got = sorted(i for r in per_rank for i in r[k][0])
            assert got == sorted(b.tolist())


# --------------------------------------------------------------------------- the command

def _cmd(out, *extra):
    return [sys.executable, "-m", "diffpool_fast", "train", "--dataset", "synthetic", "--synthetic-graphs", "40",
            "--hidden", "8", "--layers", "1", "--levels", "1", "--batch-size", "4", "--progress", "off",
            "--out", str(out), *extra]


def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_pid(launcher, rank):
    todo, seen = [launcher], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    for p in seen:
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return p
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_every_rank_clearly_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, DIFFPOOL_FAST_DIST_TIMEOUT="30")
    p = subprocess.Popen(_cmd(out, "--epochs", "200", "--nproc-per-node", "2", "--threads", "1"), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    victim = None
    while time.monotonic() < deadline and p.poll() is None:
        rows = (out / "metrics.csv").read_text().count("\n") - 1 if (out / "metrics.csv").is_file() else 0
        if rows >= 2:
            victim = _rank_pid(p.pid, 1)
            if victim:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.05)
    assert victim, "the run ended or never started before a rank could be killed"
    _, err = p.communicate(timeout=90)  # never a hang: the timeout would fail the test
    assert p.returncode != 0
    assert "a rank failed" in err and f"--resume --out {out} --nproc-per-node 2" in err, err[-2000:]

    # another world size is refused, naming both
    assert main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 2
    assert "trained by 2 rank(s), this is 1" in capsys.readouterr().err

    done = subprocess.run(_cmd(out, "--resume", "--nproc-per-node", "2", "--stop-after", "3"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-12000:]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["runtime"]["world_size"] == 2 and state["epoch"] >= 5
    assert [r["epoch"] for r in state["history"]] == list(range(1, state["epoch"] + 1))
