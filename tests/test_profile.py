"""``diffpool-fast profile`` and the analytic cost model."""
import csv

import pytest
import torch

from diffpool_fast import cli
from diffpool_fast.profiling import costmodel
from diffpool_fast.profiling.costmodel import Shape
from diffpool_fast.profiling.harness import make_backend
from diffpool_fast.profiling.memory import cpu_peak_supported, cpu_peaks_subprocess
from diffpool_fast.profiling.options import build_config, clusters_for, parse_bytes
from diffpool_fast.profiling.report import ERROR_COLUMNS

MiB = 1 << 20
needs_proc = pytest.mark.skipif(cpu_peak_supported() is not None, reason="needs Linux /proc")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ floor (hand count)


def test_floor_matches_hand_count():
    # B=2 graphs, N=10 nodes, C=3 clusters, F=4 features, fp32 x/s (4 bytes), bool adj (1 byte),
    # with a mask (1 byte per node), symmetric adjacency.
    sh = Shape(2, 10, 3, 4, "float32", "bool", masked=True)
    # forward: A 2*10*10*1=200, L 2*10*3*4=240, X 2*10*4*4=320, mask 2*10=20,
    # S and AS 2*240=480, out 2*3*4*4=96, A' 2*3*3*4=72
    assert costmodel.floor_bytes(sh, "fwd") == 200 + 240 + 320 + 20 + 480 + 96 + 72 == 1428
    # backward: read S, AS 480, X 320, g_out 96, G 72; write dL 240, dX 320
    assert costmodel.floor_bytes(sh, "bwd") == 480 + 320 + 96 + 72 + 240 + 320 == 1528
    assert costmodel.floor_bytes(sh, "full") == 1428 + 1528
    # FLOPs forward: AS 2*2*100*3=1200, S^T(AS) 2*2*10*9=360, S^TS 360, S^TX 2*2*10*3*4=480
    assert costmodel.floor_flops(sh, "fwd") == 1200 + 360 + 360 + 480 == 2400
    # backward: X g_out^T 480, S g_out 480, AS(G+G^T) 360, S(S^TS) 360
    assert costmodel.floor_flops(sh, "bwd") == 1680
    # an asymmetric adjacency is read again in backward, for A^T S (2*2*100*3 FLOPs)
    asym = Shape(2, 10, 3, 4, "float32", "bool", masked=True, symmetric=False)
    assert costmodel.floor_bytes(asym, "bwd") == 1528 + 200
    assert costmodel.floor_flops(asym, "bwd") == 1680 + 1200
    # without a mask, and with an fp32 adjacency (4 bytes per entry)
    nomask = Shape(2, 10, 3, 4, "float32", "float32", masked=False)
    assert costmodel.floor_bytes(nomask, "fwd") == 800 + 240 + 320 + 480 + 96 + 72


def test_floor_time_on_h100_is_the_roofline():
    spec = costmodel.known_device("NVIDIA H100 80GB HBM3")
    assert spec.bandwidth == 3.35e12 and spec.rate("float32") == 495e12
    assert costmodel.known_device("NVIDIA H200").bandwidth == 4.8e12
    assert costmodel.known_device("Some Unknown GPU") is None
    # B=64, N=1024, C=128, F=128 fp32, no mask: A 64*1024*1024*4 = 268,435,456 bytes; L and X
    # 64*1024*256*4 = 67,108,864; S and AS the same again; out and A' 64*128*256*4 = 8,388,608.
    # 411,041,792 bytes take 122.7 us at 3.35 TB/s; the 21.5 GFLOP (AS 17.2, S^T AS and S^T S
    # 2.1 each, S^T X 2.1) take 43 us at 495 TF/s: bandwidth-bound.
    sh = Shape(64, 1024, 128, 128, masked=False)
    assert costmodel.floor_bytes(sh, "fwd") == 268_435_456 + 2 * 67_108_864 + 8_388_608
    t = costmodel.floor_time(sh, "fwd", spec)
    assert t == pytest.approx(411_041_792 / 3.35e12)
    assert costmodel.floor_flops(sh, "fwd") / 495e12 < t


