"""``diffpool-fast``: the command-line entry point.

The CLI is argparse only. Each subcommand has a module here exposing ``register(subparsers)``:
it adds its parser and sets ``func``, which calls the library (``diffpool_fast.train``,
``diffpool_fast.profiling``) with the parsed arguments and returns an exit code. The library is
imported inside ``func``, so that ``diffpool-fast --help`` stays fast.

Errors: the library raises :class:`diffpool_fast.errors.UsageError` (bad options, unreadable
files, datasets that cannot be loaded); here it becomes one line on stderr and exit code 2. An
``OSError`` that reaches this far (a file the library did not expect to fail) is one line too,
exit code 1; Ctrl-C is exit code 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from ..errors import UsageError

# (module, purpose) in the order they appear in --help.
SUBCOMMAND_MODULES = (
    "diffpool_fast.cli.train",  # train: DiffPool graph classification on TU datasets / synthetic
    "diffpool_fast.cli.profile",  # profile: memory and throughput of dense coarsening
    "diffpool_fast.cli.compile_check",  # compile-check: ahead-of-time Triton compile, sm_80/sm_90
    "diffpool_fast.cli.select",  # select: per-fold choice between finished runs by validation
)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage block is what ``--help`` is for), like
    the library's errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..profiling.provenance import package_version

    parser = _Parser(
        prog="diffpool-fast",
        description="Fast, memory-lean DiffPool: coarsening kernels, training and profiling.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # this build has no such subcommand
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"diffpool-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"diffpool-fast {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffpool-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
