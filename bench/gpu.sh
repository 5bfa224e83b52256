#!/usr/bin/env bash
# The GPU command: on a CUDA machine, run the test suite on CUDA, then benchmark forward,
# backward and both for PyG eager, torch.compile of PyG, our torch path and our Triton path.
#
#   bash bench/gpu.sh [OUT_DIR]        (default: bench/results/<UTC date>-<GPU name>-gpu, with
#                                       -2, -3, ... appended if that folder is already in use)
#   GPU_STEPS="tests bench" bash bench/gpu.sh OUT_DIR   (a subset of: tests bench model precision sparse clusters)
#
# The device tool allows 10 minutes per command: with the default (all three steps, at most
# 300 + 360 + 120 s) run it as two calls if the first one is slow, e.g. GPU_STEPS=tests, then
# GPU_STEPS="bench model" with the same OUT_DIR, then GPU_STEPS="precision sparse clusters".
#
# Writes into OUT_DIR: env.txt (GPU, driver, versions, command), tests.log, profile.log and the
# CSV + markdown + plots of `diffpool-fast profile`. Target: under 8 minutes on an H100 (the
# tests take ~2 min there, mostly Triton JIT compiles; the sweep ~4 min). Exit status: non-zero
# if the tests or the benchmark failed (the benchmark still runs after failing tests, so one
# run on a borrowed GPU gives all the evidence there is).
set -uo pipefail
cd "$(dirname "$0")/.."
# The lent GPU machines' `python3` holds torch, triton and torch_geometric; `python` may not exist.
PY=${PYTHON:-python3}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device visible to torch; this command needs a GPU" >&2
    exit 2
fi
# The GPU's name as a folder-name part, e.g. "NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3.
gpu=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
# Install the package without touching the machine's torch/triton (no network there: no build
# isolation, no dependencies).
if ! $PY -c "import diffpool_fast.kernels" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . || {
        echo "bench/gpu.sh: could not install diffpool_fast (pip install --no-deps --no-build-isolation -e .)" >&2
        exit 2
    }
fi
# bench/results/<date>-<device>-<name>/ (bench/README.md): the date the numbers are made.
if [ $# -ge 1 ]; then
    OUT_DIR=$1
else
    OUT_DIR=bench/results/$(date -u +%F)-$gpu-gpu
    k=1; base=$OUT_DIR
    while [ -n "$(ls -A "$OUT_DIR" 2>/dev/null)" ]; do k=$((k + 1)); OUT_DIR=$base-$k; done
fi
mkdir -p "$OUT_DIR"
# The interpreter must be off: these runs are about the compiled kernels.
unset TRITON_INTERPRET DIFFPOOL_FAST_BACKEND

{
    echo "command: bash bench/gpu.sh $*"
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
    $PY - <<'PY'
import platform, torch, triton, numpy
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__, "| numpy", numpy.__version__)
try:
    import torch_geometric
    print("torch_geometric", torch_geometric.__version__)
except ImportError:
    print("torch_geometric not installed")
PY
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

STEPS=${GPU_STEPS:-tests bench model}
status=0
if [[ " $STEPS " == *" tests "* ]]; then
    start=$(date +%s)
    echo "== tests on CUDA =="
    timeout 300 $PY -m pytest -q tests 2>&1 | tee "$OUT_DIR/tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: tests FAILED (see $OUT_DIR/tests.log)"; status=1; }
    echo "tests took $(( $(date +%s) - start )) s"
fi

if [[ " $STEPS " == *" bench "* ]]; then
    start=$(date +%s)
    echo "== benchmark =="
    timeout 360 $PY -m diffpool_fast profile --device cuda --backend all --mode fwd,bwd,full \
        --batch 64 --nodes 128,256,512,1024,2048 --clusters 128 --features 128 \
        --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/profile.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: benchmark FAILED (see $OUT_DIR/profile.log)"; status=1; }
    echo "benchmark took $(( $(date +%s) - start )) s"
fi

if [[ " $STEPS " == *" model "* ]]; then
    # Training step of the whole classifier (fused SAGE blocks; torch and Triton pooling) against
    # PyG's example network, on CUDA.
    start=$(date +%s)
    echo "== model training step =="
    timeout 120 $PY -m diffpool_fast profile --model --device cuda --backend all \
        --batch 64 --nodes 64,128,256,512 --features 32 --repeats 7 --warmup 2 \
        --out "$OUT_DIR/model" 2>&1 | tee "$OUT_DIR/model.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: model profile FAILED (see $OUT_DIR/model.log)"; status=1; }
    echo "model profile took $(( $(date +%s) - start )) s"
