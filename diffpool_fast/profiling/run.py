"""``diffpool-fast profile``: time, throughput and peak memory of dense coarsening, side by side.

For every shape x backend x mode it measures the median time after warm-up (CUDA events on a
GPU, wall clock on CPU, backends interleaved repeat by repeat so that a shared machine disturbs
them alike), the achieved bandwidth counted on the adjacency, TFLOP/s, the peak memory beyond
the inputs (CUDA allocator statistics on a GPU; on CPU the resident-set high-water mark of a
fresh subprocess per backend and shape, see ``memory``), the analytic floor of ``costmodel``
and the percentage of it reached, the analytic memory model, and the speed and memory ratios to
PyG's ``dense_diff_pool`` measured in the same run. The backends and modes are described in
``harness``.

The op table (issue 19): ``--shapes`` lists shapes explicitly (``BxNxCxF``, with ``:converged`` or
an adjacency dtype as suffix), ``--precision highest,high`` measures each shape under each
``torch.set_float32_matmul_precision`` setting (a ``precision`` column), ``--accuracy`` adds the
relative Frobenius errors against PyG's formulas in float64 on the same inputs, ``pyg-compiled``
is compiled afresh per shape (its first forward+backward under each precision, a compile or a
recompile, in ``compile_s``, not in the times), and ``auto``
is labelled with the path ``backend="auto"`` took and why (``dispatch``). profile.md then ends
with one forward+backward block per shape and precision, in the format of the first GPU run.
``--write-dispatch PATH`` writes the faster of our two paths per bucket into the dispatch table.

This module runs the command: :func:`run` takes the parsed arguments and hands ``--model`` to
``model_step`` and ``--from-csv`` to ``report``; :func:`profile` runs a :class:`Config`.

Exit codes: 0 when at least one backend was measured; a ``UsageError`` (exit 2) when none of
the requested backends can run here (e.g. ``--backend triton`` without a GPU); 1 when every
measurement was skipped or failed (the CSV and markdown still say why, no plots are drawn), or
when ``--write-dispatch`` had no shape with both of our paths measured (nothing is written).

A busy machine makes CPU timings unreliable (the same shape at 0.6 ms, then 70 ms): as ``train``
does, the thread count is lowered to the idle cores when ``--threads`` is not given, with a note,
and a warning is printed when it is; the 1-minute load average at the start is recorded in
meta.json and in every CSV row (``load_avg``).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

from ..config import BACKEND_ENV
from ..errors import UsageError
from . import costmodel
from .accuracy import accuracy_markdown, measure_errors, reference
from .accuracy import accuracy_rows as accuracy_rows_of
from .costmodel import Shape
from .harness import (
    BACKEND_LABELS,
    Backend,
    Timer,
    auto_path,
    compile_for,
    first_line,
    make_backend,
    make_inputs,
    time_once,
    triton_unsupported,
)
from .max_batch import max_batch_all, max_batch_markdown
from .memory import cpu_peak_supported, cpu_peaks_subprocess, cuda_peaks
from .model_step import run_model
from .options import Config, build_config
from .provenance import device_name, device_spec, versions
from .report import (
    COLUMNS,
    Row,
    Writer,
    markdown_header,
    markdown_table,
    op_table_markdown,
    plot,
    render_from_csv,
    terminal_table,
    write_csv,
)

__all__ = ["Config", "build_config", "run", "profile", "profile_shape"]


def run(args) -> int:
    """``diffpool-fast profile`` with parsed arguments: exit code 0, or raises UsageError."""
    if args.model:
        return _run_model(args)
    if args.from_csv:
        return render_from_csv(args.from_csv, args.out)
    return profile(build_config(args))


def _run_model(args) -> int:
    """``--model``, with the same exit codes as the coarsening profile: an error when only the
    Triton backend is asked for where it cannot run, 1 when no backend was measured."""
    import csv

    from .harness import triton_unavailable
    from .model_step import MODEL_BACKENDS
    from .options import SHAPE_DEFAULTS, choice_list, resolve_device

    for flag in ("shapes", "write_dispatch", "precision", "compile_limit"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is an option of the coarsening profile, not of --model")
    for k, v in SHAPE_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    wanted = choice_list(args.backend, "backend", MODEL_BACKENDS, all_=True)
    device = resolve_device(args.device)
    reason = triton_unavailable(device)
    if wanted == ["triton"] and reason:
        raise UsageError(f"nothing to profile on {device}: ours (triton): {reason}")
    rc = run_model(args)
    path = os.path.join(args.out or os.path.join("runs", "profile-model"), "model_profile.csv")
    if rc == 0 and os.path.isfile(path):
        with open(path, newline="") as f:
            if not any(r.get("status") == "ok" for r in csv.DictReader(f)):
                print("diffpool-fast profile: nothing was measured: every backend was skipped or failed "
                      "(see the table)", file=sys.stderr)
                return 1
    return rc


def profile(cfg: Config) -> int:
    """Measure every shape of ``cfg``; write profile.csv (row by row), profile.md, meta.json,
    the plots, the optional accuracy and max-batch tables to ``cfg.out``, and with
    ``--write-dispatch`` the dispatch table. Returns 0, or 1 when nothing could be measured (or
    the dispatch table could not be written); raises UsageError when no requested backend can
    run here."""
    import torch

    started = time.perf_counter()
    if os.environ.pop(BACKEND_ENV, None):
        print(f"note: ignoring {BACKEND_ENV} (each backend is chosen explicitly here)")
    backends = {b: make_backend(b, cfg.device, cfg.shapes[0]) for b in cfg.backends}
    if not any(b.available for b in backends.values()):
        # Nothing can run: an error before anything is written, not an empty table and plots.
        reasons = "; ".join(f"{BACKEND_LABELS[b.name]}: {b.reason}" for b in backends.values())
        raise UsageError(f"nothing to profile on {cfg.device}: no requested backend can run here ({reasons})")
    before = torch.get_float32_matmul_precision()
    try:
        return _profile(cfg, backends, started)
    finally:
        torch.set_float32_matmul_precision(before)


def _profile(cfg: Config, backends: Dict[str, Backend], started: float) -> int:
    import torch
    from tqdm import tqdm

    os.makedirs(cfg.out, exist_ok=True)
    dev_name = device_name(cfg.device)
    spec = device_spec(cfg.device, dev_name, cfg.peak_bandwidth, cfg.peak_tflops)
    vers = versions()
    threads = torch.get_num_threads()
    meta = {"device": dev_name, "floor_source": f"{spec.name}: {spec.bandwidth / 1e9:.1f} GB/s, "
            f"{spec.rate(cfg.shapes[0].dtype) / 1e12:.2f} TF/s, {spec.source}",
            "threads": threads, "python": vers["python"], "torch": vers["torch"],
            "triton": vers["triton"], "torch_geometric": vers["torch_geometric"],
            "command": cfg.command,
            "load_avg": "" if cfg.load_avg is None else f"{cfg.load_avg:.2f}"}
    if cfg.device == "cuda":
        meta["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    meta["git"] = git_commit()
    with open(os.path.join(cfg.out, "meta.json"), "w") as f:
        json.dump({**meta, "versions": vers, "config": {
            k: v for k, v in asdict(cfg).items() if k != "shapes"},
            "shapes": [asdict(s) for s in cfg.shapes]}, f, indent=1)

    print(f"device: {dev_name}; floor: {meta['floor_source']}")
    print(f"command: {cfg.command}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + f"; git {meta['git']}")
    if cfg.device == "cpu":
        print(f"CPU timings: wall clock, backends interleaved repeat by repeat, median of "
              f"{cfg.repeats} after {cfg.warmup} warm-up; peak memory: RSS high-water mark of a "
              "fresh process per backend and shape, above its inputs")
    else:
        print(f"CUDA timings: CUDA events, backends interleaved, median of {cfg.repeats} after "
              f"{cfg.warmup} warm-up; peak memory: CUDA allocator max_memory_allocated above inputs")
    precisions = cfg.precisions or [torch.get_float32_matmul_precision()]
    print("float32 matmul precision: " + ", ".join(precisions)
          + ("" if cfg.precisions else " (the setting in force; --precision to choose)"))

    if cfg.load_avg is not None:
        print(f"machine load at the start: {cfg.load_avg:.2f} (1-minute average) on {os.cpu_count()} cores, "
              f"{threads} torch thread(s)")
    for b in backends.values():
        if not b.available:
            print(f"skipped: {BACKEND_LABELS[b.name]}: {b.reason}")
    cpu_mem_reason = cpu_peak_supported() if cfg.device == "cpu" and cfg.memory else None
    if cpu_mem_reason:
        print(f"note: peak memory not measured: {cpu_mem_reason}")

    writer = Writer(os.path.join(cfg.out, "profile.csv"), COLUMNS + [k for k in meta if k not in COLUMNS])
    records: List[Dict[str, object]] = []
    timer = Timer(cfg.device)
    avail = [b for b in cfg.backends if backends[b].available]
    per_shape = len(avail) * (1 if cfg.memory else 0) + len(precisions) * len(cfg.modes) * (
        cfg.warmup + cfg.repeats) * len(avail)
    bar = tqdm(total=per_shape * len(cfg.shapes), desc="profile", unit="run", file=sys.stderr,
               dynamic_ncols=True)
    try:
        for index, shape in enumerate(cfg.shapes):
            rows = profile_shape(cfg, shape, backends, timer, spec, threads, bar, cpu_mem_reason,
                                 index=index, precisions=precisions)
            for row in rows:
                rec = row.record(meta)
                writer.write(rec)
                records.append(rec)
    finally:
        bar.close()
        writer.close()

    print()
    print(terminal_table(records))
    header = markdown_header(cfg.command, dev_name, meta["floor_source"], vers,
                             cfg.device == "cpu")
    md = markdown_table(records, header)
    ops = op_table_markdown(records)
    if ops:
        md += "\n" + ops
        print()
        print(ops)
    accuracy_rows = accuracy_rows_of(records) if cfg.accuracy else []
    if accuracy_rows:
        write_csv(os.path.join(cfg.out, "accuracy.csv"), accuracy_rows, meta)
        md += "\n" + accuracy_markdown(accuracy_rows)
    if cfg.max_batch is not None:
        mb = max_batch_all(cfg, backends, threads)
        write_csv(os.path.join(cfg.out, "max_batch.csv"), mb, meta)
        text = max_batch_markdown(mb, cfg.max_batch)
        md += "\n" + text
        print()
        print(text)
    rc = 0
    if cfg.write_dispatch:
        text, ok = write_dispatch(cfg, records, meta, vers)
        md += "\n" + text
        print()
        print(text)
        rc = 0 if ok else 1
    md += f"\nMeasured in {time.perf_counter() - started:.0f} s (backends set up, every shape, tables).\n"
    with open(os.path.join(cfg.out, "profile.md"), "w") as f:
        f.write(md)
    s0 = cfg.shapes[0]
    title = (f"B={s0.batch} F={s0.features} clusters "
             f"{'/'.join(str(s.clusters) for s in cfg.shapes if s.batch == s0.batch)} {s0.dtype} "
             f"adj {s0.adj_dtype} on {dev_name}")
    measured = any(r["status"] == "ok" for r in records)
    paths = []
    if measured:
        try:
            paths = plot(records, cfg.out, title)
        except ImportError as err:
            print(f"note: no plots ({first_line(err)}; pip install matplotlib)")
    print()
    print(f"wrote {cfg.out}/: profile.csv, profile.md, meta.json"
          + "".join(f", {os.path.basename(p)}" for p in paths)
          + (", accuracy.csv" if accuracy_rows else "")
          + (", max_batch.csv" if cfg.max_batch is not None else "")
          + (f"; dispatch table {cfg.write_dispatch}" if cfg.write_dispatch and rc == 0 else "")
          + f" in {time.perf_counter() - started:.0f} s")
    if not measured:
        print("diffpool-fast profile: nothing was measured: every backend was skipped or failed "
              "(see the reasons above); no plots", file=sys.stderr)
        return 1
    return rc


def profile_shape(cfg: Config, shape: Shape, backends: Dict[str, Backend], timer: Timer,
                  spec: costmodel.DeviceSpec, threads: int, bar, cpu_mem_reason, index: int = 0,
                  precisions: Optional[List[str]] = None) -> List[Row]:
    """The rows of one shape: every backend x precision x mode, measured or with the reason it
    is not. ``index``: the shape's place in ``cfg.shapes`` (for ``--compile-limit``);
    ``precisions``: the float32 matmul settings to measure under (None: the one in force)."""
    import torch

    current = torch.get_float32_matmul_precision()
    set_precision = precisions is not None and cfg.precisions is not None
    precisions = precisions or [current]
    rows: Dict[Tuple[str, str, str], Row] = {}
    for prec in precisions:
        for b in cfg.backends:
            for mode in cfg.modes:
                est = costmodel.memory_model(b, shape, mode)
                row = rows[b, mode, prec] = Row(
                    b, mode, shape, floor_bytes=costmodel.floor_bytes(shape, mode),
                    floor_flops=costmodel.floor_flops(shape, mode),
                    floor_s=costmodel.floor_time(shape, mode, spec),
                    model_peak=est.peak, model_saved=est.saved, precision=prec)
                if not backends[b].available:
                    row.status, row.reason = "skipped", backends[b].reason

    def rows_of(b, prec=None, modes=None):
        return [rows[b, m, p] for p in (precisions if prec is None else [prec])
                for m in (cfg.modes if modes is None else modes)]

    bar.set_description(f"profile {shape.label()}")

    # The CPU memory workers run before the inputs are built here, so that this process's
    # memory does not compete with theirs. The resident set does not depend on the precision.
    live = [b for b in cfg.backends if backends[b].available]
    if cfg.memory and cfg.device == "cpu":
        for b in live:
            if cpu_mem_reason:
                bar.update(1)
                continue
            res = cpu_peaks_subprocess(b, shape, cfg.modes, cfg.seed, cfg.density, threads)
            for row in rows_of(b):
                if "error" in res:
                    row.status, row.reason = "error", str(res["error"])
                else:
                    row.peak, row.peak_method = int(res[row.mode]), "rss-hwm-subprocess"
            bar.update(1)

    inp = make_inputs(shape, cfg.device, cfg.seed, cfg.density)
    n_steps = len(cfg.modes) * (cfg.warmup + cfg.repeats)
    if "triton" in live:
        reason = triton_unsupported(shape, inp)
        if reason:
            live.remove("triton")
            for row in rows_of("triton"):
                row.status = "skipped"
                row.reason = f"the Triton path would fall back to torch: {reason}"
            bar.update(len(precisions) * n_steps + (1 if cfg.memory and cfg.device == "cuda" else 0))
    if "auto" in live:
        path, why = auto_path(inp)
        for row in rows_of("auto"):
            row.path, row.dispatch = path, why
    if "pyg-compiled" in live and cfg.compile_limit is not None and index >= cfg.compile_limit:
        live.remove("pyg-compiled")
        for row in rows_of("pyg-compiled"):
            row.status = "skipped"
            row.reason = f"not compiled for this shape (--compile-limit {cfg.compile_limit})"
        bar.update(len(precisions) * n_steps)
    live = [b for b in live if all(r.status == "ok" for r in rows_of(b))]
    ref = None
    if cfg.accuracy and live:
        try:
            ref = reference(inp)
        except Exception as err:  # e.g. out of memory: the float64 reference holds B x N x N terms
            for b in live:
                for row in rows_of(b):
                    row.reason = f"accuracy: the float64 reference failed: {first_line(err)}"
            if cfg.device == "cuda":
                torch.cuda.empty_cache()

    for prec in precisions:
        if set_precision:
            torch.set_float32_matmul_precision(prec)
        here = list(live)
        if "pyg-compiled" in here:
            try:
                seconds = compile_for(backends["pyg-compiled"], inp, cfg.device, fresh=prec == precisions[0])
                for row in rows_of("pyg-compiled", prec):
                    row.compile_s = seconds
            except Exception as err:
                _mark_error(rows, "pyg-compiled", cfg.modes, err, here, prec)
        if cfg.memory and cfg.device == "cuda":
            for b in list(here):
                try:
                    res = cuda_peaks(backends[b].fn, inp, cfg.modes)
                    for row in rows_of(b, prec):
                        row.peak, row.peak_method = int(res[row.mode]), "cuda-allocator"
                except Exception as err:
                    _mark_error(rows, b, cfg.modes, err, here, prec)
                bar.update(1)

        for mode in cfg.modes:
            for r in range(cfg.warmup + cfg.repeats):
                order = here[r % len(here):] + here[: r % len(here)] if here else []
                for b in order:
                    row = rows[b, mode, prec]
                    if row.status != "ok":
                        bar.update(1)
                        continue
                    try:
                        t = time_once(timer, backends[b].fn, inp, mode)
                    except Exception as err:
                        _mark_error(rows, b, [mode], err, None, prec)
                        if cfg.device == "cuda":
                            torch.cuda.empty_cache()
                        bar.update(1)
                        continue
                    if r >= cfg.warmup:
                        row.times.append(t)
                    bar.update(1)

        if ref is not None:
            for b in here:
                if not any(row.status == "ok" for row in rows_of(b, prec)):
                    continue
                try:
                    errs = measure_errors(backends[b].fn, inp, ref)
                except Exception as err:
                    errs = {}
                    for row in rows_of(b, prec):
                        row.reason = (row.reason + "; " if row.reason else "") + f"accuracy: {first_line(err)}"
                for row in rows_of(b, prec):
                    row.errors = errs

        for mode in cfg.modes:
            pyg = rows.get(("pyg", mode, prec))
            for b in cfg.backends:
                row = rows[b, mode, prec]
                if pyg is not None and pyg.median and row.median:
                    row.speedup = pyg.median / row.median
                if pyg is not None and pyg.peak and row.peak is not None:
                    row.peak_vs_pyg = row.peak / pyg.peak
    del inp, ref
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return [rows[b, m, p] for p in precisions for m in cfg.modes for b in cfg.backends]


def _mark_error(rows, backend, modes, err, live, prec) -> None:
    """A backend that raised: its rows of ``modes`` under ``prec`` become errors, and it is timed
    no more under that precision."""
    for mode in modes:
        rows[backend, mode, prec].status = "error"
        rows[backend, mode, prec].reason = first_line(err)
        rows[backend, mode, prec].times = []
    if live is not None and backend in live:
        live.remove(backend)


def git_commit() -> str:
    """The checkout's commit (short), ``+dirty`` when files differ from it; ``unknown`` outside
    a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dispatch_cases(records: List[Dict[str, object]]) -> Tuple[List[Dict[str, object]], str]:
    """The measured cases for the dispatch table, and the precision they were measured under:
    full-mode rows where both of our paths ran, under "highest" (torch's default) when that was
    measured, else under the first precision measured."""
    full = [r for r in records if r["mode"] == "full" and r["status"] == "ok"]
    precs = list(dict.fromkeys(str(r.get("precision", "")) for r in full))
    prec = "highest" if "highest" in precs else (precs[0] if precs else "")
    cases: Dict[tuple, Dict[str, object]] = {}
    for r in full:
        if str(r.get("precision", "")) != prec:
            continue
        key = tuple(r[k] for k in ("batch", "nodes", "clusters", "features", "dtype", "adj_dtype", "logits"))
        case = cases.setdefault(key, {k: r[k] for k in ("batch", "nodes", "clusters", "features", "dtype",
                                                        "adj_dtype", "logits")})
        case["precision"] = prec
        if r["backend"] in ("torch", "triton", "pyg"):
            case[f"{r['backend']}_ms"] = float(r["time_ms"])
    return list(cases.values()), prec


