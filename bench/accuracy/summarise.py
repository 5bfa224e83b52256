"""Table of the 10-fold CV runs in bench/accuracy/*/results.json -> bench/accuracy/results.md.

Usage: python bench/accuracy/summarise.py
"""
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"MUTAG": 85.0, "PROTEINS": 75.0, "ENZYMES": 60.0}
PAPER = {"PROTEINS": "76.25", "ENZYMES": "62.53", "MUTAG": "-"}


def main():
    rows = []
    replicates = {}
    for res_path in sorted(HERE.glob("*/results.json")):
        r = json.loads(res_path.read_text())
        run = res_path.parent.name
        name = r["config"]["dataset"]
        cfg = r["config"]
        accs = " ".join(f"{100 * f['test_acc']:.1f}" for f in r["folds"])
        norm = cfg.get("norm", "batch" if cfg.get("batch_norm", True) else "none")
        opts = (f"{cfg['gnn']}, levels {cfg['levels']}, ratio {cfg['ratio']}, clusters {r['model']['clusters']}, "
                f"hidden {cfg['hidden']}, norm {norm}, bucket {cfg['bucket']}, "
                f"readout {cfg['readout']}/{cfg['readout_levels']}, "
                f"node attr {cfg['node_attr']}")
        target = TARGETS.get(name)
        mean = 100 * r["test_acc_mean"]
        met = "-" if target is None else ("yes" if mean >= target else "no")
        rep = re.fullmatch(r"(.+)-seed(\d+)", run)
        if rep:  # a replicate on other folds: judged together with its siblings (table below)
            met = "replicate, see below"
            replicates.setdefault(rep.group(1), []).append((int(rep.group(2)), mean, name))
        rows.append(
            f"| {run} | {mean:.2f} ± {100 * r['test_acc_std']:.2f} | {target or '-'} ({met}) | "
            f"{100 * r['final_epoch_test_acc_mean']:.2f} | {PAPER.get(name, '-')} | {r['epochs']} | "
            f"{r['train_seconds_per_epoch_mean']:.2f} | {r['total_seconds'] / 60:.0f} | {accs} | {opts} |"
        )
    lines = [
        "| run | test acc % (mean ± std over 10 folds) | target (met) | last-epoch test acc % | paper | epochs "
        "| train s/epoch | wall min | per-fold test acc % | model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if replicates:
        lines += [
            "",
            "Replicates: the same configuration on other 10-fold splits (`--seed N`); the declared result is the "
            "mean of the replicates' means (bench/accuracy/README.md).",
            "",
            "| configuration | seeds | per-seed test acc % | mean % | target (met) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for base, reps in sorted(replicates.items()):
            reps.sort()
            mean = sum(m for _, m, _ in reps) / len(reps)
            target = TARGETS.get(reps[0][2])
            met = "-" if target is None else ("yes" if mean >= target else "no")
            lines.append(f"| {base} | {', '.join(str(k) for k, _, _ in reps)} | "
                         f"{' / '.join(f'{m:.2f}' for _, m, _ in reps)} | {mean:.2f} | {target or '-'} ({met}) |")
    # Per-fold choice between runs by validation accuracy (`diffpool-fast select ... --json`).
    sel_rows = []
    for sel_path in sorted(HERE.glob("selection-*.json")):
        sel = json.loads(sel_path.read_text())
        name = sel["dataset"]
        target = TARGETS.get(name)
        mean = 100 * sel["test_acc_mean"]
        met = "-" if target is None else ("yes" if mean >= target else "no")
        cands = ", ".join(f"{Path(c['path']).parent.name} ({k})" for c, k in zip(sel["candidates"], sel["picks"]))
        accs = " ".join(f"{100 * f['test_acc']:.1f}" for f in sel["folds"])
        sel_rows.append(f"| {name} | {mean:.2f} ± {100 * sel['test_acc_std']:.2f} | {target or '-'} ({met}) | "
                        f"{cands} | {accs} |")
    if sel_rows:
        lines += [
            "",
            "Validation-only selection between the runs above (`diffpool-fast select`): per fold, the run with the "
            "best validation accuracy; its test accuracy.",
            "",
            "| dataset | test acc % (mean ± std) | target (met) | candidates (folds picked) | per-fold test acc % |",
            "| --- | --- | --- | --- | --- |",
            *sel_rows,
        ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
