"""``diffpool-fast train``: outputs, exact resume after an interruption, clear errors."""
import csv
import json

import pytest
import torch

from diffpool_fast import cli
from diffpool_fast.train import loop as train

SMALL = ["train", "--synthetic-graphs", "48", "--epochs", "3", "--folds", "2", "--hidden", "8",
         "--layers", "2", "--batch-size", "8", "--dropout", "0.2", "--progress", "off", "--seed", "4"]

TIMING = {"train_seconds", "epoch_seconds"}


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _results(out):
    res = json.loads((out / "results.json").read_text())
    folds = [{k: v for k, v in f.items() if "seconds" not in k} for f in res["folds"]]
    return res, folds


def _last_model(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["last_model"]


def test_full_run_writes_metrics_and_results(tmp_path):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--out", str(out)]) == 0
    rows = _rows(out)
    assert [(r["fold"], r["epoch"]) for r in rows] == [(f, e) for f in ("1", "2") for e in ("1", "2", "3")]
    res, folds = _results(out)
    assert len(folds) == 2 and res["epochs"] == 3
    for f in folds:
        chosen = [r for r in rows if r["fold"] == str(f["fold"]) and r["epoch"] == str(f["best_epoch"])][0]
        assert float(chosen["test_acc"]) == f["test_acc"]  # test accuracy at the selected epoch
        fold_rows = [r for r in rows if r["fold"] == str(f["fold"])]
        assert float(chosen["val_acc"]) == max(float(r["val_acc"]) for r in fold_rows)
        assert f["n_train"] + f["n_val"] + f["n_test"] == 48
    accs = [f["test_acc"] for f in folds]
    assert res["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert res["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert res["config"]["hidden"] == 8 and res["config"]["dataset"] == "synthetic"
    assert "cross-validation" in res["protocol"] and res["versions"]["torch"] == torch.__version__
    # The output folder is not overwritten by accident.
    assert cli.main(SMALL + ["--out", str(out)]) == 2


@pytest.mark.parametrize("sparse", ["0", "1"])  # level 0 dense, or on the CSR adjacency
def test_resume_after_interruptions_is_exact(tmp_path, monkeypatch, capsys, sparse):
    monkeypatch.setenv("DIFFPOOL_FAST_SPARSE", sparse)
    ref = tmp_path / "ref"
    assert cli.main(SMALL + ["--out", str(ref)]) == 0

    out = tmp_path / "int"
    # 1) a clean stop after 2 epochs (mid fold 1)
    assert cli.main(SMALL + ["--out", str(out), "--stop-after", "2"]) == 0
    assert len(_rows(out)) == 2
    assert "--resume" in capsys.readouterr().err
    # 2) an interruption (Ctrl-C) in the middle of an epoch, after its training, before its
    #    checkpoint: the epoch is lost and redone on resume.
    real_evaluate = train._evaluate
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        # Calls 1-2: fold 1 epoch 3 (val, test); 3-4: fold 2 epoch 1; 5: fold 2 epoch 2.
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train, "_evaluate", interrupted)
    assert cli.main(SMALL + ["--out", str(out), "--resume"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(train, "_evaluate", real_evaluate)
    assert len(_rows(out)) == 4  # fold 2's 2nd epoch trained but was never checkpointed
    # 3) resume to the end
    assert cli.main(SMALL + ["--out", str(out), "--resume"]) == 0

    assert _rows(out) == _rows(ref)  # every metric of every epoch, bit for bit (as text)
    assert _results(out)[1] == _results(ref)[1]
    a, b = _last_model(out), _last_model(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Resuming a finished run does nothing harmful and reports it again.
    assert cli.main(SMALL + ["--out", str(out), "--resume"]) == 0


def test_resume_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--out", str(out), "--stop-after", "1"]) == 0
    args = [a if a != "8" or i != SMALL.index("--hidden") + 1 else "16" for i, a in enumerate(SMALL)]
    assert cli.main(args + ["--out", str(out), "--resume"]) == 2
    assert "hidden: 8 -> 16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "NOPE", "--data-root", "{tmp}"], "'NOPE' not found"),
        (["--dataset", "MUTAG", "--data-root", "{tmp}/missing"], "does not exist"),
        (["--epochs", "0"], "must be positive"),
        (["--folds", "x"], "expected a int"),
        (["--val-fraction", "0.7"], "--val-fraction"),
        (["--gnn", "gat"], "invalid choice"),
        (["--clusters", "4,0"], "positive integers"),
        (["--resume"], "no checkpoint"),
        (["--folds", "100", "--synthetic-graphs", "30"], "--folds 100"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = cli.main(["train", "--progress", "off", "--out", str(tmp_path / "o")] + argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code != 0
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_cuda_request_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["train", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_auto_threads_leave_busy_cores_alone():
    from diffpool_fast.profiling.provenance import auto_threads

    assert auto_threads(2, 2, 0.1) == 2
    assert auto_threads(2, 2, 1.2) == 1  # one other busy process on a 2-core machine
    assert auto_threads(2, 2, 5.0) == 1  # never below one
    assert auto_threads(4, 16, 3.0) == 4  # plenty idle: torch's default


def test_train_threads_do_not_depend_on_the_load(monkeypatch, tmp_path):
    # A fixed-seed command gives one result whatever the machine's load: without --threads the
    # count is min(usable CPUs, DEFAULT_MAX_THREADS) (the thread count changes the numbers), and
    # results.json says where it came from.
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    want = min(train.usable_cpus(), train.DEFAULT_MAX_THREADS)
    counts = []
    try:
        for i, load in enumerate((0.0, 50.0)):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            out = tmp_path / f"run{i}"
            assert cli.main(SMALL + ["--epochs", "1", "--out", str(out)]) == 0
            res = json.loads((out / "results.json").read_text())
            counts.append(res["machine"]["torch_threads"])
            assert res["machine"]["threads_source"].startswith("default: min(usable CPUs")
        assert counts == [want, want]
        assert _rows(tmp_path / "run0") == _rows(tmp_path / "run1")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert train.default_threads() == (1, "OMP_NUM_THREADS")
        assert train.set_threads(None) == "OMP_NUM_THREADS" and torch.get_num_threads() == 1
        assert train.set_threads(2) == "--threads" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- resume semantics (options)

def _stopped_run(tmp_path, extra=(), after="2"):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--threads", "1", "--out", str(out), "--stop-after", after] + list(extra)) == 0
    return out


def test_resume_takes_the_options_from_the_saved_run(tmp_path, capsys):
    ref = tmp_path / "ref"
    assert cli.main(SMALL + ["--threads", "1", "--out", str(ref)]) == 0
    out = _stopped_run(tmp_path)
    # exactly the form the README and the --stop-after hint give
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 0
    assert _rows(out) == _rows(ref)
    a, b = _last_model(out), _last_model(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads((out / "results.json").read_text())
    assert res["config"] == json.loads((ref / "results.json").read_text())["config"]


def test_resume_refuses_a_conflicting_option_even_when_it_is_the_default(tmp_path, capsys):
    out = _stopped_run(tmp_path, after="1")
    before = (out / "metrics.csv").read_bytes()
    capsys.readouterr()
    # --hidden 64 is the parser's default, the run has 8: given explicitly, it conflicts
    assert cli.main(["train", "--resume", "--out", str(out), "--hidden", "64", "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "--hidden: 8 -> 64" in err and "--epochs: 3 -> 5" in err and len(err.strip().splitlines()) == 1
    # repeating an option with the saved value, and changing a runtime-only one, are fine
    assert cli.main(["train", "--resume", "--out", str(out), "--hidden", "8", "--progress", "off",
                     "--stop-after", "1"]) == 0
    assert len(_rows(out)) == 2 and (out / "metrics.csv").read_bytes().startswith(before)


def test_resume_refuses_another_package_version(tmp_path, monkeypatch, capsys):
    from diffpool_fast.profiling import provenance

    out = _stopped_run(tmp_path, after="1")
    capsys.readouterr()
    monkeypatch.setattr(provenance, "package_version", lambda: "9.9.9")
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "started by diffpool_fast 0." in err and "this is 9.9.9" in err
    assert not (out / "results.json").exists() and len(_rows(out)) == 1


# --------------------------------------------------------------------------- checkpoints that do not fit

def _edit_checkpoint(path, edit):
    """Rewrite a checkpoint with ``edit(state)`` applied, its digest recomputed: a well-formed
    file whose content is wrong, as another program or version could write it."""
    from diffpool_fast.train.checkpoint import save_checkpoint

    state = torch.load(path, weights_only=False)
    edit(state)
    save_checkpoint(path, state)


def _shape(state):
    k = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][k] = torch.zeros(3, 3)


def _fold(value):
    return lambda st: st.update(fold=value)


def _drop(key):
    return lambda st: st.pop(key)


@pytest.mark.parametrize(
    "edit, words",
    [
        (_drop("history"), ["lacks history"]),
        (_drop("optimizer"), ["lacks optimizer"]),
        (_shape, ["saved model does not fit", "size mismatch"]),
        (_fold(7), ["fold 7 is outside"]),
        (_fold(2), ["inconsistent"]),
        (lambda st: st.update(epoch=9), ["epoch 9 is outside"]),
        (lambda st: st["history"].pop(), ["history rows"]),
        (lambda st: st.update(model=None), ["not all present"]),
        (lambda st: st["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)), ["optimizer's exp_avg has shape"]),
        (lambda st: st.update(config="x"), ["'config' is a str"]),
    ],
    ids=["no-history", "no-optimizer", "model-shape", "fold-out-of-range", "fold-past-history", "epoch-out-of-range",
         "history-short", "model-missing", "optimizer-shape", "config-type"],
)
def test_a_checkpoint_with_the_wrong_structure_is_refused(edit, words, tmp_path, capsys):
    out = _stopped_run(tmp_path)
    _edit_checkpoint(out / "checkpoint.pt", edit)
    metrics = (out / "metrics.csv").read_bytes()
    capsys.readouterr()
    try:  # the options repeated, so that only the checkpoint can be at fault
        code = cli.main(SMALL + ["--threads", "1", "--resume", "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not (out / "results.json").exists()
    assert (out / "metrics.csv").read_bytes() == metrics  # the folder is left as it was


def test_stale_temporary_files_are_removed(tmp_path, capsys):
    out = _stopped_run(tmp_path, after="1")
    dead = out / ".checkpoint.pt.tmp999999999"  # no such process
    dead.write_bytes(b"x" * 1000)
    assert cli.main(SMALL + ["--threads", "1", "--resume", "--out", str(out), "--stop-after", "1"]) == 0
    assert not dead.exists()
    assert not list(out.glob(".*.tmp*"))
