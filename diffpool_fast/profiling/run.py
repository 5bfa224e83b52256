"""``diffpool-fast profile``: time, throughput and peak memory of dense coarsening, side by side.

For every shape x backend x mode it measures the median time after warm-up (CUDA events on a
GPU, wall clock on CPU, backends interleaved repeat by repeat so that a shared machine disturbs
them alike), the achieved bandwidth counted on the adjacency, TFLOP/s, the peak memory beyond
the inputs (CUDA allocator statistics on a GPU; on CPU the resident-set high-water mark of a
fresh subprocess per backend and shape, see ``memory``), the analytic floor of ``costmodel``
and the percentage of it reached, the analytic memory model, and the speed and memory ratios to
PyG's ``dense_diff_pool`` measured in the same run. The backends and modes are described in
``harness``.

This module runs the command: :func:`run` takes the parsed arguments and hands ``--model`` to
``model_step`` and ``--from-csv`` to ``report``; :func:`profile` runs a :class:`Config`.

Exit codes: 0 when at least one backend was measured; a ``UsageError`` (exit 2) when none of
the requested backends can run here (e.g. ``--backend triton`` without a GPU); 1 when every
measurement was skipped or failed (the CSV and markdown still say why, no plots are drawn).

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
from dataclasses import asdict
from typing import Dict, List, Tuple

from ..config import BACKEND_ENV
from ..errors import UsageError
from . import costmodel
from .accuracy import accuracy_markdown, measure_accuracy
from .costmodel import Shape
from .harness import (
    BACKEND_LABELS,
    Backend,
    Timer,
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
    from .options import choice_list, resolve_device

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
    the plots and the optional accuracy and max-batch tables to ``cfg.out``. Returns 0, or 1
    when nothing could be measured; raises UsageError when no requested backend can run here."""
    import torch
    from tqdm import tqdm

    if os.environ.pop(BACKEND_ENV, None):
        print(f"note: ignoring {BACKEND_ENV} (each backend is chosen explicitly here)")
    backends = {b: make_backend(b, cfg.device, cfg.shapes[0]) for b in cfg.backends}
    if not any(b.available for b in backends.values()):
        # Nothing can run: an error before anything is written, not an empty table and plots.
        reasons = "; ".join(f"{BACKEND_LABELS[b.name]}: {b.reason}" for b in backends.values())
        raise UsageError(f"nothing to profile on {cfg.device}: no requested backend can run here ({reasons})")
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
    with open(os.path.join(cfg.out, "meta.json"), "w") as f:
        json.dump({**meta, "versions": vers, "config": {
            k: v for k, v in asdict(cfg).items() if k != "shapes"},
            "shapes": [asdict(s) for s in cfg.shapes]}, f, indent=1)

    print(f"device: {dev_name}; floor: {meta['floor_source']}")
    if cfg.device == "cpu":
        print(f"CPU timings: wall clock, backends interleaved repeat by repeat, median of "
              f"{cfg.repeats} after {cfg.warmup} warm-up; peak memory: RSS high-water mark of a "
              "fresh process per backend and shape, above its inputs")
    else:
        print(f"CUDA timings: CUDA events, backends interleaved, median of {cfg.repeats} after "
              f"{cfg.warmup} warm-up; peak memory: CUDA allocator max_memory_allocated above inputs")

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
    accuracy_rows: List[Dict[str, object]] = []
    timer = Timer(cfg.device)
    avail = [b for b in cfg.backends if backends[b].available]
    per_shape = (len(avail) * (1 if cfg.memory else 0)
                 + len(cfg.modes) * (cfg.warmup + cfg.repeats) * len(avail))
    bar = tqdm(total=per_shape * len(cfg.shapes), desc="profile", unit="run", file=sys.stderr,
               dynamic_ncols=True)
    try:
        for shape in cfg.shapes:
            rows = profile_shape(cfg, shape, backends, timer, spec, threads, bar, cpu_mem_reason)
            for row in rows:
                rec = row.record(meta)
                writer.write(rec)
                records.append(rec)
            if cfg.accuracy:
                accuracy_rows += measure_accuracy(cfg, shape, backends)
    finally:
        bar.close()
        writer.close()

    print()
    print(terminal_table(records))
    header = markdown_header(cfg.command, dev_name, meta["floor_source"], vers,
                             cfg.device == "cpu")
    md = markdown_table(records, header)
    if accuracy_rows:
        acc_path = os.path.join(cfg.out, "accuracy.csv")
        write_csv(acc_path, accuracy_rows, meta)
        md += "\n" + accuracy_markdown(accuracy_rows)
        print()
        print(accuracy_markdown(accuracy_rows))
    if cfg.max_batch is not None:
        mb = max_batch_all(cfg, backends, threads)
        write_csv(os.path.join(cfg.out, "max_batch.csv"), mb, meta)
        text = max_batch_markdown(mb, cfg.max_batch)
        md += "\n" + text
        print()
        print(text)
    with open(os.path.join(cfg.out, "profile.md"), "w") as f:
        f.write(md)
    title = (f"B={cfg.shapes[0].batch} F={cfg.shapes[0].features} clusters "
             f"{'/'.join(str(s.clusters) for s in cfg.shapes)} {cfg.shapes[0].dtype} "
             f"adj {cfg.shapes[0].adj_dtype} on {dev_name}")
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
          + (", max_batch.csv" if cfg.max_batch is not None else ""))
    if not measured:
        print("diffpool-fast profile: nothing was measured: every backend was skipped or failed "
              "(see the reasons above); no plots", file=sys.stderr)
        return 1
    return 0


