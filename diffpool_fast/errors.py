"""The package's own exception types.

Library code raises these (or plain ``ValueError``/``TypeError`` for bad arguments of the ops);
only ``diffpool_fast.cli`` turns them into a one-line message and an exit code.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Options or files a command cannot work with: the CLI prints it as one line, exit 2."""


class DatasetError(UsageError):
    """A dataset that cannot be found, read or parsed."""