def write_dispatch(cfg: Config, records: List[Dict[str, object]], meta: Dict[str, object],
                   vers: Dict[str, str]) -> Tuple[str, bool]:
    """--write-dispatch: this device's section of the dispatch table from the measured winners.
    Returns the markdown that says what was written (or why nothing was) and whether it was."""
    import datetime

    from ..ops import dispatch_table

    cases, prec = dispatch_cases(records)
    buckets = dispatch_table.winners(cases)
    head = f"## Dispatch table: {cfg.write_dispatch}, capability {meta.get('capability', '?')}"
    if not buckets:
        return (head + "\n\nNOT written: no shape has full-mode times of both torch and triton "
                "(see the skipped and failed rows above).\n"), False
    cap = tuple(int(v) for v in str(meta["capability"]).split("."))
    section = {
        "device": meta["device"], "provisional": False,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": meta.get("git", "unknown"),
        "versions": {k: vers[k] for k in ("python", "torch", "triton", "torch_geometric") if k in vers},
        "precision": prec,
        "timing": (f"forward+backward (grads of x and s, adj without grad), median of {cfg.repeats} CUDA-event "
                   f"timings after {cfg.warmup} warm-ups, backends interleaved in one process"),
        "source": "diffpool-fast profile --write-dispatch",
        "command": cfg.command,
        "buckets": buckets,
    }
    dispatch_table.write_section(cfg.write_dispatch, cap, section)
    lines = [head, "", f"Written from the full-mode timings under \"{prec}\" (replacing this capability's "
             "previous section). Bucket: N, C, F rounded up to powers of two; dtype of x / adj.", "",
             "| N | C | F | dtype / adj | auto picks | triton / torch time | beats PyG | cases |",
             "|---|---|---|---|---|---|---|---|"]
    for b in buckets:
        beats = {True: "yes", False: "no", None: ""}[b["beats_pyg"]]
        lines.append(f"| {b['nodes']} | {b['clusters']} | {b['features']} | {b['dtype']} / {b['adj_dtype']} | "
                     f"{b['backend']} | {b['triton_over_torch']:.3g} | {beats} | {len(b['cases'])} |")
    return "\n".join(lines) + "\n", True
