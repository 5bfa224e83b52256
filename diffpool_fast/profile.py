"""``diffpool-fast profile``: time, throughput and peak memory of dense coarsening, side by side.

For every shape x backend x mode it measures the median time after warm-up (CUDA events on a
GPU, wall clock on CPU, backends interleaved repeat by repeat so that a shared machine disturbs
them alike), the achieved bandwidth counted on the adjacency, TFLOP/s, the peak memory beyond
the inputs (CUDA allocator statistics on a GPU; on CPU the resident-set high-water mark of a
fresh subprocess per backend and shape, see ``measure_cpu_peak``), the analytic floor of
``costmodel`` and the percentage of it reached, the analytic memory model, and the speed and
memory ratios to PyG's ``dense_diff_pool`` measured in the same run.

Backends: ``torch`` (our lean path, ``dense_diff_pool(..., backend="torch")``), ``pyg``
(``torch_geometric.nn.dense_diff_pool``), ``compile`` (``torch.compile`` of PyG's function),
``triton`` (``dense_diff_pool(..., backend="triton")``). A backend that cannot run here is
reported as skipped with the reason; the others still run.

Modes: ``fwd`` (forward with x and s requiring grad, as in training), ``bwd`` (backward only,
after an untimed forward), ``full`` (forward + backward). The adjacency does not require grad
(the first level of a model).
"""
from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import costmodel
from .costmodel import ADJ_DTYPES, BACKENDS, FLOAT_DTYPES, MODES, Shape

DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64", "double": "float64", "f64": "float64",
    "byte": "uint8",
}
BACKEND_LABELS = {
    "torch": "ours (torch)",
    "triton": "ours (triton)",
    "pyg": "PyG",
    "compile": "torch.compile(PyG)",
}

# glibc returns large freed blocks to the OS only when they were mmapped; a fixed (not the
# default dynamic) mmap threshold makes every allocation above 64 KiB an mmap, so that the
# resident set follows the live tensors and its high-water mark is the peak of the step.
_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_TOP_PAD_": "0",
}


