"""Checkpoints and result files, written atomically: a crash never leaves a half-written file.

A file is written to a temporary name beside its target (``.NAME.tmpPID``), flushed to disk,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows). A write that fails
(a full disk, a vanished folder) removes its temporary file and leaves the previous target as it
was; the temporary files of killed processes are removed by :func:`remove_stale_temps` when the
next run starts in the folder.

A checkpoint carries a digest of its own content (:func:`content_digest`): ``torch.load`` reads
a file with flipped bytes inside a tensor without complaint, so :func:`load_checkpoint` checks the
digest and refuses a damaged file instead of resuming from silently wrong weights.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Union

from ..errors import UsageError

CHECKPOINT = "checkpoint.pt"
#: 2: the digest, the dataset fingerprint, the package version and the runtime options
CKPT_VERSION = 2

#: the columns of metrics.csv, and the entries of every row of a checkpoint's history
METRIC_FIELDS = [
    "fold", "epoch", "train_loss", "train_ce", "train_link", "train_ent", "train_acc",
    "val_loss", "val_acc", "test_loss", "test_acc", "train_seconds", "epoch_seconds",
]


class CheckpointError(UsageError):
    """A checkpoint that cannot be read, is damaged, or does not fit the run."""


class WriteError(UsageError):
    """An output file that could not be written (full disk, no permission, ...)."""


def _write_all(f, data: bytes) -> None:
    """The one place output bytes reach a file (tests make it fail as a full disk would)."""
    f.write(data)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename. On any failure the
    temporary file is removed (a full disk must not stay full because of it) and the old
    ``path`` is untouched; an ``OSError`` becomes a one-line :class:`WriteError`."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, OSError):
            kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
            raise WriteError(f"cannot write {path}: {err.strerror or err}{kept}") from None
        raise
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not supported for folders here
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list:
    """Remove the ``.NAME.tmpPID`` files of processes that are no longer running (killed in
    the middle of a write); returns the removed paths."""
    from ..data import pid_alive

    removed = []
    for p in Path(folder).glob(".*.tmp*"):
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and p.is_file() and not pid_alive(int(pid)):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def content_digest(obj) -> str:
    """SHA-256 of the values in a checkpoint's state: tensors and arrays by dtype, shape and
    bytes, containers element by element (dicts in key order), floats exactly. The same values
    give the same digest whether or not they went through ``torch.save``/``torch.load``."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"N{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for x in obj:
            _feed(h, x)
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    elif isinstance(obj, (bool, int, str, bytes, type(None))):
        h.update(f"{type(obj).__name__}{obj!r};".encode())
    else:
        h.update(f"R{type(obj).__name__}{obj!r};".encode())


def save_checkpoint(path: Path, state: dict) -> None:
    import torch

    state = dict(state)
    state.pop("digest", None)
    state["digest"] = content_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    """The state saved by :func:`save_checkpoint`, its digest checked; a file that cannot be
    read, is not a checkpoint of this version, or whose content does not match its digest is a
    :class:`CheckpointError` (one line; nothing is written)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, garbage, unpickling errors: all the same to the user
        text = str(err).strip().splitlines()
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {text[0][:200] if text else ''}): "
                              "it is truncated or damaged") from None
    if not isinstance(state, dict) or "version" not in state:
        raise CheckpointError(f"{path} is not a diffpool-fast train checkpoint")
    if state["version"] != CKPT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']!r}, this diffpool-fast reads "
                              f"version {CKPT_VERSION}: finish the run with the version that started it, or start anew")
    digest = state.pop("digest", None)
    if digest != content_digest(state):
        raise CheckpointError(f"{path} is damaged: its content does not match the digest written with it")
    return state


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_text(path: Path, text: Union[str, bytes]) -> None:
    atomic_write_bytes(path, text.encode() if isinstance(text, str) else text)


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
