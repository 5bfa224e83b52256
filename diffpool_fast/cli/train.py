"""``diffpool-fast train``: the command line of :mod:`diffpool_fast.train.loop`.

Every option records, when it is given, its name in ``args.explicit`` (:class:`_Given`): argparse
alone cannot tell an option given with its default value from one left out, and ``--resume``
needs to know which options the command line named (those must agree with the saved run; the
rest are taken from it).
"""
from __future__ import annotations

import argparse
import math

from ..config import CACHE_ENV, DATA_ROOT_ENV


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(v):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}") from None
        return v
    return parse


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}") from None
    return v


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _nonneg_float(text):
    v = _number(text)
    if v < 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _finite_float(text):
    v = _number(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _int_list(text):
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}") from None
    return vals


#: the attribute holding the destinations of the options the command line gave
EXPLICIT = "explicit"


class _Given(argparse.Action):
    """``store`` (or, with ``nargs=0``, ``store_const``: the flags) that also adds its
    destination to ``namespace.explicit``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, EXPLICIT, frozenset(getattr(namespace, EXPLICIT, None) or ()) | {self.dest})


def _flag(group, *names, dest, value, help):
    """A flag that sets ``dest`` to ``value`` (default: ``not value``)."""
    group.add_argument(*names, dest=dest, action=_Given, nargs=0, const=value, default=not value, help=help)


def _opt(group, *names, **kw):
    group.add_argument(*names, action=_Given, **kw)


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a DiffPool classifier with stratified K-fold cross-validation",
        description=(
            "Train a hierarchical DiffPool graph classifier on the built-in generated dataset "
            "(default) or a TU dataset, with stratified K-fold cross-validation, per-epoch "
            "metrics (CSV), atomic checkpoints and exact --resume. --resume --out DIR takes "
            "every option from the saved run: options given again must agree with it, except "
            "--threads, --progress, --stop-after, --data-root, --cache-dir and --download."
        ),
    )
    d = p.add_argument_group("data")
    _opt(d, "--dataset", default="synthetic", help="'synthetic' (generated, no download) or a TU dataset name (MUTAG, PROTEINS, ENZYMES, NCI1, IMDB-BINARY, DD, ...) (default: synthetic)")
    _opt(d, "--data-root", default=None, help=f"folder holding NAME/NAME_A.txt ... (default: ${DATA_ROOT_ENV} or ./data; on --resume, the run's)")
    _opt(d, "--cache-dir", default=None, help=f"writable cache for processed TU files, keyed by their content (default: ${CACHE_ENV} or ~/.cache/diffpool_fast)")
    _flag(d, "--download", dest="download", value=True, help="let torch_geometric download a TU dataset missing from --data-root (default: off)")
    _flag(d, "--node-attr", dest="node_attr", value=True, help="also use continuous node attributes (standardised), e.g. ENZYMES' 18 (default: off)")
    _opt(d, "--max-nodes", type=_positive(int), default=None, help="drop graphs with more nodes (PyG's example uses 150) (default: keep all)")
    _opt(d, "--synthetic-graphs", type=_positive(int), default=600, help="graphs in the generated dataset (default: %(default)s)")
    _flag(d, "--no-bucket", dest="bucket", value=False, help="plain random batches instead of size-bucketed ones (default: size-bucketed)")

    t = p.add_argument_group("training")
    _opt(t, "--folds", type=_positive(int), default=1, help="K of stratified K-fold CV (10 in the paper); 1 = one stratified split (default: %(default)s)")
    _opt(t, "--epochs", type=_positive(int), default=20, help="epochs per fold (default: %(default)s)")
    _opt(t, "--batch-size", type=_positive(int), default=20, help="graphs per batch (default: %(default)s)")
    _opt(t, "--lr", type=_positive(float), default=1e-3, help="Adam learning rate (default: %(default)s)")
    _opt(t, "--weight-decay", type=_nonneg_float, default=0.0, help="Adam weight decay (default: %(default)s)")
    _opt(t, "--clip", type=_nonneg_float, default=2.0, help="gradient-norm clip (0 = none), as the DiffPool code (default: %(default)s)")
    _opt(t, "--val-fraction", type=_finite_float, default=0.1, help="stratified share of the training folds held out for model selection (default: %(default)s)")
    _opt(t, "--seed", type=_nonneg_int, default=0, help="seed of the folds, the generated data, the initialisation and the batch order; any integer >= 0 (default: %(default)s)")
    _opt(t, "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available (default: %(default)s)")
    _opt(t, "--backend", choices=("auto", "torch", "triton"), default="auto", help="coarsening backend of dense_diff_pool (default: %(default)s)")
    _opt(t, "--level0", choices=("auto", "dense", "sparse"), default="auto",
         help="level 0 on padded dense batches, or on edge lists without padding (PyG's sparse form: O(E) memory, "
              "no N x N tensor); auto: edge lists for the batches where they are faster (CPU, padded to "
              "256 nodes or more, at most 5%% of the adjacency nonzero; DIFFPOOL_FAST_SPARSE=0/1 forces "
              "dense/sparse) (default: %(default)s)")
    _opt(t, "--threads", type=_positive(int), default=None,
         help="torch CPU threads (default: $OMP_NUM_THREADS if set, else min(usable CPUs, 4), never from the machine's "
              "load, since the count changes a run's numbers; results.json records it; on --resume, the run's)")
    _opt(t, "--deterministic", choices=("on", "off"), default="on",
         help="on CUDA, deterministic sums (torch.use_deterministic_algorithms: sorted segment sums instead of "
              "atomics in the edge-list level 0 and the index/scatter backward passes), so that two runs with one "
              "seed, and a resumed run, are bit for bit the same; off: CUDA runs differ at rounding level. No effect "
              "on CPU, whose kernels are deterministic at a fixed thread count (default: %(default)s)")
    _opt(t, "--cuda-graphs", choices=("on", "off"), default="off",
         help="on CUDA, capture each batch shape's training step (forward, backward, Adam) as one CUDA graph and "
              "replay it: batches padded to a few sizes, cluster widths from the padded size; a shape whose step "
              "cannot be captured runs plain, with the reason printed. Off until measured on a GPU "
              "(bench/scripts/gpu_train.py) (default: %(default)s)")

    m = p.add_argument_group("model")
    _opt(m, "--gnn", choices=("sage", "gcn", "gin"), default="sage", help="GNN layer (default: %(default)s)")
    _opt(m, "--levels", type=int, default=2, help="pooling levels (default: %(default)s)")
    _opt(m, "--ratio", type=_finite_float, default=0.25, help="clusters per level: ceil(ratio * previous), from the largest graph (default: %(default)s)")
    _opt(m, "--clusters", type=_int_list, default=None, help="explicit clusters per level, e.g. 38,10; overrides --levels/--ratio (default: from --ratio)")
    _opt(m, "--hidden", type=_positive(int), default=64, help="GNN and head width (default: %(default)s)")
    _opt(m, "--layers", type=_positive(int), default=3, help="GNN layers per block (default: %(default)s)")
    _flag(m, "--no-jk", dest="jk", value=False, help="use only the last GNN layer's output (default: concatenate all layers' outputs)")
    _opt(m, "--readout", choices=("mean", "max", "sum"), default="mean", help="readout over nodes (default: %(default)s)")
    _opt(m, "--readout-levels", choices=("last", "all"), default="last", help="read out the last level only, or every level (default: %(default)s)")
    _opt(m, "--dropout", type=_finite_float, default=0.0, help="dropout on the readout and in the head (default: %(default)s)")
    _opt(m, "--norm", choices=("batch", "layer", "none"), default="none",
         help="normalisation after each GNN layer: batch norm over real nodes, per-node layer norm, or none. "
              "Batch norm with size-bucketed batches (the default batching) is biased when the class "
              "correlates with graph size (PROTEINS, MUTAG): use it with --no-bucket. Note: the "
              "DiffPoolClassifier class defaults to batch norm (batch_norm=True); this command to none "
              "(default: %(default)s)")
    _opt(m, "--link-weight", type=_nonneg_float, default=1.0, help="weight of the link-prediction loss (default: %(default)s)")
    _opt(m, "--ent-weight", type=_nonneg_float, default=1.0, help="weight of the assignment-entropy loss (default: %(default)s)")
    _opt(m, "--link-norm", choices=("graph", "numel", "none"), default="graph", help="link-loss scaling (dense_diff_pool's normalize) (default: %(default)s)")
    _opt(m, "--link-loss", choices=("frobenius", "bce"), default="frobenius",
         help="link loss: ||A - S S^T||_F (PyG's), or at level 0 the DiffPool authors' binary cross-entropy of "
              "min(S S^T, 1) against the input graph over real node pairs (levels >= 1 keep frobenius: their coarsened "
              "graphs are weighted; level 0 stays dense) (default: %(default)s)")
    m.add_argument("--clusters-per-graph", dest="clusters_per_graph", action=_Given, nargs=0, const=True, default=True,
                   help="each graph its own clusters per level, ceil(ratio * its nodes), at most the level's count; a "
                        "batch is as wide as its largest graph needs, levels >= 1 masked (default: on, chosen by the "
                        "declared study in bench/accuracy/clusters/)")
    _flag(m, "--fixed-clusters", dest="clusters_per_graph", value=False,
          help="the paper's fixed cluster count per level for every graph (default: off)")

    o = p.add_argument_group("output")
    _opt(o, "--out", default=None, help="output folder (default: a new runs/<dataset>/<date-time>/)")
    _flag(o, "--resume", dest="resume", value=True,
          help="continue the interrupted run in --out with its saved options (without --out: the latest under "
               "runs/<dataset>/) (default: off)")
    _opt(o, "--stop-after", type=_positive(int), default=None, help="stop after this many epochs in this invocation (checkpointed; continue with --resume) (default: no limit)")
    _opt(o, "--progress", choices=("auto", "on", "off"), default="auto", help="progress bars; auto: only on a terminal (default: %(default)s)")
    par = p.add_argument_group("parallel (torch.distributed; see the README)")
    _opt(par, "--nproc-per-node", type=_positive(int), default=None,
         help="data-parallel training in K processes on this machine (DistributedDataParallel, gloo on CPU, NCCL "
              "on CUDA), run through torchrun; --batch-size is per rank. The command also runs under torchrun "
              "directly (several machines) (default: one process)")
    _opt(par, "--fold-workers", type=_positive(int), default=None,
         help="train the folds in K worker processes, one fold each at a time, max(1, cores // K) threads each "
              "unless --threads; the same results as the sequential run (default: one process)")
    p.set_defaults(func=_run, **{EXPLICIT: frozenset()})


def _run(args) -> int:
    from ..train.parallel import dispatch

    return dispatch(args)
