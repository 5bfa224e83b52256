"""``train --resume``: what a checkpoint must hold before a run continues from it.

A resumed run continues only when everything its numbers depend on is what the interrupted run
used, and it refuses otherwise, naming what differs:

- the options: ``--resume --out DIR`` takes every option from the saved run. Options repeated on
  the command line must agree with it; the runtime-only ones (``RUNTIME_ONLY``: threads,
  progress bars, ``--stop-after``, where the data and the cache lie) may change, and the thread
  count and data folder the run used are kept unless given again;
- the data: the dataset's fingerprint (:func:`diffpool_fast.data.fingerprint`: counts, digests of
  labels, features and edges, the raw files' digests) must match;
- the software: the package version that started the run;
- the checkpoint itself: its digest (``checkpoint.load_checkpoint``) and structure: fold and
  epoch inside the run, a history that is exactly the epochs before them, a model and optimizer
  state that fit the model the options build.

All of it is checked before the run writes anything, so a refused resume leaves the folder as
it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..errors import UsageError
from .checkpoint import METRIC_FIELDS, CheckpointError

#: options that do not change what a run computes: they may differ between a run and its resume
RUNTIME_ONLY = frozenset({"out", "resume", "stop_after", "progress", "func", "command", "threads",
                          "data_root", "cache_dir", "download", "explicit"})

#: runtime options a resume keeps from the saved run unless given again (None = not given)
KEPT_RUNTIME = ("threads", "data_root", "cache_dir")

#: how a flag whose dest is not its name is spelled on the command line
_FLAG_NAMES = {"bucket": "--no-bucket", "jk": "--no-jk", "clusters_per_graph": "--clusters-per-graph/--fixed-clusters"}

#: options newer than some checkpoints, with the value that reproduces what such a run computed
ADDED_OPTIONS = {"clusters_per_graph": False, "link_loss": "frobenius", "deterministic": "on", "cuda_graphs": "off"}

#: top-level entries of a checkpoint and their types
_FIELDS = {
    "version": int, "package_version": str, "config": dict, "dataset": dict, "runtime": dict,
    "fold": int, "epoch": int, "model": (dict, type(None)), "optimizer": (dict, type(None)),
    "rng": (dict, type(None)), "history": list, "fold_results": list, "elapsed": (int, float),
}

#: what a finished fold's record must hold (results.json and the summary read these)
FOLD_RESULT_KEYS = ("fold", "test_acc", "best_epoch", "best_val_acc", "best_val_loss", "final_test_acc",
                    "final_train_loss", "first_train_loss", "epochs", "train_seconds_per_epoch",
                    "epoch_seconds_mean", "n_train", "n_val", "n_test")


def option_name(dest: str) -> str:
    return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def check_fields(state: dict, path: Path) -> None:
    """The checkpoint has every entry, each of its type (before anything reads them)."""
    missing = [k for k in _FIELDS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete checkpoint")
    for k, kind in _FIELDS.items():
        if not isinstance(state[k], kind) or (kind is int and isinstance(state[k], bool)):
            raise CheckpointError(f"{path}: '{k}' is a {type(state[k]).__name__}, not a checkpoint's {k}")


def check_version(state: dict, current: str, out: Path) -> None:
    if state["package_version"] != current:
        raise UsageError(f"--resume: the run in {out} was started by diffpool_fast {state['package_version']}, "
                         f"this is {current}: its epochs would mix two versions' numbers; finish it with "
                         f"{state['package_version']} or start a new run")


def merge_options(args, saved: dict, config_keys: Iterable[str], given: Optional[Iterable[str]], out: Path) -> None:
    """Set ``args`` to the saved run's options. ``given``: the options the command line named
    (None: every option counts as given, for callers that build the whole namespace); any of
    them that differs from the saved value is refused, all differences in one message."""
    keys = set(config_keys)
    # options added after a run started compute what the run computed at these values
    saved = {**{k: v for k, v in ADDED_OPTIONS.items() if k in keys}, **saved}
    unknown, lacking = sorted(set(saved) - keys), sorted(keys - set(saved))
    if unknown or lacking:
        raise CheckpointError(f"--resume: the checkpoint in {out} does not hold this version's options "
                              f"(unknown: {', '.join(unknown) or 'none'}; missing: {', '.join(lacking) or 'none'})")
    named = keys if given is None else set(given) & keys
    diff = [(k, saved[k], getattr(args, k)) for k in sorted(named) if getattr(args, k) != saved[k]]
    if diff:
        text = "; ".join(f"{option_name(k)}: {a!r} -> {b!r}" for k, a, b in diff)
        raise UsageError(f"--resume: options differ from the run in {out} (saved -> given): {text}. "
                         "Leave them out to resume with the run's own options, or start a new run")
    for k in keys:
        setattr(args, k, saved[k])


def keep_runtime(args, runtime: dict) -> list:
    """Thread count, data and cache folder of the saved run, where this command gives none: the
    same thread count keeps the resumed epochs bit for bit those of an uninterrupted run.
    Returns the notes to print once the resume is known to go ahead."""
    notes = []
    for k in KEPT_RUNTIME:
        if getattr(args, k, None) is None and runtime.get(k) is not None:
            setattr(args, k, runtime[k])
            if k == "threads":
                notes.append(f"resuming with the run's {runtime[k]} torch thread(s) (--threads N to change)")
    return notes


def check_same_data(saved: dict, now: dict, out: Path) -> None:
    """Refuse other data than the run's: every count and digest that differs is named, with the
    raw files that changed."""
    labels = (("name", "dataset"), ("graphs", "graphs"), ("classes", "classes"), ("nodes", "nodes"),
              ("features", "features per node"))
    diffs = [f"{text} {saved.get(k)!r} -> {now.get(k)!r}" for k, text in labels if saved.get(k) != now.get(k)]
    for k, text in (("labels_sha256", "graph labels"), ("features_sha256", "node features"),
                    ("edges_sha256", "edges")):
        if saved.get(k) != now.get(k):
            diffs.append(f"{text} differ")
    if not diffs:
        return
    before, after = saved.get("files") or {}, now.get("files") or {}
    changed = sorted(f for f in before if f in after and before[f] != after[f])
    gone, new = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    files = "; ".join(part for part in (
        f"changed: {', '.join(changed)}" if changed else "", f"missing now: {', '.join(gone)}" if gone else "",
        f"new: {', '.join(new)}" if new else "") if part)
    raise UsageError(f"--resume: the data differ from the run's in {out}: {', '.join(diffs)}"
                     + (f" (raw files {files})" if files else "")
                     + "; point --data-root at the run's data, or start a new run")


def check_progress(state: dict, n_folds: int, epochs: int, path: Path) -> None:
    """Fold, epoch, history and finished folds agree with each other and with the run's size."""
    fold, epoch = state["fold"], state["epoch"]

    def bad(text):
        return CheckpointError(f"{path} is inconsistent: {text}")

    if not 0 <= fold <= n_folds:
        raise bad(f"fold {fold} is outside the run's 0..{n_folds}")
    if not 0 <= epoch <= epochs:
        raise bad(f"epoch {epoch} is outside the run's 0..{epochs}")
    if fold == n_folds and epoch:
        raise bad(f"epoch {epoch} after the last fold")
    if (state["model"] is None) != (state["optimizer"] is None) or (state["model"] is None) != (state["rng"] is None):
        raise bad("model, optimizer and random-number states are not all present or all absent")
    if state["model"] is None and epoch:
        raise bad(f"epoch {epoch} of fold {fold + 1} is recorded without its model")
    want = [(f + 1, e + 1) for f in range(fold) for e in range(epochs)] + [(fold + 1, e + 1) for e in range(epoch)]
    rows = state["history"]
    if not all(isinstance(r, dict) and all(k in r for k in METRIC_FIELDS) for r in rows):
        raise bad("a history row lacks metrics")
    have = [(r["fold"], r["epoch"]) for r in rows]
    if have != want:
        raise bad(f"{len(have)} history rows for fold {fold + 1}, epoch {epoch} (expected {len(want)})")
    res = state["fold_results"]
    if len(res) != fold or not all(isinstance(r, dict) and all(k in r for k in FOLD_RESULT_KEYS) for r in res):
        raise bad(f"{len(res)} finished-fold records for {fold} finished fold(s)")
    if [r["fold"] for r in res] != list(range(1, fold + 1)):
        raise bad("finished-fold records out of order")
    if state["rng"] is not None and not all(k in state["rng"] for k in ("torch", "python", "numpy")):
        raise bad("random-number state incomplete")


def restore(model, opt, state: dict, path: Path) -> None:
    """Load the checkpoint's model, optimizer and random-number states, or a CheckpointError
    saying what does not fit (instead of a shape error in the middle of an epoch)."""
    import torch

    from .checkpoint import set_rng_state

    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"{path}: the saved model does not fit the run's model ({detail[:300]})") from None
    try:
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: the saved optimizer state does not fit the model ({str(err)[:200]})") from None
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise CheckpointError(f"{path}: the saved optimizer's {k} has shape {tuple(v.shape)} "
                                          f"for a parameter of shape {tuple(p.shape)}")
    try:
        set_rng_state(state["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the saved random-number state cannot be restored ({str(err)[:200]})") from None
