"""Fold-parallel cross-validation: ``diffpool-fast train --fold-workers K``.

The folds are independent trainings, so a parent process runs up to K of them at a time, each in
a worker process of its own (``python -c``; worker w takes folds w, w + K, ... one after the other) with
``--threads max(1, cores // K)`` unless ``--threads`` is given, so the machine is not
oversubscribed. Fold f trains in ``OUT/folds/fold-FF/``, a run of its own with its own
``metrics.csv``, checkpoint and ``results.json`` holding that fold only (the fold's seeds are the
sequential run's: they depend on the seed and the fold number only). When every fold has
finished, the parent merges them, in fold order, into ``OUT/metrics.csv`` and
``OUT/results.json``: the same rows and results as the sequential run with that thread count,
apart from the timings and the command.

``OUT/fold_workers.json`` records the run's options. A worker that dies (killed, out of memory)
leaves its unfinished folds; the others finish theirs, then the run stops with an error naming
them; ``--resume --out OUT``
then continues it: finished folds are kept, interrupted ones resume from their checkpoints
exactly like a sequential run, the rest start.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UsageError
from .one_fold import FOLDS, fold_dir

MARKER = "fold_workers.json"
#: options of the parent that its workers do not get
_PARENT_ONLY = ("fold_workers", "nproc_per_node", "func", "explicit", "stop_after", "out", "resume")


def is_fold_parallel(out) -> bool:
    return out is not None and (Path(out) / MARKER).is_file()


def _spec_args(args) -> dict:
    return {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in vars(args).items()
            if k not in _PARENT_ONLY}


def worker_main(argv=None) -> int:
    """A worker: ``python -c '...worker_main()' SPEC.json`` trains SPEC's folds one after the other,
    each in its folder (resumed from its checkpoint where it has one)."""
    from . import loop
    from .checkpoint import CHECKPOINT

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    out = Path(spec["out"])
    for fold in spec["folds"]:
        d = fold_dir(out, fold)
        if (d / loop.RESULTS).is_file():
            continue
        ns = argparse.Namespace(**spec["args"])
        ns.out, ns.resume, ns.only_fold = str(d), (d / CHECKPOINT).is_file(), fold
        ns.threads, ns.progress, ns.stop_after = spec["threads"], "off", None
        ns.explicit = frozenset()  # a resumed fold takes its options from its checkpoint
        try:
            rc = int(loop.run(ns) or 0)
        except UsageError as err:
            print(f"diffpool-fast train (fold {fold + 1} worker): error: {err}", file=sys.stderr)
            return 2
        if rc:
            return rc
    return 0


def _marker(args, cfg: dict) -> dict:
    return {"fold_workers": args.fold_workers, "folds": args.folds, "config": cfg, "args": _spec_args(args)}


def _open(args, out: Path) -> dict:
    """The run's marker: a new one (refusing a folder that holds a run) or, with --resume, the
    saved one, its options merged into ``args`` (the options given again must agree)."""
    from . import loop, resume
    from .checkpoint import CHECKPOINT, write_json

    path = out / MARKER
    if not args.resume:
        if path.exists() or (out / CHECKPOINT).exists() or (out / loop.RESULTS).exists():
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        loop._prepare_out(out)
        mark = _marker(args, loop._run_config(args))
        mark["started"] = time.time()
        write_json(path, mark)
        return mark
    if not path.is_file():
        raise UsageError(f"--resume --fold-workers: {out} holds no fold-parallel run ({MARKER} is missing); "
                         "resume a sequential run without --fold-workers")
    try:
        mark = json.loads(path.read_text())
        saved = mark["config"]
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    resume.merge_options(args, saved, loop._run_config(args), getattr(args, "explicit", None), out)
    if args.threads is None:
        args.threads = mark.get("args", {}).get("threads")
    if args.fold_workers is None:
        args.fold_workers = mark.get("fold_workers")
    return mark


def run(args) -> int:
    """Train the folds of ``args`` in ``args.fold_workers`` worker processes; merge the results."""
    from . import loop

    loop._validate(args)
    if getattr(args, "stop_after", None) is not None:
        raise UsageError("--stop-after does not combine with --fold-workers (each fold is a run of its own; "
                         "stop the command instead: --resume continues it)")
    if getattr(args, "nproc_per_node", None):
        raise UsageError("--fold-workers and --nproc-per-node: choose one")
    if args.resume and not args.out:
        raise UsageError("--resume of a fold-parallel run needs --out DIR")
    out = loop._output_dir(args)
    mark = _open(args, out)
    k = max(1, int(args.fold_workers or 1))
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // k)
    n = args.folds
    todo = [f for f in range(n) if not (fold_dir(out, f) / loop.RESULTS).is_file()]
    print(f"diffpool-fast train: {n} fold(s), {len(todo)} to train, in {k} worker(s) x {threads} thread(s); "
          f"writing {out}/", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    base = _spec_args(args)
    base["threads"] = threads
    (out / FOLDS).mkdir(exist_ok=True)
    procs, failed, shown = [], [], set()
    for w in range(min(k, len(todo))):
        spec = {"args": base, "out": str(out), "folds": todo[w::k], "threads": threads}
        path = out / FOLDS / f"worker-{w + 1}.json"
        path.write_text(json.dumps(spec, indent=1) + "\n")
        log = open(out / FOLDS / f"worker-{w + 1}.log", "a")
        p = subprocess.Popen([sys.executable, "-c", "import sys; from diffpool_fast.train.fold_workers "
                              "import worker_main; sys.exit(worker_main())", str(path)],
                             stdout=log, stderr=subprocess.STDOUT, env=_worker_env(threads))
        (out / FOLDS / f"worker-{w + 1}.pid").write_text(f"{p.pid}\n")
        procs.append((w, p, log, spec["folds"]))
    try:
        while True:
            alive = [p.poll() is None for _, p, _, _ in procs]
            for f in todo:
                res = fold_dir(out, f) / loop.RESULTS
                if f not in shown and res.is_file():
                    shown.add(f)
                    r = json.loads(res.read_text())["folds"][0]
                    print(f"fold {f + 1}/{n}: test acc {r['test_acc']:.4f} at epoch {r['best_epoch']} "
                          f"(val {r['best_val_acc']:.4f}); {r['train_seconds_per_epoch']:.2f} s/epoch",
                          file=sys.stderr, flush=True)
            if not any(alive):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, p, _, _ in procs:
            p.wait()
        raise
    for w, p, log, folds in procs:
        log.close()
        if p.returncode != 0:
            left = [f + 1 for f in folds if not (fold_dir(out, f) / loop.RESULTS).is_file()]
            failed.append((w, p.returncode, left))
    if failed:
        lines = "; ".join(f"worker {w + 1}: exit code {rc}, fold(s) {', '.join(map(str, left))} unfinished "
                          f"(see {out / FOLDS / f'worker-{w + 1}.log'})" for w, rc, left in failed)
        raise UsageError(f"a fold worker failed ({lines}); the finished folds are kept: continue with "
                         f"--resume --out {out}")
    return _merge(args, out, n, mark, time.perf_counter() - t0)


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _merge(args, out: Path, n: int, mark: dict, seconds: float) -> int:
    """OUT/metrics.csv and OUT/results.json from the folds' own, in fold order."""
    from . import loop
    from .checkpoint import write_json, write_text

    header, rows, folds, first = None, [], [], None
    for f in range(n):
        d = fold_dir(out, f)
        lines = (d / loop.METRICS).read_text().splitlines(keepends=True)
        header = header or lines[0]
        rows.extend(lines[1:])
        res = json.loads((d / loop.RESULTS).read_text())
        first = first or res
        folds.extend(res["folds"])
    results = dict(first)
    results["folds"] = folds
    results.update(loop._summarise(folds))
    results["total_seconds"] = seconds + float(mark.get("seconds", 0.0))
    results["command"] = "diffpool-fast " + " ".join(sys.argv[1:]) if sys.argv and "diffpool" in sys.argv[0] else None
    write_text(out / loop.METRICS, header + "".join(rows))
    write_json(out / loop.RESULTS, results)
    mean, std = results["test_acc_mean"], results["test_acc_std"]
    print(f"{args.dataset}: test accuracy {100 * mean:.2f} +- {100 * std:.2f} % over {len(folds)} fold(s) "
          f"(at best validation epoch); {results['train_seconds_per_epoch_mean']:.2f} s/epoch; results in "
          f"{out / loop.RESULTS}")
    return 0