def profile_shape(cfg: Config, shape: Shape, backends: Dict[str, Backend], timer: Timer,
                  spec: costmodel.DeviceSpec, threads: int, bar, cpu_mem_reason) -> List[Row]:
    """The rows of one shape: every backend x mode, measured or with the reason it is not."""
    import torch

    rows: Dict[Tuple[str, str], Row] = {}
    for b in cfg.backends:
        for mode in cfg.modes:
            est = costmodel.memory_model(b, shape, mode)
            rows[b, mode] = Row(
                b, mode, shape, floor_bytes=costmodel.floor_bytes(shape, mode),
                floor_flops=costmodel.floor_flops(shape, mode),
                floor_s=costmodel.floor_time(shape, mode, spec),
                model_peak=est.peak, model_saved=est.saved)
            if not backends[b].available:
                rows[b, mode].status, rows[b, mode].reason = "skipped", backends[b].reason
    bar.set_description(f"profile {shape.label()}")

    # The CPU memory workers run before the inputs are built here, so that this process's
    # memory does not compete with theirs.
    live = [b for b in cfg.backends if backends[b].available]
    if cfg.memory and cfg.device == "cpu":
        for b in live:
            if cpu_mem_reason:
                bar.update(1)
                continue
            res = cpu_peaks_subprocess(b, shape, cfg.modes, cfg.seed, cfg.density, threads)
            for mode in cfg.modes:
                row = rows[b, mode]
                if "error" in res:
                    row.status, row.reason = "error", str(res["error"])
                else:
                    row.peak, row.peak_method = int(res[mode]), "rss-hwm-subprocess"
            bar.update(1)

    inp = make_inputs(shape, cfg.device, cfg.seed, cfg.density)
    if "triton" in live:
        reason = triton_unsupported(shape, inp)
        if reason:
            live.remove("triton")
            for mode in cfg.modes:
                rows["triton", mode].status = "skipped"
                rows["triton", mode].reason = f"the Triton path would fall back to torch: {reason}"
            bar.update(len(cfg.modes) * (cfg.warmup + cfg.repeats) + (1 if cfg.memory else 0))
    live = [b for b in live if all(rows[b, m].status == "ok" for m in cfg.modes)]

    if cfg.memory and cfg.device == "cuda":
        for b in list(live):
            try:
                res = cuda_peaks(backends[b].fn, inp, cfg.modes)
                for mode in cfg.modes:
                    rows[b, mode].peak, rows[b, mode].peak_method = int(res[mode]), "cuda-allocator"
            except Exception as err:
                _mark_error(rows, b, cfg.modes, err, live)
            bar.update(1)

    for mode in cfg.modes:
        for r in range(cfg.warmup + cfg.repeats):
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for b in order:
                if rows[b, mode].status != "ok":
                    bar.update(1)
                    continue
                try:
                    t = time_once(timer, backends[b].fn, inp, mode)
                except Exception as err:
                    _mark_error(rows, b, [mode], err, None)
                    if cfg.device == "cuda":
                        torch.cuda.empty_cache()
                    bar.update(1)
                    continue
                if r >= cfg.warmup:
                    rows[b, mode].times.append(t)
                bar.update(1)
    del inp
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()

    for mode in cfg.modes:
        pyg = rows.get(("pyg", mode))
        for b in cfg.backends:
            row = rows[b, mode]
            if pyg is not None and pyg.median and row.median:
                row.speedup = pyg.median / row.median
            if pyg is not None and pyg.peak and row.peak is not None:
                row.peak_vs_pyg = row.peak / pyg.peak
    return [rows[b, m] for m in cfg.modes for b in cfg.backends]


def _mark_error(rows, backend, modes, err, live) -> None:
    """A backend that raised: its rows of ``modes`` become errors, and it is timed no more."""
    for mode in modes:
        rows[backend, mode].status = "error"
        rows[backend, mode].reason = first_line(err)
        rows[backend, mode].times = []
    if live is not None and backend in live:
        live.remove(backend)
