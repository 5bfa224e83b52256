"""sparse_diff_pool past the N^2 wall: time and peak memory from 10^3 to 10^6 nodes, against peers.

One DiffPool step on SBM-like graphs (blocks of ``--block`` nodes, ``--p-in`` of each node's
draws inside its block, the rest anywhere in its graph, made undirected and coalesced: about
``--degree`` edges per node), F features, C clusters, assignment logits from one Linear(F, C)
layer (tgp's DiffPool has that layer built in, so every peer gets one). Timed: forward (from the
sparse batch ``x, edge_index, batch`` to the four outputs) + backward of
``out.sum() + out_adj.sum() + link + ent`` into x and the Linear layer; the median of ``--reps``
after one warm-up run (a peer whose warm-up takes over ``--slow`` seconds is run once).
``--logits converged`` sets x and that layer (ours and tgp's own) so that S is near one-hot on
every row (``_converged_inputs``): the regime where sparse_diff_pool's link loss takes its hard
split; the default's random layer leaves every row of S below 1/2.

Peers, each size and thread count in a fresh subprocess:

- ``sparse``: ``diffpool_fast.ops.sparse_pool.sparse_diff_pool`` on the sparse batch;
- ``dense``: ``diffpool_fast.dense_diff_pool`` (torch path) on ``to_dense_batch``/``to_dense_adj``
  (the conversion is inside the timed step, as in a model fed by PyG's DataLoader);
- ``pyg``: ``torch_geometric.nn.dense_diff_pool`` on the same dense form;
- ``tgp``: torch-geometric-pool's ``DiffPool(batched=False)`` (its sparse, unbatched path;
  ``remove_self_loops=False, degree_norm=False`` so that it computes plain S^T A S). Never a
  dependency of the project, and kept out of its virtual environment (tgp pulls torch_scatter,
  which PyG would then use too): install it into a folder of its own, which only the tgp
  worker puts on its path (``--tgp-site``, default ``~/.cache/diffpool_fast_bench/tgp_site``)::

      pip install --target ~/.cache/diffpool_fast_bench/tgp_site --no-deps --no-build-isolation \
          torch-geometric-pool torch_scatter scikit-learn scipy joblib threadpoolctl cloudpickle narwhals

  (tgp 1.0.2 imports scikit-learn at import time; torch_scatter builds from source against the
  installed torch). Skipped and recorded when it cannot be imported.

The dense peers are skipped when their adjacency, B * N_max^2 * 4 bytes, would exceed
``--dense-max-gb``; the table gives that predicted size for every case.

Peak memory: ``ru_maxrss`` after the runs minus ``ru_maxrss`` after building the inputs, with
the high-water mark reset in between (``/proc/self/clear_refs``), so it is the step's own peak
above its inputs.

Usage: python bench/scripts/sparse_scale.py [--sizes 1000,...] [--threads 1,2] [--peers ...]
Writes sparse_scale.csv, sparse_scale.md, sparse_scale_time.png and sparse_scale_memory.png to
bench/results/<date>-<device>-sparse_scale/ (or ``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

PEERS = ("sparse", "dense", "pyg", "tgp")
DEFAULT_TGP_SITE = Path.home() / ".cache" / "diffpool_fast_bench" / "tgp_site"


def sbm_batch(sizes, degree, block, p_in, seed):
    """(edge_index [2, E] coalesced and undirected, batch [N]) of SBM-like graphs of ``sizes``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    N = int(sizes_t.sum())
    batch = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    ptr = torch.cat([sizes_t.new_zeros(1), sizes_t.cumsum(0)[:-1]])
    draws = max(1, degree // 2)  # each node draws degree/2 ends; both directions are stored
    src = torch.arange(N).repeat_interleave(draws)
    g = batch[src]
    start, n = ptr[g], sizes_t[g]
    local = src - start
    blk0 = (local // block) * block
    blk_n = torch.minimum(torch.full_like(blk0, block), n - blk0)
    inside = torch.rand(src.numel(), generator=gen) < p_in
    u = torch.rand(src.numel(), generator=gen, dtype=torch.float64)
    dst_local = torch.where(inside, blk0 + (u * blk_n).long(), (u * n).long())
    dst = start + torch.minimum(dst_local, n - 1)
    keep = dst != src
    src, dst = src[keep], dst[keep]
    key = torch.unique(torch.cat([src * N + dst, dst * N + src]))  # sorted, coalesced
    return torch.stack([key // N, key % N]), batch


def case_sizes(N, graphs, seed):
    """Graph sizes summing to about N: one graph, or ``graphs`` graphs of 0.5..1.5 times N/graphs."""
    if graphs <= 1:
        return [N]
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    mean = N / graphs
    return [max(2, int(mean * (0.5 + float(r)))) for r in torch.rand(graphs, generator=gen)]


def _converged_inputs(sizes, args):
    """(x, W) for ``--logits converged``: with W = [I; -I] [C, F] (C <= 2F) and no bias, x W^T is
    10 at column k = (node's block) mod C, 0 or -10 elsewhere, plus N(0, 0.3^2) noise: every row
    of S near one-hot (the link loss's hard split on every row and edge)."""
    import torch

    F, C = args.features, args.clusters
    if C > 2 * F:
        raise SystemExit(f"--logits converged needs --clusters <= 2 * --features, got {C} and {F}")
    W = torch.cat([torch.eye(F), -torch.eye(F)])[:C]
    local = torch.cat([torch.arange(n) for n in sizes])
    k = (local // args.block) % C
    x = 0.3 * torch.randn(len(local), F)
    rows = torch.arange(len(local))
    x[rows, k % F] += torch.where(k < F, 10.0, -10.0)
    return x.requires_grad_(True), W


def worker(args) -> dict:
    import torch

    torch.set_num_threads(int(args.threads))
    sizes = case_sizes(args.nodes, args.graphs, args.seed)
    ei, batch = sbm_batch(sizes, args.degree, args.block, args.p_in, args.seed)
    N, B = batch.numel(), len(sizes)
    torch.manual_seed(args.seed)
    x = torch.randn(N, args.features, requires_grad=True)
    lin = torch.nn.Linear(args.features, args.clusters)
    W_conv = None
    if args.logits == "converged":
        x, W_conv = _converged_inputs(sizes, args)
        with torch.no_grad():
            lin.weight.copy_(W_conv)
            lin.bias.zero_()
    params = [x, *lin.parameters()]

    if args.peer == "sparse":
        from diffpool_fast.ops.sparse_pool import sparse_diff_pool

        def step():
            out, out_adj, link, ent = sparse_diff_pool(x, ei, lin(x), batch, None, True, num_graphs=B, backend="torch")
            return out.sum() + out_adj.sum() + link + ent
    elif args.peer in ("dense", "pyg"):
        from torch_geometric.utils import to_dense_adj, to_dense_batch

        if args.peer == "dense":
            from diffpool_fast import dense_diff_pool

            def pool(xd, adj, sd, mask):
                return dense_diff_pool(xd, adj, sd, mask, True, backend="torch")
        else:
            from torch_geometric.nn import dense_diff_pool as pool

        def step():
            xd, mask = to_dense_batch(x, batch, batch_size=B)
            sd, _ = to_dense_batch(lin(x), batch, batch_size=B)
            adj = to_dense_adj(ei, batch, batch_size=B)
            out, out_adj, link, ent = pool(xd, adj, sd, mask)
            return out.sum() + out_adj.sum() + link + ent
    elif args.peer == "tgp":
        from tgp.poolers import DiffPool

        pooler = DiffPool(in_channels=args.features, k=args.clusters, batched=False, remove_self_loops=False,
                          degree_norm=False)
        if W_conv is not None:
            layer = pooler.selector.mlp.lins[0]  # tgp 1.0.2's assignment layer
            with torch.no_grad():
                layer.weight.copy_(W_conv)
                layer.bias.zero_()
        params = [x, *pooler.parameters()]

        def step():
            po = pooler(x=x, adj=ei, batch=batch)
            return po.x.sum() + po.edge_index.sum() + sum(po.loss.values())
    else:
        raise SystemExit(f"unknown peer {args.peer}")

    def run():
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        step().backward()
        return time.perf_counter() - t0

    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark: the peak below is this step's own
    except OSError:
        reset = False
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [run()]  # warm-up
    if times[0] <= args.slow:
        times = [run() for _ in range(args.reps)]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"N": N, "B": B, "E": int(ei.shape[1]), "N_max": max(sizes), "times": times,
            "median_s": statistics.median(times), "min_s": min(times), "peak_mb": (peak_kb - base_kb) / 1024,
            "hwm_reset": reset}


def _env(tgp_site: str, threads: int = 0) -> dict:
    env = dict(os.environ)
    env.pop("DIFFPOOL_FAST_BACKEND", None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if tgp_site:
        env["PYTHONPATH"] = os.pathsep.join([tgp_site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _tgp_status(tgp_site: str) -> str:
    try:
        probe = "import tgp; from tgp.poolers import DiffPool; print(tgp.__version__)"
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env=_env(tgp_site))
    except subprocess.TimeoutExpired:
        return "import timed out"
    if r.returncode != 0:
        return "not importable: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return "ok " + r.stdout.strip()


def _versions(tgp_site: str) -> str:
    out = []
    for mod in ("torch_geometric", "tgp", "torch_scatter"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
                           capture_output=True, text=True, env=_env(tgp_site if mod != "torch_geometric" else ""))
        out.append(f"{mod} {r.stdout.strip() if r.returncode == 0 else 'n/a'}")
    return ", ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000,10000,20000,100000,300000,1000000")
    ap.add_argument("--batched", default="100000:100,1000000:1000",
                    help="batched cases N:B (B graphs of 0.5..1.5 N/B nodes); '' for none")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--degree", type=int, default=10)
    ap.add_argument("--block", type=int, default=100)
    ap.add_argument("--p-in", type=float, default=0.8)
    ap.add_argument("--logits", choices=("linear", "converged"), default="linear",
                    help="linear: a Linear layer of random x (default; no row of S above 1/2); converged: x and "
                         "that layer (ours and tgp's built-in one) set so that S is near one-hot on every row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slow", type=float, default=60.0, help="a peer whose warm-up exceeds this runs once")
    ap.add_argument("--dense-max-gb", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tgp-site", default=str(DEFAULT_TGP_SITE), help="folder holding tgp and its dependencies")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--graphs", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    from provenance import header, results_dir, write_csv

    out_dir = Path(args.out) if args.out else results_dir("sparse_scale")
    out_dir.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p]
    tgp_status = _tgp_status(args.tgp_site) if "tgp" in peers else "not asked for"
    cases = [(int(n), 1) for n in args.sizes.split(",") if n]
    for item in (args.batched or "").split(","):
        if item:
            n, b = item.split(":")
            cases.append((int(n), int(b)))
    log = open(out_dir / "sparse_scale.log", "w")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for nodes, graphs in cases:
            sizes = case_sizes(nodes, graphs, args.seed)
            B, n_max = len(sizes), max(sizes)
            dense_gb = B * n_max * n_max * 4 / 2**30
            for peer in peers:
                row = {"threads": threads, "case": "one graph" if graphs == 1 else f"{B} graphs",
                       "nodes": sum(sizes), "B": B, "N_max": n_max, "peer": peer,
                       "dense_adj_gb": round(dense_gb, 4), "status": "", "E": "", "median_s": "", "min_s": "",
                       "reps": "", "peak_mb": ""}
                if peer in ("dense", "pyg") and dense_gb > args.dense_max_gb:
                    row["status"] = f"skipped: dense adjacency {dense_gb:.1f} GB > {args.dense_max_gb} GB"
                elif peer == "tgp" and not tgp_status.startswith("ok"):
                    row["status"] = f"skipped: tgp {tgp_status}"
                else:
                    cmd = [sys.executable, __file__, "--worker", "--peer", peer, "--nodes", str(nodes),
                           "--graphs", str(graphs), "--threads", str(threads), "--features", str(args.features),
                           "--clusters", str(args.clusters), "--degree", str(args.degree), "--block",
                           str(args.block), "--p-in", str(args.p_in), "--reps", str(args.reps), "--slow",
                           str(args.slow), "--seed", str(args.seed), "--logits", args.logits]
                    env = _env(args.tgp_site if peer == "tgp" else "", threads)
                    row["load_before"] = round(os.getloadavg()[0], 2)
                    t0 = time.perf_counter()
                    try:
                        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                        if r.returncode == 0 and line:
                            res = json.loads(line[-1][7:])
                            row.update(status="ok", E=res["E"], median_s=round(res["median_s"], 4),
                                       min_s=round(res["min_s"], 4), reps=len(res["times"]),
                                       peak_mb=round(res["peak_mb"], 1))
                        else:
                            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                            row["status"] = f"failed (exit {r.returncode}): {tail[:200]}"
                    except subprocess.TimeoutExpired:
                        row["status"] = f"timed out after {args.timeout:.0f} s"
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    row["load_after"] = round(os.getloadavg()[0], 2)
                say(json.dumps(row))
                rows.append(row)

    fields = ["threads", "case", "nodes", "B", "N_max", "E", "peer", "status", "median_s", "min_s", "reps",
              "peak_mb", "dense_adj_gb", "wall_s", "load_before", "load_after"]
    write_csv(out_dir / "sparse_scale.csv", rows, fields)
    lines = ["# sparse_diff_pool scaling", ""] + header(__file__, argv) + [
        f"- peers: {', '.join(peers)}; tgp: {tgp_status}; {_versions(args.tgp_site)}",
        f"- F={args.features}, C={args.clusters}, ~{args.degree} edges per node (SBM-like, blocks of {args.block}, "
        f"p_in={args.p_in}), logits: {args.logits}, fp32, forward+backward, median of {args.reps} after a warm-up "
        f"(one run when the warm-up takes over {args.slow:.0f} s)",
        "- peak = ru_maxrss above the inputs (high-water mark reset after building them), one process per cell;"
        " dense adj = B * N_max^2 * 4 bytes, the dense peers' adjacency alone",
        "- the 1-minute load average before and after each cell is in sparse_scale.csv (a shared 2-core machine:"
        " other jobs slow some cells down)",
        "",
    ]
    lines += _tables(rows, peers)
    (out_dir / "sparse_scale.md").write_text("\n".join(lines) + "\n")
    _plots(rows, peers, out_dir)
    say(f"wrote {out_dir}")


def _tables(rows, peers):
    out = []
    for threads in sorted({r["threads"] for r in rows}):
        out += [f"## {threads} thread{'s' if threads > 1 else ''}", ""]
        head = "| case | N | E | dense adj GB |" + "".join(f" {p} s | {p} MB |" for p in peers)
        if "tgp" in peers and "sparse" in peers:
            head += " tgp / sparse time | tgp / sparse peak |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        keys = []
        for r in rows:
            k = (r["case"], r["nodes"])
            if r["threads"] == threads and k not in keys:
                keys.append(k)
        for case, nodes in keys:
            cell = {r["peer"]: r for r in rows if r["threads"] == threads and (r["case"], r["nodes"]) == (case, nodes)}
            any_r = next(iter(cell.values()))
            E = next((r["E"] for r in cell.values() if r["E"] != ""), "")
            line = f"| {case} | {nodes:,} | {E if E == '' else f'{E:,}'} | {any_r['dense_adj_gb']:.3g} |"
            for p in peers:
                r = cell.get(p)
                if r is None:
                    line += " | |"
                elif r["status"] == "ok":
                    note = "" if r["reps"] != 1 else " (1 run)"
                    line += f" {r['median_s']:.4g}{note} | {r['peak_mb']:.0f} |"
                else:
                    short = "skip" if r["status"].startswith("skipped") else r["status"].split(":")[0]
                    line += f" {short} | |"
            if "tgp" in peers and "sparse" in peers:
                a, b = cell.get("tgp"), cell.get("sparse")
                if a and b and a["status"] == b["status"] == "ok":
                    mem = f"{a['peak_mb'] / b['peak_mb']:.2f}" if b["peak_mb"] > 0 else ""
                    line += f" {a['median_s'] / b['median_s']:.2f} | {mem} |"
                else:
                    line += " | |"
            out.append(line)
        out.append("")
    notes = sorted({r["status"] for r in rows if r["status"] not in ("ok",)})
    if notes:
        out += ["Not run:", ""] + [f"- {n}" for n in notes] + [""]
    return out


def _plots(rows, peers, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    threads_all = sorted({r["threads"] for r in rows})
    panels = (("time", "median_s", "forward+backward, s"), ("memory", "peak_mb", "peak RSS above inputs, MB"))
    for what, key, ylabel in panels:
        fig, axes = plt.subplots(1, len(threads_all), figsize=(6 * len(threads_all), 4.5), squeeze=False)
        for ax, threads in zip(axes[0], threads_all):
            for color, p in enumerate(peers):
                for case_kind, style in (("one graph", "-o"), ("batched", "--s")):
                    pts = sorted((r["nodes"], r[key]) for r in rows
                                 if r["threads"] == threads and r["peer"] == p and r["status"] == "ok"
                                 and (r["case"] == "one graph") == (case_kind == "one graph") and r[key] != ""
                                 and float(r[key]) > 0)
                    if pts:
                        ax.plot([a for a, _ in pts], [b for _, b in pts], style, color=f"C{color}",
                                label=f"{p} ({case_kind})")
            if what == "memory":
                ns = sorted({r["nodes"] for r in rows if r["case"] == "one graph"})
                if ns:
                    ax.plot(ns, [n * n * 4 / 2**20 for n in ns], ":", color="gray", label="N^2 fp32 (one graph)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("nodes N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"sparse_scale_{what}.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
