"""bench/scripts/gpu_train.py, the GPU measurement of issue 20, runs on a CPU too: without CUDA it
says so and measures nothing; with ``--device cpu --tiny`` its step table is written (ours and
PyG's example, same run)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "scripts" / "gpu_train.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_skips_with_a_message(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in (tmp_path / "SKIPPED.txt").read_text()


def test_the_step_table_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--tiny",
                           "--parts", "model", "--variants", "pyg,ours,ours-graphs", "--budget", "300"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "model_profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["max_nodes"]) for r in rows] == [(v, n) for n in ("16", "32")
                                                             for v in ("pyg", "ours", "ours-graphs")]
    assert all(r["status"] == "ok" and float(r["graphs_per_s"]) > 0 and r["x_pyg"] for r in rows)
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "status.csv"))] == ["ok"]
    assert (tmp_path / "gpu_train.md").is_file() and (tmp_path / "host_syncs.txt").is_file()
    assert '"device": "cpu"' in (tmp_path / "env.json").read_text()