def test_memory_model_pyg_holds_nxn_ours_does_not():
    sh = Shape(16, 2048, 128, 64)
    n2 = 16 * 2048 * 2048 * 4
    pyg = costmodel.memory_model("pyg", sh, "full")
    ours = costmodel.memory_model("torch", sh, "full")
    assert pyg.peak >= 3 * n2 and pyg.saved >= n2
    assert ours.peak < n2 and ours.peak < pyg.peak / 5
    assert costmodel.memory_model("triton", sh, "full").peak <= ours.peak
    assert costmodel.predict_max_batch("torch", sh, 8 << 30) > 2 * costmodel.predict_max_batch(
        "pyg", sh, 8 << 30)


# ------------------------------------------------------------------------------ peak measurement


_PEAK_SCRIPT = """
import torch
from diffpool_fast.profiling.memory import measure_cpu_peak
MiB = 1 << 20
def work():
    a = torch.ones(16 * MiB)  # 64 MiB, alive at the peak
    b = torch.ones(8 * MiB)  # 32 MiB more
    del b
    c = torch.ones(4 * MiB)  # 16 MiB after b is gone: the peak stays 96 MiB
    return a, c
print(measure_cpu_peak(work))
"""


@needs_proc
def test_cpu_peak_measures_a_known_allocation():
    """In a fresh process with the profiler workers' malloc settings (memory.MALLOC_ENV), as the
    profiler measures: in this long-lived test process glibc may serve the 32 MiB block from heap
    memory an earlier test freed, which the resident set already counts."""
    import os
    import subprocess
    import sys

    from diffpool_fast.profiling.memory import MALLOC_ENV

    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True,
                          env=dict(os.environ, **MALLOC_ENV), check=True)
    peak = int(proc.stdout.strip().splitlines()[-1])
    assert abs(peak - 96 * MiB) < 4 * MiB, peak / MiB


@needs_proc
def test_memory_model_agrees_with_measured_peaks():
    # N x N = 4.5 MiB per batch in fp32: PyG's 3 N x N in backward dominate; ours has none.
    sh = Shape(8, 384, 48, 16)
    for backend in ("torch", "pyg"):
        res = cpu_peaks_subprocess(backend, sh, ["fwd", "full"], 0, 0.05, 1)
        assert "error" not in res, res
        for mode in ("fwd", "full"):
            model = costmodel.memory_model(backend, sh, mode).peak
            assert abs(res[mode] - model) <= 0.25 * model + MiB, (backend, mode, res[mode], model)
    assert res["full"] > 3 * 8 * 384 * 384 * 4  # pyg's residual and its gradients


# ------------------------------------------------------------------------------ the command


