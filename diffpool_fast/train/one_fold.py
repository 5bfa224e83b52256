"""A run of one fold of a cross-validation (``loop.run`` with ``args.only_fold``): what
``--fold-workers`` (:mod:`diffpool_fast.train.fold_workers`) runs in each worker. Its folder is
``OUT/folds/fold-FF/``; its checkpoint holds that fold's epochs and result only, with the fold's
own number, so the sequential run's checks apply to it shifted to that fold."""
from __future__ import annotations

from pathlib import Path

FOLDS = "folds"


def fold_dir(out, fold: int) -> Path:
    """The folder of fold ``fold`` (0-based) of the fold-parallel run in ``out``."""
    return Path(out) / FOLDS / f"fold-{fold + 1:02d}"


def check_progress(state: dict, fold: int, n_folds: int, epochs: int, path: Path) -> None:
    """``resume.check_progress`` for a run of fold ``fold`` alone (``loop`` with
    ``args.only_fold``): its checkpoint holds that fold's epochs and result only."""
    from . import resume
    from .checkpoint import CheckpointError

    if not fold <= state["fold"] <= fold + 1:
        raise CheckpointError(f"{path} is inconsistent: fold {state['fold'] + 1} in the run of fold {fold + 1} alone")
    shift = {fold + 1: 1}
    view = dict(state, fold=state["fold"] - fold,
                history=[dict(r, fold=shift.get(r.get("fold"), -1)) if isinstance(r, dict) else r
                         for r in state["history"]],
                fold_results=[dict(r, fold=shift.get(r.get("fold"), -1)) if isinstance(r, dict) else r
                              for r in state["fold_results"]])
    resume.check_progress(view, 1, epochs, path)
