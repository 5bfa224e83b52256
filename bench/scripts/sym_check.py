"""The torch path's exact symmetry check against the A^T S product it can spare, over shapes.

For each (B, N, C): the time of ``coarsen_torch.all_symmetric`` on a symmetric float32 adjacency
(the whole check: every slab is read), of ``A^T S`` (the product skipped when it passes), and of
one forward + backward of ``dense_diff_pool`` (torch path) with ``adj_symmetric=None`` (checks
when C >= SYM_CHECK_MIN_C), ``False`` (never checks: always A^T S) and ``True`` (the promise),
with PyG's ``dense_diff_pool`` in the same run. Medians of ``--reps`` interleaved repetitions.

Usage: python bench/scripts/sym_check.py [--threads 2] [--reps 9]
Writes bench/results/<UTC date>-<device>-sym_check/sym_check.{csv,md} (or --out STEM).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPES = [(16, 512, 16), (16, 512, 32), (16, 512, 64), (16, 512, 128), (64, 128, 32), (64, 128, 64),
          (4, 1024, 64), (4, 1024, 128), (2, 2048, 128), (32, 150, 38)]


def _t(fn):
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch_geometric.nn import dense_diff_pool as pyg

    from diffpool_fast import dense_diff_pool
    from diffpool_fast.ops.coarsen_torch import SYM_CHECK_MIN_C, all_symmetric

    sys.path.insert(0, str(HERE))
    from provenance import header, results_dir, write_csv  # bench/scripts/

    rows = []
    g = torch.Generator().manual_seed(0)
    for B, N, C in SHAPES:
        a = (torch.rand(B, N, N, generator=g) < 0.05).float()
        adj = ((a + a.transpose(1, 2)) > 0).float()
        S = torch.softmax(torch.randn(B, N, C, generator=g), -1)
        x = torch.randn(B, N, 64, generator=g, requires_grad=True)
        s = torch.randn(B, N, C, generator=g, requires_grad=True)

        def step(fn, **kw):
            o = fn(x, adj, s, **kw)
            (o[0].sum() + o[1].sum() + o[2] + o[3]).backward()

        fns = {
            "check": lambda: all_symmetric(adj),
            "A^T S": lambda: adj.transpose(1, 2) @ S,
            "ours None": lambda: step(dense_diff_pool, backend="torch"),
            "ours False": lambda: step(dense_diff_pool, backend="torch", adj_symmetric=False),
            "ours True": lambda: step(dense_diff_pool, backend="torch", adj_symmetric=True),
            "pyg": lambda: step(pyg),
        }
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for r in range(args.reps):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[k].append(_t(fns[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"B": B, "N": N, "C": C, "checked": C >= SYM_CHECK_MIN_C,
                     **{f"{k} ms": round(v, 3) for k, v in med.items()},
                     "pyg / ours None": round(med["pyg"] / med["ours None"], 3),
                     "pyg / ours False": round(med["pyg"] / med["ours False"], 3)})
        print(rows[-1], file=sys.stderr)
    out = Path(args.out) if args.out else results_dir("sym_check") / "sym_check"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows)
    cols = list(rows[0])
    lines = ["# Symmetry check vs the A^T S product (torch path, float32, symmetric adjacency)", "",
             *header(__file__, argv), "",
             f"Medians of {args.reps} interleaved repetitions, {args.threads} threads; fwd+bwd rows are one "
             f"dense_diff_pool step with F=64; `checked`: C >= SYM_CHECK_MIN_C = {SYM_CHECK_MIN_C}.", "",
             "| " + " | ".join(cols) + " |", "|" + " ---: |" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
