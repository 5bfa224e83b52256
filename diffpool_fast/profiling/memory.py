"""Peak memory of a step: the CUDA allocator's on a GPU, the resident set's on CPU.

On CPU the peak is the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set before the step, measured in a fresh
subprocess per backend and shape (:func:`run_worker`): a fresh process has no allocator caches
or freed-but-kept pages of earlier shapes, and its allocator is set up so that the resident set
follows the live tensors (``MALLOC_ENV``).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import Callable, Dict, Optional, Sequence

from ..config import TRITON_INTERPRET_ENV
from .costmodel import Shape
from .harness import backward, first_line, forward, make_backend, make_inputs, step, step_keep

# glibc returns large freed blocks to the OS only when they were mmapped; a fixed (not the
# default dynamic) mmap threshold makes every allocation above 64 KiB an mmap, so that the
# resident set follows the live tensors and its high-water mark is the peak of the step.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_TOP_PAD_": "0",
}


# ----------------------------------------------------------------------------------------------
# The resident set (Linux)


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
        return f"CPU peak memory needs Linux /proc/self/clear_refs ({first_line(err)})"
    return None


def measure_cpu_peak(run: Callable[..., object], before: Optional[Callable[[], object]] = None) -> int:
    """Bytes the resident set grows above its level before ``run`` (after ``before``, which is
    run first and whose result is passed on), at its highest during ``run``.

    Faithful when large blocks are mmapped (see MALLOC_ENV: the profiler's workers set it);
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


# ----------------------------------------------------------------------------------------------
# Fresh processes


def run_worker(module: str, function: str, job: Dict[str, object]) -> Dict[str, object]:
    """Run ``module.function()`` in a fresh Python with ``job`` as JSON in ``sys.argv[1]``; its
    last line of stdout is the JSON result. A crash becomes ``{"error": ...}``."""
    env = dict(os.environ, **MALLOC_ENV)
    # The tests switch Triton's interpreter on for their own process; a worker measures what a
    # normal run does, so it runs without it.
    env.pop(TRITON_INTERPRET_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", f"from {module} import {function} as m; m()", json.dumps(job)],
        capture_output=True, text=True, env=env,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory worker exited with {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def worker_main() -> None:
    """Entry of the coarsening memory subprocess: JSON job in argv[1], JSON result on stdout."""
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
            peak = measure_cpu_peak(lambda mode=mode: step_keep(backend.fn, inp, mode))
        inp.x.grad = inp.s.grad = None
        result[mode] = peak
    result["inputs"] = inp.nbytes("full")
    print(json.dumps(result))


def cpu_peaks_subprocess(backend: str, shape: Shape, modes: Sequence[str], seed: int,
                         density: float, threads: int) -> Dict[str, object]:
    """Peak bytes per mode of one backend and shape, measured in a fresh process; also
    ``"inputs"``, the bytes of the inputs (for the max-batch fit)."""
    job = {"backend": backend, "shape": asdict(shape), "modes": list(modes), "seed": seed,
           "density": density, "threads": threads}
    return run_worker("diffpool_fast.profiling.memory", "worker_main", job)


# ----------------------------------------------------------------------------------------------
# CUDA


def cuda_peaks(fn, inp, modes: Sequence[str]) -> Dict[str, object]:
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
