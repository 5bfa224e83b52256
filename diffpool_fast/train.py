"""``diffpool-fast train``: DiffPool graph classification with stratified K-fold cross-validation.

Protocol (stated in every results.json): the graphs are dealt into K stratified folds. For fold
k, fold k is the test set; from the other K-1 folds a stratified ``--val-fraction`` is held out
for validation and the rest trains the model for ``--epochs`` epochs. After every epoch the
model is evaluated on validation and test; the fold's reported accuracy is the test accuracy at
the epoch with the best validation accuracy (ties: lower validation loss, then the earlier
epoch). The test fold never influences training or the choice of epoch. ``--folds 1`` is one
stratified split: 10% test, then ``--val-fraction`` of the rest for validation.

Every epoch appends a row to ``OUT/metrics.csv`` (flushed) and rewrites ``OUT/checkpoint.pt``
atomically (temp file + os.replace): model, optimizer, RNG states, fold, epoch and all metrics so
far. Each epoch's batch order and dropout draw from (seed, fold, epoch) only, so ``--resume``
continues an interrupted run to bit-for-bit the result of an uninterrupted one (same machine,
same thread count). ``OUT/results.json`` holds per-fold and mean +- std test accuracy (std over
folds, ddof=0), epochs, time per epoch and the full configuration.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
RESULTS = "results.json"
CKPT_VERSION = 1

METRIC_FIELDS = [
    "fold", "epoch", "train_loss", "train_ce", "train_link", "train_ent", "train_acc",
    "val_loss", "val_acc", "test_loss", "test_acc", "train_seconds", "epoch_seconds",
]

# Options that do not change what a run computes: they may differ between a run and its resume.
_RUNTIME_ONLY = {"out", "resume", "stop_after", "progress", "func", "command", "threads", "data_root", "cache_dir", "download"}

PROTOCOL = (
    "stratified {k}-fold cross-validation; in each fold a stratified {vf:.0%} of the training "
    "folds is held out for validation; test accuracy reported at the epoch of best validation "
    "accuracy (ties: lower validation loss, then earlier epoch); {epochs} epochs per fold"
)


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if v < 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _int_list(text):
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def register(sub) -> None:
    from .data import DATA_ROOT_ENV, CACHE_ENV

    p = sub.add_parser(
        "train",
        help="train a DiffPool classifier with stratified K-fold cross-validation",
        description=(
            "Train a hierarchical DiffPool graph classifier on the built-in generated dataset "
            "(default) or a TU dataset, with stratified K-fold cross-validation, per-epoch "
            "metrics (CSV), atomic checkpoints and exact --resume."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="synthetic", help="'synthetic' (generated, no download) or a TU dataset name (MUTAG, PROTEINS, ENZYMES, NCI1, IMDB-BINARY, DD, ...)")
    d.add_argument("--data-root", default=None, help=f"folder holding NAME/NAME_A.txt ... (default: ${DATA_ROOT_ENV} or ./data)")
    d.add_argument("--cache-dir", default=None, help=f"writable cache for processed TU files (default: ${CACHE_ENV} or ~/.cache/diffpool_fast)")
    d.add_argument("--download", action="store_true", help="let torch_geometric download a TU dataset missing from --data-root")
    d.add_argument("--node-attr", action="store_true", help="also use continuous node attributes (standardised), e.g. ENZYMES' 18")
    d.add_argument("--max-nodes", type=_positive(int), default=None, help="drop graphs with more nodes (PyG's example uses 150); default keeps all")
    d.add_argument("--synthetic-graphs", type=_positive(int), default=600, help="graphs in the generated dataset")
    d.add_argument("--no-bucket", dest="bucket", action="store_false", help="plain random batches instead of size-bucketed ones")

    t = p.add_argument_group("training")
    t.add_argument("--folds", type=_positive(int), default=1, help="K of stratified K-fold CV (10 in the paper); 1 = one stratified split")
    t.add_argument("--epochs", type=_positive(int), default=20)
    t.add_argument("--batch-size", type=_positive(int), default=20)
    t.add_argument("--lr", type=_positive(float), default=1e-3)
    t.add_argument("--weight-decay", type=_nonneg_float, default=0.0)
    t.add_argument("--clip", type=_nonneg_float, default=2.0, help="gradient-norm clip (0 = none), as the DiffPool code")
    t.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of the training folds held out for model selection")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="coarsening backend of dense_diff_pool")
    t.add_argument("--threads", type=_positive(int), default=None,
                   help="torch CPU threads (default: torch's choice, lowered to the cores other processes leave idle)")

    m = p.add_argument_group("model")
    m.add_argument("--gnn", choices=("sage", "gcn", "gin"), default="sage")
    m.add_argument("--levels", type=int, default=2, help="pooling levels")
    m.add_argument("--ratio", type=float, default=0.25, help="clusters per level: ceil(ratio * previous), from the largest graph")
    m.add_argument("--clusters", type=_int_list, default=None, help="explicit clusters per level, e.g. 38,10 (overrides --levels/--ratio)")
    m.add_argument("--hidden", type=_positive(int), default=64)
    m.add_argument("--layers", type=_positive(int), default=3, help="GNN layers per block")
    m.add_argument("--no-jk", dest="jk", action="store_false", help="use only the last GNN layer's output (default concatenates all)")
    m.add_argument("--readout", choices=("mean", "max", "sum"), default="mean")
    m.add_argument("--readout-levels", choices=("last", "all"), default="last")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--norm", choices=("batch", "layer", "none"), default="none",
                   help="normalisation after each GNN layer: batch norm over real nodes, per-node layer norm, or none. "
                        "Batch norm with size-bucketed batches (the default batching) is biased when the class "
                        "correlates with graph size (PROTEINS, MUTAG): use it with --no-bucket")
    m.add_argument("--link-weight", type=_nonneg_float, default=1.0)
    m.add_argument("--ent-weight", type=_nonneg_float, default=1.0)
    m.add_argument("--link-norm", choices=("graph", "numel", "none"), default="graph", help="link-loss scaling (dense_diff_pool's normalize)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default: a new runs/<dataset>/<date-time>/)")
    o.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (without --out: the latest under runs/<dataset>/)")
    o.add_argument("--stop-after", type=_positive(int), default=None, help="stop after this many epochs in this invocation (checkpointed; continue with --resume)")
    o.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bars (auto: only on a terminal)")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- helpers

def _validate(args) -> None:
    from .cli import CLIError

    if not 0.0 < args.val_fraction < 0.5:
        raise CLIError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    if not 0.0 <= args.dropout < 1.0:
        raise CLIError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 < args.ratio <= 1.0:
        raise CLIError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.levels < 0:
        raise CLIError(f"--levels must be >= 0, got {args.levels}")


def auto_threads(default: int, cpu_count: int, load: float) -> int:
    """Torch threads when ``--threads`` is not given: torch's ``default``, lowered to the cores
    the other runnable processes leave idle (``cpu_count - round(load)``, at least 1). On a
    2-core machine beside one busy process, two spinning OpenMP threads made an epoch of the
    generated dataset 3x to 45x slower than one thread (bench/threads_under_load.md); with no
    other process, one thread instead of two costs about 10% there.
    """
    return max(1, min(default, cpu_count - int(round(load))))


def _fit_threads_to_load() -> None:
    import torch

    if os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
        return  # the user chose, or no load figure on this platform
    default = torch.get_num_threads()
    load = os.getloadavg()[0]
    n = auto_threads(default, os.cpu_count() or default, load)
    if n < default:
        print(f"diffpool-fast train: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): "
              f"using {n} torch thread(s) instead of {default} (--threads N to choose)", file=sys.stderr)
        torch.set_num_threads(n)


def _adam(model, lr, weight_decay):
    """Adam with the fused (one kernel over all parameters) implementation where this torch has
    it for the parameters' device: the same update; for this model's ~80 small parameter tensors
    the PROTEINS training step is 16.9 instead of 19.1 ms on 2 CPU threads
    (bench/train_step_variants.md). Falls back to the default one."""
    import torch

    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def _seed_for(seed: int, fold: int, epoch: int) -> int:
    # Distinct, reproducible streams per (fold, epoch); epoch -1 is the fold's initialisation.
    return (int(seed) * 1_000_003 + (fold + 1) * 10_007 + (epoch + 2)) % (2**63 - 1)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    _atomic_write_bytes(path, lambda f: torch.save(state, f))


def _write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    _atomic_write_bytes(path, lambda f: f.write(data))


def _run_config(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _RUNTIME_ONLY}


def _rng_state():
    import random

    import numpy as np
    import torch

    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _versions() -> dict:
    """The installed versions ``diffpool-fast profile`` records, and numpy's."""
    import numpy as np

    from .profile import versions

    return {**versions(), "numpy": np.__version__}


