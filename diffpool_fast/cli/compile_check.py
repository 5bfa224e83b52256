"""``diffpool-fast compile-check``: the command line of :mod:`diffpool_fast.profiling.compile_check`."""
from __future__ import annotations

import os

from ..profiling.compile_check import TARGETS


def register(sub) -> None:
    p = sub.add_parser(
        "compile-check",
        help="compile every Triton kernel configuration for sm_80 and sm_90 (no GPU needed)",
        description=_description(),
    )
    p.add_argument("--quick", action="store_true",
                   help="fp32 (and uint8 adjacency) specialisations only: every block "
                        "configuration, fewer dtypes (default: off)")
    p.add_argument("--representative", action="store_true",
                   help="per kernel: smallest, C_PAD=128 and largest configuration, fp32 (what "
                        "CI runs) (default: off)")
    p.add_argument("--kernel", action="append", default=None, metavar="NAME",
                   help="only kernels whose name contains NAME, repeatable (default: every kernel)")
    p.add_argument("--target", type=int, action="append", choices=TARGETS, default=None,
                   help="compute capability to compile for, repeatable (default: 80 and 90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel compiles (default: the CPU count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar)")
    p.set_defaults(func=_run)


def _description() -> str:
    from ..profiling import compile_check

    return compile_check.__doc__.split("\n\n", 1)[1]


def _run(args) -> int:
    from ..profiling.compile_check import run

    return run(args)
