"""Training: DiffPool graph classification with stratified K-fold cross-validation.

Protocol (stated in every results.json): the graphs are dealt into K stratified folds. For fold
k, fold k is the test set; from the other K-1 folds a stratified ``--val-fraction`` is held out
for validation and the rest trains the model for ``--epochs`` epochs. After every epoch the
model is evaluated on validation and test; the fold's reported accuracy is the test accuracy at
the epoch with the best validation accuracy (ties: lower validation loss, then the earlier
epoch). The test fold never influences training or the choice of epoch. ``--folds 1`` is one
stratified split: 10% test, then ``--val-fraction`` of the rest for validation.

Every epoch appends a row to ``OUT/metrics.csv`` (flushed) and rewrites ``OUT/checkpoint.pt``
atomically (temp file + os.replace): model, optimizer, RNG states, fold, epoch and all metrics so
far, the options, the dataset's fingerprint and the package version (a first checkpoint is
written before the first epoch). Each epoch's batch order and dropout draw from (seed, fold,
epoch) only, so ``--resume --out OUT`` continues an interrupted run to bit-for-bit the result of
an uninterrupted one (same machine, same thread count: the resume keeps the run's; without
``--threads`` the count is a fixed rule, ``default_threads``, never the machine's load; on CUDA
with ``--deterministic on``, see ``steps``). It takes the
options from the checkpoint and refuses conflicting ones, other data, another package version
and a damaged or inconsistent checkpoint (``resume``), before writing anything. ``OUT/results.json``
holds per-fold and mean +- std test accuracy (std over folds, ddof=0), epochs, time per epoch and
the full configuration.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import platform
import sys
import time
from pathlib import Path

from ..config import triton_interpreting
from ..errors import UsageError
from ..profiling import provenance
from . import distributed, resume
from .checkpoint import (
    CHECKPOINT,
    CKPT_VERSION,
    METRIC_FIELDS,
    WriteError,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    write_json,
    write_text,
)

METRICS = "metrics.csv"
RESULTS = "results.json"

# Options that do not change what a run computes: they may differ between a run and its resume.
_RUNTIME_ONLY = resume.RUNTIME_ONLY | {"nproc_per_node", "fold_workers", "only_fold"}  # train/distributed.py, fold_workers.py

PROTOCOL = (
    "stratified {k}-fold cross-validation; in each fold a stratified {vf:.0%} of the training "
    "folds is held out for validation; test accuracy reported at the epoch of best validation "
    "accuracy (ties: lower validation loss, then earlier epoch); {epochs} epochs per fold"
)


# --------------------------------------------------------------------------- helpers

def _validate(args) -> None:
    """The checks argparse's types cannot make (or a Python caller skipped)."""
    if not 0.0 < args.val_fraction < 0.5:
        raise UsageError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 < args.ratio <= 1.0:
        raise UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.levels < 0:
        raise UsageError(f"--levels must be >= 0, got {args.levels}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    for name in ("weight_decay", "clip", "link_weight", "ent_weight"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


def _adam(model, lr, weight_decay, capturable: bool = False):
    """Adam with the fused (one kernel over all parameters) implementation where this torch has
    it for the parameters' device (CPU and CUDA): the same update, fewer launches over this
    model's ~80 small parameter tensors (bench/notes/train_step_variants.md). Falls back to the
    default one. ``capturable``: its step may be captured in a CUDA graph (train --cuda-graphs)."""
    import torch

    kw = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


#: ``train``'s torch thread count without ``--threads``: the CPUs this process may use, at most
#: this many. A fixed rule, never the machine's load: the thread count changes the summation
#: order of the CPU kernels, so a run's numbers depend on it (the README's main command gave
#: 85.00% at 2 threads and 90.00% at 1), and a fixed-seed command must give one result.
DEFAULT_MAX_THREADS = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> tuple:
    """``(threads, source)`` when ``--threads`` is not given: ``OMP_NUM_THREADS`` when it is set
    to a positive integer (the user's choice), else ``min(usable CPUs, DEFAULT_MAX_THREADS)``."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cpus = usable_cpus()
    return min(cpus, DEFAULT_MAX_THREADS), f"default: min(usable CPUs {cpus}, {DEFAULT_MAX_THREADS})"


def set_threads(requested) -> str:
    """Set torch's CPU threads for the run: ``--threads`` (or, on --resume, the run's count),
    else :func:`default_threads`. Returns where the count came from (results.json records it)."""
    import torch

    if requested is not None:
        torch.set_num_threads(int(requested))
        return "--threads"
    n, source = default_threads()
    torch.set_num_threads(n)
    return source


def _seed_for(seed: int, fold: int, epoch: int) -> int:
    # Distinct, reproducible streams per (fold, epoch); epoch -1 is the fold's initialisation.
    return (int(seed) * 1_000_003 + (fold + 1) * 10_007 + (epoch + 2)) % (2**63 - 1)


def _run_config(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _RUNTIME_ONLY}


def _versions() -> dict:
    """The installed versions ``diffpool-fast profile`` records, and numpy's; torch's as the
    running build names itself (``torch.__version__``, with its local tag such as ``+cu130`` or
    ``+cpu``, which the distribution metadata leaves out)."""
    import numpy as np
    import torch

    from ..profiling.provenance import versions

    return {**versions(), "torch": torch.__version__, "numpy": np.__version__}


def _machine(device) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _build_model(cfg: dict, ds):
    from ..nn.model import DiffPoolClassifier

    return DiffPoolClassifier(
        ds.num_features, ds.num_classes, max_nodes=ds.max_nodes, num_levels=cfg["levels"],
        ratio=cfg["ratio"], clusters=cfg["clusters"], hidden=cfg["hidden"], gnn=cfg["gnn"],
        layers=cfg["layers"], jk=cfg["jk"], readout=cfg["readout"], readout_levels=cfg["readout_levels"],
        dropout=cfg["dropout"], batch_norm=cfg["norm"], link_weight=cfg["link_weight"],
        ent_weight=cfg["ent_weight"], link_norm=cfg["link_norm"], backend=cfg["backend"],
        adj_symmetric=True if ds.undirected else None,
        clusters_per_graph=cfg.get("clusters_per_graph", False), link_loss=cfg.get("link_loss", "frobenius"),
    )


def _evaluate(model, loader, device):
    """(mean loss, accuracy) over ``loader``. The sums stay on the device and are read once, at
    the end: no host sync per batch."""
    import torch
    import torch.nn.functional as F

    from ..sparse_data import model_inputs

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, graphs
    with torch.no_grad():
        for b in loader.epoch():
            b = b.to(device)
            inputs, kw = model_inputs(b)  # a dense or a sparse (edge-list) batch: --level0
            logits, _ = model(*inputs, **kw)
            loss = F.cross_entropy(logits, b.y, reduction="sum")
            correct = (logits.argmax(-1) == b.y).sum()
            sums += torch.stack([loss.to(torch.float64), correct.to(torch.float64),
                                 torch.full((), b.y.numel(), dtype=torch.float64, device=sums.device)])
    loss_sum, correct, total = sums.tolist()
    total = int(total)
    return (loss_sum / max(total, 1), int(correct) / max(total, 1))


def _train_epoch(model, opt, loader, epoch, device, clip, steps=None):
    """One epoch; returns its mean loss, terms and accuracy. Every step's statistics are added
    on the device and read once at the end (one host sync per epoch, none per step). A
    non-finite loss raises ``FloatingPointError`` at the end of the epoch, naming its first
    step; the run's checkpoint still holds the epochs before. ``steps``: a
    :class:`~diffpool_fast.train.steps.GraphSteps` that runs the batches it can as
    captured CUDA graphs (None: every step is :func:`train_step`)."""
    import torch

    from .steps import STEP_STATS, train_step

    model.train()
    sums = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    for i, b in enumerate(loader.epoch(epoch)):
        b = b.to(device)
        stats = train_step(model, opt, b, clip) if steps is None else steps.step(b)
        sums += stats
        first_bad = torch.where((first_bad < 0) & (stats[-1] > 0), i, first_bad)
    *vals, bad = sums.tolist()
    out = dict(zip(STEP_STATS, vals))
    if bad:
        raise FloatingPointError(f"non-finite loss in {int(bad)} step(s) of epoch {epoch + 1}, first at step "
                                 f"{int(first_bad) + 1}")
    total = max(int(out.pop("graphs")), 1)
    correct = int(out.pop("correct"))
    out = {k: v / total for k, v in out.items()}
    out["acc"] = correct / total
    return out


def _select(rows):
    """The fold's model-selection row: best val acc, then lower val loss, then earlier epoch."""
    return min(rows, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))


