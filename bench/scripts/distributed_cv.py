"""10-fold CV wall time: sequential vs ``--fold-workers`` vs ``--nproc-per-node`` (issue 14).

For each dataset and configuration this runs ``diffpool-fast train --folds 10`` in a fresh
output folder, times the whole command (wall clock, start-up included) and reads the run's
``results.json``. It writes ``distributed_cv.md`` and ``distributed_cv.json`` into
``bench/results/<date>-<device>-distributed_cv/`` (or ``--out``), with the runs' folders beside.

    python bench/scripts/distributed_cv.py --data-root /work/shared/tudata \
        --dataset MUTAG --dataset PROTEINS:20 --configs seq,folds2,ddp2

``NAME:EPOCHS`` overrides ``--epochs`` for one dataset. Configurations:

- ``seq``: one process, ``--threads 2``;
- ``folds2``: ``--fold-workers 2``, 1 thread each;
- ``ddp2``: ``--nproc-per-node 2`` (gloo), 1 thread per rank, per-rank batch = batch / 2 so
  the global batch is the sequential run's;
- ``seq1``: one process, ``--threads 1`` (not asked for: it separates the gain of two processes
  from that of not running two threads beside other busy processes);
- ``seq-repeat``: ``seq`` again (run last, it shows how much the shared machine's load moves a time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

CONFIGS = {
    "seq": ["--threads", "2"],
    "folds2": ["--fold-workers", "2", "--threads", "1"],
    "ddp2": ["--nproc-per-node", "2", "--threads", "1"],
}
CONFIGS["seq-repeat"] = CONFIGS["seq"]
CONFIGS["seq1"] = ["--threads", "1"]  # one process, one thread: what avoiding the contention alone gives


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--dataset", action="append", default=None, help="NAME or NAME:EPOCHS (repeatable)")
    ap.add_argument("--configs", default="seq,folds2,ddp2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--out", default=None, help="results folder (default: bench/results/<date>-<device>-distributed_cv)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else provenance.results_dir("distributed_cv")
    out.mkdir(parents=True, exist_ok=True)
    datasets = args.dataset or ["MUTAG", "PROTEINS:20"]
    summary_path = out / "distributed_cv.json"
    records = json.loads(summary_path.read_text()) if summary_path.exists() else []
    for spec in datasets:
        name, _, ep = spec.partition(":")
        epochs = int(ep) if ep else args.epochs
        for cfg in args.configs.split(","):
            run_dir = out / "runs" / f"{name}-{cfg}"
            if (run_dir / "results.json").exists():
                continue
            extra = list(CONFIGS[cfg])
            bs = args.batch_size
            if cfg.startswith("ddp"):
                bs = args.batch_size // 2
            cmd = [sys.executable, "-m", "diffpool_fast", "train", "--dataset", name, "--folds", str(args.folds),
                   "--epochs", str(epochs), "--batch-size", str(bs), "--progress", "off", "--out", str(run_dir)] + extra
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            if run_dir.exists():
                cmd += ["--resume"]
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            with open(out / f"{name}-{cfg}.log", "a") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - t0
            rec = {"dataset": name, "config": cfg, "epochs": epochs, "rc": rc, "wall_seconds": wall,
                   "load_before": load0, "load_after": os.getloadavg()[0], "command": " ".join(cmd[1:])}
            if rc == 0:
                res = json.loads((run_dir / "results.json").read_text())
                rec.update(test_acc_mean=res["test_acc_mean"], test_acc_std=res["test_acc_std"],
                           fold_accs=[f["test_acc"] for f in res["folds"]])
            records.append(rec)
            summary_path.write_text(json.dumps(records, indent=2) + "\n")
            print(json.dumps(rec), flush=True)
    _write_md(out, records)
    return 0


def _write_md(out: Path, records) -> None:
    lines = ["# 10-fold CV: sequential vs fold workers vs data-parallel ranks", ""]
    lines += provenance.header(__file__)
    lines += ["", "| dataset | config | epochs | wall s | vs seq | test acc (mean +- std) | load before/after |",
              "|---|---|---|---|---|---|---|"]
    seq = {r["dataset"]: r["wall_seconds"] for r in records if r["config"] == "seq" and r["rc"] == 0}
    failed_then_done = {(r["dataset"], r["config"]) for r in records if r["rc"] == 0}
    for r in records:
        if r["rc"] != 0 and (r["dataset"], r["config"]) in failed_then_done:
            continue  # an attempt that failed before the run that counts (see distributed_cv.json)
        ratio = f"{r['wall_seconds'] / seq[r['dataset']]:.2f}" if r["dataset"] in seq else "-"
        acc = f"{100 * r['test_acc_mean']:.2f} +- {100 * r['test_acc_std']:.2f}" if "test_acc_mean" in r else f"rc {r['rc']}"
        lines.append(f"| {r['dataset']} | {r['config']} | {r['epochs']} | {r['wall_seconds']:.1f} | {ratio} | {acc} | "
                     f"{r['load_before']:.1f}/{r['load_after']:.1f} |")
    (out / "distributed_cv.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