fi
if [[ " $STEPS " == *" precision "* ]]; then
    # The Triton products over A follow torch.get_float32_matmul_precision ("highest": tf32x3,
    # "high": tf32); each setting against PyG under the same setting, in the same process.
    for prec in highest high; do
        start=$(date +%s)
        echo "== precision $prec =="
        timeout 240 $PY -c "import sys, torch; torch.set_float32_matmul_precision('$prec'); from diffpool_fast.cli import main; sys.exit(main(sys.argv[1:]))" \
            profile --device cuda --backend torch,pyg,triton --mode full --accuracy \
            --batch 64 --nodes 512,1024,2048 --clusters 128 --features 128 \
            --out "$OUT_DIR/precision-$prec" 2>&1 | tee "$OUT_DIR/precision-$prec.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: precision $prec FAILED"; status=1; }
        echo "precision $prec took $(( $(date +%s) - start )) s"
    done
fi

if [[ " $STEPS " == *" sparse "* ]]; then
    # sparse_diff_pool (edge lists, no N^2) and the edge-list level 0 on CUDA.
    start=$(date +%s)
    echo "== sparse_diff_pool on CUDA =="
    timeout 240 $PY - <<'PY' 2>&1 | tee "$OUT_DIR/sparse.log"
import time, torch
from diffpool_fast import dense_diff_pool, sparse_diff_pool
g = torch.Generator(device="cuda").manual_seed(0)
# equality with the dense op on CUDA (float64), then forward+backward time at 10^6 nodes
N, C, F, E = 300, 17, 9, 3000
ei = torch.randint(0, N, (2, E), device="cuda", generator=g)
x = torch.randn(N, F, device="cuda", dtype=torch.float64, generator=g)
s = torch.randn(N, C, device="cuda", dtype=torch.float64, generator=g)
adj = torch.zeros(N, N, device="cuda", dtype=torch.float64).index_put_((ei[0], ei[1]), torch.ones(E, device="cuda", dtype=torch.float64), accumulate=True)
a, b = sparse_diff_pool(x, ei, s), dense_diff_pool(x, adj, s, backend="torch")
err = max(float((p - q).abs().max()) for p, q in zip(a, b))
print(f"sparse vs dense on CUDA, float64: max abs diff {err:.3e}")
assert err < 1e-9
# a near-converged batch of graphs with a symmetric pattern: the hard split of the link loss,
# every size-bucket kind (lone, equal-size view, padded), gradients of x, s and edge_weight
sizes = [5, 5, 5, 3, 9, 17, 12, 1, 40]
B, Nmax, C, F = len(sizes), max(sizes), 6, 3
batch = torch.repeat_interleave(torch.arange(B, device="cuda"), torch.tensor(sizes, device="cuda"))
ptr = torch.tensor([0] + sizes, device="cuda").cumsum(0)
r = torch.cat([torch.randint(0, n, (2 * n,), device="cuda", generator=g) + ptr[b] for b, n in enumerate(sizes)])
c = torch.cat([torch.randint(0, n, (2 * n,), device="cuda", generator=g) + ptr[b] for b, n in enumerate(sizes)])
ei = torch.cat([torch.stack([r, c]), torch.stack([c, r])], 1)
w = torch.rand(ei.shape[1], device="cuda", dtype=torch.float64, generator=g).requires_grad_(True)
Nt = int(ptr[-1])
hard = torch.randint(0, C, (Nt,), device="cuda", generator=g)
s = (9.0 * torch.nn.functional.one_hot(hard, C).double() + 0.3 * torch.randn(Nt, C, device="cuda", dtype=torch.float64, generator=g)).requires_grad_(True)
x = torch.randn(Nt, F, device="cuda", dtype=torch.float64, generator=g).requires_grad_(True)
loc = torch.arange(Nt, device="cuda") - ptr[batch]
xd = torch.zeros(B, Nmax, F, device="cuda", dtype=torch.float64).index_put((batch, loc), x)
sd = torch.zeros(B, Nmax, C, device="cuda", dtype=torch.float64).index_put((batch, loc), s)
ad = torch.zeros(B, Nmax, Nmax, device="cuda", dtype=torch.float64).index_put((batch[ei[0]], loc[ei[0]], loc[ei[1]]), w, accumulate=True)
mask = torch.zeros(B, Nmax, dtype=torch.bool, device="cuda").index_put((batch, loc), torch.ones(Nt, dtype=torch.bool, device="cuda"))
a = sparse_diff_pool(x, ei, s, batch, w, per_graph=True)
b = dense_diff_pool(xd, ad, sd, mask, per_graph=True, backend="torch")
err = max(float((p - q).detach().abs().max()) for p, q in zip(a, b))
ga = torch.autograd.grad(sum(t.sum() for t in a), (x, s, w))
gb = torch.autograd.grad(sum(t.sum() for t in b), (x, s, w))
gerr = max(float((p - q).abs().max()) for p, q in zip(ga, gb))
print(f"near-converged batch of {B} graphs, symmetric pattern, float64: outputs {err:.3e}, grads of x, s, w {gerr:.3e}")
assert err < 1e-9 and gerr < 1e-9
N, E = 10**6, 10**7
ei = torch.randint(0, N, (2, E), device="cuda", generator=g)
x = torch.randn(N, 32, device="cuda", generator=g, requires_grad=True)
s = torch.randn(N, 64, device="cuda", generator=g, requires_grad=True)
for rep in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out, oa, l, e = sparse_diff_pool(x, ei, s)
    (out.sum() + oa.sum() + l + e).backward()
    torch.cuda.synchronize()
    print(f"N=1e6 E=1e7 C=64 F=32 fwd+bwd {time.perf_counter() - t0:.3f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: sparse step FAILED"; status=1; }
    echo "sparse step took $(( $(date +%s) - start )) s"
