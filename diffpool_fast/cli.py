"""``diffpool-fast``: the command-line entry point.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; the module adds
its parser and sets ``func`` (called with the parsed arguments, returning an exit code). Modules
import their heavy dependencies inside ``func`` so that ``diffpool-fast --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# (module, purpose) in the order they appear in --help.
SUBCOMMAND_MODULES = (
    "diffpool_fast.train",  # train: DiffPool graph classification on TU datasets / synthetic
    "diffpool_fast.profile",  # profile: memory and throughput of dense coarsening
    "diffpool_fast.compile_check",  # compile-check: ahead-of-time Triton compile for sm_80/sm_90
    "diffpool_fast.select",  # select: per-fold choice between finished runs by validation accuracy
)


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpool-fast",
        description="Fast, memory-lean DiffPool: coarsening kernels, training and profiling.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    except CLIError as err:
        print(f"diffpool-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffpool-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
