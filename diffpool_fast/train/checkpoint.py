"""Checkpoints and result files, written atomically: a crash never leaves a half-written file.

A file is written to a temporary name beside its target, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CHECKPOINT = "checkpoint.pt"
CKPT_VERSION = 1


def atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    import torch

    atomic_write_bytes(path, lambda f: torch.save(state, f))


def write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def rng_state():
    import random

    import numpy as np
    import torch

    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
