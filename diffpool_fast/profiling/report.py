"""The results of ``diffpool-fast profile``: rows, the CSV, terminal and markdown tables, plots.

``profile.csv`` is written row by row as shapes finish (:class:`Writer`); ``profile.md`` and the
PNG plots are rendered from the records, and can be rendered again from a ``profile.csv`` alone
(:func:`render_from_csv`, ``--from-csv``).
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import UsageError
from . import costmodel
from .accuracy import ERROR_COLUMNS, accuracy_markdown
from .costmodel import MODES, PROFILE_BACKENDS, Shape
from .harness import BACKEND_LABELS
from .max_batch import max_batch_markdown

#: the columns of profile.csv, in order
COLUMNS = [
    "backend", "path", "mode", "precision", "logits", "batch", "nodes", "clusters", "features", "dtype",
    "adj_dtype", "masked", "status", "reason", "time_ms", "time_ms_q1", "time_ms_q3", "repeats",
    "adj_GBps", "TFLOPs", "peak_bytes", "peak_method", "model_peak_bytes", "model_saved_bytes",
    "floor_bytes", "floor_flops", "floor_ms", "pct_of_floor", "speedup_vs_pyg", "peak_vs_pyg",
    "compile_s", *ERROR_COLUMNS, "dispatch",
    "device", "floor_source", "threads", "python", "torch", "triton", "torch_geometric",
    "command",
]


@dataclass
class Row:
    """The measurements of one backend, mode and shape; ``record`` is its CSV row."""

    backend: str
    mode: str
    shape: Shape
    status: str = "ok"
    reason: str = ""
    times: List[float] = field(default_factory=list)
    peak: Optional[int] = None
    peak_method: str = ""
    floor_bytes: int = 0
    floor_flops: int = 0
    floor_s: float = 0.0
    model_peak: int = 0
    model_saved: int = 0
    speedup: Optional[float] = None
    peak_vs_pyg: Optional[float] = None
    #: torch.get_float32_matmul_precision() while it was measured
    precision: str = ""
    #: the path that ran: the backend itself, or for auto the path it picked ("torch"/"triton")
    path: str = ""
    #: auto: where its choice came from (the dispatch table's section and bucket, or why not)
    dispatch: str = ""
    #: pyg-compiled: seconds of the first forward+backward, which compiles
    compile_s: Optional[float] = None
    #: ERROR_COLUMNS -> relative error (--accuracy)
    errors: Dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    def quantile(self, q: float) -> Optional[float]:
        if not self.times:
            return None
        xs = sorted(self.times)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def record(self, meta: Dict[str, str]) -> Dict[str, object]:
        sh, med = self.shape, self.median
        return {
            "backend": self.backend, "path": self.path or self.backend, "mode": self.mode,
            "precision": self.precision, "logits": sh.logits, "batch": sh.batch, "nodes": sh.nodes,
            "clusters": sh.clusters, "features": sh.features, "dtype": sh.dtype,
            "adj_dtype": sh.adj_dtype, "masked": sh.masked, "status": self.status,
            "reason": self.reason,
            "time_ms": _fmt(med * 1e3 if med else None),
            "time_ms_q1": _fmt(self.quantile(0.25) * 1e3 if self.times else None),
            "time_ms_q3": _fmt(self.quantile(0.75) * 1e3 if self.times else None),
            "repeats": len(self.times),
            "adj_GBps": _fmt(costmodel.adj_bytes(sh) / med / 1e9 if med else None),
            "TFLOPs": _fmt(self.floor_flops / med / 1e12 if med else None),
            "peak_bytes": self.peak if self.peak is not None else "",
            "peak_method": self.peak_method,
            "model_peak_bytes": self.model_peak, "model_saved_bytes": self.model_saved,
            "floor_bytes": self.floor_bytes, "floor_flops": self.floor_flops,
            "floor_ms": _fmt(self.floor_s * 1e3),
            "pct_of_floor": _fmt(100 * self.floor_s / med if med else None),
            "speedup_vs_pyg": _fmt(self.speedup), "peak_vs_pyg": _fmt(self.peak_vs_pyg),
            "compile_s": _fmt(self.compile_s),
            **{c: (f"{self.errors[c]:.3e}" if c in self.errors else "") for c in ERROR_COLUMNS},
            "dispatch": self.dispatch,
            **meta,
        }


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}"


def mib(b) -> str:
    """Bytes (an int or a CSV string; empty when unmeasured) -> MiB with one decimal."""
    return "" if b is None or b == "" else f"{int(b) / 2**20:,.1f}"


class Writer:
    """Appends rows to the CSV as they are measured, so a crash loses only the shape in flight."""

    def __init__(self, path: str, columns: List[str]):
        self.path = path
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=columns)
        self.csv.writeheader()
        self.file.flush()

    def write(self, record: Dict[str, object]) -> None:
        self.csv.writerow(record)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def label(r: Dict[str, object]) -> str:
    """A record's implementation name for tables: auto with the path it ran."""
    name = BACKEND_LABELS.get(r["backend"], r["backend"])
    if r["backend"] == "auto" and r.get("path") and r.get("path") != "auto":
        name = f"ours (auto: {r['path']})"
    return name


