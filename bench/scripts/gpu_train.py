"""Training on a GPU against PyG's example network (issue 20): the step table and a PROTEINS run.

    python bench/scripts/gpu_train.py --data-root DATA --out OUT_DIR      (on a CUDA machine)
    python bench/scripts/gpu_train.py --device cpu --tiny --out /tmp/x    (checks the script on a CPU)

Without CUDA (and without ``--device cpu``) it writes ``OUT_DIR/SKIPPED.txt`` saying so and exits 0.
Every part runs in its own process under its own time limit, and all of them within ``--budget``
seconds (default 110): a part that fails or runs out of time is written to ``status.csv`` the
moment it ends, with its last lines of output, and the next part runs. Parts and outputs:

1. ``env.json``: device, versions, threads (written by the driver).
2. ``model``: one training step (forward, backward, clip 2.0 where ours, Adam) at batch 64 of
   generated graphs with 64..128 and 256..512 nodes (``diffpool_fast.profiling.model_step``'s
   graphs, padded to the largest), for PyG's example network (``pyg``: DenseSAGEConv, batch norm,
   ``torch_geometric.nn.dense_diff_pool``, as ``diffpool-fast profile --model`` runs it) and
   variants of ours:

   - ``ours``: the model ``diffpool-fast train`` builds by default (no norm, clusters per graph,
     fused SAGE blocks, ``backend="auto"``, undirected graphs promised), ``--deterministic on``;
   - ``ours-graphs``: ``ours`` with ``--cuda-graphs on`` (``train.steps.GraphSteps``; if the step
     cannot be captured the row says why and what it measured is the plain step on padded
     batches with static cluster widths);
   - ``ours-det-off``: ``ours`` without deterministic algorithms (the mode's cost, dense level 0);
     ``ours-det-fill``: with them and torch's NaN fill of every ``torch.empty`` (off in ``train``);
   - ``ours-modules``: ``ours`` with the GNN layer modules instead of the fused SAGE blocks;
   - ``ours-torch`` / ``ours-triton``: ``ours`` with that coarsening backend (not by default);
   - ``ours-bn``: batch norm and fixed clusters (the class's defaults: the issue's first table; not
     by default);
   - ``ours-sparse`` / ``ours-sparse-det-off``: level 0 on edge lists (``--level0 sparse``), with
     and without deterministic algorithms (the mode's cost where its sums are).

   Variants are timed interleaved, round by round, each round a window of ``--steps`` steps with
   one synchronisation at its end (the host runs ahead as in training): step time = window time
   / steps, the median over rounds; ``x_pyg`` = PyG's median step time / the variant's, same run.
   -> ``model_profile.csv`` (rewritten after every round, so a time-out keeps the rounds done),
   ``model_profile.md``, and ``host_syncs.txt``: every host sync one ``ours`` step makes, with
   the line that makes it (``torch.cuda.set_sync_debug_mode``), what stands between the step and
   a CUDA graph.
3. ``train-ours``: ``diffpool-fast train --dataset PROTEINS --max-nodes 150 --batch-size 20
   --folds 1 --epochs E`` on the GPU; ``train-pyg``: PyG's example pipeline on the same graphs
   (TUDataset with ``ToDense(150)``, ``DenseDataLoader`` batch 20, ``PyGDiffPoolNet``, Adam 1e-3,
   NLL), the same number of training graphs per epoch; ``train-ours-graphs``: ``train-ours`` with
   ``--cuda-graphs on``, skipped when the ``model`` part found that the step cannot be captured
   (it would time the plain step again). graphs/s = training graphs per epoch / the epoch's training seconds, the
   median over epochs after the first (compiles and warm-up) -> ``train_proteins.csv``.

``gpu_train.md`` sums it all up. Nothing is downloaded: TU data come from ``--data-root``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

#: the default variants (``--variants`` also takes ours-torch, ours-triton, ours-bn, ours-det-fill)
VARIANTS = ("pyg", "ours", "ours-graphs", "ours-det-off", "ours-modules", "ours-sparse", "ours-sparse-det-off")
MODEL_COLUMNS = ["variant", "graphs", "min_nodes", "max_nodes", "features", "hidden", "status", "reason",
                 "step_ms", "step_ms_min", "step_ms_max", "rounds", "steps_per_round", "graphs_per_s", "x_pyg",
                 "backend", "level0", "deterministic", "cuda_graphs", "fused", "norm", "clusters_per_graph",
                 "graph_steps", "device", "torch", "triton", "torch_geometric", "command"]
TRAIN_COLUMNS = ["run", "status", "reason", "graphs_per_s", "x_pyg", "train_graphs", "epochs",
                 "epoch_train_s_median", "epoch_train_s_first", "test_acc", "device", "command"]


def _default_root() -> str:
    for cand in (os.environ.get("DIFFPOOL_FAST_DATA"), REPO.parent / "shared" / "tudata", REPO / "data"):
        if cand and (Path(cand) / "PROTEINS").is_dir():
            return str(cand)
    return str(REPO / "data")


def _write_csv(path: Path, columns, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    os.replace(tmp, path)


def _fmt(v, digits=4):
    return f"{v:.{digits}g}" if isinstance(v, float) else ("" if v is None else str(v))


def _versions(torch) -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("triton", "torch_geometric"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------- part: env

def part_env(args) -> None:
    """env.json (in the driver: its CUDA start-up costs once)."""
    import torch

    info = {"device": args.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            **_versions(torch), "cuda": torch.version.cuda}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    (Path(args.out) / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


# --------------------------------------------------------------------------- part: model

def _sparse_of(x, adj, mask, y, sizes):
    """The edge-list form of a padded dense batch (what ``collate_sparse`` gives for its graphs)."""
    import torch

    from diffpool_fast.sparse_data import SparseBatch

    B = x.shape[0]
    offsets = (torch.cumsum(sizes, 0) - sizes).to(x.device)
    b, i, j = adj.nonzero(as_tuple=True)  # sorted by (graph, source, target), unique
    edge_index = torch.stack([offsets[b] + i, offsets[b] + j])
    batch = torch.repeat_interleave(torch.arange(B, device=x.device), sizes.to(x.device))
    return SparseBatch(x[mask], edge_index, batch, y, sizes)


class _Variant:
    """One row of the table: ``step()`` queues one training step (no host sync)."""

    def __init__(self, name, ms, device, seed):
        import torch

        from diffpool_fast.data import DenseBatch
        from diffpool_fast.nn.model import DenseGNN, DiffPoolClassifier
        from diffpool_fast.profiling.model_step import Trainer, make_graphs, make_model_backend
        from diffpool_fast.train.loop import _adam
        from diffpool_fast.train.steps import CudaCapture, GraphSteps, train_step

        self.name, self.steps, self.info = name, None, {}
        self.deterministic = not name.endswith("det-off")
        if name == "pyg":
            backend = make_model_backend("pyg", ms, device)
            if backend.build is None:
                raise RuntimeError(backend.reason)
            tr = Trainer(backend, ms, device, seed)
            self.step = tr.step
            self.info = {"backend": "pyg", "level0": "dense", "norm": "batch", "clusters_per_graph": False,
                         "fused": "", "cuda_graphs": "off"}
            return
        x, adj, mask, y = make_graphs(ms, device, seed)
        sizes = mask.sum(1).cpu()
        backend = {"ours-torch": "torch", "ours-triton": "triton"}.get(name, "auto")
        bn = name == "ours-bn"
        torch.manual_seed(0)
        self.model = DiffPoolClassifier(ms.features, ms.classes, max_nodes=ms.max_nodes, hidden=ms.hidden,
                                        backend=backend, adj_symmetric=True, batch_norm="batch" if bn else "none",
                                        clusters_per_graph=not bn).to(device)
        if name == "ours-modules":
            for m in self.model.modules():
                if isinstance(m, DenseGNN):
                    m.fused = False
        graphs = name == "ours-graphs" and device == "cuda"
        self.opt = _adam(self.model, 1e-3, 0.0, capturable=graphs)
        sparse = name.startswith("ours-sparse")
        batch = _sparse_of(x, adj, mask, y, sizes) if sparse else DenseBatch(x, adj, mask, y, sizes)
        if graphs:
            self.steps = GraphSteps(self.model, self.opt, 2.0, CudaCapture(torch.device(device)),
                                    log=lambda text: print(f"{name}: {text}", flush=True))
            self.step = lambda: self.steps.step(batch)
        else:
            if name == "ours-graphs":
                self.model.static_clusters = True  # what --cuda-graphs computes, on a device without graphs
            self.step = lambda: train_step(self.model, self.opt, batch, 2.0)
        self.info = {"backend": backend, "level0": "sparse" if sparse else "dense", "norm": "batch" if bn else "none",
                     "clusters_per_graph": not bn, "fused": name != "ours-modules",
                     "cuda_graphs": "on" if name == "ours-graphs" else "off"}


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _host_syncs(variant, device) -> list:
    """The host syncs one step of ``variant`` makes on CUDA, as 'file:line: message'."""
    import warnings

    import torch

    from diffpool_fast.train.steps import SYNC_WARNING

    _sync(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            variant.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in seen
            if SYNC_WARNING in str(w.message)]


def part_model(args) -> None:
    import torch

    from diffpool_fast.profiling.model_step import ModelShape
    from diffpool_fast.train.steps import CUBLAS_DETERMINISTIC, CUBLAS_ENV, deterministic

    os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC)  # the same cuBLAS set-up for every variant
    device, out = args.device, Path(args.out)
    vers = _versions(torch)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    names = [v for v in args.variants.split(",") if v]
    rows, syncs_text = [], []
    for lo, hi in args.sizes:
        ms = ModelShape(args.batch, hi, lo, args.features, 2, args.hidden, args.density)
        live, res = {}, {}
        for name in names:
            row = {"variant": name, "graphs": ms.graphs, "min_nodes": lo, "max_nodes": hi, "features": ms.features,
                   "hidden": ms.hidden, "status": "ok", "reason": "", "device": dev_name,
                   "deterministic": "off" if name.endswith("det-off") else ("on+fill" if name == "ours-det-fill"
                                                                           else "on"),
                   "command": " ".join(sys.argv),
                   **{k: vers[k] for k in ("torch", "triton", "torch_geometric")}}
            res[name] = row
            rows.append(row)
            try:
                with deterministic(torch.device(device), row["deterministic"] != "off", "fill" in row["deterministic"]):
                    v = _Variant(name, ms, device, args.seed)
                    row.update(v.info)
                    for _ in range(args.warmup):
                        v.step()
                    _sync(device)
                    if name == "ours" and device != "cuda":
                        syncs_text.append(f"== ours, {lo}..{hi} nodes: host syncs not measured (no CUDA device)")
                    elif name == "ours":
                        found = _host_syncs(v, device)
                        syncs_text += [f"== ours, {lo}..{hi} nodes: {len(found)} host sync(s) in one step"] + found
                live[name] = (v, [])
            except Exception as err:  # noqa: BLE001 - written down, the others go on
                row.update(status="error", reason=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                           if str(err).strip() else type(err).__name__)
                print(f"{name} {lo}..{hi}: {row['reason']}", flush=True)
            _write_csv(out / "model_profile.csv", MODEL_COLUMNS, rows)
        (out / "host_syncs.txt").write_text("\n".join(syncs_text) + "\n")
        order = list(live)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)] if order else []:
                v, times = live[name]
                if res[name]["status"] != "ok":
                    continue
                try:
                    with deterministic(torch.device(device), res[name]["deterministic"] != "off",
                                       "fill" in res[name]["deterministic"]):
                        _sync(device)
                        t0 = time.perf_counter()
                        for _ in range(args.steps):
                            v.step()
                        _sync(device)
                        times.append((time.perf_counter() - t0) / args.steps)
                except Exception as err:  # noqa: BLE001
                    res[name].update(status="error", reason=f"{type(err).__name__}: {str(err).strip()[:300]}")
            _fill(res, live, ms, args)
            _write_csv(out / "model_profile.csv", MODEL_COLUMNS, rows)
        for name, (v, _) in live.items():
            if v.steps is not None:
                s = v.steps.summary()
                res[name]["graph_steps"] = json.dumps({"steps": s["steps"], "graphs": s["graphs"],
                                                       "plain_because": s["plain_because"]})
        _write_csv(out / "model_profile.csv", MODEL_COLUMNS, rows)
        live.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    (out / "model_profile.md").write_text(_model_md(rows, dev_name, args))
    print(_model_md(rows, dev_name, args))


def _fill(res, live, ms, args) -> None:
    pyg = live.get("pyg", (None, []))[1]
    base = statistics.median(pyg) if pyg and res["pyg"]["status"] == "ok" else None
    for name, (_, times) in live.items():
        if not times:
            continue
        med = statistics.median(times)
        res[name].update(step_ms=f"{1e3 * med:.4g}", step_ms_min=f"{1e3 * min(times):.4g}",
                         step_ms_max=f"{1e3 * max(times):.4g}", rounds=len(times), steps_per_round=args.steps,
                         graphs_per_s=f"{ms.graphs / med:.5g}", x_pyg=f"{base / med:.3g}" if base else "")


def _model_md(rows, dev_name, args) -> str:
    lines = [f"# Training step: ours vs PyG's example network ({dev_name})", "",
             f"batch {args.batch}, hidden {args.hidden}, features {args.features}; a window of {args.steps} steps per "
             f"round, {args.rounds} interleaved rounds, median; x PyG = PyG's step time / the variant's (same run)", "",
             "| variant | nodes | step ms | graphs/s | x PyG | status |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['min_nodes']}..{r['max_nodes']} | {r.get('step_ms', '')} | "
                     f"{r.get('graphs_per_s', '')} | {r.get('x_pyg', '')} | {r['status']} {r['reason']} "
                     f"{r.get('graph_steps', '')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- part: PROTEINS

def _epochs_rate(train_graphs: int, secs) -> dict:
    later = secs[1:] or secs
    med = statistics.median(later)
    return {"graphs_per_s": train_graphs / med, "epoch_train_s_median": med, "epoch_train_s_first": secs[0],
            "epochs": len(secs), "train_graphs": train_graphs}


def part_train_ours(args, graphs: bool) -> None:
    """``diffpool-fast train`` on PROTEINS; its metrics.csv gives the epochs' training seconds."""
    run = Path(args.out) / ("train-ours-graphs" if graphs else "train-ours")
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "diffpool_fast", "train", "--dataset", "PROTEINS", "--data-root", args.data_root,
           "--max-nodes", str(args.max_nodes), "--batch-size", "20", "--folds", "1", "--epochs", str(args.epochs),
           "--device", args.device, "--progress", "off", "--out", str(run), "--cache-dir", str(Path(args.out) / "cache")]
    if graphs:
        cmd += ["--cuda-graphs", "on"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads((run / "results.json").read_text())
    with open(run / "metrics.csv") as f:
        secs = [float(r["train_seconds"]) for r in csv.DictReader(f)]
    fold = res["folds"][0]
    out = {"run": run.name, "status": "ok", "test_acc": fold["test_acc"], "device": res["device"],
           "command": " ".join(cmd), **_epochs_rate(fold["n_train"], secs)}
    if "cuda_graphs" in fold:
        out["reason"] = json.dumps({k: fold["cuda_graphs"][k] for k in ("steps", "graphs", "plain_because")})
    print(json.dumps(out), flush=True)
    (Path(args.out) / f"{run.name}.json").write_text(json.dumps(out) + "\n")


def part_train_pyg(args) -> None:
    """PyG's example pipeline on PROTEINS (graphs of at most --max-nodes nodes), as many training
    graphs per epoch as ``diffpool-fast train --folds 1`` trains on (81%: 90% of the 90% not in test)."""
    import torch
    import torch.nn.functional as F
    import torch_geometric.transforms as T
    from torch_geometric.datasets import TUDataset
    from torch_geometric.loader import DenseDataLoader

    from diffpool_fast.data import _link_raw
    from diffpool_fast.nn.baselines import PyGDiffPoolNet

    M, device = args.max_nodes, torch.device(args.device)
    tmp = tempfile.mkdtemp(prefix="pyg_proteins_")
    try:
        src = Path(args.data_root) / "PROTEINS"
        _link_raw(src / "raw" if (src / "raw").is_dir() else src, Path(tmp) / "PROTEINS" / "raw", "PROTEINS")
        ds = TUDataset(tmp, "PROTEINS", transform=T.ToDense(M), pre_filter=lambda d: d.num_nodes <= M)
        g = torch.Generator().manual_seed(0)
        n_train = int(round(0.81 * len(ds)))
        train = ds[torch.randperm(len(ds), generator=g)[:n_train]]
        loader = DenseDataLoader(train, batch_size=20, shuffle=True)
        torch.manual_seed(0)
        net = PyGDiffPoolNet(ds.num_features, ds.num_classes, max_nodes=M).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        secs = []
        for _ in range(args.epochs):
            net.train()
            _sync(args.device)
            t0 = time.perf_counter()
            for data in loader:
                data = data.to(device)
                opt.zero_grad()
                out, _, _ = net(data.x, data.adj, data.mask)
                F.nll_loss(out, data.y.view(-1)).backward()
                opt.step()
            _sync(args.device)
            secs.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"run": "train-pyg", "status": "ok", "device": args.device, "command": "PyG example loop (this script)",
           **_epochs_rate(n_train, secs)}
    print(json.dumps(out), flush=True)
    (Path(args.out) / "train-pyg.json").write_text(json.dumps(out) + "\n")


