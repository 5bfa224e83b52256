"""The options of ``diffpool-fast profile``: parsing their strings, checking them, ``Config``.

The command line hands the option strings over unparsed (``--nodes 128,256``, ``--clusters
0.25``, ``--max-batch 8GiB``): they are parsed here, so that a bad value is a
:class:`~diffpool_fast.errors.UsageError` (one line, exit 2) and a Python caller gets the same
checks as the command line.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..errors import UsageError
from .costmodel import ADJ_DTYPES, ALL_BACKENDS, BACKEND_ALIASES, FLOAT_DTYPES, LOGITS, MODES, PROFILE_BACKENDS, Shape
from .provenance import command_line, fit_threads_to_load

DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64", "double": "float64", "f64": "float64",
    "byte": "uint8",
}


def int_list(text: str, name: str) -> List[int]:
    """``"128,256"`` -> ``[128, 256]``; every value at least 1."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise UsageError(f"{name} must be integers separated by commas, got {text!r}") from None
        if v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
        values.append(v)
    return values


def choice_list(text: str, name: str, allowed: Sequence[str], all_: bool = False) -> List[str]:
    """``"fwd,full"`` -> ``["fwd", "full"]`` in the order given, duplicates dropped; with
    ``all_``, ``"all"`` stands for every allowed value."""
    out: List[str] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if all_ and part == "all":
            out.extend(a for a in allowed if a not in out)
            continue
        if part not in allowed:
            extra = ", all" if all_ else ""
            raise UsageError(f"unknown {name} {part!r}: choose from {', '.join(allowed)}{extra}")
        if part not in out:
            out.append(part)
    return out


def backend_list(text: str) -> List[str]:
    """``--backend``: names of ``PROFILE_BACKENDS`` (``compile`` for ``pyg-compiled``), ``all``
    for ``ALL_BACKENDS``, in the order given, duplicates dropped."""
    out: List[str] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        names = ALL_BACKENDS if part == "all" else [BACKEND_ALIASES.get(part, part)]
        for name in names:
            if name not in PROFILE_BACKENDS:
                raise UsageError(f"unknown backend {part!r}: choose from {', '.join(PROFILE_BACKENDS)}, all")
            if name not in out:
                out.append(name)
    return out


#: torch.set_float32_matmul_precision's settings
PRECISIONS = ("highest", "high", "medium")


def parse_shapes(text: str, dtype: str, adj_dtype: str, logits: Sequence[str], masked: bool,
                 promise_symmetric: bool) -> List[Shape]:
    """``--shapes 64x512x128x128,64x512x128x128:converged,64x512x128x128:bool``: B x N x C x F,
    each optionally followed by ``:converged`` / ``:random`` (its only logits kind; otherwise
    every kind of ``--logits``) and ``:ADJ_DTYPE`` (its adjacency dtype; otherwise ``--adj-dtype``)."""
    shapes: List[Shape] = []
    for spec in str(text).split(","):
        spec = spec.strip()
        head, *mods = spec.split(":")
        parts = head.lower().split("x")
        try:
            B, N, C, F = (int(p) for p in parts)
        except ValueError:
            raise UsageError(f"--shapes: each shape is BxNxCxF such as 64x512x128x128 (then optionally "
                             f":converged, :bool, ...), got {spec!r}") from None
        for name, v in (("B", B), ("N", N), ("C", C), ("F", F)):
            if v < 1:
                raise UsageError(f"--shapes {spec!r}: {name} must be at least 1, got {v}")
        if C > N:
            raise UsageError(f"--shapes {spec!r}: C={C} clusters is larger than N={N} nodes")
        kinds, adt = list(logits), adj_dtype
        for mod in mods:
            m = mod.strip().lower()
            if m in LOGITS:
                kinds = [m]
            else:
                adt = parse_dtype(m, f"--shapes {spec!r}: a suffix (a logits kind {'/'.join(LOGITS)} or an adjacency dtype)",
                                  ADJ_DTYPES)
        for kind in kinds:
            shapes.append(Shape(B, N, C, F, dtype, dtype if adt == "same" else adt, masked=masked,
                                promise_symmetric=promise_symmetric, logits=kind))
    return shapes


def parse_dtype(text: str, name: str, allowed: Sequence[str]) -> str:
    """A dtype name or alias (``fp16``, ``bf16``, ``byte``) -> its torch name."""
    t = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if t not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {text!r}")
    return t