def _machine(device) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _build_model(cfg: dict, ds):
    from .model import DiffPoolClassifier

    return DiffPoolClassifier(
        ds.num_features, ds.num_classes, max_nodes=ds.max_nodes, num_levels=cfg["levels"],
        ratio=cfg["ratio"], clusters=cfg["clusters"], hidden=cfg["hidden"], gnn=cfg["gnn"],
        layers=cfg["layers"], jk=cfg["jk"], readout=cfg["readout"], readout_levels=cfg["readout_levels"],
        dropout=cfg["dropout"], batch_norm=cfg["norm"], link_weight=cfg["link_weight"],
        ent_weight=cfg["ent_weight"], link_norm=cfg["link_norm"], backend=cfg["backend"],
        adj_symmetric=True if ds.undirected else None,
    )


def _evaluate(model, loader, device):
    import torch
    import torch.nn.functional as F

    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for b in loader.epoch():
            b = b.to(device)
            logits, _ = model(b.x, b.adj, b.mask)
            loss_sum += float(F.cross_entropy(logits, b.y, reduction="sum"))
            correct += int((logits.argmax(-1) == b.y).sum())
            total += b.y.numel()
    return (loss_sum / max(total, 1), correct / max(total, 1))


def _train_epoch(model, opt, loader, epoch, device, clip):
    import torch
    import torch.nn.functional as F

    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "link": 0.0, "ent": 0.0}
    correct = total = 0
    for b in loader.epoch(epoch):
        b = b.to(device)
        opt.zero_grad(set_to_none=True)
        logits, aux, terms = model(b.x, b.adj, b.mask, return_terms=True)
        ce = F.cross_entropy(logits, b.y)
        loss = ce + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch + 1}")
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        n = b.y.numel()
        total += n
        sums["loss"] += float(loss.detach()) * n
        sums["ce"] += float(ce.detach()) * n
        sums["link"] += float(terms["link"].detach()) * n
        sums["ent"] += float(terms["ent"].detach()) * n
        correct += int((logits.detach().argmax(-1) == b.y).sum())
    out = {k: v / max(total, 1) for k, v in sums.items()}
    out["acc"] = correct / max(total, 1)
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

    from .data import stratified_folds, stratified_split

    if k == 1:
        rest, test = stratified_split(torch.arange(len(ds)), ds.y, 0.1, seed)
        tests = [test]
        trains = [rest]
    else:
        if k > len(ds):
            from .cli import CLIError

            raise CLIError(f"--folds {k} needs at least {k} graphs, the dataset has {len(ds)}")
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
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in METRIC_FIELDS})


