"""diffpool-fast select: per-fold choice by validation accuracy only, and its refusals."""
import json

import pytest

from diffpool_fast.cli import main


def _run(tmp_path, name, vals, losses, tests, **cfg):
    d = tmp_path / name
    d.mkdir()
    config = {"dataset": "MUTAG", "seed": 0, "folds": len(vals), "val_fraction": 0.1, "max_nodes": None}
    config.update(cfg)
    folds = [{"fold": i + 1, "best_val_acc": v, "best_val_loss": lo, "test_acc": t,
              "n_train": 150, "n_val": 17, "n_test": 19} for i, (v, lo, t) in enumerate(zip(vals, losses, tests))]
    (d / "results.json").write_text(json.dumps({"folds": folds, "config": config, "command": f"train {name}",
                                                "test_acc_mean": sum(tests) / len(tests)}))
    return str(d)


def test_select_picks_by_validation_never_by_test(tmp_path, capsys):
    # fold 1: b validates better; fold 2: a tie on accuracy, a has the lower loss; fold 3: full tie -> first
    a = _run(tmp_path, "a", [0.8, 0.9, 0.7], [0.5, 0.2, 0.3], [0.99, 0.5, 0.6])
    b = _run(tmp_path, "b", [0.9, 0.9, 0.7], [0.5, 0.3, 0.3], [0.1, 0.99, 0.99])
    out = tmp_path / "sel.json"
    assert main(["select", a, b, "--json", str(out), "--out", str(tmp_path / "sel.md")]) == 0
    sel = json.loads(out.read_text())
    assert [r["picked"] for r in sel["folds"]] == [1, 0, 0]
    assert sel["test_acc_mean"] == pytest.approx((0.1 + 0.5 + 0.6) / 3)
    assert sel["picks"] == [2, 1]
    assert "Selected: 40.00" in capsys.readouterr().out


@pytest.mark.parametrize("change", [{"seed": 1}, {"dataset": "PROTEINS"}, {"val_fraction": 0.2}])
def test_select_refuses_runs_on_other_folds(tmp_path, capsys, change):
    a = _run(tmp_path, "a", [0.8], [0.5], [0.9])
    b = _run(tmp_path, "b", [0.9], [0.5], [0.9], **change)
    assert main(["select", a, b]) == 2
    err = capsys.readouterr().err
    assert "do not share their folds" in err and next(iter(change)) in err


def test_select_needs_finished_runs(tmp_path, capsys):
    a = _run(tmp_path, "a", [0.8], [0.5], [0.9])
    assert main(["select", a, str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["select", a]) == 2
    assert "at least two runs" in capsys.readouterr().err