def _summarise(fold_results):
    import statistics

    accs = [f["test_acc"] for f in fold_results]
    finals = [f["final_test_acc"] for f in fold_results]
    spe = [f["train_seconds_per_epoch"] for f in fold_results]
    return {
        "test_acc_mean": statistics.fmean(accs) if accs else None,
        "test_acc_std": statistics.pstdev(accs) if accs else None,
        "final_epoch_test_acc_mean": statistics.fmean(finals) if finals else None,
        "final_epoch_test_acc_std": statistics.pstdev(finals) if finals else None,
        "train_seconds_per_epoch_mean": statistics.fmean(spe) if spe else None,
    }


def _fold_splits(ds, k, val_fraction, seed):
    import torch

    from ..data import stratified_folds, stratified_split

    if k == 1:
        rest, test = stratified_split(torch.arange(len(ds)), ds.y, 0.1, seed)
        tests = [test]
        trains = [rest]
    else:
        if k > len(ds):

            raise UsageError(f"--folds {k} needs at least {k} graphs, the dataset has {len(ds)}")
        tests = stratified_folds(ds.y, k, seed)
        all_idx = torch.arange(len(ds))
        trains = []
        for t in tests:
            keep = torch.ones(len(ds), dtype=torch.bool)
            keep[t] = False
            trains.append(all_idx[keep])
    splits = []
    for f, (tr, te) in enumerate(zip(trains, tests)):
        tr2, va = stratified_split(tr, ds.y, val_fraction, seed * 7919 + f)
        splits.append((tr2, va, te))
    return splits