# ----------------------------------------------------------------------------------------------
# Arguments


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="time, throughput and peak memory of dense coarsening, backend by backend",
        description=__doc__.split("\n\n")[0].replace("``", "")
        + " Writes CSV, markdown and PNG plots to --out.",
    )
    p.add_argument("--batch", type=int, default=16, help="graphs per batch (default 16)")
    p.add_argument("--nodes", default="128,256,512,1024",
                   help="padded nodes per graph: one value or a comma list (default 128,256,512,1024)")
    p.add_argument("--clusters", default="0.25",
                   help="clusters: a count (128) or a ratio of nodes (0.25, the default)")
    p.add_argument("--features", type=int, default=64, help="features per node (default 64)")
    p.add_argument("--dtype", default="float32", help=f"x and s dtype: {', '.join(FLOAT_DTYPES)}")
    p.add_argument("--adj-dtype", default="same",
                   help=f"adjacency dtype: same (as --dtype) or one of {', '.join(ADJ_DTYPES)}")
    p.add_argument("--mode", default="full", help="fwd, bwd, full, or a comma list (default full)")
    p.add_argument("--backend", default="all",
                   help=f"{', '.join(BACKENDS)}, all, or a comma list (default all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per backend (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--density", type=float, default=0.05, help="edge probability (default 0.05)")
    p.add_argument("--adj-symmetric", action="store_true",
                   help="tell our backends the (generated, undirected) adjacency is symmetric: "
                        "dense_diff_pool(..., adj_symmetric=True), no backward pass over adj")
    p.add_argument("--no-mask", action="store_true",
                   help="no padding mask (default: graphs of N/2..N real nodes, padded to N)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, here and in the memory workers (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/profile-<time>)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--accuracy", action="store_true",
                   help="also measure each backend's error against a float64 reference")
    p.add_argument("--max-batch", default=None, metavar="BYTES",
                   help="also find the largest batch each backend fits in BYTES (e.g. 8GiB)")
    p.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s",
                   help="device bandwidth for the floor (default: datasheet on known GPUs, "
                        "measured otherwise)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TF/s",
                   help="device matmul rate for the floor (same default)")
    p.add_argument("--from-csv", default=None, metavar="CSV",
                   help="only redraw profile.md and the plots from an earlier profile.csv "
                        "(into --out, default the CSV's folder)")
    p.add_argument("--model", action="store_true",
                   help="time a training step (forward, backward, Adam) of the full DiffPool "
                        "classifier instead: --nodes is the largest graph, --features the input "
                        "channels; see also --graphs, --min-nodes, --classes, --hidden")
    p.add_argument("--graphs", type=int, default=None,
                   help="--model: graphs per batch (default: --batch)")
    p.add_argument("--min-nodes", type=int, default=None,
                   help="--model: smallest graph (default: half of the largest)")
    p.add_argument("--classes", type=int, default=2, help="--model: classes (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="--model: hidden channels (default 64)")
    p.set_defaults(func=run)


def _cli_error(message: str):
    from .cli import CLIError

    return CLIError(message)


def _int_list(text: str, name: str) -> List[int]:
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise _cli_error(f"{name} must be integers separated by commas, got {text!r}") from None
        if v < 1:
            raise _cli_error(f"{name} must be at least 1, got {v}")
        values.append(v)
    return values


def _choice_list(text: str, name: str, allowed: Sequence[str], all_: bool = False) -> List[str]:
    out: List[str] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if all_ and part == "all":
            out.extend(a for a in allowed if a not in out)
            continue
        if part not in allowed:
            extra = ", all" if all_ else ""
            raise _cli_error(f"unknown {name} {part!r}: choose from {', '.join(allowed)}{extra}")
        if part not in out:
            out.append(part)
    return out


def _dtype(text: str, name: str, allowed: Sequence[str]) -> str:
    t = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if t not in allowed:
        raise _cli_error(f"{name} must be one of {', '.join(allowed)}, got {text!r}")
    return t


def parse_bytes(text: str) -> int:
    """'8GiB', '500MB', '1.5e9', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(text),
                     flags=re.IGNORECASE)
    if not m:
        raise _cli_error(f"--max-batch must be a size such as 8GiB, 500MB or 1e9, got {text!r}")
    value = float(m.group(1))
    unit = m.group(2).upper()
    base = 1024 if m.group(3) else 1000
    value *= base ** "_KMGT".index(unit) if unit else 1
    if value < 1:
        raise _cli_error(f"--max-batch must be positive, got {text!r}")
    return int(value)


def clusters_for(nodes: int, spec: str) -> int:
    """A count ("128") or a ratio of nodes ("0.25") -> clusters for ``nodes``."""
    text = str(spec).strip()
    try:
        if re.fullmatch(r"[0-9]+", text):
            count = int(text)
        else:
            ratio = float(text)
            if not 0 < ratio <= 1:
                raise _cli_error(f"--clusters as a ratio must be in (0, 1], got {text}")
            count = max(1, round(ratio * nodes))
    except ValueError:
        raise _cli_error(f"--clusters must be a count or a ratio of nodes, got {text!r}") from None
    if count < 1:
        raise _cli_error(f"--clusters must be at least 1, got {count}")
    if count > nodes:
        raise _cli_error(f"--clusters {count} is larger than --nodes {nodes}")
    return count


@dataclass
class Config:
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


def build_config(args) -> Config:
    import torch

    for name in ("batch", "features", "repeats"):
        if getattr(args, name) < 1:
            raise _cli_error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise _cli_error(f"--warmup must be at least 0, got {args.warmup}")
    if not 0 <= args.density <= 1:
        raise _cli_error(f"--density must be in [0, 1], got {args.density}")
    set_threads(args)
    nodes = _int_list(args.nodes, "--nodes")
    dtype = _dtype(args.dtype, "--dtype", FLOAT_DTYPES)
    adj_dtype = dtype if args.adj_dtype.strip().lower() == "same" else _dtype(
        args.adj_dtype, "--adj-dtype", ADJ_DTYPES)
    modes = _choice_list(args.mode, "mode", MODES)
    backends = _choice_list(args.backend, "backend", BACKENDS, all_=True)
    shapes = [
        Shape(args.batch, n, clusters_for(n, args.clusters), args.features, dtype, adj_dtype,
              masked=not args.no_mask, promise_symmetric=args.adj_symmetric)
        for n in nodes
    ]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _cli_error("--device cuda: CUDA is not available on this machine (use --device cpu)")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("peak_bandwidth", "peak_tflops"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise _cli_error(f"--{name.replace('_', '-')} must be positive, got {v}")
    out = args.out or os.path.join(
        "runs", "profile-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Config(
        shapes=shapes, modes=modes, backends=backends, device=device, repeats=args.repeats,
        warmup=args.warmup, density=args.density, seed=args.seed, out=out,
        memory=not args.no_memory, accuracy=args.accuracy,
        max_batch=parse_bytes(args.max_batch) if args.max_batch is not None else None,
        peak_bandwidth=args.peak_bandwidth, peak_tflops=args.peak_tflops,
        command=command_line(args),
    )


def set_threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise _cli_error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def command_line(args) -> str:
    """The command as typed when it was ``diffpool-fast profile ...``; otherwise (called from
    Python) the equivalent command with every option spelled out."""
    argv = list(sys.argv)
    if len(argv) > 1 and os.path.basename(argv[0]) == "diffpool-fast" and argv[1] == "profile":
        return " ".join(shlex.quote(a) for a in ["diffpool-fast"] + argv[1:])
    parts = ["diffpool-fast", "profile"]
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------------------------------------
# Workload and backends


@dataclass
class Inputs:
    x: "object"
    adj: "object"
    s: "object"
    mask: "object"
    grads: Tuple  # upstream gradients of (out, out_adj, link, ent)

    def nbytes(self, mode: str = "full") -> int:
        ts = [self.x, self.adj, self.s] + ([self.mask] if self.mask is not None else [])
        if mode != "fwd":
            ts += list(self.grads)
        return sum(t.numel() * t.element_size() for t in ts)


def make_inputs(shape: Shape, device: str, seed: int = 0, density: float = 0.05) -> Inputs:
    """Random padded graphs: symmetric adjacency, graph sizes in [N/2, N] (the first has N).

    The adjacency is filled one graph at a time, so building it needs no B x N x N temporary.
    """
    import torch

    B, N, C, F = shape.batch, shape.nodes, shape.clusters, shape.features
    dt = getattr(torch, shape.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, F, generator=g, device=device).to(dt).requires_grad_()
    s = torch.randn(B, N, C, generator=g, device=device).to(dt).requires_grad_()
    mask = None
    if shape.masked:
        sizes = torch.randint((N + 1) // 2, N + 1, (B,), generator=g, device=device)
        sizes[0] = N
        mask = torch.arange(N, device=device)[None, :] < sizes[:, None]
    adj = torch.empty(B, N, N, dtype=getattr(torch, shape.adj_dtype), device=device)
    for b in range(B):
        a = torch.rand(N, N, generator=g, device=device) < density
        a = a | a.transpose(0, 1)
        if mask is not None:
            a &= mask[b][:, None] & mask[b][None, :]
        adj[b].copy_(a)
        del a
    g_out = torch.randn(B, C, F, generator=g, device=device).to(dt)
    g_adj = torch.randn(B, C, C, generator=g, device=device).to(dt)
    one = torch.ones((), dtype=dt, device=device)
    return Inputs(x, adj, s, mask, (g_out, g_adj, one, one))


@dataclass
class Backend:
    name: str
    fn: Optional[Callable] = None
    reason: str = ""  # why it is skipped, when fn is None

    @property
    def available(self) -> bool:
        return self.fn is not None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def triton_unavailable(device: str) -> Optional[str]:
    """Why the Triton path cannot be benchmarked here, or None."""
    from . import dispatch

    if not dispatch.triton_importable():
        return "triton is not installed (pip install 'diffpool_fast[triton]')"
    if device != "cuda":
        return "needs a CUDA GPU (on CPU Triton only runs under its interpreter, which is not a benchmark)"
    return None


def make_backend(name: str, device: str, shape: Optional[Shape] = None) -> Backend:
    """The callable ``fn(x, adj, s, mask) -> (out, out_adj, link, ent)`` of a backend, or the
    reason it cannot run here."""
    import torch

    from .pool import dense_diff_pool

    sym = True if (shape is not None and shape.promise_symmetric) else None
    if name == "torch":
        return Backend(name, lambda x, adj, s, mask: dense_diff_pool(x, adj, s, mask, backend="torch",
                                                                     adj_symmetric=sym))
    if name == "triton":
        reason = triton_unavailable(device)
        if reason:
            return Backend(name, reason=reason)
        try:
            from . import coarsen_triton  # noqa: F401  (availability check)
        except ImportError as err:
            return Backend(name, reason=f"the Triton path is not in this build ({_first_line(err)})")
        return Backend(name, lambda x, adj, s, mask: dense_diff_pool(x, adj, s, mask, backend="triton",
                                                                     adj_symmetric=sym))
    if name in ("pyg", "compile"):
        try:
            from torch_geometric.nn import dense_diff_pool as pyg_pool
        except ImportError as err:
            return Backend(name, reason=f"torch_geometric is not installed ({_first_line(err)})")

        def pyg(x, adj, s, mask):
            # PyG multiplies adj with S, so a bool/uint8/half adjacency must be converted first;
            # the copy is part of its cost.
            if adj.dtype != x.dtype:
                adj = adj.to(x.dtype)
            return pyg_pool(x, adj, s, mask)

        if name == "pyg":
            return Backend(name, pyg)
        try:
            compiled = torch.compile(pyg, dynamic=False)
            _smoke(compiled, device, shape)
        except Exception as err:  # compile needs a C++ toolchain on CPU, Triton on CUDA, ...
            return Backend(name, reason=f"torch.compile failed: {_first_line(err)}")
        return Backend(name, compiled)
    raise ValueError(f"unknown backend {name!r}")


def _smoke(fn, device: str, shape: Optional[Shape]) -> None:
    """One forward+backward at a tiny shape, to find out now whether a backend runs at all."""
    dtype = shape.dtype if shape else "float32"
    adj_dtype = shape.adj_dtype if shape else "float32"
    tiny = Shape(2, 8, 2, 4, dtype, adj_dtype)
    inp = make_inputs(tiny, device)
    step(fn, inp, "full")


def triton_unsupported(shape: Shape, inp: Inputs) -> Optional[str]:
    """Why the Triton path would fall back to torch for this shape (None = it runs)."""
    from . import coarsen_triton

    return coarsen_triton.unsupported_reason(inp.x, inp.adj, inp.s, inp.mask)


def forward(fn, inp: Inputs):
    return fn(inp.x, inp.adj, inp.s, inp.mask)


def backward(outs, inp: Inputs) -> None:
    import torch

    torch.autograd.backward(outs, inp.grads)


def step(fn, inp: Inputs, mode: str) -> None:
    """One untimed run of ``mode`` (for warm-up and memory measurement)."""
    inp.x.grad = inp.s.grad = None
    outs = forward(fn, inp)
    if mode != "fwd":
        backward(outs, inp)
    del outs
    inp.x.grad = inp.s.grad = None


class Timer:
    """Seconds of one call: CUDA events on a GPU, the wall clock on CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.torch = torch

    def time(self, fn: Callable, pre: Optional[Callable] = None) -> float:
        torch = self.torch
        arg = pre() if pre else None
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(arg)
        return time.perf_counter() - t0


def time_once(timer: Timer, fn, inp: Inputs, mode: str) -> float:
    inp.x.grad = inp.s.grad = None
    if mode == "fwd":
        holder = []
        t = timer.time(lambda _: holder.append(forward(fn, inp)))
    elif mode == "bwd":
        t = timer.time(lambda outs: backward(outs, inp), pre=lambda: forward(fn, inp))
    else:
        t = timer.time(lambda _: backward(forward(fn, inp), inp))
    inp.x.grad = inp.s.grad = None
    return t


# ----------------------------------------------------------------------------------------------
# Peak memory


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_rss_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (the resident-set high-water mark) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_peak_supported() -> Optional[str]:
    """None when this machine can measure CPU peaks (Linux, resettable VmHWM), else why not."""
    try:
        _status_bytes("VmHWM")
        _reset_rss_peak()
    except (OSError, RuntimeError) as err:
        return f"CPU peak memory needs Linux /proc/self/clear_refs ({_first_line(err)})"
    return None


def measure_cpu_peak(run: Callable[[], object], before: Optional[Callable[[], object]] = None) -> int:
    """Bytes the resident set grows above its level before ``run`` (after ``before``, which is
    run first and whose result is passed on), at its highest during ``run``.

    Faithful when large blocks are mmapped (see _MALLOC_ENV: the profiler's workers set it);
    tests check it against tensors of known size.
    """
    gc.collect()
    base = _status_bytes("VmRSS")
    state = before() if before else None
    _reset_rss_peak()
    result = run() if state is None else run(state)
    peak = _status_bytes("VmHWM") - base
    del result, state
    return max(0, peak)


def _memory_worker_main() -> None:
    """Entry of the CPU memory subprocess: JSON job in argv[1], JSON result on stdout."""
    job = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(job["threads"])
    shape = Shape(**job["shape"])
    backend = make_backend(job["backend"], "cpu", shape)
    if not backend.available:
        print(json.dumps({"error": backend.reason}))
        return
    result: Dict[str, object] = {}
    inp = make_inputs(shape, "cpu", job["seed"], job["density"])
    for mode in job["modes"]:
        step(backend.fn, inp, mode)  # warm-up: one-time allocations are not the step's cost
        step(backend.fn, inp, mode)
        if mode == "bwd":
            def before():
                inp.x.grad = inp.s.grad = None
                return forward(backend.fn, inp)

            peak = measure_cpu_peak(lambda outs: backward(outs, inp), before)
        else:
            peak = measure_cpu_peak(lambda: step_keep(backend.fn, inp, mode))
        inp.x.grad = inp.s.grad = None
        result[mode] = peak
    result["inputs"] = inp.nbytes("full")
    print(json.dumps(result))


def step_keep(fn, inp: Inputs, mode: str):
    """A step that returns its outputs (so they are alive at the peak, as in training)."""
    inp.x.grad = inp.s.grad = None
    outs = forward(fn, inp)
    if mode != "fwd":
        backward(outs, inp)
    return outs


def cpu_peaks_subprocess(backend: str, shape: Shape, modes: Sequence[str], seed: int,
                         density: float, threads: int) -> Dict[str, object]:
    """Peak bytes per mode of one backend and shape, measured in a fresh process."""
    job = {"backend": backend, "shape": asdict(shape), "modes": list(modes), "seed": seed,
           "density": density, "threads": threads}
    env = dict(os.environ, **_MALLOC_ENV)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c",
         "from diffpool_fast.profile import _memory_worker_main as m; m()", json.dumps(job)],
        capture_output=True, text=True, env=env,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory worker exited with {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def cuda_peaks(fn, inp: Inputs, modes: Sequence[str]) -> Dict[str, object]:
    """Peak allocator bytes above the inputs, per mode, on the current CUDA device."""
    import torch

    out: Dict[str, object] = {}
    for mode in modes:
        step(fn, inp, mode)
        torch.cuda.synchronize()
        gc.collect()
        base = torch.cuda.memory_allocated()
        if mode == "bwd":
            outs = forward(fn, inp)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            backward(outs, inp)
            del outs
        else:
            torch.cuda.reset_peak_memory_stats()
            outs = step_keep(fn, inp, mode)
            del outs
        torch.cuda.synchronize()
        out[mode] = torch.cuda.max_memory_allocated() - base
        inp.x.grad = inp.s.grad = None
    return out


# ----------------------------------------------------------------------------------------------
# Environment


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "torch_geometric", "diffpool_fast"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_spec(cfg: Config, name: str) -> costmodel.DeviceSpec:
    spec = costmodel.known_device(name) if cfg.device == "cuda" else None
    if spec is None:
        spec = costmodel.measure_device(cfg.device)
    if cfg.peak_bandwidth or cfg.peak_tflops:
        flops = dict(spec.flops)
        if cfg.peak_tflops:
            flops = {k: cfg.peak_tflops * 1e12 for k in flops}
        spec = costmodel.DeviceSpec(
            spec.name, cfg.peak_bandwidth * 1e9 if cfg.peak_bandwidth else spec.bandwidth,
            flops, spec.source + "; overridden by --peak-bandwidth/--peak-tflops")
    return spec


# ----------------------------------------------------------------------------------------------
# Results

COLUMNS = [
    "backend", "mode", "batch", "nodes", "clusters", "features", "dtype", "adj_dtype", "masked",
    "status", "reason", "time_ms", "time_ms_q1", "time_ms_q3", "repeats", "adj_GBps", "TFLOPs",
    "peak_bytes", "peak_method", "model_peak_bytes", "model_saved_bytes", "floor_bytes",
    "floor_flops", "floor_ms", "pct_of_floor", "speedup_vs_pyg", "peak_vs_pyg",
    "device", "floor_source", "threads", "python", "torch", "triton", "torch_geometric",
    "command",
]


@dataclass
class Row:
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
            "backend": self.backend, "mode": self.mode, "batch": sh.batch, "nodes": sh.nodes,
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
            **meta,
        }


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}"


