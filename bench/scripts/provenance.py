"""Where a bench script writes, and the command, machine, versions and date lines that head it.

Every script in bench/scripts/ that measures something writes, by default, into a folder of its
own under bench/results/ named ``<UTC date>-<device>-<name>`` (``results_dir``), e.g.
``bench/results/2026-11-25-cpu-xeon2-level_step/level_step.md``; the markdown it writes starts
with ``header``'s lines. bench/README.md states the rule.

    python bench/scripts/provenance.py NAME   # prints (and creates) the folder a run would use
"""
from __future__ import annotations

import csv
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent.parent
RESULTS = REPO / "bench" / "results"
_NOISE = {"intel", "amd", "r", "tm", "cpu", "processor", "genuine", "authentic"}


def device_slug() -> str:
    """This machine's CPU as a folder-name part, e.g. ``cpu-xeon2`` (Intel Xeon, 2 cores).

    ``BENCH_DEVICE`` overrides it. Otherwise ``cpu-`` + the model name's words without the
    vendor, trademark and clock words (from /proc/cpuinfo, else ``platform.processor()``) +
    the core count."""
    if os.environ.get("BENCH_DEVICE"):
        return os.environ["BENCH_DEVICE"]
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    model = re.sub(r"@.*$", "", model.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", model) if w and w not in _NOISE and not w.endswith("core")]
    words = [w for w in words if not re.fullmatch(r"\d+", w) or len(w) > 2]  # drop "64" of "64-core"
    name = "-".join(words) or "cpu"
    sep = "-" if name[-1].isdigit() else ""
    return f"cpu-{name}{sep}{os.cpu_count()}"


def results_dir(name: str, device: Optional[str] = None, create: bool = True) -> Path:
    """bench/results/<UTC date>-<device>-<name>/ for a new run (``-2``, ``-3``, ... appended if a
    run of the same day already has that folder: results are never overwritten)."""
    base = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{device or device_slug()}-{name}"
    path, k = RESULTS / base, 1
    while path.exists() and any(path.iterdir()):
        k += 1
        path = RESULTS / f"{base}-{k}"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path, rows: List[Dict], fields: Optional[Sequence[str]] = None, comments: Sequence[str] = ()) -> None:
    """``rows`` as CSV at ``path``: ``comments`` first as ``# `` lines, then a header of ``fields``
    (default: the first row's keys; keys outside ``fields`` are dropped) and the rows."""
    with open(path, "w", newline="") as f:
        for line in comments:
            f.write("# " + line + "\n")
        w = csv.DictWriter(f, fieldnames=list(fields or rows[0]), extrasaction="ignore" if fields else "raise")
        w.writeheader()
        w.writerows(rows)


def header(script: str, argv: Optional[List[str]] = None) -> List[str]:
    """Markdown bullet lines for the running ``script`` (its __file__) and its arguments."""
    import torch

    from diffpool_fast import __version__

    args = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join([os.path.relpath(script, REPO)] + list(args))
    return [
        f"- command: `{command}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- versions: torch {torch.__version__}, diffpool_fast {__version__}, python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/scripts/provenance.py NAME")
    print(os.path.relpath(results_dir(sys.argv[1]), Path.cwd()))