def _rewrite_metrics(path: Path, rows) -> None:
    """metrics.csv holding exactly ``rows``, replaced atomically (a kill keeps the old file)."""
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in METRIC_FIELDS})
    write_text(path, buf.getvalue())


def _prepare_out(out: Path) -> bool:
    """Create ``out`` and make sure files can be written in it; True when it was created here.
    A clear error for an ``--out`` that is a file, lies under a file or cannot be written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        above = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        raise UsageError(f"--out {out}: {above or 'a folder above it'} is a file, not a folder") from None
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the folder: {err.strerror or err}") from None
    probe = out / f".write-test{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out} is not writable: {err.strerror or err}") from None
    return created


def _append_metrics(path: Path, row: dict) -> None:
    try:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow({k: row[k] for k in METRIC_FIELDS})
            f.flush()
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err} (the checkpoint holds every epoch so far; "
                         "--resume rewrites this file from it)") from None


def _check_splits(splits, n_graphs: int, args) -> None:
    """Every fold needs graphs to train on, to select the epoch with and to test: an empty set
    gives a crash or, worse, an accuracy of nothing."""
    for f, (tr, va, te) in enumerate(splits):
        for part, idx in (("training", tr), ("validation", va), ("test", te)):
            if len(idx) == 0:
                raise UsageError(f"the dataset has {n_graphs} graphs, too few for {args.folds} fold(s) with "
                                 f"--val-fraction {args.val_fraction}: fold {f + 1} has no {part} graph")


def _warn_clusters(clusters, max_nodes: int) -> None:
    """Explicit cluster counts above the nodes they pool run, but pad instead of coarsening."""
    prev, what = max_nodes, "nodes of the largest graph"
    for level, c in enumerate(clusters or [], 1):
        if c > prev:
            print(f"diffpool-fast train: warning: --clusters: level {level} has {c} clusters, more than the "
                  f"{prev} {what}: that level adds clusters instead of coarsening (did you mean fewer?)",
                  file=sys.stderr)
        prev, what = c, f"clusters of level {level}"


def _output_dir(args) -> Path:
    """--out, or a new runs/<dataset>/<timestamp>/ (with --resume: the latest one there)."""

    if args.out:
        return Path(args.out)
    base = Path("runs") / args.dataset
    if args.resume:
        runs = sorted(p for p in base.glob("*/") if (p / CHECKPOINT).is_file()) if base.is_dir() else []
        if not runs:
            raise UsageError(f"--resume: no run with a checkpoint under {base}/; pass --out DIR")
        return runs[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, k = base / stamp, 1
    while out.exists():
        k += 1
        out = base / f"{stamp}-{k}"
    return out


# --------------------------------------------------------------------------- main

def _open_run(args, out: Path):
    """The checkpoint of a resumed run, its options merged into ``args`` and its header checked
    (nothing read from the data yet, nothing written); None for a new run."""
    ckpt_path = out / CHECKPOINT
    if not args.resume:
        if ckpt_path.exists() or (out / RESULTS).exists():
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    if not ckpt_path.is_file():
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
    state = load_checkpoint(ckpt_path)
    resume.check_fields(state, ckpt_path)
    resume.check_version(state, provenance.package_version(), out)
    resume.merge_options(args, state["config"], _run_config(args), getattr(args, "explicit", None), out)
    state["notes"] = resume.keep_runtime(args, state["runtime"])
    _validate(args)
    return state


def _load_data(args, state, ckpt_path: Path):
    """The dataset (after ``--max-nodes``), its fingerprint and the folds; for a resumed run,
    the checks that it is the run's data and that the checkpoint fits the folds."""
    from ..data import fingerprint, load_dataset

    ds = load_dataset(args.dataset, args.data_root, cache_dir=args.cache_dir, node_attr=args.node_attr,
                      download=args.download, synthetic_graphs=args.synthetic_graphs, seed=args.seed)
    fp = fingerprint(ds)
    if state is not None:
        resume.check_same_data(state["dataset"], fp, ckpt_path.parent)
    dropped = 0
    if args.max_nodes is not None:
        keep = [i for i in range(len(ds)) if int(ds.num_nodes[i]) <= args.max_nodes]
        dropped = len(ds) - len(keep)
        ds = ds.subset(keep)
        if len(ds) == 0:
            raise UsageError(f"--max-nodes {args.max_nodes} drops every graph")
    if len(ds) < 3:
        raise UsageError(f"dataset {args.dataset!r} has {len(ds)} graphs, too few to split")
    splits = _fold_splits(ds, args.folds, args.val_fraction, args.seed)
    _check_splits(splits, len(ds), args)
    _warn_clusters(args.clusters, ds.max_nodes)
    if state is not None and getattr(args, "only_fold", None) is not None:
        from .one_fold import check_progress

        check_progress(state, args.only_fold, len(splits), args.epochs, ckpt_path)
    elif state is not None:
        resume.check_progress(state, len(splits), args.epochs, ckpt_path)
    return ds, fp, dropped, splits