def _output_dir(args) -> Path:
    """--out, or a new runs/<dataset>/<timestamp>/ (with --resume: the latest one there)."""
    from .cli import CLIError

    if args.out:
        return Path(args.out)
    base = Path("runs") / args.dataset
    if args.resume:
        runs = sorted(p for p in base.glob("*/") if (p / CHECKPOINT).is_file()) if base.is_dir() else []
        if not runs:
            raise CLIError(f"--resume: no run with a checkpoint under {base}/; pass --out DIR")
        return runs[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, k = base / stamp, 1
    while out.exists():
        k += 1
        out = base / f"{stamp}-{k}"
    return out


# --------------------------------------------------------------------------- main

def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .cli import CLIError
    from .data import DatasetError, DenseLoader, load_dataset
    from .model import cluster_counts

    _validate(args)
    if args.norm == "batch" and args.bucket:
        print("diffpool-fast train: warning: --norm batch with size-bucketed batches: each batch's statistics "
              "come from graphs of one size, which biases them when the class correlates with size; "
              "consider --no-bucket or --norm none", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        _fit_threads_to_load()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise CLIError("--backend triton needs --device cuda (Triton kernels run on CUDA tensors); use --backend torch or auto on CPU")

    out = _output_dir(args)
    ckpt_path, metrics_path, results_path = out / CHECKPOINT, out / METRICS, out / RESULTS
    cfg = _run_config(args)

    state = None
    if args.resume:
        if not ckpt_path.is_file():
            raise CLIError(f"--resume: no checkpoint at {ckpt_path}")
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CLIError(f"--resume: cannot read {ckpt_path}: {type(err).__name__}: {err}")
        if state.get("version") != CKPT_VERSION:
            raise CLIError(f"--resume: {ckpt_path} has checkpoint version {state.get('version')}, expected {CKPT_VERSION}")
        diff = {k: (state["config"].get(k), v) for k, v in cfg.items() if state["config"].get(k) != v}
        if diff:
            text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CLIError(f"--resume: the options differ from the run in {out} ({text}); rerun with the same options")
    elif ckpt_path.exists() or results_path.exists():
        raise CLIError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    try:
        ds = load_dataset(args.dataset, args.data_root, cache_dir=args.cache_dir, node_attr=args.node_attr,
                          download=args.download, synthetic_graphs=args.synthetic_graphs, seed=args.seed)
    except DatasetError as err:
        raise CLIError(str(err))
    dropped = 0
    if args.max_nodes is not None:
        keep = [i for i in range(len(ds)) if int(ds.num_nodes[i]) <= args.max_nodes]
        dropped = len(ds) - len(keep)
        ds = ds.subset(keep)
        if len(ds) == 0:
            raise CLIError(f"--max-nodes {args.max_nodes} drops every graph")
    if len(ds) < 3:
        raise CLIError(f"dataset {args.dataset!r} has {len(ds)} graphs, too few to split")

    out.mkdir(parents=True, exist_ok=True)
    splits = _fold_splits(ds, args.folds, args.val_fraction, args.seed)
    summary = ds.summary()
    summary["dropped_over_max_nodes"] = dropped

    if state is None:
        state = {"version": CKPT_VERSION, "config": cfg, "fold": 0, "epoch": 0, "model": None,
                 "optimizer": None, "rng": None, "history": [], "fold_results": [], "elapsed": 0.0}
        _rewrite_metrics(metrics_path, [])
    else:
        # The checkpoint is the truth: drop CSV rows written after it (a crash between the two).
        _rewrite_metrics(metrics_path, state["history"])

    progress = {"auto": None, "on": False, "off": True}[args.progress]
    t_start = time.perf_counter() - state["elapsed"]
    epochs_this_run = 0
    stopped = False
    meta = {"dataset_summary": summary, "device": str(device)}
    print(f"diffpool-fast train: {summary['name']}, {summary['graphs']} graphs, {summary['classes']} classes, "
          f"{summary['features']} features, max {summary['max_nodes']} nodes; {args.folds} fold(s) x {args.epochs} epochs "
          f"on {device}; writing {out}/", file=sys.stderr)

    fold_bar = tqdm(total=len(splits), initial=state["fold"], desc="folds", unit="fold", disable=progress, position=0)
    try:
        for fold in range(state["fold"], len(splits)):
            tr, va, te = splits[fold]
            train_loader = DenseLoader(ds, tr, batch_size=args.batch_size, shuffle=True, bucket=args.bucket, seed=_seed_for(args.seed, fold, -2))
            val_loader = DenseLoader(ds, va, batch_size=args.batch_size, bucket=args.bucket)
            test_loader = DenseLoader(ds, te, batch_size=args.batch_size, bucket=args.bucket)
            torch.manual_seed(_seed_for(args.seed, fold, -1))
            model = _build_model(cfg, ds).to(device)
            opt = _adam(model, args.lr, args.weight_decay)
            start_epoch = 0
            if state["model"] is not None and state["fold"] == fold:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                _set_rng_state(state["rng"])
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
                tm = _train_epoch(model, opt, train_loader, epoch, device, args.clip)
                t_train = time.perf_counter() - t0
                val_loss, val_acc = _evaluate(model, val_loader, device)
                test_loss, test_acc = _evaluate(model, test_loader, device)
                row = {"fold": fold + 1, "epoch": epoch + 1, "train_loss": tm["loss"], "train_ce": tm["ce"],
                       "train_link": tm["link"], "train_ent": tm["ent"], "train_acc": tm["acc"],
                       "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                       "train_seconds": t_train, "epoch_seconds": time.perf_counter() - t0}
                rows.append(row)
                state["history"].append(row)
                with open(metrics_path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow({k: row[k] for k in METRIC_FIELDS})
                    f.flush()
                state.update(fold=fold, epoch=epoch + 1, model=model.state_dict(), optimizer=opt.state_dict(),
                             rng=_rng_state(), elapsed=time.perf_counter() - t_start)
                _save_checkpoint(ckpt_path, state)
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
            state["fold_results"].append(fres)
            # The finished fold's final model is kept (last_model) for users and for checking resume.
            state.update(fold=fold + 1, epoch=0, model=None, optimizer=None, last_model=model.state_dict(),
                         elapsed=time.perf_counter() - t_start)
            _save_checkpoint(ckpt_path, state)
            fold_bar.update(1)
            fold_bar.set_postfix(test=f"{fres['test_acc']:.3f}")
            tqdm.write(f"fold {fold + 1}/{len(splits)}: test acc {fres['test_acc']:.4f} at epoch {fres['best_epoch']} "
                       f"(val {fres['best_val_acc']:.4f}); train loss {fres['first_train_loss']:.4f} -> {fres['final_train_loss']:.4f}; "
                       f"{fres['train_seconds_per_epoch']:.2f} s/epoch", file=sys.stderr)
    finally:
        fold_bar.close()

    if stopped:
        print(f"stopped after {epochs_this_run} epoch(s) (--stop-after); continue with --resume --out {out}", file=sys.stderr)
        return 0

    results = {
        "dataset": args.dataset,
        "protocol": PROTOCOL.format(k=args.folds, vf=args.val_fraction, epochs=args.epochs) if args.folds > 1 else
        f"one stratified split (10% test, {args.val_fraction:.0%} of the rest validation); test accuracy at the epoch of best validation accuracy; {args.epochs} epochs",
        "folds": state["fold_results"],
        **_summarise(state["fold_results"]),
        "epochs": args.epochs,
        "total_seconds": time.perf_counter() - t_start,
        "config": cfg,
        "model": {"clusters": cfg["clusters"] or cluster_counts(ds.max_nodes, cfg["levels"], cfg["ratio"]), "max_nodes": ds.max_nodes},
        **meta,
        "machine": _machine(device),
        "versions": _versions(),
        "command": "diffpool-fast " + " ".join(sys.argv[1:]) if sys.argv and "diffpool" in sys.argv[0] else None,
    }
    _write_json(results_path, results)
    mean, std = results["test_acc_mean"], results["test_acc_std"]
    print(f"{args.dataset}: test accuracy {100 * mean:.2f} +- {100 * std:.2f} % over {len(state['fold_results'])} fold(s) "
          f"(at best validation epoch); {results['train_seconds_per_epoch_mean']:.2f} s/epoch; results in {results_path}")
    return 0
