"""``diffpool-fast compile-check`` in CI: ahead-of-time compiles for sm_80 and sm_90, no GPU.

CI runs the representative subset (per kernel: smallest fp32 configuration, the C_PAD = 128 and
largest ones with every branch on, and the uint8-adjacency symmetric-check forward at C_PAD = 512;
each with and without 16-divisible strides: 56 compilations, about 40 s on 2 cores); the full
table (every configuration x dtype x flag, a few hundred) is ``diffpool-fast compile-check``.
The kernels must be compiled, not interpreted, so the check runs in a subprocess without
TRITON_INTERPRET (which conftest sets for the interpreter tests).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env


def test_representative_kernels_compile_without_spills(tmp_path):
    env = _env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile, not a cache hit
    proc = subprocess.run(
        [sys.executable, "-m", "diffpool_fast", "compile-check", "--representative",
         "--no-progress", "--jobs", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = [line.split() for line in out.splitlines() if line.endswith("  ok")]
    kernels = {r[0] for r in rows}
    assert kernels == {"assignment_fwd_kernel", "assignment_bwd_kernel", "gram_fwd_kernel", "symmetrize_kernel",
                       "finish_kernel", "adjacency_fwd_kernel", "link_residual_kernel", "link_residual_bwd_kernel",
                       "adjacency_bwd_kernel"}, out
    # columns from the right: sm regs spill smem limit HGMMA HMMA status
    assert {r[-8] for r in rows} == {"80", "90"}, out
    # issue 19 item 3: at the benchmark's 128 clusters the products over A (and the other product
    # kernels) use Hopper's warp-group instructions on sm_90, and mma.sync on sm_80
    for r in rows:
        line = " ".join(r)
        if "C_PAD=128 " in line and ("BM=64" in line or "BN=64" in line or "BC=128" in line) and r[0] in (
                "adjacency_fwd_kernel", "link_residual_kernel", "assignment_bwd_kernel", "gram_fwd_kernel"):
            hgmma, hmma = int(r[-3]), int(r[-2])
            assert (hgmma > 0) if r[-8] == "90" else (hmma > 0), line


def test_failures_are_reported_as_failures():
    from diffpool_fast.profiling.compile_check import SMEM_LIMIT, Result

    ok = Result("k", "cfg", 80, 100, 0, 1024, None)
    assert ok.ok
    assert not ok._replace(spill_bytes=8).ok
    assert not ok._replace(shared=SMEM_LIMIT[80] + 1).ok
    assert ok._replace(target=90, shared=SMEM_LIMIT[80] + 1).ok
    assert not ok._replace(registers=None, spill_bytes=None, shared=None, error="boom").ok
    # a product kernel whose SASS has no tensor-core instruction fell back to FMA: a failure
    product = Result("adjacency_fwd_kernel", "cfg", 90, 100, 0, 1024, None, 0, 0)
    assert product.fma_fallback and not product.ok
    assert product._replace(hgmma=6).ok and product._replace(target=80, hmma=96).ok
    assert ok._replace(hgmma=0, hmma=0).ok  # not a product kernel


def test_refuses_to_run_under_the_interpreter():
    env = _env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "diffpool_fast", "compile-check", "--quick"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr and "Traceback" not in proc.stderr
