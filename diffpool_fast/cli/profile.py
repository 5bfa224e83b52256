"""``diffpool-fast profile``: the command line of :mod:`diffpool_fast.profiling.run`.

Only the parser is here. List and size options (``--nodes 128,256``, ``--clusters 0.25``,
``--max-batch 8GiB``) stay strings: :mod:`diffpool_fast.profiling.options` parses and checks
them, so that a Python caller of the library gets the same checks, and a bad value is a
``UsageError`` (one line, exit 2).
"""
from __future__ import annotations

from ..profiling.costmodel import ADJ_DTYPES, ALL_BACKENDS, FLOAT_DTYPES, LOGITS, PROFILE_BACKENDS


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="time, throughput and peak memory of dense coarsening, backend by backend",
        description=_description(),
    )
    p.add_argument("--batch", type=int, default=None, help="graphs per batch (default: 16)")
    p.add_argument("--nodes", default=None,
                   help="padded nodes per graph: one value or a comma list (default: 128,256,512,1024)")
    p.add_argument("--clusters", default=None,
                   help="clusters: a count (128) or a ratio of nodes (0.25); at most --nodes (default: 0.25)")
    p.add_argument("--features", type=int, default=None, help="features per node (default: 64)")
    p.add_argument("--shapes", default=None, metavar="BxNxCxF,...",
                   help="explicit shapes instead of --batch/--nodes/--clusters/--features, e.g. 64x512x128x128,256x128x32x64; "
                        "a suffix :converged or :random fixes that shape's logits, :bool (or another dtype) its adjacency "
                        "dtype, e.g. 64x512x128x128:converged (default: off)")
    p.add_argument("--logits", default="random",
                   help=f"generated assignment logits, {' or '.join(LOGITS)} or both comma-separated: converged = 12 one-hot + "
                        "0.1 noise with a same-cluster adjacency (default: %(default)s)")
    p.add_argument("--precision", default=None,
                   help="torch.set_float32_matmul_precision settings to measure each shape under, e.g. highest,high; a "
                        "precision column in the CSV (default: leave the setting in force, and record it)")
    p.add_argument("--dtype", default="float32",
                   help=f"x and s dtype: {', '.join(FLOAT_DTYPES)} (default: %(default)s)")
    p.add_argument("--adj-dtype", default="same",
                   help=f"adjacency dtype: same (as --dtype) or one of {', '.join(ADJ_DTYPES)} (default: %(default)s)")
    p.add_argument("--mode", default="full", help="fwd, bwd, full, or a comma list (default: %(default)s)")
    p.add_argument("--backend", default="all",
                   help=f"{', '.join(PROFILE_BACKENDS)}, all ({','.join(ALL_BACKENDS)}), or a comma list; auto = "
                        "dense_diff_pool's default backend, labelled with the path it picked; pyg-compiled (or compile) = "
                        "torch.compile of PyG, compiled once per shape, compile time (compile_s) reported apart (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per backend (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="edge probability (default: %(default)s)")
    p.add_argument("--adj-symmetric", action="store_true",
                   help="tell our backends the (generated, undirected) adjacency is symmetric: "
                        "dense_diff_pool(..., adj_symmetric=True), no backward pass over adj (default: off)")
    p.add_argument("--no-mask", action="store_true",
                   help="no padding mask (default: a mask; graphs of N/2..N real nodes, padded to N)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, here and in the memory workers (default: torch's, lowered to the "
                        "cores other processes leave idle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/profile-<time>)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (default: measure it)")
    p.add_argument("--accuracy", action="store_true",
                   help="also measure each backend's relative Frobenius error (out, out_adj, link, ent, grad x, grad s) "
                        "against PyG's formulas in float64 on the same inputs: error columns and accuracy.csv (default: off)")
    p.add_argument("--compile-limit", type=int, default=None, metavar="K",
                   help="compile PyG (pyg-compiled) for the first K shapes only, the others skipped with a note; "
                        "each compile takes seconds (default: every shape)")
    p.add_argument("--write-dispatch", default=None, metavar="PATH",
                   help="write the faster of ours (torch, triton) per shape bucket, from the full-mode timings, into the "
                        "dispatch table at PATH as this GPU capability's section (diffpool_fast/ops/dispatch_table.json is "
                        "the one the package reads); needs --device cuda, --mode full, --backend with torch and triton (default: off)")
    p.add_argument("--max-batch", default=None, metavar="BYTES",
                   help="also find the largest batch each backend fits in BYTES, e.g. 8GiB (default: off)")
    p.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s",
                   help="device bandwidth for the floor (default: datasheet on known GPUs, "
                        "measured otherwise)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TF/s",
                   help="device matmul rate for the floor (default: as for --peak-bandwidth)")
    p.add_argument("--from-csv", default=None, metavar="CSV",
                   help="only redraw profile.md and the plots from an earlier profile.csv "
                        "into --out (default: off; --out defaults to the CSV's folder)")
    p.add_argument("--model", action="store_true",
                   help="time a training step (forward, backward, Adam) of the full DiffPool "
                        "classifier instead: --nodes is the largest graph, --features the input "
                        "channels; see also --graphs, --min-nodes, --classes, --hidden (default: off)")
    p.add_argument("--graphs", type=int, default=None,
                   help="--model: graphs per batch (default: --batch)")
    p.add_argument("--min-nodes", type=int, default=None,
                   help="--model: smallest graph (default: half of the largest)")
    p.add_argument("--classes", type=int, default=2, help="--model: classes (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="--model: hidden channels (default: %(default)s)")
    p.set_defaults(func=_run)


def _description() -> str:
    from ..profiling import run

    return run.__doc__.split("\n\n")[0].replace("``", "") + " Writes CSV, markdown and PNG plots to --out."


def _run(args) -> int:
    from ..profiling.run import run

    return run(args)
