"""Link-loss accuracy from random assignments to exact fits, and what the direct recompute costs.

Issue 11 item 3. The case: two 20-node cliques (self-loops included), logits = scale * the
one-hot of each node's clique, normalize=False, float32 inputs, for scales 0..20. Per scale: the
true link loss (float64 logits and arithmetic), PyG's float32 formula, our torch path and our
Triton path (under TRITON_INTERPRET=1 on CPU: NumPy fp32 products) in float32, and the relative
error of d link / d s against float64 for each.

Also, for ``ops.link_exact``'s error argument: on random assignments, the two-clique sweep and
planted partitions (N = 40..512), the ratio M'/Q (M' = (||A|| + ||S^T S||)^2) and the constant
c = |Q_identity - Q| / (u M') of the three-term identity computed as before the recompute
(float32 products, float64 sums), with Q the float64 residual of the same float32 S.

Cost (``--time``): forward + backward of one coarsening step at B=16, N=512, F=64, C=128, torch
path, on random inputs and on near-converged ones (planted partition into C clusters of ~4
nodes, logits 10 * one-hot + noise: every graph flagged), against PyG's
``torch_geometric.nn.dense_diff_pool`` in the same process, providers interleaved, median of
``--reps`` repetitions, ``--threads`` threads. ``--ref REV`` adds the coarsening core
(``coarsen_torch``) of an earlier revision (loaded from ``git show REV:...``) to the timing.

Usage: python bench/scripts/link_accuracy.py [--time] [--reps 9] [--threads 2] [--ref HEAD]
(``--ref`` also adds that revision's torch path to the accuracy table.)
Writes bench/results/<UTC date>-cpu-link_accuracy/ (link_accuracy.md, link_accuracy.csv,
identity_error.csv, cost.csv); the reading is bench/notes/link_accuracy.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates any kernel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from provenance import header, results_dir, write_csv  # noqa: E402  (bench/scripts/ is on sys.path)

from diffpool_fast.profiling.accuracy import two_cliques  # noqa: E402

U32 = 2.0 ** -24


def link_grad(fn, x, adj, s, **kw):
    import torch

    s = s.detach().clone().requires_grad_()
    link = fn(x, adj, s, None, normalize=False, **kw)[2]
    (g,) = torch.autograd.grad(link, [s])
    return link.item(), g.double()


def _core_as_pool(core):
    """An earlier revision's coarsen_torch as (x, adj, s, mask, normalize=False) -> link (its
    then sqrt guard: 0 where Q <= 0)."""
    import torch

    def fn(x, adj, s, mask, normalize=False):
        q = core(x, adj, s, mask)[2].sum()
        pos = q > 0
        return None, None, torch.where(pos, torch.sqrt(torch.where(pos, q, torch.ones_like(q))), 0 * q)
    return fn


def accuracy_rows(ref_core=None):
    import torch

    from diffpool_fast import dense_diff_pool
    from diffpool_fast.ops.reference import dense_diff_pool_reference as ref

    providers = [("pyg32", ref, {}), ("torch32", dense_diff_pool, dict(backend="torch")),
                 ("triton32", dense_diff_pool, dict(backend="triton"))]
    if ref_core is not None:
        providers.append(("ref_torch32", _core_as_pool(ref_core), {}))
    rows = []
    for scale in range(0, 21):
        x, adj, s = two_cliques(float(scale))
        true_l, true_g = link_grad(ref, x.double(), adj.double(), s.double())
        res = {"scale": scale, "true": true_l}
        for name, fn, kw in providers:
            val, g = link_grad(fn, x, adj, s, **kw)
            gn = true_g.norm().item()
            res[name] = val
            res[name + "_err"] = abs(val - true_l)
            res[name + "_grad_err"] = ((g - true_g).norm().item() / gn) if gn > 0 else (g.norm().item())
        # what the float32 rounding of S alone leaves: the exact gradient of the float32 S
        P = torch.softmax(s, -1).double().requires_grad_()
        (gP,) = torch.autograd.grad(torch.linalg.vector_norm(adj.double() - P @ P.mT), [P])
        P = P.detach()
        g = P * (gP - (P * gP).sum(-1, keepdim=True))
        gn = true_g.norm().item()
        res["s32_grad_err"] = ((g - true_g).norm().item() / gn) if gn > 0 else g.norm().item()
        rows.append(res)
    return rows


def _identity_terms(adj, S):
    """(Q from the identity as computed before the recompute, exact Q of the same S, M')."""
    import torch

    f64 = torch.float64
    AS = adj.float() @ S
    out_adj = S.mT @ AS
    StS = S.mT @ S
    a2 = torch.linalg.vector_norm(adj.float(), dim=(1, 2)).to(f64).square()
    sts = StS.to(f64).square().sum((1, 2))
    q_id = a2 - 2 * out_adj.diagonal(dim1=1, dim2=2).sum(-1, dtype=f64) + sts
    R = adj.double() - S.double() @ S.double().mT
    q = (R * R).sum((1, 2))
    m = (a2.sqrt() + sts.sqrt()).square()
    return q_id, q, m


def identity_rows():
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []

    def add(kind, adj, logits):
        S = torch.softmax(logits.float(), -1)
        q_id, q, m = _identity_terms(adj, S)
        for b in range(adj.shape[0]):
            c = (q_id[b] - q[b]).abs().item() / (U32 * m[b].item())
            rows.append(dict(kind=kind, N=adj.shape[1], C=logits.shape[2], ratio=m[b].item() / q[b].item(),
                             c=c, identity_rel_err=(q_id[b] - q[b]).abs().item() / q[b].item()))

    for N, C, p in ((40, 2, 0.5), (64, 8, 0.1), (200, 4, 0.5), (512, 16, 0.3), (512, 128, 0.05)):
        adj = (torch.rand(4, N, N, generator=g) < p).float()
        add("random", adj, torch.randn(4, N, C, generator=g))
    for scale in range(0, 21, 2):
        x, adj, s = two_cliques(float(scale))
        add(f"cliques scale {scale}", adj, s)
    for N, C in ((128, 8), (512, 16), (512, 128)):
        lab = torch.randint(0, C, (N,), generator=g)
        oh = torch.nn.functional.one_hot(lab, C).float()
        adj = (oh @ oh.T)[None]
        for sc in (1, 3, 5, 8, 12):
            add(f"planted sc{sc}", adj, sc * oh[None] + 0.3 * torch.randn(1, N, C, generator=g))
    return rows


def _load_ref_core(rev: str):
    """coarsen_torch of revision ``rev``, as module diffpool_fast.ops._ref_coarsen_torch."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:diffpool_fast/ops/coarsen_torch.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "coarsen_torch_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("diffpool_fast.ops._ref_coarsen_torch", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.coarsen_torch


def cost_rows(reps: int, threads: int, ref_rev: str):
    import torch
    from torch_geometric.nn import dense_diff_pool as pyg

    from diffpool_fast import dense_diff_pool
    from diffpool_fast.ops import link_exact
    from diffpool_fast.ops.coarsen_torch import coarsen_torch

    torch.set_num_threads(threads)
    B, N, F, C = 16, 512, 64, 128
    g = torch.Generator().manual_seed(0)
    cases = {}
    a = (torch.rand(B, N, N, generator=g) < 0.05).float()
    cases["random"] = (torch.randn(B, N, F, generator=g), ((a + a.mT) > 0).float(),
                       torch.randn(B, N, C, generator=g))
    lab = torch.randint(0, C, (B, N), generator=g)
    oh = torch.nn.functional.one_hot(lab, C).float()
    cases["near-converged"] = (torch.randn(B, N, F, generator=g), oh @ oh.mT,
                               10.0 * oh + 0.1 * torch.randn(B, N, C, generator=g))
    ref_core = _load_ref_core(ref_rev) if ref_rev else None

    def public(fn, **kw):
        def step(x, adj, s):
            out, out_adj, link, ent = fn(x, adj, s, **kw)
            (out.sum() + out_adj.sum() + link + ent).backward()
        return step

    def core(fn):
        def step(x, adj, s):
            out, out_adj, q, ent = fn(x, adj, s, None)
            (out.sum() + out_adj.sum() + q.sum().sqrt() + ent.sum()).backward()
        return step

    providers = {"ours (dense_diff_pool, torch)": public(dense_diff_pool, backend="torch"),
                 "ours, adj_symmetric=True": public(dense_diff_pool, backend="torch", adj_symmetric=True),
                 "PyG dense_diff_pool": public(pyg),
                 "ours core (coarsen_torch)": core(coarsen_torch)}
    if ref_core is not None:
        providers[f"core at {ref_rev} (coarsen_torch)"] = core(ref_core)
    rows = []
    for case, (x0, adj, s0) in cases.items():
        S = torch.softmax(s0, -1)
        q_id, q, m = _identity_terms(adj, S)
        flagged = int((m > link_exact.RHO * q_id).sum())
        times = {k: [] for k in providers}
        for _ in range(2):  # warm-up
            for step in providers.values():
                step(x0.clone().requires_grad_(), adj, s0.clone().requires_grad_())
        for _ in range(reps):
            for k, step in providers.items():  # interleaved
                x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
                t0 = time.perf_counter()
                step(x, adj, s)
                times[k].append(time.perf_counter() - t0)
        pyg_med = statistics.median(times["PyG dense_diff_pool"])
        pyg_min = min(times["PyG dense_diff_pool"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(case=case, flagged=f"{flagged}/{B}", provider=k, median_ms=med * 1e3,
                             min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3, reps=reps,
                             speedup_vs_pyg=pyg_med / med, speedup_vs_pyg_min=pyg_min / min(ts)))
    return rows


def _write_csv(path, rows, head):
    write_csv(path, rows, comments=[line.lstrip("- ") for line in head])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time", action="store_true", help="also measure the cost (B=16, N=512, F=64, C=128)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ref", default="", help="also time coarsen_torch of this git revision")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else results_dir("link_accuracy", device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    head = header(__file__, sys.argv[1:] if argv is None else argv)
    import triton

    head.append(f"- triton {triton.__version__} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), "
                f"torch float32 matmul precision {torch.get_float32_matmul_precision()}, "
                f"{torch.get_num_threads()} threads")

    ref_core = _load_ref_core(args.ref) if args.ref else None
    acc = accuracy_rows(ref_core)
    ident = identity_rows()
    _write_csv(out / "link_accuracy.csv", acc, head)
    _write_csv(out / "identity_error.csv", ident, head)
    md = ["# Link-loss accuracy near an exact fit (issue 11 item 3)", ""] + head + [
        "",
        "Two 20-node cliques, logits = scale * one-hot, normalize=False, float32 inputs. Link loss",
        "values; errors are |link - true|; gradient errors are ||g - g64|| / ||g64|| of d link/d s.",
        "The last column is the error of the exact gradient of the float32-rounded S = softmax(s): what",
        "any float32 implementation is left with (PyG's float32 error sometimes undercuts it by luck).",
        "",
        "| scale | true (float64) | PyG fp32 | ours torch fp32 | ours Triton fp32 | err PyG | err torch "
        "| err Triton | grad err PyG | grad err torch | grad err Triton | grad err of S's rounding |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in acc:
        md.append(f"| {r['scale']} | {r['true']:.6e} | {r['pyg32']:.6e} | {r['torch32']:.6e} | "
                  f"{r['triton32']:.6e} | {r['pyg32_err']:.1e} | {r['torch32_err']:.1e} | "
                  f"{r['triton32_err']:.1e} | {r['pyg32_grad_err']:.1e} | {r['torch32_grad_err']:.1e} | "
                  f"{r['triton32_grad_err']:.1e} | {r['s32_grad_err']:.1e} |")
    if ref_core is not None:
        md += ["", f"The torch path at `{args.ref}` (before the direct recompute), the same case:", "",
               "| scale | link | error | grad err |", "|---:|---:|---:|---:|"]
        for r in acc:
            md.append(f"| {r['scale']} | {r['ref_torch32']:.6e} | {r['ref_torch32_err']:.1e} | "
                      f"{r['ref_torch32_grad_err']:.1e} |")
    md += ["", "## The identity's error (before the direct recompute), for link_exact's argument", "",
           "c = |Q_identity - Q| / (u M'), M' = (||A|| + ||S^T S||)^2, u = 2^-24, Q the float64 residual",
           "of the same float32 S; graphs with M'/Q > RHO = 8 are recomputed directly.", "",
           "| inputs | N | C | M'/Q (min..max) | c max | identity rel. error max |", "|---|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in ident:
        groups.setdefault((r["kind"], r["N"], r["C"]), []).append(r)
    for (kind, N, C), rs in groups.items():
        md.append(f"| {kind} | {N} | {C} | {min(r['ratio'] for r in rs):.3g}..{max(r['ratio'] for r in rs):.3g} | "
                  f"{max(r['c'] for r in rs):.2f} | {max(r['identity_rel_err'] for r in rs):.1e} |")
    cmax = max(r["c"] for r in ident)
    md += ["", f"Largest c over all inputs: {cmax:.2f}."]
    if args.time:
        load0 = os.getloadavg()
        cost = cost_rows(args.reps, args.threads, args.ref)
        load1 = os.getloadavg()
        load = (f"load average (1, 5, 15 min) {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} before, "
                f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} after")
        _write_csv(out / "cost.csv", cost, head + [load])
        md += ["", f"## Cost: forward + backward, B=16, N=512, F=64, C=128, {args.threads} threads, "
               f"{args.reps} repetitions (providers interleaved)", "", f"- {load}", "",
               "| inputs | flagged graphs | provider | median ms | min ms | max ms | PyG / this (medians) "
               "| PyG / this (mins) |",
               "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in cost:
            md.append(f"| {r['case']} | {r['flagged']} | {r['provider']} | {r['median_ms']:.1f} | "
                      f"{r['min_ms']:.1f} | {r['max_ms']:.1f} | {r['speedup_vs_pyg']:.2f} | "
                      f"{r['speedup_vs_pyg_min']:.2f} |")
    (out / "link_accuracy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {os.path.relpath(out, Path.cwd())}")


if __name__ == "__main__":
    main()
