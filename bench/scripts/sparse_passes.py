"""Costs of single passes inside sparse_diff_pool at 10^6 nodes, each against its alternative.

- elementwise passes over S [N, C] (add, mul, log, softmax): what one pass costs;
- the row entropy, forward and backward: the out-of-place formulas against the in-place form
  ``sparse_pool._RowEntropy`` uses (same operations, same order: the results are compared bitwise);
- the transposed edge pattern: stable argsort of the int64 columns against int32 columns and
  against ``to_sparse_csc`` (all three must give the same permutation).

Medians of ``--reps`` repetitions, 1 thread. Usage: python bench/scripts/sparse_passes.py [--nodes 1000000]
Writes bench/results/<UTC date>-<device>-sparse_passes/sparse_passes.md (or --out STEM).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EPS = 1e-15


def _ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from provenance import header, results_dir  # bench/scripts/
    from sparse_scale import sbm_batch

    N, C, r = args.nodes, args.clusters, args.reps
    g = torch.Generator().manual_seed(0)
    S = torch.softmax(torch.randn(N, C, generator=g), -1)
    gr = torch.randn(N, generator=g)

    def ent_fwd_out():
        return -(S * torch.log(S + EPS)).sum(-1)

    def ent_fwd_in():
        t = S + EPS
        t.log_()
        t.mul_(S)
        return t.sum(-1).neg_()

    def ent_bwd_out():
        Se = S + EPS
        return -gr[:, None] * (torch.log(Se) + S / Se)

    def ent_bwd_in():
        t = S + EPS
        q = torch.div(S, t)
        t.log_()
        t.add_(q)
        return t.mul_(gr[:, None]).neg_()

    assert torch.equal(ent_fwd_out(), ent_fwd_in()) and torch.equal(ent_bwd_out(), ent_bwd_in())
    rows = [("pass over [N, C]: S + eps", _ms(lambda: S + EPS, r), ""),
            ("pass over [N, C]: S * S", _ms(lambda: S * S, r), ""),
            ("pass over [N, C]: log(S)", _ms(lambda: torch.log(S), r), ""),
            ("pass over [N, C]: softmax", _ms(lambda: torch.softmax(S, -1), r), "")]
    fo, fi = _ms(ent_fwd_out, r), _ms(ent_fwd_in, r)
    bo, bi = _ms(ent_bwd_out, r), _ms(ent_bwd_in, r)
    rows += [("entropy forward, out of place", fo, "1.00x"), ("entropy forward, in place", fi, f"{fo / fi:.2f}x"),
             ("entropy backward, out of place", bo, "1.00x"), ("entropy backward, in place", bi, f"{bo / bi:.2f}x")]
    ei, _ = sbm_batch([N], 10, 100, 0.8, 0)
    row, col = ei
    crow = torch.zeros(N + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row, minlength=N).cumsum(0)
    perm = torch.argsort(col, stable=True)
    col32 = col.to(torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A = torch.sparse_csr_tensor(crow, col, torch.arange(col.numel()), (N, N), check_invariants=False)
        assert torch.equal(A.to_sparse_csc().values(), perm)
        assert torch.equal(torch.argsort(col32, stable=True), perm)
        a64 = _ms(lambda: torch.argsort(col, stable=True), r)
        rows += [(f"transposed pattern, E={col.numel()}: argsort int64 (used)", a64, "1.00x")]
        a32 = _ms(lambda: torch.argsort(col32, stable=True), r)
        csc = _ms(lambda: A.to_sparse_csc(), r)
    rows += [("transposed pattern: argsort int32", a32, f"{a64 / a32:.2f}x"),
             ("transposed pattern: to_sparse_csc", csc, f"{a64 / csc:.2f}x")]
    out = Path(args.out) if args.out else results_dir("sparse_passes") / "sparse_passes"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Single passes of sparse_diff_pool, N={N}, C={C}, 1 thread", "", *header(__file__, argv), "",
             f"Medians of {r} repetitions; 'vs first' is the first row of its group over this row.", "",
             "| pass | ms | vs first |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {ms:.1f} | {ratio} |" for name, ms, ratio in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
