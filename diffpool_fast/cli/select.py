"""``diffpool-fast select``: the command line of :mod:`diffpool_fast.train.select`."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("select", help="pick between finished train runs per fold by validation accuracy",
                       description=_description())
    p.add_argument("runs", nargs="+", metavar="RUN", help="train --out folders (or their results.json)")
    p.add_argument("--out", default=None, help="also write the table as markdown to this file (default: terminal only)")
    p.add_argument("--json", default=None,
                   help="write the selection (per fold, candidates) as JSON to this file (default: none)")
    p.set_defaults(func=_run)


def _description() -> str:
    from ..train import select

    return select.__doc__.split("\n\n", 1)[1]


def _run(args) -> int:
    from ..train.select import run

    return run(args)