def terminal_table(records: List[Dict[str, object]]) -> str:
    """The measured rows as aligned columns, then one line per skipped or failed backend."""
    head = ["backend", "mode", "N", "C", "time ms", "x PyG", "adj GB/s", "TFLOP/s",
            "peak MiB", "model MiB", "floor ms", "% floor", "mem/PyG"]
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        rows.append([label(r) + _case_suffix(r), r["mode"], r["nodes"],
                     r["clusters"], short(r["time_ms"]), short(r["speedup_vs_pyg"]),
                     short(r["adj_GBps"]), short(r["TFLOPs"]), mib(r["peak_bytes"]),
                     mib(r["model_peak_bytes"]), short(r["floor_ms"]),
                     short(r["pct_of_floor"]), short(r["peak_vs_pyg"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    lines = ["  ".join(str(h).rjust(w) if i > 1 else str(h).ljust(w)
                       for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    skipped = {(r["backend"], r["status"], r["reason"]) for r in records if r["status"] != "ok"}
    for backend, status, reason in sorted(skipped):
        lines.append(f"{status}: {backend}: {reason}")
    return "\n".join(lines)


def short(v) -> str:
    """A number (or its CSV string) in at most about four significant digits, for tables."""
    if v in (None, ""):
        return ""
    v = float(v)
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def markdown_table(records: List[Dict[str, object]], header: List[str]) -> str:
    """profile.md: ``header``, then every row (skipped and failed ones with their reason)."""
    cols = ["backend", "mode", "batch", "nodes", "clusters", "features", "time_ms",
            "speedup_vs_pyg", "adj_GBps", "TFLOPs", "peak_bytes", "model_peak_bytes",
            "peak_vs_pyg", "floor_ms", "pct_of_floor", "status"]
    names = ["backend", "mode", "B", "N", "C", "F", "time ms (median)", "speed-up vs PyG",
             "adj GB/s", "TFLOP/s", "peak MiB", "model peak MiB", "peak / PyG's",
             "floor ms", "% of floor", "status"]
    lines = list(header) + ["", "| " + " | ".join(names) + " |",
                            "|" + "---|" * len(names)]
    for r in records:
        cells = []
        for c in cols:
            v = r[c]
            if c in ("peak_bytes", "model_peak_bytes"):
                v = mib(v)
            elif c == "status" and r["status"] != "ok":
                v = f"{r['status']}: {r['reason']}"
            elif c == "backend":
                v = label(r) + _case_suffix(r)
            elif c in ("batch", "nodes", "clusters", "features"):
                v = str(v)
            elif c not in ("mode", "status"):
                v = short(v) if v not in ("", None) else ""
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _case_suffix(r: Dict[str, object]) -> str:
    """`` [high]``, `` [converged]``: what tells apart rows of one shape and backend."""
    tags = [str(r[k]) for k in ("precision", "logits") if r.get(k) and r.get(k) not in ("highest", "random")]
    return f" [{', '.join(tags)}]" if tags else ""


def op_table_markdown(records: List[Dict[str, object]]) -> str:
    """The forward+backward table of issue 19, one block per shape, inputs and precision:
    implementation, time, ratio to PyG, peak, and (with --accuracy) the relative errors."""
    full = [r for r in records if r["mode"] == "full"]
    if not full:
        return ""
    order = {b: i for i, b in enumerate(("pyg", "pyg-compiled", "compile", "auto", "triton", "torch"))}
    blocks: Dict[tuple, List[Dict[str, object]]] = {}
    for r in full:
        key = (r["batch"], r["nodes"], r["clusters"], r["features"], r["dtype"], r["adj_dtype"],
               r.get("logits", ""), r.get("precision", ""))
        blocks.setdefault(key, []).append(r)
    errs = any(r.get(c) not in (None, "") for r in full for c in ERROR_COLUMNS)
    head = ["impl", "fwd+bwd ms", "x PyG", "peak MiB"]
    if errs:
        head += ["rel err out", "out_adj", "link", "ent", "grad x", "grad s"]
    lines = ["## forward+backward (grads of x and s)", "",
             "x PyG = PyG's median / this median, same run and precision; peak = memory above the inputs"
             + ("; rel err = relative Frobenius error against PyG's formulas in float64 on the same inputs"
                if errs else "")]
    for key, rows in blocks.items():
        B, N, C, F, dt, adt, logits, prec = key
        title = (f"B={B} N={N} C={C} F={F} adj={adt}" + (f" x={dt}" if dt != "float32" else "")
                 + (f" prec={prec}" if prec else "") + (" converged" if logits == "converged" else ""))
        lines += ["", f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes = []
        for r in sorted(rows, key=lambda r: order.get(r["backend"], 99)):
            name = label(r)
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']}: {r['reason']} |" + " |" * (len(head) - 2))
                continue
            cells = [name, short(r["time_ms"]), short(r["speedup_vs_pyg"]), mib(r["peak_bytes"])]
            if errs:
                cells += [str(r.get(c, "")) for c in ERROR_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
            if r.get("compile_s") not in (None, ""):
                notes.append(f"{name}: first forward+backward {float(r['compile_s']):.1f} s (compiles, or loads "
                             "from Inductor's on-disk cache; not in the time)")
            if r["backend"] == "auto" and r.get("dispatch"):
                notes.append(f"{name}: {r['dispatch']}")
        lines += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines).rstrip() + "\n"


def plot(records: List[Dict[str, object]], out_dir: str, title: str) -> List[str]:
    """time_vs_nodes.png and peak_memory_vs_nodes.png, one panel per mode, log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # against N: the rows of the first measured batch size, F, adjacency dtype, precision and
    # logits kind (an explicit --shapes list may mix them; the CSV and tables hold every row)
    ok = [r for r in records if r["status"] == "ok"]
    same = ("batch", "features", "adj_dtype", "precision", "logits")
    if ok:
        first = [str(ok[0].get(k, "")) for k in same]
        ok = [r for r in ok if [str(r.get(k, "")) for k in same] == first]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    backends = [b for b in PROFILE_BACKENDS + ("compile",) if any(r["backend"] == b for r in ok)]
    colors = {"torch": "tab:blue", "triton": "tab:green", "pyg": "tab:red", "pyg-compiled": "tab:orange",
              "compile": "tab:orange", "auto": "tab:purple"}
    paths = []
    for kind, key, ylabel, fname in (
        ("time", "time_ms", "median time (ms)", "time_vs_nodes.png"),
        ("memory", "peak_bytes", "peak memory beyond inputs (MiB)", "peak_memory_vs_nodes.png"),
    ):
        fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(5 * max(1, len(modes)), 4),
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes or ["full"]):
            for b in backends:
                pts = sorted({int(r["nodes"]): r for r in ok if r["backend"] == b and r["mode"] == mode}.items())
                xs = [n for n, r in pts if r[key] not in ("", None)]
                ys = [float(r[key]) / (2**20 if kind == "memory" else 1)
                      for n, r in pts if r[key] not in ("", None)]
                if xs:
                    ax.plot(xs, ys, "o-", color=colors.get(b), label=BACKEND_LABELS[b])
                if kind == "memory":
                    ms = [float(r["model_peak_bytes"]) / 2**20 for _, r in pts]
                    ax.plot([n for n, _ in pts], ms, "--", color=colors.get(b), alpha=0.6,
                            label=f"{BACKEND_LABELS[b]} (model)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("nodes N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_header(command: str, device: str, floor_source: str, vers: Dict[str, str],
                    on_cpu: bool) -> List[str]:
    """The lines above profile.md's table: how the numbers were obtained and what they mean."""
    return [
        "# diffpool-fast profile",
        "",
        f"- command: `{command}`",
        f"- device: {device}; floor: {floor_source}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "- " + ("CPU: wall-clock medians, backends interleaved repeat by repeat; peak = RSS "
                "high-water mark of a fresh process per backend and shape, above its inputs"
                if on_cpu else
                "CUDA: CUDA-event medians, backends interleaved; peak = CUDA allocator "
                "max_memory_allocated above inputs"),
        "- speed-up vs PyG = PyG's median / this median (same run); peak / PyG's = this "
        "peak / PyG's peak; adj GB/s = one read of adj (B·N²·itemsize) / time; % of floor = "
        "analytic floor time / median time",
    ]


def render_from_csv(path: str, out: Optional[str]) -> int:
    """profile.md and the plots again from a profile.csv (e.g. after editing or merging runs)."""
    if not os.path.isfile(path):
        raise UsageError(f"--from-csv: no such file {path!r}")
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    missing = [c for c in ("backend", "mode", "nodes", "status", "time_ms") if records and c not in records[0]]
    if not records or missing:
        raise UsageError(f"--from-csv: {path!r} is not a profile.csv (missing {missing or 'rows'})")
    out = out or os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    r0 = records[0]
    vers = {k: r0.get(k, "") for k in ("python", "torch", "triton", "torch_geometric")}
    header = markdown_header(r0.get("command", ""), r0.get("device", ""),
                             r0.get("floor_source", ""), vers,
                             on_cpu=r0.get("peak_method", "") != "cuda-allocator"
                             and "cuda" not in r0.get("command", ""))
    md = markdown_table(records, header)
    ops = op_table_markdown(records)
    if ops:
        md += "\n" + ops
    # the --accuracy and --max-batch tables of the same run, when their CSVs lie next to it
    renderers = (("accuracy.csv", accuracy_markdown),
                 ("max_batch.csv", lambda rows: max_batch_markdown(rows, int(rows[0]["budget_bytes"]))))
    for extra, render in renderers:
        extra_path = os.path.join(os.path.dirname(os.path.abspath(path)), extra)
        if os.path.isfile(extra_path):
            with open(extra_path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                md += "\n" + render(rows)
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write(md)
    title = f"B={r0['batch']} F={r0['features']} {r0['dtype']} adj {r0['adj_dtype']} on {r0.get('device', '')}"
    paths = plot(records, out, title)
    print(terminal_table(records))
    print(f"wrote {out}/: profile.md" + "".join(f", {os.path.basename(p)}" for p in paths))
    return 0


def write_csv(path: str, rows: List[Dict[str, object]], meta: Dict[str, object]) -> None:
    """``rows`` with ``meta`` (device, versions, command) appended to each; nothing if empty."""
    if not rows:
        return
    cols = list(rows[0].keys()) + [k for k in meta if k not in rows[0]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: v for k, v in meta.items() if k not in r}})
