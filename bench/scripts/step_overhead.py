"""How a DiffPoolClassifier training step's time splits into a fixed part and a per-graph part.

PyG's example architecture (SAGE, hidden 64, 3 layers, JK, 2 levels of 38 and 10 clusters from
max_nodes=150, batch norm, mean readout), our fused training step (fused SAGE blocks, fused Adam),
on generated batches of fixed shape (B graphs of N node slots, the last fifth of each graph's
slots padding): the step time for several (B, N), on 1 and 2 threads.

- B=1, N=3: almost no data; the per-operation cost of the whole step (Python, dispatcher,
  autograd), paid once per step whatever the batch.
- B=20, N=3: level 0 has almost no data, levels 1-2 have their full 20 x 38 and 20 x 10 nodes:
  the part of a batch-20 step that no change to level 0 can remove.
- B=10/20/40 at N=45 (about the mean bucketed PROTEINS batch): how the step grows with the batch.
  A batch split across two workers gives each worker a B=10 step.
- ``--compile``: also ``torch.compile`` of forward + loss with the layer modules at B=20, N=45
  with static shapes (the C++ wrapper on), after compiling.

Usage: python bench/scripts/step_overhead.py [--threads 1,2] [--steps 60] [--compile]
Writes bench/results/<UTC date>-<device>-step_overhead/step_overhead.md (command, machine,
versions, date included; bench/README.md); the reading of the recorded run is
bench/notes/step_overhead.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
SHAPES = [(1, 3), (20, 3), (10, 45), (20, 45), (40, 45)]


from provenance import header, results_dir  # noqa: E402  (bench/scripts/ is on sys.path)


def _measure(threads: int, steps: int, compiled: bool) -> list:
    import torch
    import torch.nn.functional as F

    from diffpool_fast.nn.model import DenseGNN, DiffPoolClassifier
    from diffpool_fast.train.loop import _adam

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = DiffPoolClassifier(3, 2, max_nodes=150, num_levels=2, ratio=0.25, hidden=64, gnn="sage", layers=3,
                             jk=True, readout="mean", readout_levels="last", backend="torch", adj_symmetric=True)
    opt = _adam(net, 1e-3, 0.0)

    def loss_of(x, adj, mask, y):
        logits, aux = net(x, adj, mask)
        return F.cross_entropy(logits, y) + aux

    fn = loss_of
    shapes = SHAPES
    if compiled:
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
        for m in net.modules():
            if isinstance(m, DenseGNN):
                m.fused = False
        fn = torch.compile(loss_of, dynamic=False)
        shapes = [(20, 45)]
    rows = []
    for B, N in shapes:
        g = torch.Generator().manual_seed(B * 1000 + N)
        x = torch.randn(B, N, 3, generator=g)
        a = (torch.rand(B, N, N, generator=g) < 0.1).float()
        adj = ((a + a.transpose(1, 2)) > 0).float()
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[:, N - N // 5:] = False
        y = torch.randint(0, 2, (B,), generator=g)

        def step():  # called within this iteration only
            opt.zero_grad()
            fn(x, adj, mask, y).backward()  # noqa: B023
            opt.step()

        t0 = time.perf_counter()
        for _ in range(10):
            step()
        warm = time.perf_counter() - t0
        best = float("inf")
        for _ in range(3):  # best of three blocks of `steps` steps: the least disturbed by other jobs
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - t0) / steps)
        rows.append({"variant": "compiled-static" if compiled else "fused", "threads": threads, "B": B, "N": N,
                     "ms_per_step": 1e3 * best, "ms_per_20_graphs": 1e3 * best * 20 / B, "warmup_s": warm})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="markdown file to write (default: a new folder in bench/results/)")
    args = ap.parse_args(argv)
    if args.worker:  # one configuration in a fresh process
        import json

        threads, compiled = args.worker.split(":")
        print(json.dumps(_measure(int(threads), args.steps, compiled == "1")))
        return
    import json

    jobs = [(int(t), False) for t in args.threads.split(",")]
    if args.compile:
        jobs.append((max(int(t) for t in args.threads.split(",")), True))
    rows = []
    for threads, compiled in jobs:
        out = subprocess.run([sys.executable, __file__, "--worker", f"{threads}:{int(compiled)}", "--steps",
                              str(args.steps)], capture_output=True, text=True, check=True, cwd=REPO)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        print(f"done: threads {threads}{' compiled' if compiled else ''}", file=sys.stderr)
    lines = [
        "# Fixed and per-graph parts of a DiffPoolClassifier training step (CPU)",
        "",
        "PyG's example architecture (max_nodes 150: levels of 38 and 10 clusters), fused training step, "
        "generated batches of B graphs x N node slots (last fifth padding); best of 3 blocks of "
        f"{args.steps} steps after 10 warm-up steps; each thread count in a fresh process.",
        "",
        *header(__file__, argv),
        "",
        "| variant | threads | B | N | ms per step | ms per 20 graphs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['threads']} | {r['B']} | {r['N']} | {r['ms_per_step']:.2f} | "
                     f"{r['ms_per_20_graphs']:.2f} |")
    if any(r["variant"] == "compiled-static" for r in rows):
        w = [r for r in rows if r["variant"] == "compiled-static"][0]["warmup_s"]
        lines += ["", f"compiled-static: the 10 warm-up steps (compiling included) took {w:.0f} s."]
    out = Path(args.out) if args.out else results_dir("step_overhead") / "step_overhead.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