def _fresh_state(cfg: dict, fp: dict, args, threads_source: str) -> dict:
    import torch

    root = None
    if args.dataset.lower() != "synthetic":
        from ..data import default_data_root

        root = str(Path(args.data_root or default_data_root()).expanduser().resolve())
    command = "diffpool-fast " + " ".join(sys.argv[1:]) if sys.argv and "diffpool" in sys.argv[0] else None
    return {"version": CKPT_VERSION, "package_version": provenance.package_version(), "config": cfg,
            "dataset": fp, "runtime": {"threads": torch.get_num_threads(), "threads_source": threads_source,
                                       "data_root": root,
                                       "cache_dir": args.cache_dir, "command": command},
            "fold": 0, "epoch": 0, "model": None, "optimizer": None, "rng": None, "history": [],
            "fold_results": [], "elapsed": 0.0}


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..nn.model import cluster_counts
    from ..sparse_data import Level0Loader
    from .steps import CudaCapture, GraphSteps, deterministic

    _validate(args)
    dist = distributed.start(args)  # one process (a no-op) outside torchrun
    out = dist.same_everywhere(_output_dir(args))
    ckpt_path, metrics_path, results_path = out / CHECKPOINT, out / METRICS, out / RESULTS
    state = _open_run(args, out)
    dist.check_world(state, out)
    dist.barrier()  # every rank has looked at the folder before rank 0 writes in it
    cfg = _run_config(args)
    if args.norm == "batch" and args.bucket:
        print("diffpool-fast train: warning: --norm batch with size-bucketed batches: each batch's statistics "
              "come from graphs of one size, which biases them when the class correlates with size; "
              "consider --no-bucket or --norm none", file=sys.stderr)
    threads_source = set_threads(args.threads)
    if state is not None and args.threads is not None and "threads" not in (getattr(args, "explicit", None) or ()):
        # resume.keep_runtime set args.threads to the run's count: it came from where the run's came from
        threads_source = state["runtime"].get("threads_source", "the resumed run's count")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise UsageError("--backend triton needs --device cuda (Triton kernels run on CUDA tensors); use --backend torch or auto on CPU")
    device = dist.device(device)  # a rank's own GPU under torchrun
    if getattr(args, "link_loss", "frobenius") == "bce" and args.level0 == "sparse":
        raise UsageError("--link-loss bce needs every node pair: it has no edge-list form; use --level0 dense or auto "
                         "(auto is dense with bce)")
    if dist.active and args.level0 == "sparse":
        raise UsageError("--level0 sparse is not available with --nproc-per-node yet (the ranks' loaders are dense); "
                         "use --level0 dense or auto (auto is dense there)")

    created = _prepare_out(out)
    try:
        ds, fp, dropped, splits = _load_data(args, state, ckpt_path)
        if state is not None and state["model"] is not None:
            # Load the saved states into a model of this fold once before anything is written,
            # so that a checkpoint that does not fit is refused with the folder untouched.
            probe = _build_model(cfg, ds).to(device)
            resume.restore(probe, _adam(probe, args.lr, args.weight_decay), state, ckpt_path)
            del probe
    except UsageError:
        if created:
            try:
                out.rmdir()  # only when still empty
            except OSError:
                pass
        raise
    for note in (state or {}).pop("notes", []):
        print(f"diffpool-fast train: {note}", file=sys.stderr)
    removed = remove_stale_temps(out) if dist.writer else []
    if removed:
        print(f"diffpool-fast train: removed {len(removed)} temporary file(s) of an interrupted write in {out}/",
              file=sys.stderr)
    summary = ds.summary()
    summary["dropped_over_max_nodes"] = dropped

    if state is None:
        state = _fresh_state(cfg, fp, args, threads_source)
        state["fold"] = getattr(args, "only_fold", None) or 0  # fold_workers: a run of one fold
        dist.record(state)
        if dist.writer:
            _rewrite_metrics(metrics_path, [])
            save_checkpoint(ckpt_path, state)  # from here on, --resume --out alone continues the run
    elif dist.writer:
        # The checkpoint is the truth: drop CSV rows written after it (a crash between the two).
        _rewrite_metrics(metrics_path, state["history"])

    progress = {"auto": None, "on": False, "off": True}[args.progress] if dist.writer else True
    t_start = time.perf_counter() - state["elapsed"]
    epochs_this_run = 0
    stopped = False
    meta = {"dataset_summary": summary, "device": str(device)}
    if dist.writer:
        print(f"diffpool-fast train: {summary['name']}, {summary['graphs']} graphs, {summary['classes']} classes, "
              f"{summary['features']} features, max {summary['max_nodes']} nodes; {args.folds} fold(s) x {args.epochs} epochs "
              f"on {device}; writing {out}/" + (f" ({dist.world} ranks)" if dist.active else ""), file=sys.stderr)

    fold_bar = tqdm(total=len(splits), initial=state["fold"], desc="folds", unit="fold", disable=progress, position=0)
    # on CUDA: deterministic sums (--deterministic), batches built on the GPU, captured steps (--cuda-graphs)
    on_gpu = device.type == "cuda"
    graphs = on_gpu and not dist.active and getattr(args, "cuda_graphs", "off") == "on"
    if getattr(args, "cuda_graphs", "off") == "on" and not graphs and dist.writer:
        print("diffpool-fast train: --cuda-graphs on: " + ("not with --nproc-per-node" if on_gpu else "no CUDA device")
              + "; every step runs plain", file=sys.stderr)
    gpu_context = contextlib.ExitStack()
    gpu_context.enter_context(deterministic(device, getattr(args, "deterministic", "on") == "on"))
    try:
        last = len(splits) if getattr(args, "only_fold", None) is None else args.only_fold + 1
        train_epoch, evaluate = (dist.train_epoch, dist.evaluate) if dist.active else (_train_epoch, _evaluate)
        # --level0: dense or sparse (edge-list) batches, the same graphs in each (sparse_data.Level0Loader)
        level0 = "dense" if getattr(args, "link_loss", "frobenius") == "bce" else args.level0
        load = dist.loader if dist.active else functools.partial(Level0Loader, level0=level0, device=device,
                                                                 resident=on_gpu, pad_ladder=graphs)
        for fold in range(state["fold"], last):
            tr, va, te = splits[fold]
            train_loader = load(ds, tr, batch_size=args.batch_size, shuffle=True, bucket=args.bucket, seed=_seed_for(args.seed, fold, -2))
            val_loader = load(ds, va, batch_size=args.batch_size, bucket=args.bucket)
            test_loader = load(ds, te, batch_size=args.batch_size, bucket=args.bucket)
            torch.manual_seed(_seed_for(args.seed, fold, -1))
            model = _build_model(cfg, ds).to(device)
            opt = _adam(model, args.lr, args.weight_decay, capturable=graphs)
            steps = GraphSteps(model, opt, args.clip, CudaCapture(device)) if graphs else None
            start_epoch = 0
            if state["model"] is not None and state["fold"] == fold:
                resume.restore(model, opt, state, ckpt_path)
                start_epoch = state["epoch"]
            rows = [r for r in state["history"] if r["fold"] == fold + 1]
            ep_bar = tqdm(total=args.epochs, initial=start_epoch, desc=f"fold {fold + 1}/{len(splits)}", unit="ep",
                          leave=False, disable=progress, position=1)
            for epoch in range(start_epoch, args.epochs):
                if args.stop_after is not None and epochs_this_run >= args.stop_after:
                    stopped = True
                    break
                torch.manual_seed(_seed_for(args.seed, fold, epoch))
                t0 = time.perf_counter()
                try:
                    tm = train_epoch(model, opt, train_loader, epoch, device, args.clip,
                                     **({"steps": steps} if steps is not None else {}))
                except FloatingPointError as err:
                    raise UsageError(f"fold {fold + 1}: {err}: training diverged (try a smaller --lr, or --clip); "
                                     f"the checkpoint keeps the epochs before") from None
                t_train = time.perf_counter() - t0
                val_loss, val_acc = evaluate(model, val_loader, device)
                test_loss, test_acc = evaluate(model, test_loader, device)
                row = {"fold": fold + 1, "epoch": epoch + 1, "train_loss": tm["loss"], "train_ce": tm["ce"],
                       "train_link": tm["link"], "train_ent": tm["ent"], "train_acc": tm["acc"],
                       "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                       "train_seconds": t_train, "epoch_seconds": time.perf_counter() - t0}
                rows.append(row)
                state["history"].append(row)
                if dist.writer:
                    _append_metrics(metrics_path, row)
                state.update(fold=fold, epoch=epoch + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                             rng=rng_state(), elapsed=time.perf_counter() - t_start)
                if dist.writer:
                    save_checkpoint(ckpt_path, state)
                epochs_this_run += 1
                ep_bar.update(1)
                ep_bar.set_postfix(loss=f"{tm['loss']:.3f}", val=f"{val_acc:.3f}", test=f"{test_acc:.3f}")
            ep_bar.close()
            if stopped:
                break
            best = _select(rows)
            fres = {"fold": fold + 1, "test_acc": best["test_acc"], "best_epoch": best["epoch"],
                    "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
                    "final_test_acc": rows[-1]["test_acc"], "final_train_loss": rows[-1]["train_loss"],
                    "first_train_loss": rows[0]["train_loss"], "epochs": len(rows),
                    "train_seconds_per_epoch": sum(r["train_seconds"] for r in rows) / len(rows),
                    "epoch_seconds_mean": sum(r["epoch_seconds"] for r in rows) / len(rows),
                    "n_train": len(tr), "n_val": len(va), "n_test": len(te)}
            if steps is not None:
                fres["cuda_graphs"] = steps.summary()
            state["fold_results"].append(fres)
            # The finished fold's final model is kept (last_model) for users and for checking resume.
            state.update(fold=fold + 1, epoch=0, model=None, optimizer=None, rng=None, last_model=model.state_dict(),
                         elapsed=time.perf_counter() - t_start)
            if dist.writer:
                save_checkpoint(ckpt_path, state)
            fold_bar.update(1)
            fold_bar.set_postfix(test=f"{fres['test_acc']:.3f}")
            if dist.writer:
                tqdm.write(f"fold {fold + 1}/{len(splits)}: test acc {fres['test_acc']:.4f} at epoch {fres['best_epoch']} "
                           f"(val {fres['best_val_acc']:.4f}); train loss {fres['first_train_loss']:.4f} -> {fres['final_train_loss']:.4f}; "
                           f"{fres['train_seconds_per_epoch']:.2f} s/epoch", file=sys.stderr)
    finally:
        fold_bar.close()
        gpu_context.close()

    # every rank is done with collectives: meet once more, then leave the process group together
    # (a rank that exits while another still has the group open can take that one down with it)
    dist.barrier()
    dist.close()
    if not dist.writer:
        return 0
    if stopped:
        print(f"stopped after {epochs_this_run} epoch(s) (--stop-after); continue with --resume --out {out}", file=sys.stderr)
        return 0

    results = {
        "dataset": args.dataset,
        "protocol": PROTOCOL.format(k=args.folds, vf=args.val_fraction, epochs=args.epochs) if args.folds > 1 else
        f"one stratified split (10% test, {args.val_fraction:.0%} of the rest validation); "
        f"test accuracy at the epoch of best validation accuracy; {args.epochs} epochs",
        "folds": state["fold_results"],
        **_summarise(state["fold_results"]),
        "epochs": args.epochs,
        "total_seconds": time.perf_counter() - t_start,
        "config": cfg,
        "model": {"clusters": cfg["clusters"] or cluster_counts(ds.max_nodes, cfg["levels"], cfg["ratio"]), "max_nodes": ds.max_nodes},
        **meta,
        "dataset_fingerprint": fp,
        "machine": {**_machine(device), "threads_source": threads_source},
        "versions": _versions(),
        "command": state["runtime"].get("command"),
    }
    write_json(results_path, results)
    mean, std = results["test_acc_mean"], results["test_acc_std"]
    print(f"{args.dataset}: test accuracy {100 * mean:.2f} +- {100 * std:.2f} % over {len(state['fold_results'])} fold(s) "
          f"(at best validation epoch); {results['train_seconds_per_epoch_mean']:.2f} s/epoch; results in {results_path}")
    return 0
