"""Where a recorded number comes from: installed versions, the device, the command, peak rates.

Every row ``diffpool-fast profile`` writes carries these, and ``diffpool-fast train`` records
``versions()`` with its results, so that a number can be traced to the software and machine
that produced it.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
from typing import Dict, Optional

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
