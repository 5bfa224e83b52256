"""train --clusters-per-graph and --link-loss: end to end, resume, and the refused combinations."""
from __future__ import annotations

import json

import torch
from test_train import SMALL, _last_model, _rows

from diffpool_fast import cli
from diffpool_fast.train.resume import ADDED_OPTIONS


def test_per_graph_bce_run_resumes_exactly(tmp_path, capsys):
    extra = ["--clusters-per-graph", "--link-loss", "bce", "--threads", "1"]
    ref = tmp_path / "ref"
    assert cli.main(SMALL + extra + ["--out", str(ref)]) == 0
    res = json.loads((ref / "results.json").read_text())
    assert res["config"]["clusters_per_graph"] is True and res["config"]["link_loss"] == "bce"
    out = tmp_path / "int"
    assert cli.main(SMALL + extra + ["--out", str(out), "--stop-after", "2"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 0
    assert _rows(out) == _rows(ref)
    a, b = _last_model(out), _last_model(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the link term is a BCE at level 0 (positive) plus Frobenius deeper: finite, > 0
    assert all(float(r["train_link"]) > 0 for r in _rows(ref))


def test_options_change_what_is_trained(tmp_path):
    base = SMALL + ["--threads", "1", "--epochs", "1", "--folds", "2"]
    runs = {}
    for name, extra in (("fixed", ["--fixed-clusters"]), ("pergraph", []), ("bce", ["--fixed-clusters", "--link-loss", "bce"])):
        assert cli.main(base + extra + ["--out", str(tmp_path / name)]) == 0
        runs[name] = _rows(tmp_path / name)
    assert runs["fixed"] != runs["pergraph"] and runs["fixed"] != runs["bce"]


def test_bce_with_sparse_level0_is_refused(tmp_path, capsys):
    code = cli.main(SMALL + ["--link-loss", "bce", "--level0", "sparse", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--link-loss bce" in err and "--level0 dense" in err and len(err.strip().splitlines()) == 1


def test_resume_of_a_checkpoint_without_the_new_options(tmp_path):
    """A run started before the options existed resumes with the values it trained with."""
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--threads", "1", "--out", str(out), "--stop-after", "1"]) == 0
    path = out / "checkpoint.pt"
    from diffpool_fast.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(path)
    for k in ADDED_OPTIONS:
        del state["config"][k]
    save_checkpoint(path, state)
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["clusters_per_graph"] is False


def test_per_graph_clusters_are_the_default_and_fixed_is_a_flag(tmp_path):
    """The declared study (bench/accuracy/clusters/RESULTS.md) made per-graph clusters the default."""
    base = SMALL + ["--threads", "1", "--epochs", "1", "--folds", "2"]
    for name, extra, want in (("default", [], True), ("explicit", ["--clusters-per-graph"], True),
                              ("fixed", ["--fixed-clusters"], False)):
        assert cli.main(base + extra + ["--out", str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / name / "results.json").read_text())["config"]["clusters_per_graph"] is want
    assert _rows(tmp_path / "default") == _rows(tmp_path / "explicit")
