"""Issue 19's op table and the dispatch sweep on a CUDA machine, each one `diffpool-fast profile`.

    python bench/scripts/gpu_op_table.py [OUT_DIR]              # the op table, ~90 s on an H200
    python bench/scripts/gpu_op_table.py --dispatch [OUT_DIR]   # the dispatch sweep, ~2 min
    python bench/scripts/gpu_op_table.py --dispatch --write-dispatch diffpool_fast/ops/dispatch_table.json
    python bench/scripts/gpu_op_table.py --cpu [--dispatch] OUT_DIR   # the same at tiny sizes on CPU, to check

Op table: the shapes of the first GPU run (B, N, C, F = 64,512,128,128 random and near-converged,
64,1024,128,128, 32,2048,128,128, 256,128,32,64, 256,512,128,128), forward+backward, PyG,
torch.compile(PyG) (compiled per shape and precision, compile time apart), ours as auto, Triton
and torch, under "highest" and "high", with relative errors against PyG's formulas in float64 and
peak memory; median of 20 CUDA-event timings after 3 warm-ups.

Dispatch sweep: torch, Triton and PyG, forward+backward under "highest" (torch's default), over
N = 64..4096 and C = 16..512 (C <= N), F = 128, adjacency float32 and bool, B so that the float32
adjacency is about 256 MiB (between 4 and 256 graphs), median of 10 after 2 warm-ups. It writes
the measured winners into OUT_DIR/dispatch_table.json (a copy of the package's table with this
GPU's section replaced), or into ``--write-dispatch PATH``.

The script prints each command it runs; it runs them in this process (``diffpool_fast.cli.main``),
with the command recorded in every output row. Default OUT_DIR:
bench/results/<UTC date>-<gpu>-op_table/ (or -dispatch/).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: the first GPU run's op table (issue 19), plus its near-converged variant of the first shape
OP_SHAPES = ["64x512x128x128", "64x512x128x128:converged", "64x1024x128x128", "32x2048x128x128",
             "256x128x32x64", "256x512x128x128"]
CPU_OP_SHAPES = ["4x64x16x16", "4x64x16x16:converged", "2x128x16x16", "8x32x8x8"]


def dispatch_shapes(cpu: bool) -> list:
    """N x C (C <= N), F = 128 (16 on CPU), float32 and bool adjacency, B by N."""
    nodes = [16, 32] if cpu else [64, 128, 256, 512, 1024, 2048, 4096]
    clusters = [4, 8] if cpu else [16, 32, 64, 128, 256, 512]
    feats = 16 if cpu else 128
    out = []
    for adj in ("float32", "bool"):
        for n in nodes:
            batch = 2 if cpu else max(4, min(256, (1 << 26) // (n * n)))
            out += [f"{batch}x{n}x{c}x{feats}" + ("" if adj == "float32" else ":bool") for c in clusters if c <= n]
    return out


def commands(args, out: Path) -> list:
    if not args.dispatch:
        argv = ["profile", "--device", "cpu" if args.cpu else "cuda", "--mode", "full",
                "--backend", "pyg,pyg-compiled,auto,triton,torch",
                "--shapes", ",".join(CPU_OP_SHAPES if args.cpu else OP_SHAPES),
                "--precision", "highest,high", "--accuracy",
                "--repeats", "3" if args.cpu else "20", "--warmup", "1" if args.cpu else "3", "--out", str(out)]
        if args.cpu:
            argv += ["--no-memory"]
        return [argv]
    table = args.write_dispatch or str(out / "dispatch_table.json")
    argv = ["profile", "--device", "cpu" if args.cpu else "cuda", "--mode", "full",
            "--backend", "torch,triton,pyg", "--shapes", ",".join(dispatch_shapes(args.cpu)),
            "--precision", "highest", "--no-memory", "--repeats", "3" if args.cpu else "10",
            "--warmup", "1" if args.cpu else "2", "--out", str(out)]
    if not args.cpu:
        argv += ["--write-dispatch", table]
    return [argv]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None, help="output folder (default: bench/results/<date>-<gpu>-...)")
    p.add_argument("--dispatch", action="store_true", help="the dispatch sweep instead of the op table")
    p.add_argument("--write-dispatch", default=None, metavar="PATH",
                   help="--dispatch: write into this table (default: OUT_DIR/dispatch_table.json, a copy of the package's)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on CPU, to check the script (no table is written)")
    args = p.parse_args()

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_op_table.py: no CUDA device; --cpu runs the same commands at tiny sizes", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
    else:
        from provenance import results_dir

        gpu = "cpu" if args.cpu else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
        out = results_dir("dispatch" if args.dispatch else "op_table", device=gpu)
    out.mkdir(parents=True, exist_ok=True)
    if args.dispatch and not args.cpu and not args.write_dispatch:
        from diffpool_fast.ops.dispatch_table import DEFAULT_PATH

        shutil.copyfile(DEFAULT_PATH, out / "dispatch_table.json")

    from diffpool_fast.cli import main as cli_main

    rc = 0
    for argv in commands(args, out):
        print("$ diffpool-fast " + " ".join(shlex.quote(a) for a in argv), flush=True)
        # recorded as typed: profile's command column reads sys.argv when it is diffpool-fast's
        sys.argv = ["diffpool-fast"] + argv
        rc = max(rc, cli_main(argv))
    print(f"gpu_op_table.py: wrote {os.path.relpath(out, Path.cwd())}/ (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
