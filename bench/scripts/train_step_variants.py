"""Where a DiffPoolClassifier training step's time goes on CPU: variants measured in one run.

Setting of bench/scripts/train_speed.py (PROTEINS graphs with <= 150 nodes, PyG's example architecture,
batch 20, size-bucketed batches, Adam), data loading excluded: batches are collated once.
Every variant trains over the same epoch of batches after one warm-up epoch; graphs/s over
``--epochs`` timed epochs. Variants:

- ``fused``: as ``diffpool-fast train`` trains (fused SAGE blocks, fused Adam), ``--threads``.
- ``modules``: layer modules instead of the fused blocks (``DenseGNN.fused = False``).
- ``plain-adam``: ``fused`` with the default (per-parameter) Adam instead of the fused one.
- ``compiled``: ``torch.compile(dynamic=True)`` of forward + loss with the layer modules (backward
  by AOT autograd); the warm-up epoch includes compiling (reported).
- ``fused-1thread``: ``fused`` on one thread.
- ``fused-1thread-x2``: two ``fused-1thread`` processes at the same time; their graphs/s summed
  (how much a second core could add if each batch were split over two 1-thread workers).
- ``level-overhead``: one DiffPool level (both GNNs + pooling) forward + backward at B=1, N=3,
  i.e. with almost no data: the per-operation cost floor, ms.

Usage: python bench/scripts/train_step_variants.py [--data-root DIR] [--epochs 2] [--threads 2]
Writes bench/results/<UTC date>-<device>-train_step_variants/train_step_variants.md (command,
machine, versions, date included; bench/README.md); the reading of the recorded run is
bench/notes/train_step_variants.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from train_speed import _default_root  # bench/scripts/ is the script's folder, on sys.path


def _train(variant: str, data_root: str, epochs: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from diffpool_fast.data import DenseLoader, load_tu
    from diffpool_fast.nn.model import DenseGNN, DiffPoolClassifier
    from diffpool_fast.train.loop import _adam

    torch.set_num_threads(threads)
    ds = load_tu("PROTEINS", data_root)
    ds = ds.subset([i for i in range(len(ds)) if int(ds.num_nodes[i]) <= 150])
    torch.manual_seed(0)
    net = DiffPoolClassifier(ds.num_features, ds.num_classes, max_nodes=150, num_levels=2, ratio=0.25, hidden=64,
                             gnn="sage", layers=3, jk=True, readout="mean", readout_levels="last", backend="torch",
                             adj_symmetric=True)
    if variant in ("modules", "compiled"):
        for m in net.modules():
            if isinstance(m, DenseGNN):
                m.fused = False
    opt = torch.optim.Adam(net.parameters(), 1e-3) if variant == "plain-adam" else _adam(net, 1e-3, 0.0)
    loader = DenseLoader(ds, batch_size=20, shuffle=True, bucket=True, seed=1)
    batches = [(b.x, b.adj.float(), b.mask, b.y) for b in loader.epoch(0)]

    def loss_of(x, adj, mask, y):
        logits, aux = net(x, adj, mask)
        return F.cross_entropy(logits, y) + aux

    fn = torch.compile(loss_of, dynamic=True) if variant == "compiled" else loss_of

    def epoch():
        for x, adj, mask, y in batches:
            opt.zero_grad()
            fn(x, adj, mask, y).backward()
            opt.step()

    t0 = time.perf_counter()
    epoch()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    dt = time.perf_counter() - t0
    n = epochs * sum(int(b[3].numel()) for b in batches)
    return {"graphs_per_s": n / dt, "ms_per_step": 1e3 * dt / (epochs * len(batches)), "warmup_s": warm}


def _level_overhead(threads: int, repeats: int = 500) -> float:
    import torch

    from diffpool_fast.nn.model import DiffPool

    torch.set_num_threads(threads)
    x, adj = torch.randn(1, 3, 3), torch.rand(1, 3, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    level = DiffPool(3, 2, backend="torch", adj_symmetric=True)

    def step():
        o = level(x, adj, mask)
        (o.x.sum() + o.adj.sum() + o.link_loss + o.ent_loss).backward()

    for _ in range(50):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return 1e3 * (time.perf_counter() - t0) / repeats


def _child(variant, args, threads):
    cmd = [sys.executable, __file__, "--child", variant, "--data-root", args.data_root, "--epochs", str(args.epochs),
           "--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=_default_root())
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per variant (after one warm-up epoch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="markdown file to write (default: a new folder in bench/results/)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_train(args.child, args.data_root, args.epochs, args.threads)))
        return

    def one(variant, threads):  # each variant in a fresh process
        p = _child(variant, args, threads)
        out, _ = p.communicate()
        return json.loads(out)

    res = {}
    for variant, threads in (("fused", args.threads), ("modules", args.threads), ("plain-adam", args.threads),
                             ("compiled", args.threads),
                             ("fused-1thread", 1)):
        res[variant] = one(variant.replace("-1thread", ""), threads)
        print(f"{variant}: {res[variant]['graphs_per_s']:.0f} graphs/s", file=sys.stderr)
    pair = [_child("fused", args, 1) for _ in range(2)]
    outs = [json.loads(p.communicate()[0]) for p in pair]
    res["fused-1thread-x2"] = {"graphs_per_s": sum(o["graphs_per_s"] for o in outs),
                               "ms_per_step": max(o["ms_per_step"] for o in outs),
                               "warmup_s": max(o["warmup_s"] for o in outs),
                               "each": [round(o["graphs_per_s"]) for o in outs]}
    overhead = _level_overhead(args.threads)

    from provenance import header, results_dir  # bench/scripts/ is the script's folder, on sys.path

    base = res["fused"]["graphs_per_s"]
    lines = ["# Training-step variants of DiffPoolClassifier (PROTEINS <= 150 nodes, batch 20, bucketed)", "",
             *header(__file__, argv), "",
             "Data loading excluded (batches collated once); one warm-up epoch, then "
             f"{args.epochs} timed epochs per variant, each variant in a fresh process.", "",
             "| variant | threads | graphs/s | vs fused | ms per step | warm-up epoch s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in res.items():
        th = 1 if "1thread" in v else args.threads
        extra = f" ({' + '.join(map(str, r['each']))})" if "each" in r else ""
        lines.append(f"| {v}{extra} | {th} | {r['graphs_per_s']:.0f} | {r['graphs_per_s'] / base:.2f}x | "
                     f"{r['ms_per_step']:.2f} | {r['warmup_s']:.1f} |")
    lines += ["", f"One DiffPool level (both GNNs and the pooling), forward + backward at B=1, N=3 ({args.threads} "
              f"threads): {overhead:.2f} ms: the per-operation cost with almost no data."]
    out = Path(args.out) if args.out else results_dir("train_step_variants") / "train_step_variants.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
