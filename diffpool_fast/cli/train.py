"""``diffpool-fast train``: the command line of :mod:`diffpool_fast.train.loop`."""
from __future__ import annotations

import argparse
import math

from ..config import CACHE_ENV, DATA_ROOT_ENV


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
    p.set_defaults(func=_run)



def _run(args) -> int:
    from ..train.loop import run

    return run(args)
