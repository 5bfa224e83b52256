"""Test accuracy of README's main job (``diffpool-fast train --dataset synthetic``) at 20 and 60
epochs, under changes that only move floating-point rounding: fused SAGE blocks or the layer
modules (``DIFFPOOL_FAST_FUSED=0``), 1 or 2 threads. Shows how settled the demo's result is.

Usage: python bench/scripts/demo_synthetic.py [--out FILE]
Writes bench/results/<UTC date>-<device>-demo_synthetic/demo_synthetic.md (command, machine,
versions, date included; bench/README.md); the reading of the recorded run is
bench/notes/demo_synthetic.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from provenance import header, results_dir  # noqa: E402  (bench/scripts/ is on sys.path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown file to write (default: a new folder in bench/results/)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo_synthetic_") as tmp:
        for epochs in (20, 60):
            for fused in ("1", "0"):
                for threads in (1, 2):
                    out = Path(tmp) / f"e{epochs}-f{fused}-t{threads}"
                    cmd = [sys.executable, "-m", "diffpool_fast", "train", "--dataset", "synthetic", "--epochs",
                           str(epochs), "--threads", str(threads), "--progress", "off", "--out", str(out)]
                    subprocess.run(cmd, env=dict(os.environ, DIFFPOOL_FAST_FUSED=fused), cwd=REPO, check=True,
                                   capture_output=True)
                    r = json.loads((out / "results.json").read_text())
                    rows.append((epochs, "fused" if fused == "1" else "modules", threads, 100 * r["test_acc_mean"],
                                 r["folds"][0]["best_epoch"], r["train_seconds_per_epoch_mean"]))
                    print(rows[-1], file=sys.stderr)
    lines = ["# README's main job: test accuracy of the generated-dataset demo", "",
             "`diffpool-fast train --dataset synthetic --epochs E --threads T` (one split, seed 0), with the fused "
             "SAGE blocks or the layer modules (`DIFFPOOL_FAST_FUSED=0`): the same model up to rounding.", "",
             *header(__file__, argv), "",
             "| epochs | GNN path | threads | test acc % | best-validation epoch | train s/epoch |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {e} | {p} | {t} | {a:.2f} | {b} | {s:.2f} |" for e, p, t, a, b, s in rows]
    out = Path(args.out) if args.out else results_dir("demo_synthetic") / "demo_synthetic.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
