"""Level 0 on a block-diagonal CSR adjacency (diffpool_fast.ops.block_sparse) vs dense batched products.

``diffpool-fast train``'s model (SAGE, hidden 64, 3 layers, JK, no norm, ratio 0.1, 2 levels, mean
readout) on size-bucketed batches of 20 graphs of a TU dataset; for the median batch and the two
largest ones (by padded node count), one training step (forward, backward, Adam), best of
``--reps`` after one warm-up step; ``DIFFPOOL_FAST_SPARSE=0`` (dense) and ``auto`` (sparse from
384 nodes), each in its own process, which also reports its peak resident memory.

Usage: python bench/scripts/sparse_level0.py [--data-root DIR] [--datasets PROTEINS,DD] [--threads 2]
Writes bench/results/<UTC date>-<device>-sparse_level0/sparse_level0.md (command, machine,
versions, date included; bench/README.md); the reading of the recorded run is
bench/notes/sparse_level0.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))


from provenance import header, results_dir  # noqa: E402  (bench/scripts/ is on sys.path)


def _worker(dataset, root, threads, reps):
    import torch
    import torch.nn.functional as F

    from diffpool_fast.data import DenseLoader, load_tu
    from diffpool_fast.nn.model import DiffPoolClassifier
    from diffpool_fast.train.loop import _adam

    torch.set_num_threads(threads)
    ds = load_tu(dataset, root)
    torch.manual_seed(0)
    net = DiffPoolClassifier(ds.num_features, ds.num_classes, max_nodes=int(ds.num_nodes.max()), num_levels=2,
                             ratio=0.1, hidden=64, gnn="sage", layers=3, jk=True, readout="mean",
                             readout_levels="last", backend="torch", adj_symmetric=bool(ds.undirected),
                             batch_norm="none")
    opt = _adam(net, 1e-3, 0.0)
    batches = sorted(DenseLoader(ds, batch_size=20, shuffle=True, bucket=True, seed=1).epoch(0),
                     key=lambda b: b.x.shape[1])
    picks = [batches[len(batches) // 2], batches[-2], batches[-1]]

    def step(b):
        opt.zero_grad()
        logits, aux = net(b.x, b.adj, b.mask)
        (F.cross_entropy(logits, b.y) + aux).backward()
        opt.step()

    out = []
    for b in picks:
        step(b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            step(b)
            best = min(best, time.perf_counter() - t0)
        out.append({"N": int(b.x.shape[1]), "ms": 1e3 * best})
    return {"clusters": net.clusters, "batches": out,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    from train_speed import _default_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=_default_root())
    ap.add_argument("--datasets", default="PROTEINS,DD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="markdown file to write (default: a new folder in bench/results/)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.data_root, args.threads, args.reps)))
        return
    res = {}
    for name in args.datasets.split(","):
        for mode in ("0", "auto"):
            env = dict(os.environ, DIFFPOOL_FAST_SPARSE=mode)
            p = subprocess.run([sys.executable, __file__, "--worker", name, "--data-root", args.data_root, "--threads",
                                str(args.threads), "--reps", str(args.reps)], env=env, capture_output=True, text=True,
                               check=True, cwd=REPO)
            res[(name, mode)] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{name} sparse={mode}: {res[(name, mode)]}", file=sys.stderr)
    lines = [
        "# Level 0 on a sparse (block-diagonal CSR) adjacency vs dense batched products",
        "",
        "One training step (forward, backward, Adam) of `diffpool-fast train`'s model (SAGE, hidden 64, 3 layers, "
        "JK, no norm, ratio 0.1, 2 levels) on size-bucketed batches of 20 graphs: the median batch and the two "
        f"largest; best of {args.reps} after a warm-up step; {args.threads} threads; each mode in its own process "
        "(peak RSS of that process).",
        "",
        *header(__file__, argv),
        "",
        "| dataset | clusters | batch N | dense ms | sparse (auto) ms | speed-up | peak RSS dense / auto MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in args.datasets.split(","):
        d, s = res[(name, "0")], res[(name, "auto")]
        for bd, bs in zip(d["batches"], s["batches"]):
            lines.append(f"| {name} | {d['clusters']} | {bd['N']} | {bd['ms']:.0f} | {bs['ms']:.0f} | "
                         f"{bd['ms'] / bs['ms']:.2f}x | {d['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} |")
    lines += ["", "Batches under 384 nodes take the dense path in both modes "
              "(`diffpool_fast.ops.block_sparse.MIN_NODES`)."]
    out = Path(args.out) if args.out else results_dir("sparse_level0") / "sparse_level0.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