fi
if [[ " $STEPS " == *" clusters "* ]]; then
    # Per-graph cluster counts on the Triton path (column mask in the row pass) and the BCE link
    # loss (chunked torch under checkpoint) on CUDA: agreement with the torch path, time, memory.
    start=$(date +%s)
    echo "== num_clusters and link_loss=bce on CUDA =="
    timeout 240 $PY - <<'PY' 2>&1 | tee "$OUT_DIR/clusters.log"
import time, torch
from diffpool_fast import dense_diff_pool
g = torch.Generator(device="cuda").manual_seed(0)
B, N, C, F = 64, 512, 128, 128
x = torch.randn(B, N, F, device="cuda", generator=g, requires_grad=True)
s = torch.randn(B, N, C, device="cuda", generator=g, requires_grad=True)
a = (torch.rand(B, N, N, device="cuda", generator=g) < 0.05).float()
adj = ((a + a.transpose(1, 2)) > 0).float()
mask = torch.arange(N, device="cuda")[None] < torch.randint(N // 4, N + 1, (B,), device="cuda", generator=g)[:, None]
k = torch.randint(1, C + 1, (B,), device="cuda", generator=g)
def run(backend, **kw):
    outs = dense_diff_pool(x, adj, s, mask, backend=backend, **kw)
    gx, gs = torch.autograd.grad(sum(o.float().sum() for o in outs), [x, s])
    return outs, gx, gs
def timed(backend, **kw):
    for _ in range(2):
        run(backend, **kw)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t0 = time.perf_counter()
    for _ in range(5):
        run(backend, **kw)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / 5, torch.cuda.max_memory_allocated() / 2**20
(o1, gx1, gs1), (o2, gx2, gs2) = run("triton", num_clusters=k), run("torch", num_clusters=k)
err = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-6)) for p, q in zip(list(o1) + [gx1, gs1], list(o2) + [gx2, gs2]))
print(f"num_clusters: triton vs torch, max error relative to the largest entry {err:.2e}")
assert err < 5e-3
for name, backend, kw in (("triton, fixed C", "triton", {}), ("triton, num_clusters", "triton", dict(num_clusters=k)),
                          ("torch, num_clusters", "torch", dict(num_clusters=k)),
                          ("triton + bce", "triton", dict(link_loss="bce")), ("torch + bce", "torch", dict(link_loss="bce"))):
    ms, mib = timed(backend, **kw)
    print(f"B={B} N={N} C={C} F={F} {name}: fwd+bwd {ms:.2f} ms, peak {mib:.0f} MiB")
PY
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: clusters step FAILED"; status=1; }
    echo "clusters step took $(( $(date +%s) - start )) s"
fi
echo "results in $OUT_DIR (compare with bench/notes/FLOOR.md)"
exit $status
