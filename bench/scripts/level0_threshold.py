"""Level 0 dense (padded batch) vs on edge lists (PyG's sparse form): where the edge path wins.

``diffpool-fast train``'s default model (SAGE, hidden 64, 3 layers, JK, no norm, 2 levels, mean
readout, float32) on batches of 20 random graphs of n in [0.75 N, N] nodes, mean degree
``--degree`` (TU data: PROTEINS 3.7, D&D 5.0), built as a GraphDataset; for each padded size N one
training step (the loader's collate, forward, backward, Adam), median of ``--reps`` after a
warm-up, in the dense form (``collate``: bool [B, N, N]) and the sparse one (``collate_sparse``).
Cluster counts: the model is built for ``--max-nodes`` (C = ceil(0.25 max), ceil(0.25 C)), as
training builds it from the dataset's largest graph, and for ``--clusters`` fixed.

Usage: python bench/scripts/level0_threshold.py [--threads 1] [--sizes 16,32,...] [--reps 5]
Writes bench/results/<UTC date>-<device>-level0_threshold/level0_threshold.{md,csv,json}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import header, results_dir, write_csv  # noqa: E402  (bench/scripts/ is on sys.path)


def _dataset(N, B, degree, F, seed):
    import torch

    from diffpool_fast.data import GraphDataset

    g = torch.Generator().manual_seed(seed)
    xs, edges = [], []
    for _ in range(B):
        n = int(torch.randint(max(1, (3 * N) // 4), N + 1, (1,), generator=g))
        if len(xs) == 0:
            n = N
        m = max(1, int(round(degree * n / 2)))
        src = torch.randint(0, n, (m,), generator=g)
        dst = torch.randint(0, n, (m,), generator=g)
        keep = src != dst
        e = torch.stack([src[keep], dst[keep]])
        edges.append(torch.cat([e, e.flip(0)], 1))
        xs.append(torch.nn.functional.one_hot(torch.randint(0, F, (n,), generator=g), F).float())
    return GraphDataset("random", xs, edges, torch.randint(0, 2, (B,), generator=g), 2)


def _step_time(ds, form, clusters, reps, F):
    import torch
    import torch.nn.functional as Fn

    from diffpool_fast.data import collate
    from diffpool_fast.nn.model import DiffPoolClassifier
    from diffpool_fast.sparse_data import collate_sparse, model_inputs
    from diffpool_fast.train.loop import _adam

    torch.manual_seed(0)
    net = DiffPoolClassifier(F, 2, max_nodes=ds.max_nodes, clusters=clusters, hidden=64, gnn="sage", layers=3,
                             jk=True, readout="mean", batch_norm="none", backend="torch", adj_symmetric=True)
    opt = _adam(net, 1e-3, 0.0)
    idx = list(range(len(ds)))
    times = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        b = collate_sparse(ds, idx) if form == "sparse" else collate(ds, idx)
        args, kw = model_inputs(b)
        opt.zero_grad(set_to_none=True)
        logits, aux = net(*args, **kw)
        (Fn.cross_entropy(logits, b.y) + aux).backward()
        opt.step()
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,32,48,64,96,128,192,256,384,512")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--degree", type=float, default=4.5)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--max-nodes", type=int, default=620, help="the dataset maximum the clusters derive from")
    p.add_argument("--clusters", default="64,16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    from diffpool_fast.nn.model import cluster_counts

    torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else results_dir("level0_threshold")
    out.mkdir(parents=True, exist_ok=True)
    settings = {f"ratio 0.25 of {a.max_nodes}": cluster_counts(a.max_nodes, 2, 0.25),
                f"--clusters {a.clusters}": [int(c) for c in a.clusters.split(",")]}
    rows = []
    for N in [int(s) for s in a.sizes.split(",")]:
        ds = _dataset(N, a.batch, a.degree, a.features, seed=N)
        # the model's clusters come from the dataset maximum, not this batch
        edges = int(sum(e.shape[1] for e in ds.edges))
        for name, clusters in settings.items():
            d = _step_time(ds, "dense", clusters, a.reps, a.features)
            s = _step_time(ds, "sparse", clusters, a.reps, a.features)
            row = {"padded_nodes": N, "nodes": int(ds.num_nodes.sum()), "edges": edges,
                   "density": edges / (a.batch * N * N), "clusters": ",".join(map(str, clusters)), "setting": name,
                   "dense_ms": 1e3 * d, "sparse_ms": 1e3 * s, "sparse_over_dense": s / d}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_csv(out / "level0_threshold.csv", rows)
    (out / "level0_threshold.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    lines = header(__file__, sys.argv[1:]) + [
        "", f"One training step (collate, forward, backward, Adam), batch of {a.batch} graphs of n in "
        f"[0.75 N, N] nodes, mean degree {a.degree}, {a.features} one-hot features, {a.threads} thread(s); "
        f"median of {a.reps}.", "",
        "| padded N | density | clusters | dense ms | edges ms | edges / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['padded_nodes']} | {r['density']:.4f} | {r['clusters']} | {r['dense_ms']:.1f} | "
                     f"{r['sparse_ms']:.1f} | {r['sparse_over_dense']:.2f} |")
    (out / "level0_threshold.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/level0_threshold.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
