"""Where a training step's time goes: level 0, level 1, level 2, head, optimizer; fixed vs per-graph k.

The setting of ``train_speed.py``: PROTEINS graphs with at most 150 nodes, batch 20, size-bucketed
batches, the PyG example's architecture (SAGE, hidden 64, 3 layers, JK, ratio 0.25 -> 38 and 10
clusters, mean readout), CE + link + entropy loss, fused Adam; ``--clusters-per-graph`` gives each
graph ceil(0.25 n_b) clusters at level 1 and ceil(0.25 k_b) at level 2.

Method. For every batch, one full training step runs first (forward, backward, Adam) and is
timed as a whole; forward hooks keep each stage's inputs, and the gradients that reach each
stage's outputs are kept too. Then every stage is replayed alone on those inputs, forward and
backward with the same upstream gradients (``torch.autograd.backward``), and timed:

- ``level0``: the first ``DiffPool`` level, on the input graphs (both GNNs, the pooling to 38
  clusters or k_b, its link and entropy terms);
- ``level1``: the second ``DiffPool`` level, on the coarsened graphs (to 10 clusters or k_b);
- ``level2``: the final GNN on the twice-coarsened graphs and the readout;
- ``head``: the MLP head and the cross-entropy;
- ``optimizer``: the Adam step on the replay's gradients, and ``zero_grad``.

The stages' sum is printed next to the whole step: the difference is what the replay cannot
attribute (the autograd engine's bookkeeping across stages, the loss sum). Both models are
replayed over the same batches, interleaved batch by batch, after a warm-up.

Usage: python bench/scripts/step_breakdown.py [--data-root DIR] [--threads 2] [--batches 120]
Writes bench/results/<UTC date>-<device>-step_breakdown/step_breakdown.{csv,md} (or --out STEM).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAGES = ("level0", "level1", "level2", "head", "optimizer")


def _default_root():
    for cand in (os.environ.get("DIFFPOOL_FAST_DATA"), REPO.parent / "shared" / "tudata", REPO / "data"):
        if cand and (Path(cand) / "PROTEINS").is_dir():
            return str(cand)
    return str(REPO / "data")


def _grad_of(t):
    return None if t is None or t.grad is None else t.grad.detach().clone()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=_default_root())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=120, help="batches timed per model (after 10 of warm-up)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--max-nodes", type=int, default=150)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffpool_fast.data import DenseLoader, load_tu
    from diffpool_fast.nn.model import DiffPoolClassifier, _readout
    from diffpool_fast.train.loop import _adam

    M, B = args.max_nodes, args.batch_size
    ds = load_tu("PROTEINS", args.data_root)
    ds = ds.subset([i for i in range(len(ds)) if int(ds.num_nodes[i]) <= M])
    kw = dict(max_nodes=M, num_levels=2, ratio=0.25, hidden=64, gnn="sage", layers=3, jk=True, readout="mean",
              readout_levels="last", backend="torch", adj_symmetric=True if ds.undirected else None)
    models = {}
    for name, per_graph in (("fixed", False), ("per-graph", True)):
        torch.manual_seed(0)
        m = DiffPoolClassifier(ds.num_features, ds.num_classes, clusters_per_graph=per_graph, **kw).train()
        models[name] = (m, _adam(m, 1e-3, 0.0))
    loader = DenseLoader(ds, batch_size=B, shuffle=True, bucket=True, seed=1)
    batches = []
    epoch = 0
    while len(batches) < args.batches + 10:
        batches.extend(loader.epoch(epoch))
        epoch += 1
    batches = batches[:args.batches + 10]

    def full_step(model, opt, b):
        """One step; returns (seconds, per-level inputs, per-level output grads, head inputs, widths)."""
        inputs, outs = [], []

        def keep(mod, inp, out):
            inputs.append(inp)
            out.x.retain_grad()
            out.adj.retain_grad()
            outs.append(out)

        hooks = [lv.register_forward_hook(keep) for lv in model.levels]
        t0 = time.perf_counter()
        opt.zero_grad()
        logits, aux = model(b.x, b.adj, b.mask)
        loss = F.cross_entropy(logits, b.y) + aux
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        grads = [(_grad_of(o.x), _grad_of(o.adj)) for o in outs]
        head_in = (outs[-1].x.detach(), outs[-1].adj.detach(), outs[-1].mask)
        widths = [o.x.shape[1] for o in outs]
        return dt, inputs, grads, head_in, widths

    def replay(model, opt, b, inputs, grads, head_in):
        t = {}
        for i, (level, inp, (gx, gadj)) in enumerate(zip(model.levels, inputs, grads)):  # levels 0 and 1
            x, adj, mask = inp[0], inp[1], inp[2] if len(inp) > 2 else None
            k = inp[3] if len(inp) > 3 else None
            if i > 0:
                x = x.detach().requires_grad_()
                adj = adj.detach().requires_grad_()
            t0 = time.perf_counter()
            out = level(x, adj, mask, k)
            terms = model.link_weight * out.link_loss + model.ent_weight * out.ent_loss
            torch.autograd.backward([out.x, out.adj, terms], [gx, gadj, None])
            t[f"level{i}"] = time.perf_counter() - t0
        x, adj, mask = (v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for v in head_in)
        with torch.no_grad():  # the gradient reaching the readout, for the level-2 replay
            h0 = _readout(model.final(x, adj, mask), mask, model.readout)
        h = h0.detach().requires_grad_()
        t0 = time.perf_counter()
        F.cross_entropy(model.head(h), b.y).backward()
        t["head"] = time.perf_counter() - t0
        g_h = h.grad.detach().clone()
        t0 = time.perf_counter()
        torch.autograd.backward([_readout(model.final(x, adj, mask), mask, model.readout)], [g_h])
        t["level2"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # the replay's gradients are in place: step on them, then clear
        opt.step()
        opt.zero_grad()
        t["optimizer"] = time.perf_counter() - t0
        return t

    times = {n: {s: [] for s in STAGES + ("step",)} for n in models}
    widths = {n: [] for n in models}
    for j, b in enumerate(batches):
        for name in (models if j % 2 == 0 else list(models)[::-1]):
            model, opt = models[name]
            dt, inputs, grads, head_in, w = full_step(model, opt, b)
            t = replay(model, opt, b, inputs, grads, head_in)
            if j >= 10:
                times[name]["step"].append(dt)
                for s in STAGES:
                    times[name][s].append(t.get(s, 0.0))
                widths[name].append(w)
    rows = []
    for name in models:
        row = {"model": name, "batches": args.batches, "batch_size": B, "threads": args.threads}
        for s in STAGES + ("step",):
            row[f"{s}_ms"] = 1e3 * statistics.mean(times[name][s])
        row["stages_sum_ms"] = sum(row[f"{s}_ms"] for s in STAGES)
        row["level1_width_mean"] = statistics.mean(w[0] for w in widths[name])
        row["level2_width_mean"] = statistics.mean(w[1] for w in widths[name])
        rows.append(row)
    sys.path.insert(0, str(HERE))
    from provenance import header, results_dir, write_csv  # bench/scripts/

    out = Path(args.out) if args.out else results_dir("step_breakdown") / "step_breakdown"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows)
    lines = ["# Training-step breakdown: fixed vs per-graph clusters (PROTEINS <= 150 nodes, bucketed batches)", "",
             *header(__file__, argv), f"- torch threads: {args.threads}", "",
             "Milliseconds per step (batch of 20), mean over the timed batches; each stage replayed alone, forward "
             "and backward (bench/scripts/step_breakdown.py docstring).", "",
             "| model | level 0 | level 1 | level 2 | head | optimizer | sum of stages | whole step | "
             "level-1 / level-2 width (mean) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['level0_ms']:.2f} | {r['level1_ms']:.2f} | {r['level2_ms']:.2f} | "
                     f"{r['head_ms']:.2f} | {r['optimizer_ms']:.2f} | {r['stages_sum_ms']:.2f} | {r['step_ms']:.2f} | "
                     f"{r['level1_width_mean']:.1f} / {r['level2_width_mean']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
