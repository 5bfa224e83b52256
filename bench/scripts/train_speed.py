"""Training throughput: PyG's DiffPool example vs DiffPoolClassifier with the same architecture.

Setting of the issue: PROTEINS graphs with at most 150 nodes (PyG's example filter), batch 20,
2 CPU threads, one optimiser step per batch (Adam, lr 1e-3), graphs/s over whole epochs.

Providers, interleaved: each round runs ``--steps`` training steps of every provider in turn
(order reversed every other round), so a load spike from other jobs on the machine hits all of
them alike; each provider's stream continues through successive epochs, so over the run it
sees a representative mix of batches. Throughput = graphs timed / seconds timed:

- ``pyg-example``: PyG's pipeline: TUDataset with ``ToDense(150)``, ``DenseDataLoader``, the
  example's network (``PyGDiffPoolNet``: DenseSAGEConv, ``torch_geometric.nn.dense_diff_pool``),
  loss = NLL only (the example drops the auxiliary losses).
- ``pyg-net-our-batches``: the same network on our collated batches padded to 150 (float adj):
  isolates the model from PyG's data loader.
- ``ours-padded``: ``DiffPoolClassifier`` with the example's architecture (SAGE, hidden 64, 3
  layers, JK, ratio 0.25 of 150 -> 38, 10 clusters, mean readout), torch backend (lean
  pooling), batches padded to 150, loss = CE + link + entropy.
- ``ours-bucketed``: the same, with size-bucketed batches (each pads to its own largest graph).
  Both ``ours-*`` train as ``diffpool-fast train`` does: fused SAGE blocks (one autograd node per
  GNN block, ``diffpool_fast.nn.sage_blocks``) and fused Adam (``diffpool_fast.train.loop._adam``).
- ``ours-pergraph-padded`` / ``ours-pergraph-bucketed``: ``ours-padded`` / ``ours-bucketed`` with
  clusters per graph (``clusters_per_graph=True``: k_b = ceil(0.25 n_b) at level 1, ceil(0.25 k_b)
  at level 2, at most 38 and 10; each level as wide as its batch's largest k_b, levels >= 1
  masked). ``ours-padded`` and ``ours-bucketed`` are the fixed-k forms (38 and 10 clusters).
- ``ours-bucketed-modules``: ``ours-bucketed`` with the layer modules (no fused blocks) and the
  default Adam, to show what the two fusions contribute.
- ``ours-level0-3nodes``: ``ours-bucketed``'s batches (loaded the same way) cut to the first 3
  nodes of every graph before the step: level 0 then costs almost nothing, while levels 1-2 (38
  and 10 clusters, fixed by max_nodes), the final GNN, the head and Adam cost what they cost in
  ``ours-bucketed``. Its rate bounds what any speed-up of level 0 (bucketing, kernels) can give
  this architecture with the rest of the step as it is.

Usage: python bench/scripts/train_speed.py [--data-root DIR] [--rounds 24] [--threads 2]
on a quiet machine. OMP_WAIT_POLICY=PASSIVE helps only on a machine shared with other jobs (where
spinning 2-thread OpenMP teams can collapse to a few graphs/s); on the quiet machine it made every
provider 2.2-2.9x slower and moved the ratios (bench/notes/train_speed_passive.md vs
bench/notes/train_speed.md, two runs on 2026-11-25: PyG's example 264 vs 584 graphs/s,
ours-bucketed 1.59x vs 2.09x), so never compare runs with and without it.
Writes bench/results/<UTC date>-<device>-train_speed/train_speed.csv and train_speed.md
(command, machine, versions, date included; bench/README.md); ``--out STEM`` writes STEM.csv and
STEM.md instead. The reading of the recorded run is bench/notes/train_speed.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _default_root():
    for cand in (os.environ.get("DIFFPOOL_FAST_DATA"), REPO.parent / "shared" / "tudata", REPO / "data"):
        if cand and (Path(cand) / "PROTEINS").is_dir():
            return str(cand)
    return str(REPO / "data")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=_default_root())
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--steps", type=int, default=14, help="training steps (batches) per provider per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--max-nodes", type=int, default=150)
    ap.add_argument("--providers", default="pyg-example,ours-padded,ours-bucketed,ours-pergraph-padded,"
                    "ours-pergraph-bucketed")
    ap.add_argument("--out", default=None,
                    help="path stem: writes STEM.csv and STEM.md (default: a new folder in bench/results/)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import torch_geometric
    import torch_geometric.transforms as T
    from torch_geometric.datasets import TUDataset
    from torch_geometric.loader import DenseDataLoader

    from diffpool_fast import __version__
    from diffpool_fast.data import DenseLoader, _link_raw, load_tu
    from diffpool_fast.nn.baselines import PyGDiffPoolNet
    from diffpool_fast.nn.model import DenseGNN, DiffPoolClassifier
    from diffpool_fast.train.loop import _adam

    M, B = args.max_nodes, args.batch_size
    ds = load_tu("PROTEINS", args.data_root)
    keep = [i for i in range(len(ds)) if int(ds.num_nodes[i]) <= M]
    ds = ds.subset(keep)
    n_graphs = len(ds)

    # PyG's own pipeline on the same raw files (its own processed cache in a temp folder).
    tmp = tempfile.mkdtemp(prefix="pyg_dense_")
    src = Path(args.data_root) / "PROTEINS"
    _link_raw(src / "raw" if (src / "raw").is_dir() else src, Path(tmp) / "PROTEINS" / "raw", "PROTEINS")
    pyg_ds = TUDataset(tmp, "PROTEINS", transform=T.ToDense(M), pre_filter=lambda d: d.num_nodes <= M)
    assert len(pyg_ds) == n_graphs, (len(pyg_ds), n_graphs)

    torch.manual_seed(0)
    pyg_net = PyGDiffPoolNet(ds.num_features, ds.num_classes, max_nodes=M)
    pyg_net2 = PyGDiffPoolNet(ds.num_features, ds.num_classes, max_nodes=M)
    ours_kw = dict(max_nodes=M, num_levels=2, ratio=0.25, hidden=64, gnn="sage", layers=3, jk=True,
                   readout="mean", readout_levels="last", backend="torch",
                   adj_symmetric=True if ds.undirected else None)
    ours_pad = DiffPoolClassifier(ds.num_features, ds.num_classes, **ours_kw)
    ours_bkt = DiffPoolClassifier(ds.num_features, ds.num_classes, **ours_kw)
    ours_mod = DiffPoolClassifier(ds.num_features, ds.num_classes, **ours_kw)
    ours_l03 = DiffPoolClassifier(ds.num_features, ds.num_classes, **ours_kw)
    ours_pg_pad = DiffPoolClassifier(ds.num_features, ds.num_classes, clusters_per_graph=True, **ours_kw)
    ours_pg_bkt = DiffPoolClassifier(ds.num_features, ds.num_classes, clusters_per_graph=True, **ours_kw)
    for mod in ours_mod.modules():
        if isinstance(mod, DenseGNN):
            mod.fused = False
    assert ours_pad.clusters == pyg_net.clusters, (ours_pad.clusters, pyg_net.clusters)

    pyg_loader = DenseDataLoader(pyg_ds, batch_size=B, shuffle=True)
    pad_loader = DenseLoader(ds, batch_size=B, shuffle=True, bucket=False, pad_to=M, seed=1)
    bkt_loader = DenseLoader(ds, batch_size=B, shuffle=True, bucket=True, seed=1)
    bkt_loader2 = DenseLoader(ds, batch_size=B, shuffle=True, bucket=True, seed=1)
    bkt_loader3 = DenseLoader(ds, batch_size=B, shuffle=True, bucket=True, seed=1)
    pad_loader_pg = DenseLoader(ds, batch_size=B, shuffle=True, bucket=False, pad_to=M, seed=1)
    bkt_loader_pg = DenseLoader(ds, batch_size=B, shuffle=True, bucket=True, seed=1)

    def step_pyg(net, opt, x, adj, mask, y):
        opt.zero_grad()
        out, _, _ = net(x, adj, mask)
        loss = F.nll_loss(out, y.view(-1))
        loss.backward()
        opt.step()

    def step_ours(net, opt, x, adj, mask, y):
        opt.zero_grad()
        logits, aux = net(x, adj, mask)
        loss = F.cross_entropy(logits, y) + aux
        loss.backward()
        opt.step()

    # Every provider is an endless stream of training steps over successive epochs; a round runs
    # `--steps` steps of each provider in turn (order reversed every other round), so load from
    # other jobs on the machine falls on all providers alike.
    def stream_pyg_example():
        net, opt = providers["pyg-example"][1:]
        while True:
            for data in pyg_loader:
                yield lambda d=data: step_pyg(net, opt, d.x, d.adj, d.mask, d.y), data.y.numel()

    def stream_pyg_ours_batches():
        net, opt = providers["pyg-net-our-batches"][1:]
        for epoch in range(10**9):
            for b in pad_loader.epoch(epoch):
                yield lambda b=b: step_pyg(net, opt, b.x, b.adj.float(), b.mask, b.y), b.y.numel()

    def stream_ours(loader, key, keep_nodes=None):
        def gen():
            net, opt = providers[key][1:]
            k = keep_nodes
            for epoch in range(10**9):
                for b in loader.epoch(epoch):
                    if k is None:
                        yield lambda b=b: step_ours(net, opt, b.x, b.adj, b.mask, b.y), b.y.numel()
                    else:  # the first k nodes of every graph (the cut happens inside the timed step)
                        yield (lambda b=b: step_ours(net, opt, b.x[:, :k], b.adj[:, :k, :k],
                                                     None if b.mask is None else b.mask[:, :k], b.y)), b.y.numel()
        return gen

    providers = {
        "pyg-example": [stream_pyg_example, pyg_net, torch.optim.Adam(pyg_net.parameters(), 1e-3)],
        "pyg-net-our-batches": [stream_pyg_ours_batches, pyg_net2, torch.optim.Adam(pyg_net2.parameters(), 1e-3)],
        "ours-padded": [stream_ours(pad_loader, "ours-padded"), ours_pad, _adam(ours_pad, 1e-3, 0.0)],
        "ours-bucketed": [stream_ours(bkt_loader, "ours-bucketed"), ours_bkt, _adam(ours_bkt, 1e-3, 0.0)],
        "ours-bucketed-modules": [stream_ours(bkt_loader2, "ours-bucketed-modules"), ours_mod,
                                  torch.optim.Adam(ours_mod.parameters(), 1e-3)],
        "ours-level0-3nodes": [stream_ours(bkt_loader3, "ours-level0-3nodes", keep_nodes=3), ours_l03,
                               _adam(ours_l03, 1e-3, 0.0)],
        "ours-pergraph-padded": [stream_ours(pad_loader_pg, "ours-pergraph-padded"), ours_pg_pad,
                                 _adam(ours_pg_pad, 1e-3, 0.0)],
        "ours-pergraph-bucketed": [stream_ours(bkt_loader_pg, "ours-pergraph-bucketed"), ours_pg_bkt,
                                   _adam(ours_pg_bkt, 1e-3, 0.0)],
    }
    names = [p for p in args.providers.split(",") if p]
    streams = {}
    for p in names:
        if p not in providers:
            sys.exit(f"unknown provider {p!r}; choose from {', '.join(providers)}")
        providers[p][1].train()
        streams[p] = providers[p][0]()

    def run_steps(p, k):
        # Data loading (PyG's DenseDataLoader with ToDense, our collate) counts in the time.
        n, t0 = 0, time.perf_counter()
        for _ in range(k):
            step, size = next(streams[p])
            step()
            n += size
        return n, time.perf_counter() - t0

    for p in names:  # warm-up
        n, dt = run_steps(p, 5)
        print(f"warm-up {p}: {n / dt:.1f} graphs/s", file=sys.stderr)

    graphs = {p: [] for p in names}
    seconds = {p: [] for p in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for p in order:
            n, dt = run_steps(p, args.steps)
            graphs[p].append(n)
            seconds[p].append(dt)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{p} {graphs[p][-1] / seconds[p][-1]:.0f}" for p in names)
              + " graphs/s", file=sys.stderr)
    # Work per step, after the timing: matmul FLOPs (forward + backward, torch's FLOP counter) over
    # `--steps` further steps of each provider, and the machine's fp32 matmul rate in this run.
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for p in names:
        fc = FlopCounterMode(display=False)
        with fc:
            n_steps = sum(1 for _ in range(args.steps) if next(streams[p])[0]() is None)
        flops[p] = fc.get_total_flops() / n_steps
    a = torch.randn(1024, 1024)
    torch.mm(a, a)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    peak = 2 * 1024 ** 3 / best
    shutil.rmtree(tmp, ignore_errors=True)
    rate = {p: [g / t for g, t in zip(graphs[p], seconds[p])] for p in names}

    base = "pyg-example" if "pyg-example" in names else names[0]
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    command = env + "python " + " ".join([os.path.relpath(__file__, REPO)]
                                         + (argv if argv is not None else sys.argv[1:]))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
               f"{platform.platform()}")
    versions = (f"torch {torch.__version__}, torch_geometric {torch_geometric.__version__}, "
                f"diffpool_fast {__version__}, python {platform.python_version()}")
    rows = []
    for p in names:
        total = sum(graphs[p]) / sum(seconds[p])
        rows.append({"provider": p, "graphs_per_s": total,
                     "speedup_vs_" + base: total / (sum(graphs[base]) / sum(seconds[base])),
                     "round_rate_min": min(rate[p]), "round_rate_median": statistics.median(rate[p]),
                     "round_rate_max": max(rate[p]), "graphs_timed": sum(graphs[p]),
                     "rounds": args.rounds, "steps_per_round": args.steps, "graphs_per_epoch": n_graphs,
                     "batch_size": B, "max_nodes": M,
                     "gflop_per_step": flops[p] / 1e9,
                     "matmul_ms_at_peak": 1e3 * flops[p] / peak,
                     "step_ms": 1e3 * sum(seconds[p]) / (sum(graphs[p]) / B),
                     "matmul_peak_gflops": peak / 1e9,
                     "threads": args.threads, "command": command, "machine": machine, "versions": versions})
    sys.path.insert(0, str(HERE))
    from provenance import results_dir, write_csv  # bench/scripts/

    out = Path(args.out) if args.out else results_dir("train_speed") / "train_speed"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows)
    lines = [
        "# Training throughput: PyG's DiffPool example vs DiffPoolClassifier",
        "",
        f"PROTEINS graphs with <= {M} nodes ({n_graphs} graphs), batch {B}, {args.threads} CPU threads, "
        f"Adam step per batch, data loading included; {args.rounds} interleaved rounds of {args.steps} steps per "
        "provider (order reversed every other round); graphs/s = all graphs timed / all seconds timed.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- versions: {versions}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"| provider | graphs/s | speedup vs {base} | per-round graphs/s min / median / max | ms per {B} graphs "
        f"| matmul GFLOP per step | matmul ms at {peak / 1e9:.0f} GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['graphs_per_s']:.1f} | {r['speedup_vs_' + base]:.2f}x | "
                     f"{r['round_rate_min']:.0f} / {r['round_rate_median']:.0f} / {r['round_rate_max']:.0f} | "
                     f"{r['step_ms']:.1f} | {r['gflop_per_step']:.3f} | {r['matmul_ms_at_peak']:.1f} |")
    lines += ["", f"Matmul FLOPs (forward and backward, counted by torch.utils.flop_counter over {args.steps} more "
              f"steps per provider) and the time they would take at this run's fp32 matmul rate "
              f"({peak / 1e9:.0f} GFLOP/s, a 1024^3 product): the part of a step that is arithmetic; the rest is "
              "elementwise passes, reductions and per-operation overhead.",
              "", "Notes: the machine may be shared with other jobs; compare providers only within one run.",
              "Fixed-k providers (ours-padded, ours-bucketed) pool every graph into 38 then 10 clusters (from max_nodes); "
              "the ours-pergraph-* ones give each graph its own count, so their levels 1-2 narrow with the batch."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
