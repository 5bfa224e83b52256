"""``diffpool-fast profile --model``: a training step of the full DiffPool classifier.

Times forward + backward + optimizer step of a two-level DiffPool graph classifier on a batch
of generated graphs whose sizes are uniform in [--min-nodes, N] (padded to N), for

- ``torch`` / ``triton``: our ``diffpool_fast.nn.model.DiffPoolClassifier`` with that coarsening
  backend, fed the byte (bool) adjacency a dense loader produces;
- ``pyg``: the same architecture from PyG's modules (``diffpool_fast.nn.baselines.PyGDiffPoolNet``,
  PyG's DiffPool example), fed a float adjacency converted inside the step (PyG's layers need
  one; the conversion is part of its cost);
- ``compile``: ``torch.compile`` of that PyG network.

Both objectives are cross-entropy + link loss + entropy loss, Adam. Reports graphs per second
(batch / median step time, backends interleaved repeat by repeat) and the peak memory of a step
beyond the model, optimizer state and batch (CUDA allocator on GPU; on CPU the RSS high-water
mark of a fresh process per backend and size).

It shares the coarsening profile's harness (timer, backend availability), memory measurement,
table formatting, option parsing and provenance; ``run`` hands ``--model`` here.
"""
from __future__ import annotations

import csv
import gc
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from ..config import BACKEND_ENV
from ..errors import UsageError
from .harness import BACKEND_LABELS, Timer, first_line, triton_unavailable
from .memory import cpu_peak_supported, measure_cpu_peak, run_worker
from .options import check_density, choice_list, int_list, require_at_least, resolve_device, set_threads
from .provenance import command_line, device_name, versions
from .report import mib, short

MODEL_BACKENDS = ("torch", "triton", "pyg", "compile")


@dataclass(frozen=True)
class ModelShape:
    graphs: int
    max_nodes: int
    min_nodes: int
    features: int
    classes: int
    hidden: int
    density: float

    def label(self) -> str:
        return (f"B{self.graphs}-N{self.min_nodes}..{self.max_nodes}-F{self.features}-"
                f"H{self.hidden}")


def make_graphs(ms: ModelShape, device: str, seed: int = 0):
    """A padded batch: sizes uniform in [min_nodes, max_nodes] (the first has max_nodes), a
    symmetric random bool adjacency over the real nodes, Gaussian features, random labels."""
    import torch

    B, N = ms.graphs, ms.max_nodes
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = torch.randint(ms.min_nodes, N + 1, (B,), generator=g, device=device)
    sizes[0] = N
    mask = torch.arange(N, device=device)[None, :] < sizes[:, None]
    adj = torch.zeros(B, N, N, dtype=torch.bool, device=device)
    for b in range(B):
        a = torch.rand(N, N, generator=g, device=device) < ms.density
        a = (a | a.transpose(0, 1)) & mask[b][:, None] & mask[b][None, :]
        a.fill_diagonal_(False)
        adj[b] = a
    x = torch.randn(B, N, ms.features, generator=g, device=device) * mask[..., None]
    y = torch.randint(0, ms.classes, (B,), generator=g, device=device)
    return x, adj, mask, y


@dataclass
class ModelBackend:
    name: str
    build: Optional[object] = None  # () -> (model, step)
    reason: str = ""


def make_model_backend(name: str, ms: ModelShape, device: str) -> ModelBackend:
    import torch
    import torch.nn.functional as F

    if name in ("torch", "triton"):
        reason = triton_unavailable(device) if name == "triton" else None
        if reason:
            return ModelBackend(name, reason=reason)
        try:
            from ..nn.model import DiffPoolClassifier
        except ImportError as err:
            return ModelBackend(name, reason="diffpool_fast.nn.model is not in this build "
                                             f"({first_line(err)})")

        def build():
            torch.manual_seed(0)
            # The generated graphs are undirected: promise it, as `diffpool-fast train` does for
            # an undirected dataset.
            model = DiffPoolClassifier(ms.features, ms.classes, max_nodes=ms.max_nodes,
                                       hidden=ms.hidden, backend=name, adj_symmetric=True).to(device)

            def loss_fn(x, adj, mask, y):
                logits, aux = model(x, adj, mask)
                return F.cross_entropy(logits, y) + aux

            return model, loss_fn

        return ModelBackend(name, build)
    if name in ("pyg", "compile"):
        try:
            import torch_geometric.nn  # noqa: F401

            from ..nn.baselines import PyGDiffPoolNet
        except ImportError as err:
            return ModelBackend(name, reason=f"needs torch_geometric and diffpool_fast.nn.baselines "
                                             f"({first_line(err)})")

        def build():
            torch.manual_seed(0)
            model = PyGDiffPoolNet(ms.features, ms.classes, max_nodes=ms.max_nodes,
                                   hidden=ms.hidden).to(device)
            net = torch.compile(model) if name == "compile" else model

            def loss_fn(x, adj, mask, y):
                out, link, ent = net(x, adj.to(x.dtype), mask)
                return F.nll_loss(out, y) + link + ent

            return model, loss_fn

        return ModelBackend(name, build)
    raise ValueError(f"unknown backend {name!r}")


