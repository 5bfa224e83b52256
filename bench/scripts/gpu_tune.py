"""Tune and check the Triton kernels on a GPU in one short run (issue 19): correctness against
float64 first, then each kernel's candidate configurations timed alone, then the whole step
against PyG with the best ones.

    python bench/scripts/gpu_tune.py OUT_DIR [--budget SECONDS]

Steps, in order of value, each under its own share of the budget; results are written as they
come (``OUT_DIR/tune.log``, ``OUT_DIR/tune.json``), so a run cut short still says what it found:

1. correctness: the Triton step (values and gradients of x, s and adj) against float64 PyG
   formulas on fresh random inputs: random and near-converged, symmetric and not, bool and
   float adjacencies, a padded batch, per-graph and graph-normalised losses, N and C not powers
   of two, every output checked finite;
2. per kernel at the headline shape (B=64 N=512 C=128 F=128 fp32): every candidate of
   ``CANDIDATES`` timed alone with CUDA-graph replays (``triton.testing.do_bench_cudagraph``),
   median; the fastest is kept for the next steps and reported as the table entry to commit;
3. the step (forward + backward, grads of x and s) at the headline shape and the converged one:
   ours (Triton), ours (torch), PyG, CUDA events, median of 20 after warm-up, same process, and
   the same step replayed from a CUDA graph; errors against float64;
4. ``torch.profiler`` of 5 steps: the table of kernel times.

No GPU: exits with a message (status 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

HEADLINE = (64, 512, 128, 128)
DEVICE = "cuda"
SMOKE = False  # --smoke: tiny sizes on the CPU under Triton's interpreter, no timing (tests the script)

# kernel -> list of (table key, entry); entries in the tables' own format
CANDIDATES = {
    "adjacency": [(128, 16, 8, 2), (64, 16, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (128, 16, 8, 3),
                  (64, 32, 8, 2)],
    "gram": [(128, 64, 32, 8, 2), (128, 64, 16, 8, 3), (64, 64, 32, 4, 2), (64, 128, 32, 4, 2),
             (128, 128, 32, 8, 2), (128, 64, 64, 8, 2)],
    "row_bwd": [(64, 16, 8, 2, 64), (64, 16, 8, 1, 64), (64, 32, 8, 1, 64), (64, 16, 4, 1, 64), (64, 16, 8, 2, 128)],
    "row_fwd": [(32, 8), (16, 4), (64, 8), (32, 4), (16, 8)],
}


class Log:
    def __init__(self, out):
        self.out = out
        self.data = {}
        os.makedirs(out, exist_ok=True)
        self.f = open(os.path.join(out, "tune.log"), "a", buffering=1)

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.f.write(line + "\n")

    def put(self, key, value):
        self.data[key] = value
        with open(os.path.join(self.out, "tune.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    d = (a - b).norm().item()
    n = b.norm().item()
    return d / n if n > 0 else d


def inputs(B, N, C, F, *, converged=False, adj_dtype=torch.float32, sym=True, pad=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(B, N, F, device=DEVICE, generator=g)
    if converged:
        lab = torch.randint(0, C, (B, N), device=DEVICE, generator=g)
        oh = torch.nn.functional.one_hot(lab, C).float()
        s = 12.0 * oh + 0.1 * torch.randn(B, N, C, device=DEVICE, generator=g)
        a = oh @ oh.transpose(1, 2)
    else:
        s = torch.randn(B, N, C, device=DEVICE, generator=g)
        a = (torch.rand(B, N, N, device=DEVICE, generator=g) < 0.1).float()
        if sym:
            a = torch.triu(a) + torch.triu(a, 1).transpose(1, 2)
    mask = None
    if pad:
        n = torch.randint(N // 2, N + 1, (B,), device=DEVICE, generator=g)
        mask = torch.arange(N, device=DEVICE)[None] < n[:, None]
        a = a * (mask[:, :, None] & mask[:, None, :])
    return x, (a != 0 if adj_dtype == torch.bool else a.to(adj_dtype)), s, mask


def pyg_formulas(x, adj, s, mask, normalize=True):
    from diffpool_fast.ops.reference import dense_diff_pool_reference

    return dense_diff_pool_reference(x, adj, s, mask, normalize)


def step_grads(fn, x, adj, s, mask, weights=None, adj_grad=False, **kw):
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    adj = adj.detach().clone().requires_grad_(adj_grad)
    outs = fn(x, adj, s, mask, **kw)
    if weights is None:
        loss = sum(o.float().sum() for o in outs)
    else:
        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, [x, s] + ([adj] if adj_grad else []))
    return [o.detach() for o in outs], list(grads)


def correctness(log):
    from diffpool_fast import dense_diff_pool

    cases = [
        dict(B=4, N=63, C=10, F=32),
        dict(B=3, N=130, C=37, F=20, sym=False),
        dict(B=2, N=200, C=128, F=64, adj_dtype=torch.bool),
        dict(B=3, N=97, C=100, F=33, converged=True),
        dict(B=2, N=70, C=300, F=24),
        dict(B=3, N=45, C=20, F=7, normalize="graph", per_graph=True, adj_grad=True, sym=False),
        dict(B=4, N=512, C=128, F=128),
        dict(B=4, N=512, C=128, F=128, converged=True),
    ]
    if SMOKE:
        cases = [dict(B=2, N=20, C=5, F=3), dict(B=2, N=21, C=4, F=3, converged=True, sym=False),
                 dict(B=2, N=19, C=6, F=5, normalize="graph", per_graph=True, adj_grad=True, sym=False)]
    worst = 0.0
    rows = []
    for case in cases:
        case = dict(case)
        normalize = case.pop("normalize", True)
        per_graph = case.pop("per_graph", False)
        adj_grad = case.pop("adj_grad", False)
        x, adj, s, mask = inputs(**case, seed=len(rows))
        g = torch.Generator(device=DEVICE).manual_seed(7)
        def ref_fn(x, adj, s, mask):
            return dense_diff_pool(x, adj, s, mask, normalize, backend="torch", per_graph=per_graph)

        w_outs, _ = step_grads(ref_fn, x.double(), adj.double() if adj.dtype != torch.bool else adj, s.double(),
                               mask)
        weights = [torch.randn(o.shape, device=DEVICE, dtype=torch.float64, generator=g) for o in w_outs]
        want_outs, want_grads = step_grads(ref_fn, x.double(), adj.double() if adj.dtype != torch.bool else adj,
                                           s.double(), mask, weights, adj_grad=adj_grad and adj.is_floating_point())
        got_outs, got_grads = step_grads(
            lambda x, adj, s, mask: dense_diff_pool(x, adj, s, mask, normalize, backend="triton", per_graph=per_graph),
            x, adj, s, mask, weights, adj_grad=adj_grad and adj.is_floating_point())
        errs = [rel(a, b) for a, b in zip(got_outs + got_grads, want_outs + want_grads)]
        finite = all(torch.isfinite(t).all().item() for t in got_outs + got_grads)
        tag = ", ".join(f"{k}={v}" for k, v in case.items()) + f", normalize={normalize}, per_graph={per_graph}"
        log(f"correct {tag}: finite={finite} errors " + " ".join(f"{e:.1e}" for e in errs))
        rows.append(dict(case=tag, errors=errs, finite=finite))
        worst = max(worst, max(errs)) if finite else math.inf
    log.put("correctness", rows)
    log(f"correctness worst relative error {worst:.2e}")
    return worst


def tune(log, deadline):
    import triton.testing

    from diffpool_fast.kernels import adjacency, assignment, gram
    from diffpool_fast.ops import coarsen_triton

    B, N, C, F = HEADLINE
    x, adj, s, mask = inputs(B, N, C, F)
    cp = assignment.cluster_pad(C)
    tables = {"adjacency": (adjacency._ADJ_TABLE, cp), "gram": (gram._GRAM_TABLE, cp),
              "row_bwd": (assignment._ROW_BWD_TABLE, cp), "row_fwd": (assignment._ROW_FWD_TABLE, cp)}
    plan = coarsen_triton._plan(s.clone().requires_grad_(), None, "numel", False, True, torch.float32)

    def fwd():
        return coarsen_triton._forward(x, adj, s, mask, None, plan)

    saved = fwd()

    def bwd():
        out, out_adj, q, ent, link, entl, S, AS, StS, fin, asym, aux = saved
        return coarsen_triton._backward(torch.ones_like(out), torch.ones_like(out_adj), None, None,
                                        torch.ones_like(link), torch.ones_like(entl), x, adj, mask, S, AS, StS, fin,
                                        asym, aux, plan, C, s.dtype, True, True, False)

    chosen = {}
    for kernel, cands in CANDIDATES.items():
        table, key = tables[kernel]
        base = table[key]
        results = []
        for cand in cands:
            if time.time() > deadline:
                log(f"tune {kernel}: out of time")
                break
            table[key] = cand
            try:
                if SMOKE:
                    fwd(), bwd()
                    ms_f = ms_b = 0.0
                else:
                    ms_f = triton.testing.do_bench_cudagraph(fwd, rep=40)
                    ms_b = triton.testing.do_bench_cudagraph(bwd, rep=40)
                results.append((ms_f + ms_b, cand, ms_f, ms_b))
                log(f"tune {kernel} {cand}: fwd {ms_f * 1e3:.1f} us, bwd {ms_b * 1e3:.1f} us")
            except Exception as err:
                log(f"tune {kernel} {cand}: FAILED {type(err).__name__}: {str(err)[:200]}")
        best = min(results)[1] if results else base
        table[key] = best
        chosen[kernel] = dict(best=best, was=base, results=[(r[1], r[2], r[3]) for r in results])
        log(f"tune {kernel}: best {best} (was {base})")
        log.put("tune", chosen)
    # the winners, as kernels/tuning.py reads them (DIFFPOOL_FAST_KERNEL_CONFIGS) for later steps
    with open(os.path.join(log.out, "kernel_configs.json"), "w") as f:
        json.dump({k: {str(tables[k][1]): list(v["best"])} for k, v in chosen.items()}, f, indent=1)
    return chosen


def timed(fn, reps=20, warmup=3):
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def step_table(log, converged):
    from diffpool_fast import dense_diff_pool

    B, N, C, F = HEADLINE
    x, adj, s, mask = inputs(B, N, C, F, converged=converged)
    try:
        from torch_geometric.nn import dense_diff_pool as pyg
    except ImportError:
        pyg = None
    xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = pyg_formulas(xr, adj.double(), sr, mask)
    rgx, rgs = torch.autograd.grad(sum(o.sum() for o in ref), [xr, sr])
    rows = {}
    impls = [("ours-triton", lambda x, a, s, m: dense_diff_pool(x, a, s, m, backend="triton")),
             ("ours-torch", lambda x, a, s, m: dense_diff_pool(x, a, s, m, backend="torch"))]
    if pyg is not None:
        impls.insert(0, ("pyg", lambda x, a, s, m: pyg(x, a, s, m)))
    for name, fn in impls:
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()

        def run():
            outs = fn(xs, adj, ss, mask)
            return torch.autograd.grad(sum(o.sum() for o in outs), [xs, ss])

        ms = timed(run)
        if not SMOKE:
            torch.cuda.reset_peak_memory_stats()
        base = 0 if SMOKE else torch.cuda.memory_allocated()
        outs = fn(xs, adj, ss, mask)
        gx, gs = torch.autograd.grad(sum(o.sum() for o in outs), [xs, ss])
        peak = 0.0 if SMOKE else (torch.cuda.max_memory_allocated() - base) / 2**20
        errs = [rel(o, r) for o, r in zip(list(outs) + [gx, gs], list(ref) + [rgx, rgs])]
        graph_ms = None
        try:
            if SMOKE:
                raise RuntimeError("no CUDA graphs on the CPU")
            static = [o for o in (xs, ss)]
            gr = torch.cuda.CUDAGraph()
            st = torch.cuda.Stream()
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(st)
            with torch.cuda.graph(gr):
                run()
            graph_ms = timed(gr.replay)
            del static
        except Exception as err:
            log(f"step {name}: CUDA graph capture failed: {type(err).__name__}: {str(err)[:200]}")
        rows[name] = dict(ms=ms, graph_ms=graph_ms, peak_mib=peak, errors=errs)
        log(f"step {'converged' if converged else 'random'} {name}: {ms:.3f} ms (graph replay "
            f"{graph_ms if graph_ms is None else round(graph_ms, 3)} ms), peak {peak:.0f} MiB, errors "
            + " ".join(f"{e:.1e}" for e in errs))
    if "pyg" in rows:
        for name, r in rows.items():
            log(f"step {'converged' if converged else 'random'} {name}: x PyG {rows['pyg']['ms'] / r['ms']:.2f}")
    log.put(f"step_{'converged' if converged else 'random'}", rows)


def profile(log):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    from diffpool_fast import dense_diff_pool

    B, N, C, F = HEADLINE
    x, adj, s, mask = inputs(B, N, C, F)
    xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()

    def run():
        outs = dense_diff_pool(xs, adj, ss, mask, backend="triton")
        return torch.autograd.grad(sum(o.sum() for o in outs), [xs, ss])

    for _ in range(3):
        run()
    if SMOKE:
        return
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(os.path.join(log.out, "profile_step.txt"), "w") as f:
        f.write(table)
    log(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the tuning step (default 200)")
    ap.add_argument("--steps", default="correct,tune,step,profile")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1 (tests this script)")
    args = ap.parse_args(argv)
    global DEVICE, SMOKE, HEADLINE
    if args.smoke:
        DEVICE, SMOKE, HEADLINE = "cpu", True, (2, 40, 20, 8)
        for k in CANDIDATES:
            CANDIDATES[k] = CANDIDATES[k][:2]
    elif not torch.cuda.is_available():
        print("gpu_tune.py: no CUDA device", file=sys.stderr)
        return 2
    log = Log(args.out)
    log(f"device {torch.cuda.get_device_name() if not SMOKE else 'cpu (interpreter)'}; torch {torch.__version__}")
    steps = args.steps.split(",")
    t0 = time.time()
    for name, fn in (("correct", lambda: correctness(log)),
                     ("tune", lambda: tune(log, time.time() + args.budget)),
                     ("step", lambda: (step_table(log, False), step_table(log, True))),
                     ("profile", lambda: profile(log))):
        if name not in steps:
            continue
        try:
            fn()
        except Exception:
            log(f"{name} FAILED:\n{traceback.format_exc()}")
        log(f"{name} done at {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
