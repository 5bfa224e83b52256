"""Kernel configurations from a file: how a GPU run tries the configurations it tuned.

The launch helpers read their block sizes from tables keyed on C_PAD (``adjacency._ADJ_TABLE``,
``gram._GRAM_TABLE``, ``assignment._ROW_FWD_TABLE``, ``assignment._ROW_BWD_TABLE``); the tables
in the source are the committed choice (so far picked to compile without spills; a GPU tuning
run, ``bench/scripts/gpu_tune.py``, times the alternatives). The
variable ``DIFFPOOL_FAST_KERNEL_CONFIGS`` names a JSON file ``{"adjacency": {"128": [...]}, ...}``
whose entries replace theirs in this process, read once when the Triton path is first imported:
``bench/gpu.sh`` tunes, writes such a file, and runs its later steps with it.
"""
from __future__ import annotations

import json
from typing import Dict


def tables() -> Dict[str, dict]:
    """The configuration tables by name, each C_PAD -> entry."""
    from . import adjacency, assignment, gram

    return {"adjacency": adjacency._ADJ_TABLE, "gram": gram._GRAM_TABLE,
            "row_fwd": assignment._ROW_FWD_TABLE, "row_bwd": assignment._ROW_BWD_TABLE}


def load(path: str) -> Dict[str, dict]:
    """Replace table entries with those of the JSON file at ``path``; returns what it set.
    A ValueError names an unknown table, C_PAD or an entry of the wrong length."""
    with open(path) as f:
        data = json.load(f)
    known = tables()
    done: Dict[str, dict] = {}
    for name, entries in data.items():
        if name not in known:
            raise ValueError(f"{path}: unknown kernel table {name!r}; known: {sorted(known)}")
        table = known[name]
        for key, entry in entries.items():
            c_pad = int(key)
            if c_pad not in table:
                raise ValueError(f"{path}: {name} has no C_PAD {c_pad}; known: {sorted(table)}")
            entry = tuple(int(v) for v in entry)
            if len(entry) != len(table[c_pad]):
                raise ValueError(f"{path}: {name}[{c_pad}] = {list(entry)} must have "
                                 f"{len(table[c_pad])} numbers like {list(table[c_pad])}")
            table[c_pad] = entry
            done.setdefault(name, {})[c_pad] = entry
    return done