def test_profile_small_sweep_writes_csv_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "prof"
    rc = cli.main(["profile", "--device", "cpu", "--backend", "torch,pyg,triton", "--mode",
                   "fwd,full", "--batch", "2", "--nodes", "24,40", "--clusters", "0.25",
                   "--features", "8", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ours (torch)" in text and "PyG" in text and "% floor" in text
    rows = _rows(out / "profile.csv")
    assert len(rows) == 2 * 2 * 3  # nodes x modes x backends
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["python"]
        assert "profile" in r["command"]
        if r["backend"] == "triton":
            # no GPU here: skipped with the reason, not timed
            assert r["status"] == "skipped" and "CUDA" in r["reason"] and r["time_ms"] == ""
            continue
        assert r["status"] == "ok", r
        assert float(r["time_ms"]) > 0 and int(r["repeats"]) == 2
        assert float(r["floor_ms"]) > 0 and float(r["pct_of_floor"]) > 0
        assert r["peak_bytes"] != "" and r["peak_method"] == "rss-hwm-subprocess"
        assert int(r["clusters"]) == {24: 6, 40: 10}[int(r["nodes"])]
        if r["backend"] == "pyg":
            assert float(r["speedup_vs_pyg"]) == 1.0
        else:
            assert float(r["speedup_vs_pyg"]) > 0
    for name in ("time_vs_nodes.png", "peak_memory_vs_nodes.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| ours (torch) | full | 2 | 40 |" in (out / "profile.md").read_text()


def test_max_batch_on_cpu_is_sane(tmp_path, capsys):
    out = tmp_path / "mb"
    budget = 192 * MiB
    rc = cli.main(["profile", "--device", "cpu", "--backend", "torch,pyg", "--mode", "full",
                   "--batch", "4", "--nodes", "512", "--clusters", "32", "--features", "16",
                   "--repeats", "1", "--warmup", "0", "--no-memory", "--max-batch", "192MiB",
                   "--out", str(out)])
    assert rc == 0
    assert "Largest batch" in capsys.readouterr().out
    rows = {r["backend"]: r for r in _rows(out / "max_batch.csv")}
    ours, pyg = int(rows["torch"]["max_batch"]), int(rows["pyg"]["max_batch"])
    # per graph: adj 1 MiB; PyG holds ~3 more N x N in backward, ours none
    assert pyg >= 1 and ours > 2 * pyg
    for r in rows.values():
        fit = int(r["fixed_bytes"]) + int(r["per_graph_bytes"]) * int(r["max_batch"])
        assert fit <= budget
        assert fit + int(r["per_graph_bytes"]) > budget
        model = int(r["model_max_batch"])
        assert model / 2 <= int(r["max_batch"]) <= model * 2, r


# ------------------------------------------------------------------------------ unavailable


def test_unavailable_backends_are_skipped_with_a_reason(monkeypatch):
    b = make_backend("triton", "cpu")
    assert not b.available and "CUDA" in b.reason

    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    b = make_backend("compile", "cpu")
    assert not b.available and "torch.compile failed" in b.reason and "C++" in b.reason

    import sys

    monkeypatch.setitem(sys.modules, "torch_geometric.nn", None)
    for name in ("pyg", "compile"):
        b = make_backend(name, "cpu")
        assert not b.available and "torch_geometric is not installed" in b.reason
    assert make_backend("torch", "cpu").available


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--nodes", "-5"], ["--nodes", "-5"]),
        (["--nodes", "64,x"], ["--nodes", "64,x"]),
        (["--nodes", "64", "--clusters", "100"], ["--clusters 100", "--nodes 64"]),
        (["--clusters", "1.5"], ["--clusters", "1.5"]),
        (["--backend", "torch,tensorflow"], ["backend", "tensorflow"]),
        (["--mode", "sideways"], ["mode", "sideways"]),
        (["--dtype", "int8"], ["--dtype", "int8"]),
        (["--adj-dtype", "int32"], ["--adj-dtype", "int32"]),
        (["--batch", "0"], ["--batch", "0"]),
        (["--features", "-1"], ["--features", "-1"]),
        (["--repeats", "0"], ["--repeats"]),
        (["--max-batch", "lots"], ["--max-batch", "lots"]),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_clear_message(argv, words, capsys, tmp_path):
    _assert_usage_error(argv, words, capsys, tmp_path)


def _assert_usage_error(argv, words, capsys, tmp_path):
    """profile with ``argv`` exits 2 with a one-line error naming every one of ``words``."""
    rc = cli.main(["profile", "--device", "cpu", "--out", str(tmp_path / "x")] + argv)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("diffpool-fast profile: error:") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err, (w, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_device_cuda_without_cuda_is_an_error(capsys):
    assert cli.main(["profile", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_parsers():
    assert parse_bytes("8GiB") == 8 << 30 and parse_bytes("500MB") == 500_000_000
    assert parse_bytes("1e9") == 10**9 and parse_bytes("1048576") == 1 << 20
    assert clusters_for(512, "0.25") == 128 and clusters_for(512, "128") == 128
    assert clusters_for(10, "0.01") == 1


def test_gpu_script_command_line_parses():
    # bench/gpu.sh's exact arguments (there with --device cuda); here the same on CPU.
    p = cli.build_parser()
    args = p.parse_args(
        "profile --device cpu --backend all --mode fwd,bwd,full --batch 64 "
        "--nodes 128,256,512,1024,2048 --clusters 128 --features 128 --out /tmp/x".split())
    cfg = build_config(args)
    assert cfg.backends == ["torch", "pyg", "pyg-compiled", "triton"]  # "compile" is the older name
    assert cfg.modes == ["fwd", "bwd", "full"]
    assert [s.nodes for s in cfg.shapes] == [128, 256, 512, 1024, 2048]
    assert all(s.clusters == 128 and s.batch == 64 and s.features == 128 for s in cfg.shapes)


# ------------------------------------------------------------------------------ --model


def test_model_profile_times_a_training_step(tmp_path, capsys):
    import importlib.util

    out = tmp_path / "model"
    rc = cli.main(["profile", "--model", "--device", "cpu", "--backend", "torch,pyg,triton",
                   "--batch", "4", "--nodes", "40", "--min-nodes", "20", "--features", "8",
                   "--hidden", "16", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    rows = {r["backend"]: r for r in _rows(out / "model_profile.csv")}
    assert rows["triton"]["status"] == "skipped" and "CUDA" in rows["triton"]["reason"]
    have_model = importlib.util.find_spec("diffpool_fast.nn.model") is not None
    have_baseline = importlib.util.find_spec("diffpool_fast.nn.baselines") is not None
    for name, present in (("torch", have_model), ("pyg", have_baseline)):
        r = rows[name]
        if not present:  # the model branch is not merged into this build
            assert r["status"] == "skipped" and "diffpool_fast." in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert float(r["graphs_per_s"]) > 0 and int(r["repeats"]) == 2
        assert r["peak_bytes"] != "" and int(r["params"]) > 0
        assert r["min_nodes"] == "20" and r["max_nodes"] == "40"
    assert "graphs/s" in capsys.readouterr().out


# ------------------------------------------------------------------------------ nothing to run, a busy machine

TINY_PROFILE = ["profile", "--device", "cpu", "--batch", "2", "--nodes", "16", "--features", "4",
                "--repeats", "1", "--warmup", "0", "--no-memory"]


@pytest.fixture
def idle_machine(monkeypatch):
    """A load average of 0, so that this machine's real load adds no warning to the output."""
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))


@pytest.mark.parametrize("model", [False, True], ids=["coarsening", "model"])
def test_triton_alone_on_cpu_is_a_clear_error(model, tmp_path, capsys, idle_machine):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "p"
    rc = cli.main(TINY_PROFILE + ["--backend", "triton", "--out", str(out)] + (["--model"] if model else []))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diffpool-fast profile: error: nothing to profile on cpu") and "CUDA" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # no empty table, no empty plots


def test_nothing_measured_is_a_nonzero_exit_without_plots(tmp_path, capsys, monkeypatch, idle_machine):
    from diffpool_fast.profiling import run as profile_run

    def broken(*a, **k):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(profile_run, "time_once", broken)
    out = tmp_path / "p"
    rc = cli.main(TINY_PROFILE + ["--backend", "torch", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "nothing was measured" in captured.err
    assert all(r["status"] == "error" and "exploded" in r["reason"] for r in _rows(out / "profile.csv"))
    assert not list(out.glob("*.png"))


def test_a_busy_machine_lowers_the_threads_and_is_recorded(tmp_path, capsys, monkeypatch):
    import json
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        argv = TINY_PROFILE + ["--backend", "torch"]
        assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
        err = capsys.readouterr().err
        assert "the machine is busy (load average 7.0 on 8 cores): using 1 torch thread(s) instead of 4" in err
        rows = _rows(tmp_path / "a" / "profile.csv")
        assert rows and all(r["load_avg"] == "7.00" and r["threads"] == "1" for r in rows)
        assert json.loads((tmp_path / "a" / "meta.json").read_text())["load_avg"] == "7.00"
        # --threads is obeyed, with a warning that the timings share cores
        assert cli.main(argv + ["--threads", "3", "--out", str(tmp_path / "b")]) == 0
        err = capsys.readouterr().err
        assert "warning: the machine is busy" in err and torch.get_num_threads() == 3
        assert {r["threads"] for r in _rows(tmp_path / "b" / "profile.csv")} == {"3"}
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ the op table (issue 19)

OP_TABLE = ["profile", "--device", "cpu", "--mode", "full", "--repeats", "2", "--warmup", "1", "--no-memory"]


def test_op_table_shapes_precisions_auto_and_errors(tmp_path, capsys, idle_machine):
    out = tmp_path / "ops"
    rc = cli.main(OP_TABLE + ["--backend", "pyg,auto,torch,triton", "--shapes", "3x24x6x8,3x24x6x8:converged,2x20x4x5:bool",
                              "--precision", "highest,high", "--accuracy", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = _rows(out / "profile.csv")
    assert len(rows) == 3 * 2 * 4  # shapes x precisions x backends
    cases = {(r["batch"], r["nodes"], r["clusters"], r["features"], r["adj_dtype"], r["logits"]) for r in rows}
    assert cases == {("3", "24", "6", "8", "float32", "random"), ("3", "24", "6", "8", "float32", "converged"),
                     ("2", "20", "4", "5", "bool", "random")}
    assert {r["precision"] for r in rows} == {"highest", "high"}
    for r in rows:
        if r["backend"] == "triton":
            assert r["status"] == "skipped" and all(r[c] == "" for c in ERROR_COLUMNS)
            continue
        assert r["status"] == "ok", r
        # auto is labelled with the path it took, and why
        assert r["path"] == ("torch" if r["backend"] == "auto" else r["backend"])
        if r["backend"] == "auto":
            assert r["dispatch"] == "not CUDA (cpu)"
        errs = {c: float(r[c]) for c in ERROR_COLUMNS}
        # float32 against float64: small, but measured (not zero); near convergence the link
        # loss and the gradient of s lose digits to cancellation, in PyG's formulas too
        bound = 1e-4 if r["logits"] == "random" else 1e-2
        assert all(e < bound for e in errs.values()), (r["backend"], r["logits"], errs)
        assert errs["err_out_adj"] > 0
        if r["backend"] == "pyg":
            assert float(r["speedup_vs_pyg"]) == 1.0
    md = (out / "profile.md").read_text()
    for block in ("### B=3 N=24 C=6 F=8 adj=float32 prec=highest\n", "### B=3 N=24 C=6 F=8 adj=float32 prec=high converged\n",
                  "### B=2 N=20 C=4 F=5 adj=bool prec=high\n"):
        assert block in md and block.strip() in printed, block
    assert "| ours (auto: torch) |" in md and "rel err out" in md
    assert "- ours (auto: torch): not CUDA (cpu)" in md
    assert "command: `diffpool-fast profile" in md and "versions:" in md and "Measured in" in md
    acc = _rows(out / "accuracy.csv")
    assert len(acc) == 3 * 2 * 3 and all(r["err_link"] for r in acc)


def test_error_columns_see_a_wrong_backend(monkeypatch):
    """The error measurement is not vacuous: a backend that is 1% off in out and 2x off in the
    link loss shows it."""
    from diffpool_fast.profiling.accuracy import measure_errors, reference
    from diffpool_fast.profiling.harness import make_inputs

    inp = make_inputs(Shape(2, 16, 4, 3), "cpu", seed=3)
    good = make_backend("torch", "cpu").fn

    def wrong(x, adj, s, mask):
        out, out_adj, link, ent = good(x, adj, s, mask)
        return out * 1.01, out_adj, link * 2, ent

    ref = reference(inp)
    ok, bad = measure_errors(good, inp, ref), measure_errors(wrong, inp, ref)
    assert ok["err_out"] < 1e-6 and bad["err_out"] == pytest.approx(0.01, rel=1e-3)
    assert bad["err_link"] == pytest.approx(1.0, rel=1e-3) and bad["err_out_adj"] == ok["err_out_adj"]


def test_converged_inputs_are_near_a_fit():
    """s = 12 one-hot + 0.1 noise and adj = the same-cluster pattern: S S^T is close to A on real
    nodes (the regime where the link identity cancels)."""
    from diffpool_fast.profiling.harness import make_inputs

    inp = make_inputs(Shape(3, 40, 8, 4, logits="converged"), "cpu", seed=1)
    S = torch.softmax(inp.s.detach(), -1) * inp.mask[..., None]
    A = inp.adj
    hard = inp.s.detach().argmax(-1)
    same = (hard[:, :, None] == hard[:, None, :]) & inp.mask[:, :, None] & inp.mask[:, None, :]
    assert torch.equal(A.bool(), same)  # the pattern of the clusters the logits point at
    assert float((A - S @ S.mT).norm() / A.norm()) < 1e-3
    assert float(S.max(-1).values[inp.mask].min()) > 0.99
    rand = make_inputs(Shape(3, 40, 8, 4), "cpu", seed=1)
    assert float((rand.adj - torch.softmax(rand.s.detach(), -1) @ torch.softmax(rand.s.detach(), -1).mT).norm()
                 / rand.adj.norm()) > 0.5


def test_pyg_compiled_is_compiled_per_shape_and_timed_apart(tmp_path, idle_machine):
    if not make_backend("pyg-compiled", "cpu").available:
        pytest.skip("torch.compile does not run here")
    out = tmp_path / "c"
    # "compile" is the older name of the same provider
    rc = cli.main(OP_TABLE + ["--backend", "pyg,compile", "--shapes", "2x16x4x4,2x24x4x4", "--compile-limit", "1",
                              "--out", str(out)])
    assert rc == 0
    rows = {(r["backend"], r["nodes"]): r for r in _rows(out / "profile.csv")}
    first, second = rows["pyg-compiled", "16"], rows["pyg-compiled", "24"]
    assert first["status"] == "ok" and float(first["compile_s"]) > 0 and float(first["time_ms"]) > 0
    assert second["status"] == "skipped" and "--compile-limit 1" in second["reason"] and second["compile_s"] == ""
    assert "torch.compile(PyG): first forward+backward" in (out / "profile.md").read_text()


def test_dispatch_cases_take_full_rows_of_both_paths_under_highest():
    from diffpool_fast.profiling.run import dispatch_cases

    def rec(backend, ms, prec="highest", mode="full", status="ok", nodes=512):
        return {"backend": backend, "mode": mode, "status": status, "precision": prec, "time_ms": str(ms),
                "batch": 64, "nodes": nodes, "clusters": 128, "features": 128, "dtype": "float32",
                "adj_dtype": "float32", "logits": "random"}

    records = [rec("torch", 2.0), rec("triton", 1.0), rec("pyg", 3.0), rec("auto", 1.1),
               rec("torch", 9.0, prec="high"), rec("triton", 0.1, mode="fwd"), rec("torch", 5.0, nodes=64),
               rec("triton", 5.0, nodes=64, status="error")]
    cases, prec = dispatch_cases(records)
    assert prec == "highest"
    by_n = {c["nodes"]: c for c in cases}
    assert by_n[512]["torch_ms"] == 2.0 and by_n[512]["triton_ms"] == 1.0 and by_n[512]["pyg_ms"] == 3.0
    assert "triton_ms" not in by_n[64]  # the failed run is not a time
    cases, prec = dispatch_cases([r for r in records if r["precision"] == "high"])
    assert prec == "high" and cases[0]["torch_ms"] == 9.0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--shapes", "64x512x128"], ["--shapes", "BxNxCxF", "64x512x128"]),
        (["--shapes", "4x16x32x8"], ["--shapes", "C=32", "N=16"]),
        (["--shapes", "4x16x0x8"], ["--shapes", "C must be at least 1"]),
        (["--shapes", "4x16x4x8:sideways"], ["--shapes", "suffix", "sideways"]),
        (["--shapes", "4x16x4x8", "--nodes", "32"], ["--shapes", "--nodes"]),
        (["--logits", "converged,noisy"], ["--logits", "noisy"]),
        (["--precision", "highest,ultra"], ["--precision", "ultra"]),
        (["--compile-limit", "-1"], ["--compile-limit", "-1"]),
        (["--write-dispatch", "t.json"], ["--write-dispatch", "--device cuda"]),
        (["--backend", "torch,pyg-compiled,jax"], ["backend", "jax"]),
    ],
)
def test_op_table_arguments_are_checked(argv, words, capsys, tmp_path):
    _assert_usage_error(argv, words, capsys, tmp_path)


def test_write_dispatch_writes_this_capability_from_the_measured_rows(tmp_path, monkeypatch):
    """The writer of --write-dispatch, fed the records a CUDA run makes (no GPU here)."""
    from diffpool_fast.ops import dispatch_table
    from diffpool_fast.profiling.run import write_dispatch

    def rec(backend, ms, nodes):
        return {"backend": backend, "mode": "full", "status": "ok", "precision": "highest", "time_ms": str(ms),
                "batch": 64, "nodes": nodes, "clusters": 100, "features": 128, "dtype": "float32",
                "adj_dtype": "bool", "logits": "random"}

    records = [rec("torch", 2.0, 512), rec("triton", 1.0, 512), rec("pyg", 1.5, 512),
               rec("torch", 2.0, 1000), rec("triton", 3.0, 1000)]
    path = tmp_path / "table.json"
    cfg = build_config(cli.build_parser().parse_args(["profile", "--device", "cpu", "--out", str(tmp_path / "o")]))
    cfg.write_dispatch = str(path)
    text, ok = write_dispatch(cfg, records, {"capability": "8.6", "device": "NVIDIA Fake", "git": "abc1234"},
                              {"python": "3", "torch": "2", "triton": "3", "torch_geometric": "2"})
    assert ok and "| 512 | 128 | 128 | float32 / bool | triton |" in text
    data = dispatch_table.read(str(path))
    section = data["capabilities"]["8.6"]
    assert section["provisional"] is False and section["commit"] == "abc1234" and section["device"] == "NVIDIA Fake"
    choices, _ = dispatch_table.parse(data)
    assert choices[(8, 6)] == {(512, 128, 128, "float32", "bool"): "triton", (1024, 128, 128, "float32", "bool"): "torch"}
    # nothing to compare: not written, and said so
    text, ok = write_dispatch(cfg, [rec("torch", 2.0, 512)], {"capability": "8.6", "device": "x"}, {})
    assert not ok and "NOT written" in text


def test_model_profile_keeps_its_defaults_and_refuses_op_table_options(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_run_model(args):
        seen.update(batch=args.batch, nodes=args.nodes, features=args.features)
        return 0

    monkeypatch.setattr("diffpool_fast.profiling.run.run_model", fake_run_model)
    assert cli.main(["profile", "--model", "--device", "cpu", "--backend", "torch", "--out", str(tmp_path / "m")]) == 0
    assert seen == {"batch": 16, "nodes": "128,256,512,1024", "features": 64}
    for extra in (["--shapes", "2x16x4x4"], ["--precision", "high"]):
        assert cli.main(["profile", "--model", "--device", "cpu", "--out", str(tmp_path / "m")] + extra) == 2
        assert "not of --model" in capsys.readouterr().err
