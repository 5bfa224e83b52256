"""Fold-parallel cross-validation (diffpool_fast.train.fold_workers): 2 workers x 1 thread give
the sequential --threads 1 run's metrics.csv and results.json, also after a worker was killed."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffpool_fast.cli import main

OPTS = ["--dataset", "synthetic", "--synthetic-graphs", "40", "--hidden", "8", "--layers", "1", "--levels", "1",
        "--folds", "3", "--epochs", "25", "--dropout", "0.2", "--threads", "1", "--progress", "off"]
TIMING = {"train_seconds", "epoch_seconds", "train_seconds_per_epoch", "epoch_seconds_mean",
          "train_seconds_per_epoch_mean", "total_seconds", "command"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _read(out):
    with open(out / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
    return rows, _strip(json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "run"
    assert main(["train", *OPTS, "--out", str(out)]) == 0
    return _read(out)


def _cmd(out, *extra):
    return [sys.executable, "-m", "diffpool_fast", "train", *OPTS, "--out", str(out), *extra]


def test_two_fold_workers_equal_the_sequential_run(tmp_path, sequential):
    out = tmp_path / "run"
    done = subprocess.run(_cmd(out, "--fold-workers", "2"), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, res = _read(out)
    assert rows == sequential[0]
    assert res == sequential[1]
    assert [f["fold"] for f in res["folds"]] == [1, 2, 3]


def test_a_killed_fold_worker_resumes_to_the_sequential_result(tmp_path, sequential):
    out = tmp_path / "run"
    p = subprocess.Popen(_cmd(out, "--fold-workers", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, pid_file = out / "folds" / "fold-01" / "metrics.csv", out / "folds" / "worker-1.pid"
    deadline, killed = time.monotonic() + 90, False
    while time.monotonic() < deadline and p.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 3 and pid_file.is_file():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # worker 1: folds 1 and 3
            killed = True
            break
        time.sleep(0.05)
    assert killed, "the worker finished before it could be killed"
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "a fold worker failed" in err and "fold(s) 1, 3 unfinished" in err and "--resume" in err, err[-2000:]
    assert not (out / "results.json").exists()
    assert (out / "folds" / "fold-02" / "results.json").is_file()  # the other worker finished its fold

    # without --fold-workers too: the folder says it is a fold-parallel run
    done = subprocess.run([sys.executable, "-m", "diffpool_fast", "train", "--resume", "--out", str(out),
                           "--progress", "off"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, res = _read(out)
    assert rows == sequential[0]
    assert res == sequential[1]


def test_fold_workers_refuse_what_does_not_combine(tmp_path, capsys):
    assert main(["train", *OPTS, "--out", str(tmp_path / "a"), "--fold-workers", "2", "--stop-after", "1"]) == 2
    assert "--stop-after does not combine with --fold-workers" in capsys.readouterr().err
    assert main(["train", *OPTS, "--out", str(tmp_path / "b"), "--fold-workers", "2", "--nproc-per-node", "2"]) == 2
    assert "choose one" in capsys.readouterr().err