def parse_bytes(text: str) -> int:
    """'8GiB', '500MB', '1.5e9', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(text),
                     flags=re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-batch must be a size such as 8GiB, 500MB or 1e9, got {text!r}")
    value = float(m.group(1))
    unit = m.group(2).upper()
    base = 1024 if m.group(3) else 1000
    value *= base ** "_KMGT".index(unit) if unit else 1
    if value < 1:
        raise UsageError(f"--max-batch must be positive, got {text!r}")
    return int(value)


def clusters_for(nodes: int, spec: str) -> int:
    """A count ("128") or a ratio of nodes ("0.25") -> clusters for ``nodes``."""
    text = str(spec).strip()
    if re.fullmatch(r"[0-9]+", text):
        count = int(text)
    else:
        try:
            ratio = float(text)
        except ValueError:
            raise UsageError(f"--clusters must be a count or a ratio of nodes, got {text!r}") from None
        if not 0 < ratio <= 1:
            raise UsageError(f"--clusters as a ratio must be in (0, 1], got {text}")
        count = max(1, round(ratio * nodes))
    if count < 1:
        raise UsageError(f"--clusters must be at least 1, got {count}")
    if count > nodes:
        raise UsageError(f"--clusters {count} is larger than --nodes {nodes}")
    return count


def require_at_least(args, names: Sequence[str], minimum: int) -> None:
    """``--name`` must be at least ``minimum`` for each attribute name of ``args``."""
    for name in names:
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name} must be at least {minimum}, got {getattr(args, name)}")


def check_density(density: float) -> None:
    if not 0 <= density <= 1:
        raise UsageError(f"--density must be in [0, 1], got {density}")


def set_threads(args) -> Optional[float]:
    """``--threads``: torch's CPU threads in this process (the workers get the same count).
    Without it, torch's default lowered to the cores other processes leave idle, as ``train``
    does (:func:`~diffpool_fast.profiling.provenance.fit_threads_to_load`); with it, a warning
    when the machine is busy. Returns the 1-minute load average (None where unknown)."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    return fit_threads_to_load("profile", args.threads)[1]


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when there is a GPU, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@dataclass
class Config:
    """A coarsening profile: every shape x mode x backend, and what else to measure."""

    shapes: List[Shape]
    modes: List[str]
    backends: List[str]
    device: str
    repeats: int
    warmup: int
    density: float
    seed: int
    out: str
    memory: bool
    accuracy: bool
    max_batch: Optional[int]
    peak_bandwidth: Optional[float]
    peak_tflops: Optional[float]
    command: str
    #: the 1-minute load average before the profile started (None where unknown)
    load_avg: Optional[float] = None
    #: torch.set_float32_matmul_precision settings, each shape measured under each; None: the
    #: setting in force is left alone (and recorded)
    precisions: Optional[List[str]] = None
    #: --write-dispatch: the dispatch table to write the measured winners into
    write_dispatch: Optional[str] = None
    #: pyg-compiled is compiled for at most this many shapes (None: every shape)
    compile_limit: Optional[int] = None


#: the defaults of the options --shapes replaces
SHAPE_DEFAULTS = {"batch": 16, "nodes": "128,256,512,1024", "clusters": "0.25", "features": 64}


def build_config(args) -> Config:
    """The ``Config`` of parsed ``diffpool-fast profile`` arguments (strings still unparsed)."""
    shapes_text = getattr(args, "shapes", None)
    given = [k for k in SHAPE_DEFAULTS if getattr(args, k, None) is not None]
    if shapes_text is not None and given:
        raise UsageError("--shapes gives B, N, C and F of every shape: drop "
                         + ", ".join(f"--{k}" for k in given))
    for k, v in SHAPE_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    require_at_least(args, ("batch", "features", "repeats"), 1)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be at least 0, got {args.warmup}")
    check_density(args.density)
    dtype = parse_dtype(args.dtype, "--dtype", FLOAT_DTYPES)
    adj_dtype = dtype if args.adj_dtype.strip().lower() == "same" else parse_dtype(
        args.adj_dtype, "--adj-dtype", ADJ_DTYPES)
    modes = choice_list(args.mode, "mode", MODES)
    backends = backend_list(args.backend)
    logits = choice_list(getattr(args, "logits", "random"), "--logits kind", LOGITS)
    if shapes_text is not None:
        shapes = parse_shapes(shapes_text, dtype, adj_dtype, logits, not args.no_mask, args.adj_symmetric)
    else:
        shapes = [
            Shape(args.batch, n, clusters_for(n, args.clusters), args.features, dtype, adj_dtype,
                  masked=not args.no_mask, promise_symmetric=args.adj_symmetric, logits=kind)
            for n in int_list(args.nodes, "--nodes") for kind in logits
        ]
    precisions = (choice_list(args.precision, "--precision", PRECISIONS)
                  if getattr(args, "precision", None) is not None else None)
    compile_limit = getattr(args, "compile_limit", None)
    if compile_limit is not None and compile_limit < 0:
        raise UsageError(f"--compile-limit must be at least 0, got {compile_limit}")
    device = resolve_device(args.device)
    write_dispatch = getattr(args, "write_dispatch", None)
    if write_dispatch is not None:
        missing = [b for b in ("torch", "triton") if b not in backends]
        if device != "cuda":
            raise UsageError(f"--write-dispatch {write_dispatch}: the dispatch table is measured on CUDA "
                             f"(--device cuda), not on {device}")
        if "full" not in modes:
            raise UsageError(f"--write-dispatch {write_dispatch}: needs --mode full (the table compares "
                             "forward+backward times)")
        if missing:
            raise UsageError(f"--write-dispatch {write_dispatch}: needs both of our paths timed; add "
                             + ", ".join(missing) + " to --backend")
        if args.adj_symmetric:
            raise UsageError(f"--write-dispatch {write_dispatch}: the table is for the default call; drop "
                             "--adj-symmetric (it times our paths with adj_symmetric=True)")
    for name in ("peak_bandwidth", "peak_tflops"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
    max_batch = parse_bytes(args.max_batch) if args.max_batch is not None else None
    load_avg = set_threads(args)  # after every check: a bad option's error is the only line printed
    out = args.out or os.path.join(
        "runs", "profile-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Config(
        shapes=shapes, modes=modes, backends=backends, device=device, repeats=args.repeats,
        warmup=args.warmup, density=args.density, seed=args.seed, out=out,
        memory=not args.no_memory, accuracy=args.accuracy,
        max_batch=max_batch,
        peak_bandwidth=args.peak_bandwidth, peak_tflops=args.peak_tflops,
        command=command_line(args), load_avg=load_avg, precisions=precisions,
        write_dispatch=write_dispatch, compile_limit=compile_limit,
    )
