"""Model selection: choose between configurations per fold by validation accuracy only.

Given several finished ``diffpool-fast train`` runs made on the same folds (same dataset, seed,
number of folds, validation fraction and node filter), it picks, in every fold independently,
the run whose best validation accuracy is highest (ties: lower validation loss at that epoch,
then the run listed first) and reports that run's test accuracy for the fold. The test folds take
no part in the choice, so the mean over folds is an estimate of "train these candidates and keep
the one that validates best", the model-selection protocol of Errica et al. (2020).

Output: a per-fold table on the terminal and, with ``--out``, the same as markdown plus a JSON
record (``--json``) with the candidates' commands and configurations.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from ..errors import UsageError

#: Configuration keys that must agree for the runs to share their folds.
SPLIT_KEYS = ("dataset", "seed", "folds", "val_fraction", "max_nodes")


def _load(run: str) -> Dict:
    path = Path(run)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UsageError(f"run {run!r}: no results.json (is it a finished `diffpool-fast train` --out folder?)")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"run {run!r}: {path} is not valid JSON ({err})") from None
    if "folds" not in res or "config" not in res:
        raise UsageError(f"run {run!r}: {path} has no per-fold results")
    res["_path"] = str(path)
    return res


def select(runs: Sequence[Dict]) -> Dict:
    """Per-fold selection by validation accuracy over ``runs`` (loaded results.json dicts)."""
    if len(runs) < 2:
        raise UsageError(f"select needs at least two runs, got {len(runs)}")
    base = runs[0]
    for r in runs[1:]:
        for key in SPLIT_KEYS:
            if r["config"].get(key) != base["config"].get(key):
                raise UsageError(
                    f"runs do not share their folds: {key} is {base['config'].get(key)!r} in {base['_path']} "
                    f"but {r['config'].get(key)!r} in {r['_path']}")
        if len(r["folds"]) != len(base["folds"]):
            raise UsageError(f"runs have different numbers of finished folds: {len(base['folds'])} in "
                           f"{base['_path']}, {len(r['folds'])} in {r['_path']}")
    rows: List[Dict] = []
    for i in range(len(base["folds"])):
        folds = [r["folds"][i] for r in runs]
        sizes = {(f["n_train"], f["n_val"], f["n_test"]) for f in folds}
        if len(sizes) != 1:
            raise UsageError(f"fold {i + 1}: the runs' train/val/test sizes differ {sorted(sizes)}: not the same folds")
        best = min(range(len(runs)), key=lambda j: (-folds[j]["best_val_acc"], folds[j]["best_val_loss"], j))
        rows.append({"fold": i + 1, "picked": best, "test_acc": folds[best]["test_acc"],
                     "val_acc": [f["best_val_acc"] for f in folds], "val_loss": [f["best_val_loss"] for f in folds],
                     "candidate_test_acc": [f["test_acc"] for f in folds]})
    accs = [r["test_acc"] for r in rows]
    return {
        "protocol": "per fold, the candidate run with the highest best-validation accuracy (ties: lower "
                    "validation loss, then the first listed); its test accuracy at its best-validation epoch",
        "dataset": base["config"].get("dataset"),
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_std": statistics.pstdev(accs),
        "picks": [sum(r["picked"] == j for r in rows) for j in range(len(runs))],
        "folds": rows,
        "candidates": [{"path": r["_path"], "command": r.get("command"), "config": r["config"],
                        "test_acc_mean": r.get("test_acc_mean")} for r in runs],
    }


def _markdown(sel: Dict, names: Sequence[str]) -> str:
    lines = [f"# Validation-only selection: {sel['dataset']}", "", sel["protocol"] + ".", "",
             f"**Selected: {100 * sel['test_acc_mean']:.2f} ± {100 * sel['test_acc_std']:.2f}** "
             f"(mean ± population std over {len(sel['folds'])} folds)", "", "Candidates:", ""]
    for name, c, k in zip(names, sel["candidates"], sel["picks"]):
        mean = c["test_acc_mean"]
        lines.append(f"- `{name}`: picked in {k} fold(s); alone {100 * mean:.2f}% — `{c['command']}`"
                     if mean is not None else f"- `{name}`: picked in {k} fold(s) — `{c['command']}`")
    lines += ["", "| fold | " + " | ".join(f"{n} val acc" for n in names) + " | picked | test acc |",
              "| ---: | " + " | ".join("---:" for _ in names) + " | --- | ---: |"]
    for r in sel["folds"]:
        lines.append(f"| {r['fold']} | " + " | ".join(f"{100 * v:.1f}" for v in r["val_acc"])
                     + f" | {names[r['picked']]} | {100 * r['test_acc']:.1f} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    runs = [_load(r) for r in args.runs]
    sel = select(runs)
    names = [Path(r).name or r for r in args.runs]
    text = _markdown(sel, names)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(sel, indent=1) + "\n")
    return 0
