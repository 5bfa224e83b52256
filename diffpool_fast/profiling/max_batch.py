"""``diffpool-fast profile --max-batch``: the largest batch each backend fits in a memory budget.

On a GPU it is found by trying (doubling, then bisection, CUDA allocator peaks); on CPU it is
solved from a linear fit of the total (inputs + peak) measured at two batch sizes, each in a
fresh process. Next to each, the batch the analytic memory model of ``costmodel`` predicts.
"""
from __future__ import annotations

import gc
import math
import sys
from typing import Dict, List

from . import costmodel
from .costmodel import Shape
from .harness import BACKEND_LABELS, Backend, first_line, make_inputs, step_keep
from .memory import cpu_peak_supported, cpu_peaks_subprocess
from .options import Config


def max_batch_all(cfg: Config, backends: Dict[str, Backend], threads: int) -> List[Dict[str, object]]:
    """One row per shape and backend: measured and modelled largest batch in ``cfg.max_batch``."""
    from tqdm import tqdm

    out = []
    jobs = [(shape, b) for shape in cfg.shapes for b in cfg.backends]
    for shape, b in tqdm(jobs, desc="max-batch", file=sys.stderr, dynamic_ncols=True):
        row = {"backend": b, "nodes": shape.nodes, "clusters": shape.clusters,
               "features": shape.features, "dtype": shape.dtype, "adj_dtype": shape.adj_dtype,
               "budget_bytes": cfg.max_batch,
               "model_max_batch": costmodel.predict_max_batch(b, shape, cfg.max_batch)}
        if not backends[b].available:
            row.update(status="skipped", reason=backends[b].reason, max_batch="", method="")
        else:
            try:
                if cfg.device == "cuda":
                    row.update(cuda_max_batch(backends[b].fn, shape, cfg.max_batch, cfg))
                else:
                    row.update(cpu_max_batch(b, shape, cfg.max_batch, cfg, threads))
                row.setdefault("status", "ok")
                row.setdefault("reason", "")
            except Exception as err:
                row.update(status="error", reason=first_line(err), max_batch="", method="")
        out.append(row)
    return out


def cpu_max_batch(backend: str, shape: Shape, budget: int, cfg: Config, threads: int) -> Dict[str, object]:
    """Fit total bytes (inputs + peak) = a + b·B from two measured batch sizes; solve for B."""
    reason = cpu_peak_supported()
    if reason:
        raise RuntimeError(reason)
    # Measure near the answer (the model's guess, capped at 4x the batch asked for) so the
    # extrapolation is short, and far enough apart that page-level noise does not matter.
    guess = costmodel.predict_max_batch(backend, shape, budget)
    b2 = max(2, min(guess, 4 * shape.batch))
    b1 = max(1, b2 // 4)
    totals = []
    for bb in (b1, b2):
        res = cpu_peaks_subprocess(backend, shape.with_batch(bb), ["full"], cfg.seed,
                                   cfg.density, threads)
        if "error" in res:
            raise RuntimeError(res["error"])
        totals.append(int(res["inputs"]) + int(res["full"]))
    slope = max(1.0, (totals[1] - totals[0]) / (b2 - b1))
    intercept = totals[0] - slope * b1
    best = int(math.floor((budget - intercept) / slope))
    return {"max_batch": max(0, best), "per_graph_bytes": int(slope),
            "fixed_bytes": int(intercept),
            "method": f"linear fit of inputs + RSS peak at B={b1},{b2} (fresh processes)"}


def cuda_max_batch(fn, shape: Shape, budget: int, cfg: Config) -> Dict[str, object]:
    """Largest B whose inputs plus forward+backward peak fit ``budget``, found by trying:
    doubling until a batch does not fit (over budget or out of memory), then bisection."""
    import torch

    def fits(b: int) -> bool:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        inp = None
        try:
            inp = make_inputs(shape.with_batch(b), "cuda", cfg.seed, cfg.density)
            outs = step_keep(fn, inp, "full")
            del outs
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base <= budget
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del inp
            gc.collect()
            torch.cuda.empty_cache()

    if not fits(1):
        return {"max_batch": 0, "method": "tried on the GPU (CUDA allocator peak)"}
    lo, hi, tries = 1, 2, 1
    while fits(hi):
        lo, hi, tries = hi, hi * 2, tries + 1
        if hi > 1 << 24:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        tries += 1
    return {"max_batch": lo, "method": f"tried on the GPU: doubling then bisection ({tries} tries)"}


def max_batch_markdown(rows: List[Dict[str, object]], budget: int) -> str:
    lines = [f"Largest batch in {budget / 2**30:.2f} GiB (inputs + forward/backward peak):", "",
             "| backend | N | C | F | max batch (measured) | max batch (model) | method |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = r["max_batch"] if r.get("status") == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {BACKEND_LABELS.get(r['backend'], r['backend'])} | {r['nodes']} | "
                     f"{r['clusters']} | {r['features']} | {measured} | {r['model_max_batch']} | "
                     f"{r.get('method', '')} |")
    return "\n".join(lines) + "\n"