def _mib(b) -> str:
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


def terminal_table(records: List[Dict[str, object]]) -> str:
    head = ["backend", "mode", "N", "C", "time ms", "x PyG", "adj GB/s", "TFLOP/s",
            "peak MiB", "model MiB", "floor ms", "% floor", "mem/PyG"]
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        rows.append([BACKEND_LABELS.get(r["backend"], r["backend"]), r["mode"], r["nodes"],
                     r["clusters"], _short(r["time_ms"]), _short(r["speedup_vs_pyg"]),
                     _short(r["adj_GBps"]), _short(r["TFLOPs"]), _mib(r["peak_bytes"]),
                     _mib(r["model_peak_bytes"]), _short(r["floor_ms"]),
                     _short(r["pct_of_floor"]), _short(r["peak_vs_pyg"])])
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


def _short(v) -> str:
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
                v = _mib(v)
            elif c == "status" and r["status"] != "ok":
                v = f"{r['status']}: {r['reason']}"
            elif c == "backend":
                v = BACKEND_LABELS.get(v, v)
            elif c in ("batch", "nodes", "clusters", "features"):
                v = str(v)
            elif c not in ("mode", "status"):
                v = _short(v) if v not in ("", None) else ""
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: List[Dict[str, object]], out_dir: str, title: str) -> List[str]:
    """time_vs_nodes.png and peak_memory_vs_nodes.png, one panel per mode, log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in ok)]
    colors = {"torch": "tab:blue", "triton": "tab:green", "pyg": "tab:red", "compile": "tab:orange"}
    paths = []
    for kind, key, ylabel, fname in (
        ("time", "time_ms", "median time (ms)", "time_vs_nodes.png"),
        ("memory", "peak_bytes", "peak memory beyond inputs (MiB)", "peak_memory_vs_nodes.png"),
    ):
        fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(5 * max(1, len(modes)), 4),
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes or ["full"]):
            for b in backends:
                pts = sorted((int(r["nodes"]), r) for r in ok if r["backend"] == b and r["mode"] == mode)
                xs = [n for n, r in pts if r[key] not in ("", None)]
                ys = [float(r[key]) / (2**20 if kind == "memory" else 1)
                      for n, r in pts if r[key] not in ("", None)]
                if xs:
                    ax.plot(xs, ys, "o-", color=colors[b], label=BACKEND_LABELS[b])
                if kind == "memory":
                    ms = [float(r["model_peak_bytes"]) / 2**20 for _, r in pts]
                    ax.plot([n for n, _ in pts], ms, "--", color=colors[b], alpha=0.6,
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


# ----------------------------------------------------------------------------------------------
# The run


def run(args) -> int:
    if args.model:
        from .profile_model import run_model

        return run_model(args)
    if args.from_csv:
        return render_from_csv(args.from_csv, args.out)
    cfg = build_config(args)
    return profile(cfg)


def _markdown_header(command: str, device: str, floor_source: str, vers: Dict[str, str],
                     on_cpu: bool) -> List[str]:
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
        raise _cli_error(f"--from-csv: no such file {path!r}")
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    missing = [c for c in ("backend", "mode", "nodes", "status", "time_ms") if records and c not in records[0]]
    if not records or missing:
        raise _cli_error(f"--from-csv: {path!r} is not a profile.csv (missing {missing or 'rows'})")
    out = out or os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    r0 = records[0]
    vers = {k: r0.get(k, "") for k in ("python", "torch", "triton", "torch_geometric")}
    header = _markdown_header(r0.get("command", ""), r0.get("device", ""),
                              r0.get("floor_source", ""), vers,
                              on_cpu=r0.get("peak_method", "") != "cuda-allocator"
                              and "cuda" not in r0.get("command", ""))
    md = markdown_table(records, header)
    for extra, render in (("accuracy.csv", accuracy_markdown), ("max_batch.csv", None)):
        extra_path = os.path.join(os.path.dirname(os.path.abspath(path)), extra)
        if os.path.isfile(extra_path):
            with open(extra_path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                md += "\n" + (render(rows) if render else
                              max_batch_markdown(rows, int(rows[0]["budget_bytes"])))
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write(md)
    title = f"B={r0['batch']} F={r0['features']} {r0['dtype']} adj {r0['adj_dtype']} on {r0.get('device', '')}"
    paths = plot(records, out, title)
    print(terminal_table(records))
    print(f"wrote {out}/: profile.md" + "".join(f", {os.path.basename(p)}" for p in paths))
    return 0


def profile(cfg: Config) -> int:
    import torch
    from tqdm import tqdm

    from . import dispatch

    if os.environ.pop(dispatch.BACKEND_ENV, None):
        print(f"note: ignoring {dispatch.BACKEND_ENV} (each backend is chosen explicitly here)")
    os.makedirs(cfg.out, exist_ok=True)
    dev_name = device_name(cfg.device)
    spec = device_spec(cfg, dev_name)
    vers = versions()
    threads = torch.get_num_threads()
    meta = {"device": dev_name, "floor_source": f"{spec.name}: {spec.bandwidth / 1e9:.1f} GB/s, "
            f"{spec.rate(cfg.shapes[0].dtype) / 1e12:.2f} TF/s, {spec.source}",
            "threads": threads, "python": vers["python"], "torch": vers["torch"],
            "triton": vers["triton"], "torch_geometric": vers["torch_geometric"],
            "command": cfg.command}
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

    backends = {b: make_backend(b, cfg.device, cfg.shapes[0]) for b in cfg.backends}
    for b in backends.values():
        if not b.available:
            print(f"skipped: {BACKEND_LABELS[b.name]}: {b.reason}")
    cpu_mem_reason = cpu_peak_supported() if cfg.device == "cpu" and cfg.memory else None
    if cpu_mem_reason:
        print(f"note: peak memory not measured: {cpu_mem_reason}")

    writer = Writer(os.path.join(cfg.out, "profile.csv"), COLUMNS)
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
    header = _markdown_header(cfg.command, dev_name, meta["floor_source"], vers,
                              cfg.device == "cpu")
    md = markdown_table(records, header)
    if accuracy_rows:
        acc_path = os.path.join(cfg.out, "accuracy.csv")
        _write_csv(acc_path, accuracy_rows, meta)
        md += "\n" + accuracy_markdown(accuracy_rows)
        print()
        print(accuracy_markdown(accuracy_rows))
    if cfg.max_batch is not None:
        mb = max_batch_all(cfg, backends, threads)
        _write_csv(os.path.join(cfg.out, "max_batch.csv"), mb, meta)
        text = max_batch_markdown(mb, cfg.max_batch)
        md += "\n" + text
        print()
        print(text)
    with open(os.path.join(cfg.out, "profile.md"), "w") as f:
        f.write(md)
    title = (f"B={cfg.shapes[0].batch} F={cfg.shapes[0].features} clusters "
             f"{'/'.join(str(s.clusters) for s in cfg.shapes)} {cfg.shapes[0].dtype} "
             f"adj {cfg.shapes[0].adj_dtype} on {dev_name}")
    try:
        paths = plot(records, cfg.out, title)
    except ImportError as err:
        paths = []
        print(f"note: no plots ({_first_line(err)}; pip install matplotlib)")
    print()
    print(f"wrote {cfg.out}/: profile.csv, profile.md, meta.json"
          + "".join(f", {os.path.basename(p)}" for p in paths)
          + (", accuracy.csv" if accuracy_rows else "")
          + (", max_batch.csv" if cfg.max_batch is not None else ""))
    return 0


def profile_shape(cfg: Config, shape: Shape, backends: Dict[str, Backend], timer: Timer,
                  spec: costmodel.DeviceSpec, threads: int, bar, cpu_mem_reason) -> List[Row]:
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
    for mode in modes:
        rows[backend, mode].status = "error"
        rows[backend, mode].reason = _first_line(err)
        rows[backend, mode].times = []
    if live is not None and backend in live:
        live.remove(backend)


def _write_csv(path: str, rows: List[Dict[str, object]], meta: Dict[str, object]) -> None:
    if not rows:
        return
    cols = list(rows[0].keys()) + [k for k in meta if k not in rows[0]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: v for k, v in meta.items() if k not in r}})


# ----------------------------------------------------------------------------------------------
# Accuracy against a float64 reference


def measure_accuracy(cfg: Config, shape: Shape, backends: Dict[str, Backend]) -> List[Dict[str, object]]:
    """Max error of each backend's outputs and gradients relative to a float64 reference,
    each normalised by the largest magnitude of the reference (same inputs, same upstream
    gradients)."""
    import torch

    from .reference import dense_diff_pool_reference

    inp = make_inputs(shape, cfg.device, cfg.seed + 1, cfg.density)
    x64 = inp.x.detach().double().requires_grad_()
    s64 = inp.s.detach().double().requires_grad_()
    ref = dense_diff_pool_reference(x64, inp.adj.double(), s64, inp.mask)
    torch.autograd.backward(ref, [g.double() for g in inp.grads])
    ref = [t.detach() for t in ref] + [x64.grad, s64.grad]
    names = ["out", "out_adj", "link_loss", "ent_loss", "grad_x", "grad_s"]
    rows = []
    for b in cfg.backends:
        if not backends[b].available:
            continue
        try:
            inp.x.grad = inp.s.grad = None
            outs = forward(backends[b].fn, inp)
            backward(outs, inp)
            got = [t.detach() for t in outs] + [inp.x.grad, inp.s.grad]
        except Exception as err:
            rows.append({"backend": b, "nodes": shape.nodes, "clusters": shape.clusters,
                         "batch": shape.batch, "error": _first_line(err)})
            continue
        row = {"backend": b, "batch": shape.batch, "nodes": shape.nodes,
               "clusters": shape.clusters, "features": shape.features, "dtype": shape.dtype}
        for name, g, r in zip(names, got, ref):
            scale = r.abs().max().clamp_min(1e-300)
            row[f"err_{name}"] = f"{float((g.double() - r).abs().max() / scale):.3e}"
        rows.append(row)
        inp.x.grad = inp.s.grad = None
    return rows


def accuracy_markdown(rows: List[Dict[str, object]]) -> str:
    """The error table, with each backend's link-loss error as a ratio to PyG's (same shape)."""
    names = ["out", "out_adj", "link_loss", "ent_loss", "grad_x", "grad_s"]
    pyg_link = {r["nodes"]: float(r["err_link_loss"]) for r in rows
                if r["backend"] == "pyg" and "error" not in r}
    lines = ["Error vs float64 reference (max |got - ref| / max |ref|):", "",
             "| backend | B | N | C | " + " | ".join(names) + " | PyG's link error / this |",
             "|---|---|---|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['nodes']} | {r['clusters']} | "
                         f"error: {r['error']} |")
            continue
        own = float(r["err_link_loss"])
        ratio = (f"{pyg_link[r['nodes']] / own:.3g}" if r["nodes"] in pyg_link and own > 0
                 else "")
        lines.append(f"| {BACKEND_LABELS.get(r['backend'], r['backend'])} | {r['batch']} | "
                     f"{r['nodes']} | {r['clusters']} | "
                     + " | ".join(str(r[f'err_{n}']) for n in names) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Largest batch in a memory budget


def max_batch_all(cfg: Config, backends: Dict[str, Backend], threads: int) -> List[Dict[str, object]]:
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
                row.update(status="error", reason=_first_line(err), max_batch="", method="")
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