# --------------------------------------------------------------------------- driver

PARTS = {"model": 60, "train-ours": 40, "train-pyg": 30, "train-ours-graphs": 30}


def _run_part(part, args, limit, status_rows, out) -> str:
    log = out / f"{part}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part] + args.passthrough
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, cwd=REPO).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit:.0f} s"
    secs = time.perf_counter() - t0
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-600:] if status != "ok" else ""
    status_rows.append({"part": part, "status": status, "seconds": f"{secs:.1f}", "limit_s": f"{limit:.0f}",
                        "detail": tail})
    _write_csv(out / "status.csv", ["part", "status", "seconds", "limit_s", "detail"], status_rows)
    print(f"[{part}] {status} in {secs:.1f} s" + (f": {tail}" if tail else ""), flush=True)
    return status


def _summary(out: Path) -> None:
    runs = []
    for name in ("train-pyg", "train-ours", "train-ours-graphs"):
        p = out / f"{name}.json"
        runs.append(json.loads(p.read_text()) if p.is_file() else {"run": name, "status": "missing"})
    pyg = runs[0].get("graphs_per_s")
    for r in runs:
        if pyg and r.get("graphs_per_s"):
            r["x_pyg"] = r["graphs_per_s"] / pyg
    _write_csv(out / "train_proteins.csv", TRAIN_COLUMNS, [{k: _fmt(v) for k, v in r.items()} for r in runs])
    lines = ["# gpu_train.py", ""]
    if (out / "env.json").is_file():
        lines += ["- env: `" + (out / "env.json").read_text().strip().replace("\n", " ") + "`"]
    if (out / "status.csv").is_file():
        lines += ["", "| part | status | seconds |", "| --- | --- | ---: |"]
        with open(out / "status.csv") as f:
            lines += [f"| {r['part']} | {r['status']} | {r['seconds']} |" for r in csv.DictReader(f)]
    lines += ["", "## PROTEINS (graphs <= 150 nodes, batch 20), training graphs/s", "",
              "| run | graphs/s | x PyG | epochs | first epoch s | median epoch s | test acc |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        lines.append(f"| {r['run']} | {_fmt(r.get('graphs_per_s'))} | {_fmt(r.get('x_pyg'), 3)} | {r.get('epochs', '')} "
                     f"| {_fmt(r.get('epoch_train_s_first'))} | {_fmt(r.get('epoch_train_s_median'))} | "
                     f"{_fmt(r.get('test_acc'))} |")
    if (out / "model_profile.md").is_file():
        lines += ["", (out / "model_profile.md").read_text()]
    (out / "gpu_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _capture_off(out: Path):
    """Why the model part's ``ours-graphs`` captured nothing, or None (it did, or did not run)."""
    try:
        with open(out / "model_profile.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["variant"] == "ours-graphs" and r["graph_steps"]]
    except OSError:
        return None
    for r in rows:
        info = json.loads(r["graph_steps"])
        if info["steps"]["captured"]:
            return None
    return (json.loads(rows[-1]["graph_steps"])["plain_because"] or ["no graph"])[0][:300] if rows else None


def _sizes(text):
    out = []
    for part in text.split(","):
        lo, hi = part.split("..")
        out.append((int(lo), int(hi)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for every output (created)")
    ap.add_argument("--data-root", default=_default_root(), help="folder holding PROTEINS/ (TU raw files)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA, else write SKIPPED.txt and exit 0; cpu: run the parts on the CPU (a check)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and one-epoch runs (to check the script)")
    ap.add_argument("--budget", type=float, default=110.0, help="seconds for all parts together")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="model-step variants (see the docstring)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sizes = _sizes("8..16,16..32" if args.tiny else "64..128,256..512")
    args.batch, args.hidden, args.features, args.density = (4, 8, 8, 0.2) if args.tiny else (64, 64, 32, 0.05)
    args.warmup, args.rounds, args.steps = (1, 2, 2) if args.tiny else (3, 5, 8)
    args.epochs, args.max_nodes, args.seed = (2, 30, 0) if args.tiny else (3, 150, 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        {"model": part_model, "train-ours": lambda a: part_train_ours(a, False),
         "train-ours-graphs": lambda a: part_train_ours(a, True), "train-pyg": part_train_pyg}[args.part](args)
        return 0

    import torch

    if args.device == "auto":
        if not torch.cuda.is_available():
            text = ("gpu_train.py: no CUDA device visible to torch: nothing measured. On a CPU, "
                    "--device cpu --tiny checks that the script runs.")
            (out / "SKIPPED.txt").write_text(text + "\n")
            print(text)
            return 0
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train.py: --device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    args.passthrough = ["--out", str(out), "--data-root", args.data_root, "--device", args.device,
                        "--variants", args.variants] + (["--tiny"] if args.tiny else [])
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels, not the interpreter
    t_end = time.perf_counter() + args.budget
    part_env(args)
    status_rows = []
    for part in [p for p in args.parts.split(",") if p]:
        if part not in PARTS:
            print(f"gpu_train.py: unknown part {part!r}; choose from {', '.join(PARTS)}", file=sys.stderr)
            return 2
        if part in ("train-ours", "train-ours-graphs", "train-pyg") and not (Path(args.data_root) / "PROTEINS").is_dir():
            status_rows.append({"part": part, "status": f"skipped: no PROTEINS/ in {args.data_root}", "seconds": "0"})
            _write_csv(out / "status.csv", ["part", "status", "seconds", "limit_s", "detail"], status_rows)
            continue
        off = _capture_off(out) if part == "train-ours-graphs" else None
        if off:
            status_rows.append({"part": part, "status": f"skipped: the model part could not capture the step ({off})",
                                "seconds": "0"})
            _write_csv(out / "status.csv", ["part", "status", "seconds", "limit_s", "detail"], status_rows)
            continue
        left = t_end - time.perf_counter()
        if left < 5:
            status_rows.append({"part": part, "status": "skipped: --budget spent", "seconds": "0"})
            _write_csv(out / "status.csv", ["part", "status", "seconds", "limit_s", "detail"], status_rows)
            continue
        _run_part(part, args, min(PARTS[part] * (3 if args.device == "cpu" else 1), left), status_rows, out)
    _summary(out)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in status_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
