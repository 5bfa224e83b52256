"""Costs of single passes inside sparse_diff_pool at 10^6 nodes, each against its alternative.

- elementwise passes over S [N, C] (add, mul, log, softmax): what one pass costs;
- the row entropy, forward and backward: the out-of-place formulas against the in-place form
  ``sparse_pool._RowEntropy`` uses (same operations, same order: the results are compared bitwise);
- the transposed edge pattern: stable argsort of the int64 columns against int32 columns (what
  ``sparse_edges.Pattern`` uses) and against ``to_sparse_csc`` (all three must give the same
  permutation);
- gathers of node quantities at the edges' ends and of D[j, k_i]: advanced indexing against
  ``index_select`` (equal results);
- the hard split D = S - H: a one-hot mask with ``masked_fill`` and ``where`` against a clone
  and two ``scatter_`` (what ``sparse_pool._SplitHard`` does; D and d compared bitwise);
- <P, h> per row in the softmax backward: ``(P * h).sum(-1)`` (used) against ``einsum``, time
  and the largest error relative to a float64 value, on near-one-hot rows.

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
        rows += [(f"transposed pattern, E={col.numel()}: argsort int64", a64, "1.00x")]
        a32 = _ms(lambda: torch.argsort(col32, stable=True), r)
        csc = _ms(lambda: A.to_sparse_csc(), r)
    rows += [("transposed pattern: argsort int32 (used)", a32, f"{a64 / a32:.2f}x"),
             ("transposed pattern: to_sparse_csc", csc, f"{a64 / csc:.2f}x")]

    k = torch.randint(0, C, (N,), generator=g)
    flat = S.reshape(-1)
    pos = torch.add(k.index_select(0, row), col, alpha=C)
    assert torch.equal(k[col], k.index_select(0, col)) and torch.equal(flat[pos], flat.index_select(0, pos))
    for name, adv, sel in ((f"gather k[col], [N] -> [E={col.numel()}]", lambda: k[col], lambda: k.index_select(0, col)),
                           ("gather k[row] (sorted rows)", lambda: k[row], lambda: k.index_select(0, row)),
                           ("gather D[j, k_i], [N C] -> [E]", lambda: flat[pos], lambda: flat.index_select(0, pos))):
        t_adv, t_sel = _ms(adv, r), _ms(sel, r)
        rows += [(f"{name}: advanced indexing", t_adv, "1.00x"), (f"{name}: index_select (used)", t_sel, f"{t_adv / t_sel:.2f}x")]

    top, kk = S.max(-1)
    assigned = top > 0.5 * float(top.median())  # about half of the rows, whatever C

    def split_onehot():
        hard = torch.nn.functional.one_hot(kk, C).bool() & assigned[:, None]
        d = -S.masked_fill(hard, 0.0).sum(-1)
        return torch.where(hard, d[:, None], S), torch.where(assigned, d, 0.0)

    def split_scatter():
        D = S.clone()
        D.scatter_(1, kk[:, None], 0.0)
        d = D.sum(-1).neg_()
        D.scatter_(1, kk[:, None], torch.where(assigned, d, top)[:, None])
        return D, torch.where(assigned, d, 0.0)

    (D1, d1), (D2, d2) = split_onehot(), split_scatter()
    assert torch.equal(D1, D2) and torch.equal(d1, d2)
    t1, t2 = _ms(split_onehot, r), _ms(split_scatter, r)
    rows += [("hard split D = S - H: one-hot, masked_fill, where", t1, "1.00x"),
             ("hard split: clone + two scatter_ (used)", t2, f"{t1 / t2:.2f}x")]

    P = torch.softmax(8.0 * torch.nn.functional.one_hot(kk, C).float() + torch.randn(N, C, generator=g), -1)
    h = torch.randn(N, C, generator=g)
    h -= h.gather(1, kk[:, None])
    exact = (P.double() * h.double()).sum(-1)
    scale = (P.double() * h.double()).abs().sum(-1).clamp_min(1e-300)

    def rel(v):
        return float(((v.double() - exact).abs() / scale).max())

    t_ms, t_es = _ms(lambda: (P * h).sum(-1), r), _ms(lambda: torch.einsum("ij,ij->i", P, h), r)
    e_ms, e_es = rel((P * h).sum(-1)), rel(torch.einsum("ij,ij->i", P, h))
    rows += [(f"softmax backward <P, h>: (P * h).sum (used), max error / sum|P h| {e_ms:.1e}", t_ms, "1.00x"),
             (f"softmax backward <P, h>: einsum, max error / sum|P h| {e_es:.1e}", t_es, f"{t_ms / t_es:.2f}x")]
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
