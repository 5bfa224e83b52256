"""The command line: help texts and defaults, --version, one-line errors, seeds of any size."""
import argparse
import re

import pytest
import torch

from diffpool_fast import cli
from diffpool_fast.data import DenseLoader, make_synthetic, stratified_folds

TINY = ["train", "--synthetic-graphs", "30", "--epochs", "1", "--hidden", "8", "--layers", "1",
        "--threads", "1", "--progress", "off"]


def _main(argv, capsys):
    """Exit code, stdout and stderr of one command (argparse exits become the code)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _options(name):
    """(option strings, help text) of every option of a subcommand."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return sub, [(a.option_strings, a.help or "") for a in sub._actions
                 if a.option_strings and a.help is not argparse.SUPPRESS and "-h" not in a.option_strings]


@pytest.mark.parametrize("command", ["train", "profile", "select", "compile-check"])
def test_every_option_shows_its_default_once(command, capsys):
    sub, options = _options(command)
    code, out, _ = _main([command, "--help"], capsys)
    assert code == 0
    assert "(default: True)" not in out and "(default: False)" not in out
    for names, _ in options:
        # the option's entry in the rendered help: from its name to the next option
        m = re.search(rf"\n  {re.escape(names[-1])}\b(.*?)(?=\n  -|\Z)", out, re.S)
        assert m, (names, out)
        assert len(re.findall(r"\(default:", m.group(1))) == 1, (names, m.group(1))


def test_train_help_states_the_real_defaults(capsys):
    _, out, _ = _main(["train", "--help"], capsys)
    text = re.sub(r"\s+", " ", out)
    for option, value in (("--epochs", "20"), ("--batch-size", "20"), ("--lr", "0.001"), ("--seed", "0"),
                          ("--device", "auto"), ("--norm", "none"), ("--folds", "1")):
        m = re.search(rf" {option}\b[^-]*?.*?\(default: ([^)]*)\)", text)
        assert m and m.group(1) == value, (option, m and m.group(1))
    assert "--no-bucket plain random batches instead of size-bucketed ones (default: size-bucketed)" in text
    # the CLI's norm default differs from the class's, and says so (both are kept: results unchanged)
    assert "DiffPoolClassifier class defaults to batch norm" in text
    from diffpool_fast.nn.model import DiffPoolClassifier

    assert "--norm none" in DiffPoolClassifier.__doc__


def test_version(capsys):
    import importlib.metadata as md

    code, out, _ = _main(["--version"], capsys)
    assert code == 0 and out.strip() == f"diffpool-fast {md.version('diffpool_fast')}"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seed", "-1"], ["--seed", ">= 0"]),
        (["--lr", "nan"], ["--lr", "finite"]),
        (["--lr", "inf"], ["--lr", "finite"]),
        (["--val-fraction", "nan"], ["--val-fraction"]),
        (["--synthetic-graphs", "3"], ["3 graphs", "no validation graph"]),
        (["--out", "{file}"], ["is a file"]),
        (["--out", "{file}/run"], ["is a file"]),
    ],
)
def test_bad_values_are_one_line_and_nonzero(argv, words, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "f")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    code, _, err = _main(TINY + argv, capsys)
    assert code not in (0, None)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("diffpool-fast train: error:")
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "o").exists()  # nothing left behind


def test_out_that_cannot_be_written(tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root writes anywhere permissions say it may not: use a kernel folder
        target = "/sys/kernel"
        if not os.path.isdir(target):
            pytest.skip("no read-only folder for root here")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    for out in (str(target), os.path.join(str(target), "run")):
        code, _, err = _main(TINY + ["--out", out], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--out" in err and ("not writable" in err or "cannot create" in err), err


@pytest.mark.parametrize("seed", [19_000_000, 2**63, 2**64 + 5, 10**30])
def test_large_seeds_simply_work(seed, tmp_path, capsys):
    code, _, err = _main(TINY + ["--seed", str(seed), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "results.json").is_file()


def test_seed_streams_of_working_seeds_are_unchanged():
    # Inside torch's range the seeds reach manual_seed exactly as before the overflow fix.
    from diffpool_fast.data import generator_seed

    for v in (0, 5, 2**63 - 1, 2**64 - 1, -(2**63)):
        assert generator_seed(v) == v
    assert 0 <= generator_seed(2**64 + 5) < 2**64
    ds = make_synthetic(40, seed=1)
    loader = DenseLoader(ds, batch_size=8, shuffle=True, bucket=False, seed=123)
    g = torch.Generator().manual_seed(123 * 1_000_003 + 2)
    assert torch.equal(torch.cat(loader.batch_indices(2)), torch.randperm(40, generator=g))
    folds = stratified_folds(ds.y, 4, seed=2**70)  # would overflow manual_seed before
    assert sorted(torch.cat(folds).tolist()) == list(range(40))


def test_clusters_above_the_node_count_warn(tmp_path, capsys):
    # The generated graphs have at most ~64 nodes: 100 clusters at level 1 pad, not coarsen.
    code, _, err = _main(TINY + ["--clusters", "100,10", "--out", str(tmp_path / "o")], capsys)
    assert code == 0
    assert "warning: --clusters: level 1 has 100 clusters, more than the" in err
    code, _, err = _main(TINY + ["--clusters", "5,10", "--out", str(tmp_path / "p")], capsys)
    assert code == 0 and "level 2 has 10 clusters, more than the 5 clusters of level 1" in err
    code, _, err = _main(TINY + ["--clusters", "10,3", "--out", str(tmp_path / "q")], capsys)
    assert code == 0 and "warning" not in err