class Trainer:
    """A model, its Adam optimizer and one batch: ``step()`` is one training step."""

    def __init__(self, backend: ModelBackend, ms: ModelShape, device: str, seed: int):
        import torch

        self.model, self.loss_fn = backend.build()
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batch = make_graphs(ms, device, seed)

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(*self.batch)
        loss.backward()
        self.opt.step()
        return loss

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def memory_worker_main() -> None:
    """Entry of the model's memory subprocess: JSON job in argv[1], JSON result on stdout."""
    job = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(job["threads"])
    ms = ModelShape(**job["shape"])
    backend = make_model_backend(job["backend"], ms, "cpu")
    if backend.build is None:
        print(json.dumps({"error": backend.reason}))
        return
    tr = Trainer(backend, ms, "cpu", job["seed"])
    tr.step()
    tr.step()  # Adam's state exists now: it is part of the baseline, not of the step
    peak = measure_cpu_peak(lambda: tr.step())
    print(json.dumps({"peak": peak, "params": tr.params}))


def _cpu_model_peak(name: str, ms: ModelShape, seed: int, threads: int) -> Dict[str, object]:
    """``{"peak": bytes, "params": count}`` of one backend's step, measured in a fresh process."""
    job = {"backend": name, "shape": asdict(ms), "seed": seed, "threads": threads}
    return run_worker("diffpool_fast.profiling.model_step", "memory_worker_main", job)


def _cuda_model_peak(tr: Trainer) -> int:
    import torch

    tr.step()
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tr.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


MODEL_COLUMNS = ["backend", "graphs", "max_nodes", "min_nodes", "features", "hidden", "classes",
                 "status", "reason", "step_ms", "step_ms_q1", "step_ms_q3", "repeats",
                 "graphs_per_s", "speedup_vs_pyg", "peak_bytes", "peak_vs_pyg", "peak_method",
                 "params", "device", "threads", "python", "torch", "triton",
                 "torch_geometric", "command"]


