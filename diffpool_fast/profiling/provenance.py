"""Where a recorded number comes from: installed versions, the device, the command, peak rates.

Every row ``diffpool-fast profile`` writes carries these, and ``diffpool-fast train`` records
``versions()`` with its results, so that a number can be traced to the software and machine
that produced it.

The machine's load is part of that provenance: ``train`` and ``profile`` both call
:func:`fit_threads_to_load`, which lowers torch's thread count when other processes keep cores
busy (spinning OpenMP threads sharing a core with another busy process make a step one to two
orders of magnitude slower, see bench/notes/threads_under_load.md) and says so.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
from typing import Dict, Optional, Tuple

from . import costmodel

#: the distributions whose versions are recorded next to every number
_PACKAGES = ("torch", "triton", "torch_geometric", "diffpool_fast")


def versions() -> Dict[str, str]:
    """``{"python": ..., "torch": ..., "triton": ..., "torch_geometric": ..., "diffpool_fast": ...}``;
    ``"not installed"`` for a missing package."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def package_version() -> str:
    """The installed diffpool_fast's version (what a checkpoint records and ``--version``
    prints); ``"unknown"`` when it is run from a tree that was never installed."""
    import importlib.metadata as md

    try:
        return md.version("diffpool_fast")
    except md.PackageNotFoundError:
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
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


def device_spec(device: str, name: str, peak_bandwidth: Optional[float] = None,
                peak_tflops: Optional[float] = None) -> costmodel.DeviceSpec:
    """The peak rates the floor is computed with: the datasheet of a known GPU, else measured
    here; ``peak_bandwidth`` (GB/s) and ``peak_tflops`` (TF/s) override them."""
    spec = costmodel.known_device(name) if device == "cuda" else None
    if spec is None:
        spec = costmodel.measure_device(device)
    if peak_bandwidth or peak_tflops:
        flops = dict(spec.flops)
        if peak_tflops:
            flops = {k: peak_tflops * 1e12 for k in flops}
        spec = costmodel.DeviceSpec(
            spec.name, peak_bandwidth * 1e9 if peak_bandwidth else spec.bandwidth,
            flops, spec.source + "; overridden by --peak-bandwidth/--peak-tflops")
    return spec


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


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes, this one included), None where the
    platform has no such figure."""
    if not hasattr(os, "getloadavg"):
        return None
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


def auto_threads(default: int, cpu_count: int, load: float) -> int:
    """Torch threads when ``--threads`` is not given: torch's ``default``, lowered to the cores
    the other runnable processes leave idle (``cpu_count - round(load)``, at least 1): spinning
    OpenMP threads that share a core with another busy process slow a step down by far more
    than one thread fewer costs (bench/notes/threads_under_load.md).
    """
    return max(1, min(default, cpu_count - int(round(load))))


def fit_threads_to_load(command: str, requested: Optional[int] = None,
                        warn: bool = True) -> Tuple[int, Optional[float]]:
    """Set torch's CPU threads for ``diffpool-fast COMMAND`` and return ``(threads, load)``.

    ``requested`` (``--threads``) is used as given, with a warning on stderr (if ``warn``) when
    the load leaves fewer idle cores than that; without it, torch's default is lowered to the idle cores
    (:func:`auto_threads`), with a note, unless ``OMP_NUM_THREADS`` chose the count. ``load`` is
    the 1-minute load average measured before this command started working (None where the
    platform has none), for the command to record next to its timings.
    """
    import torch

    load = load_average()
    cores = os.cpu_count() or torch.get_num_threads()
    if requested is not None:
        torch.set_num_threads(requested)
        if warn and load is not None and requested > cores - int(round(load)):
            print(f"diffpool-fast {command}: warning: the machine is busy (load average {load:.1f} on "
                  f"{cores} cores): {requested} torch thread(s) share cores with other processes, "
                  "so timings are slower and noisier than on an idle machine", file=sys.stderr)
        return torch.get_num_threads(), load
    default = torch.get_num_threads()
    if load is None or os.environ.get("OMP_NUM_THREADS"):
        return default, load  # no load figure here, or the user chose through OpenMP
    n = auto_threads(default, cores, load)
    if n < default:
        print(f"diffpool-fast {command}: the machine is busy (load average {load:.1f} on {cores} cores): "
              f"using {n} torch thread(s) instead of {default} (--threads N to choose)", file=sys.stderr)
        torch.set_num_threads(n)
    return torch.get_num_threads(), load
