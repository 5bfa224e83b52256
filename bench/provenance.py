"""The command, machine, versions and date lines that head every bench/*.md a script writes."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent


def header(script: str, argv: Optional[List[str]] = None) -> List[str]:
    """Markdown bullet lines for the running ``script`` (its __file__) and its arguments."""
    import torch

    from diffpool_fast import __version__

    args = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join([os.path.relpath(script, REPO)] + list(args))
    return [
        f"- command: `{command}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- versions: torch {torch.__version__}, diffpool_fast {__version__}, python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