def run_model(args) -> int:
    """``diffpool-fast profile --model``: writes model_profile.csv/.md and model_vs_nodes.png
    to ``--out``; returns 0 (bad options raise UsageError)."""
    import torch
    from tqdm import tqdm

    require_at_least(args, ("batch", "features", "repeats", "classes", "hidden"), 1)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be at least 0, got {args.warmup}")
    check_density(args.density)
    set_threads(args)
    nodes = int_list(args.nodes, "--nodes")
    graphs = args.graphs if args.graphs is not None else args.batch
    if graphs < 1:
        raise UsageError(f"--graphs must be at least 1, got {graphs}")
    backends = choice_list(args.backend, "backend", MODEL_BACKENDS, all_=True)
    shapes = []
    for n in nodes:
        lo = args.min_nodes if args.min_nodes is not None else max(1, n // 2)
        if not 1 <= lo <= n:
            raise UsageError(f"--min-nodes {lo} must be between 1 and --nodes {n}")
        shapes.append(ModelShape(graphs, n, lo, args.features, args.classes, args.hidden,
                                 args.density))
    device = resolve_device(args.device)
    # each backend is chosen explicitly here: a program-wide override would blur the comparison
    os.environ.pop(BACKEND_ENV, None)
    out = args.out or os.path.join("runs", "profile-model")
    os.makedirs(out, exist_ok=True)

    vers = versions()
    dev_name = device_name(device)
    threads = torch.get_num_threads()
    meta = {"device": dev_name, "threads": threads, "python": vers["python"],
            "torch": vers["torch"], "triton": vers["triton"],
            "torch_geometric": vers["torch_geometric"], "command": command_line(args)}
    print(f"device: {dev_name}; a training step (forward, backward, Adam) per backend, "
          f"interleaved, median of {args.repeats} after {args.warmup} warm-up")

    mem_reason = cpu_peak_supported() if device == "cpu" else None
    records: List[Dict[str, object]] = []
    f = open(os.path.join(out, "model_profile.csv"), "w", newline="")
    writer = csv.DictWriter(f, fieldnames=MODEL_COLUMNS)
    writer.writeheader()
    bar = tqdm(total=len(shapes) * len(backends) * (args.warmup + args.repeats + 1),
               desc="profile --model", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for ms in shapes:
            rows = _profile_model_shape(ms, backends, device, args, threads, mem_reason, bar)
            pyg = rows.get("pyg", {})
            for name in backends:
                r = rows[name]
                if pyg.get("step_ms") and r.get("step_ms"):
                    r["speedup_vs_pyg"] = f"{pyg['step_ms'] / r['step_ms']:.4g}"
                if pyg.get("peak_bytes") and r.get("peak_bytes") not in (None, ""):
                    r["peak_vs_pyg"] = f"{r['peak_bytes'] / pyg['peak_bytes']:.4g}"
                rec = {k: r.get(k, "") for k in MODEL_COLUMNS}
                rec.update(meta)
                for k in ("step_ms", "step_ms_q1", "step_ms_q3", "graphs_per_s"):
                    if rec[k] not in ("", None):
                        rec[k] = f"{rec[k]:.6g}"
                writer.writerow(rec)
                f.flush()
                records.append(rec)
    finally:
        bar.close()
        f.close()

    table = _model_table(records)
    print()
    print(table)
    with open(os.path.join(out, "model_profile.md"), "w") as fh:
        fh.write(f"# diffpool-fast profile --model\n\n- command: `{meta['command']}`\n"
                 f"- device: {dev_name}\n- versions: "
                 + ", ".join(f"{k} {v}" for k, v in vers.items()) + "\n"
                 "- a training step = forward, backward and Adam step; graphs/s = graphs per "
                 "batch / median step time; peak = memory a step adds above model, optimizer "
                 "state and batch\n\n" + table + "\n")
    _model_plot(records, out, dev_name)
    print(f"\nwrote {out}/: model_profile.csv, model_profile.md, model_vs_nodes.png")
    return 0


def _profile_model_shape(ms, backends, device, args, threads, mem_reason, bar):
    import torch

    rows: Dict[str, Dict[str, object]] = {}
    live: Dict[str, Trainer] = {}
    for name in backends:
        row = {"backend": name, "graphs": ms.graphs, "max_nodes": ms.max_nodes,
               "min_nodes": ms.min_nodes, "features": ms.features, "hidden": ms.hidden,
               "classes": ms.classes, "status": "ok", "reason": ""}
        rows[name] = row
        mb = make_model_backend(name, ms, device)
        if mb.build is None:
            row.update(status="skipped", reason=mb.reason)
            bar.update(args.warmup + args.repeats + 1)
            continue
        if device == "cpu":
            if mem_reason:
                row["peak_method"] = mem_reason
            else:
                res = _cpu_model_peak(name, ms, args.seed, threads)
                if "error" in res:
                    row.update(status="error", reason=res["error"])
                    bar.update(args.warmup + args.repeats + 1)
                    continue
                row.update(peak_bytes=int(res["peak"]), peak_method="rss-hwm-subprocess")
        try:
            live[name] = Trainer(mb, ms, device, args.seed)
            row["params"] = live[name].params
            if device == "cuda":
                row.update(peak_bytes=_cuda_model_peak(live[name]), peak_method="cuda-allocator")
        except Exception as err:
            row.update(status="error", reason=first_line(err))
            live.pop(name, None)
            bar.update(args.warmup + args.repeats)
        bar.update(1)

    timer = Timer(device)
    times: Dict[str, List[float]] = {n: [] for n in live}
    order = list(live)
    for r in range(args.warmup + args.repeats):
        for name in order[r % len(order):] + order[: r % len(order)] if order else []:
            if rows[name]["status"] != "ok":
                bar.update(1)
                continue
            try:
                t = timer.time(lambda _, name=name: live[name].step())
            except Exception as err:
                rows[name].update(status="error", reason=first_line(err))
                bar.update(1)
                continue
            if r >= args.warmup:
                times[name].append(t)
            bar.update(1)
    for name, ts in times.items():
        if ts and rows[name]["status"] == "ok":
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
            rows[name].update(step_ms=med * 1e3, step_ms_q1=q[0] * 1e3, step_ms_q3=q[2] * 1e3,
                              repeats=len(ts), graphs_per_s=ms.graphs / med)
    live.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _model_table(records) -> str:
    head = ["backend", "graphs", "nodes", "step ms", "graphs/s", "x PyG", "peak MiB", "mem/PyG"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        label = BACKEND_LABELS.get(r["backend"], r["backend"])
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['graphs']} | {r['min_nodes']}..{r['max_nodes']} | "
                         f"{r['status']}: {r['reason']} | | | | |")
            continue
        lines.append(
            f"| {label} | {r['graphs']} | {r['min_nodes']}..{r['max_nodes']} | "
            f"{short(r['step_ms'])} | {short(r['graphs_per_s'])} | "
            f"{short(r['speedup_vs_pyg'])} | {mib(r['peak_bytes'])} | "
            f"{short(r['peak_vs_pyg'])} |")
    return "\n".join(lines)


def _model_plot(records, out, dev_name) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in MODEL_BACKENDS:
        pts = sorted((int(r["max_nodes"]), r) for r in records
                     if r["backend"] == name and r["status"] == "ok")
        if not pts:
            continue
        label = BACKEND_LABELS.get(name, name)
        axes[0].plot([n for n, _ in pts], [float(r["graphs_per_s"]) for _, r in pts], "o-",
                     label=label)
        mem = [(n, int(r["peak_bytes"]) / 2**20) for n, r in pts if r["peak_bytes"] not in ("", None)]
        if mem:
            axes[1].plot([n for n, _ in mem], [m for _, m in mem], "o-", label=label)
    for ax, ylabel in zip(axes, ("graphs / s (training step)", "peak memory of a step (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("largest graph N (padded)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"DiffPool classifier training step on {dev_name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "model_vs_nodes.png"), dpi=110)
    plt.close(fig)
