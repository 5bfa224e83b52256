"""Faults: a training process killed at random points and resumed with ``--resume --out DIR``
alone; truncated and damaged checkpoints; other data on resume; a full disk.

"A crash loses no data": after any kill, the resumed run must end bit for bit where an
uninterrupted one does (metrics.csv without its timing columns, every fold's results, the final
model), and a checkpoint that is not what the run wrote must be refused with one line, exit 2,
and no results.json.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_train import _last_model, _rows

from diffpool_fast import cli

REPO = Path(__file__).resolve().parents[1]
RUN = ["train", "--synthetic-graphs", "30", "--epochs", "4", "--folds", "2", "--hidden", "16",
       "--threads", "1", "--progress", "off", "--seed", "7"]


def _folds(out):
    res = json.loads((out / "results.json").read_text())
    return [{k: v for k, v in f.items() if "seconds" not in k} for f in res["folds"]]


def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.Popen([sys.executable, "-m", "diffpool_fast"] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows_written(out):
    try:
        return max(0, (out / "metrics.csv").read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def _kill_at(proc, out, rows, delay):
    """SIGKILL once the first checkpoint exists and ``rows`` epochs are in metrics.csv, plus
    ``delay`` seconds (so that kills land inside epochs and checkpoint writes too)."""
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if (out / "checkpoint.pt").exists() and _rows_written(out) >= rows:
            time.sleep(delay)
            break
        time.sleep(0.001)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()


def test_killed_runs_resume_bit_for_bit(tmp_path):
    ref = tmp_path / "ref"
    p = _start(RUN + ["--out", str(ref)], tmp_path)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Two runs killed twice each, at random epochs (0..7 of 8) and random moments after them.
    for trial in range(2):
        out = tmp_path / f"killed{trial}"
        points = sorted(rng.randrange(8) for _ in range(2))
        for i, rows in enumerate(points):
            args = RUN + ["--out", str(out)] if i == 0 else ["train", "--resume", "--out", str(out)]
            _kill_at(_start(args, tmp_path), out, rows, rng.uniform(0, 0.03))
        leftovers = list(out.glob(".*.tmp*"))
        p = _start(["train", "--resume", "--out", str(out)], tmp_path)  # no options repeated
        _, err = p.communicate(timeout=120)
        where = f"(random seed {seed}, kills after epochs {points})"
        assert p.returncode == 0, f"{where}: {err}"
        assert _rows(out) == _rows(ref), where
        assert _folds(out) == _folds(ref), where
        a, b = _last_model(out), _last_model(ref)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), where
        assert not list(out.glob(".*.tmp*")), f"{where}: temporary files left: {leftovers}"


def _stopped(tmp_path, extra=()):
    out = tmp_path / "run"
    assert cli.main(RUN + ["--out", str(out), "--stop-after", "3"] + list(extra)) == 0
    return out


def _resume_fails(out, capsys, *words, argv=()):
    capsys.readouterr()
    try:
        code = cli.main(["train", "--resume", "--out", str(out), "--progress", "off"] + list(argv))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (out / "results.json").exists()
    return err


def test_a_truncated_checkpoint_is_refused(tmp_path, capsys):
    out = _stopped(tmp_path)
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    for keep in (0, 100, len(data) // 2, len(data) - 10):
        ckpt.write_bytes(data[:keep])
        _resume_fails(out, capsys, "checkpoint.pt", "truncated or damaged")
        assert ckpt.read_bytes() == data[:keep]  # left as it was, for inspection


def test_a_damaged_checkpoint_is_refused(tmp_path, capsys):
    # torch.load reads flipped bytes inside a tensor without complaint: the digest catches them.
    out = _stopped(tmp_path)
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    rng = random.Random(0)
    for _ in range(4):
        bad = bytearray(data)
        i = rng.randrange(len(data) // 4, 3 * len(data) // 4)
        bad[i] ^= 0xFF
        ckpt.write_bytes(bytes(bad))
        err = _resume_fails(out, capsys, "checkpoint.pt")
        assert "damaged" in err
    ckpt.write_bytes(data)
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 0


def test_other_data_on_resume_is_refused_naming_the_difference(tmp_path, capsys):
    from tu_files import edit_lines, write_tu

    d = write_tu(tmp_path / "data", "GEN", graphs=30)
    cache = str(tmp_path / "cache")
    out = _stopped(tmp_path, ["--dataset", "GEN", "--data-root", str(tmp_path / "data"), "--cache-dir", cache])
    edit_lines(d / "GEN_graph_labels.txt", lambda ls: [{"0": "1", "1": "0"}.get(x, x) for x in ls])
    _resume_fails(out, capsys, "the data differ", "graph labels differ", "GEN_graph_labels.txt")
    # the same data under another folder is fine (the fingerprint, not the path, decides)
    edit_lines(d / "GEN_graph_labels.txt", lambda ls: [{"0": "1", "1": "0"}.get(x, x) for x in ls])
    os.rename(tmp_path / "data", tmp_path / "moved")
    _resume_fails(out, capsys, "'GEN' not found")  # the run's own data folder is gone
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off",
                     "--data-root", str(tmp_path / "moved")]) == 0


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    from diffpool_fast.train import checkpoint

    out = _stopped(tmp_path)
    before = torch.load(out / "checkpoint.pt", weights_only=False)
    calls = {"n": 0}
    real = checkpoint._write_all

    def full_disk(f, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the second write of this resume: after epoch 4's metrics row
            f.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data)

    monkeypatch.setattr(checkpoint, "_write_all", full_disk)
    capsys.readouterr()
    code = cli.main(["train", "--resume", "--out", str(out), "--progress", "off"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "checkpoint.pt" in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1 and "Traceback" not in err
    assert not list(out.glob(".*.tmp*"))  # the partial temporary file is gone
    after = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (after["fold"], after["epoch"]) == (before["fold"], before["epoch"]) == (0, 3)
    monkeypatch.setattr(checkpoint, "_write_all", real)
    # the disk has room again: the run resumes from the intact checkpoint and finishes
    assert cli.main(["train", "--resume", "--out", str(out), "--progress", "off"]) == 0
    assert len(_rows(out)) == 8
