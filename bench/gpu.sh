#!/usr/bin/env bash
# The GPU command: on a CUDA machine, measure and check what the package promises on a GPU.
#
#   bash bench/gpu.sh [OUT_DIR]                      (default: bench/results/<UTC date>-<gpu>-gpu)
#   GPU_STEPS="op capture" bash bench/gpu.sh OUT_DIR (a subset, in this order: tune dispatch
#                                                     op capture model sparse clusters tests)
#
# Default steps (tune is not one: it tries kernel configurations, ~3 minutes, and its winners
# are then committed into the kernels' tables), with their time limits; all of them in under
# 6 minutes on an H200:
#   op       issue 19's op table: ours (auto, Triton, torch) vs PyG vs torch.compile(PyG), "highest"
#            and "high", errors against float64, peak memory -> op/profile.csv, profile.md    150 s
#   capture  forward+backward captured in a CUDA graph and replayed, next to eager and PyG, with a
#            torch.profiler table of the headline step (bench/scripts/gpu_tune.py step,profile)  60 s
#   model    the classifier's training step vs PyG's example, and short PROTEINS runs
#            (bench/scripts/gpu_train.py) -> model/model_profile.csv, train_proteins.csv     120 s
#   sparse, clusters  sparse_diff_pool at 10^6 nodes; num_clusters and BCE on CUDA           40 s
#   tests    every test file on the GPU with pytest-xdist (last: a killed run leaves workers)  200 s
#   tune     (not by default) bench/scripts/gpu_tune.py: correctness, each kernel's candidate
#            configurations, the step; writes tune/kernel_configs.json, which the later steps of
#            the same run use (DIFFPOOL_FAST_KERNEL_CONFIGS) and which is then committed.
#   dispatch (not by default) Triton vs torch at the op table's shapes; the winners go into
#            diffpool_fast/ops/dispatch_table.json, which auto then reads (commit it after).
#
# Output: at most 8 files at the top of OUT_DIR (status.csv, env.txt, profile.csv, tests.log,
# model_profile.csv, profile_step.txt, tune.log, results.tar.gz), the full folders in
# results.tar.gz. status.csv gets a row the moment each step ends. GPU_LIMIT_OP, GPU_LIMIT_CAPTURE,
# GPU_LIMIT_MODEL and GPU_LIMIT_TESTS override those steps' limits (seconds), to fit a lease. TU data: $DIFFPOOL_FAST_DATA or
# .gpu_data/ (the device tool carries that git-ignored copy; nothing is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
# The lent GPU machines' `python3` holds torch, triton and torch_geometric; `python` may not exist.
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device visible to torch; this command needs a GPU" >&2
    exit 2
fi
gpu=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
if ! $PY -c "import diffpool_fast.kernels" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . || {
        echo "bench/gpu.sh: could not install diffpool_fast (pip install --no-deps --no-build-isolation -e .)" >&2
        exit 2
    }
fi
if [ $# -ge 1 ]; then
    OUT_DIR=$1
else
    OUT_DIR=bench/results/$(date -u +%F)-$gpu-gpu
    k=1; base=$OUT_DIR
    while [ -n "$(ls -A "$OUT_DIR" 2>/dev/null)" ]; do k=$((k + 1)); OUT_DIR=$base-$k; done
fi
mkdir -p "$OUT_DIR/full"
FULL=$OUT_DIR/full
unset TRITON_INTERPRET DIFFPOOL_FAST_BACKEND
DATA=${DIFFPOOL_FAST_DATA:-$PWD/.gpu_data}
STEPS=${GPU_STEPS:-op capture model sparse clusters tests}
T0=$(date +%s)

{
    echo "command: bash bench/gpu.sh $*  (GPU_STEPS=$STEPS)"
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' +dirty')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
    $PY - <<'PY'
import os, platform, torch, triton, numpy
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__, "| numpy", numpy.__version__, "| cpus", os.cpu_count())
try:
    import torch_geometric
    print("torch_geometric", torch_geometric.__version__)
except ImportError:
    print("torch_geometric not installed")
PY
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
echo "step,status,seconds,at_s" > "$OUT_DIR/status.csv"

status=0
# step NAME LIMIT_S COMMAND...: runs it under its own time limit, output to full/NAME.log, and
# writes its row of status.csv as soon as it ends
step() {
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local start
    start=$(date +%s)
    echo "== $name (limit $limit s) =="
    timeout "$limit" "$@" 2>&1 | tee "$FULL/$name.log"
    local rc=${PIPESTATUS[0]}
    local now
    now=$(date +%s)
    echo "$name,$([ "$rc" -eq 0 ] && echo ok || echo "FAILED rc=$rc"),$((now - start)),$((now - T0))" >> "$OUT_DIR/status.csv"
    [ "$rc" -eq 0 ] || { echo "bench/gpu.sh: $name FAILED (rc=$rc, see $FULL/$name.log)"; status=1; }
}

step tune 280 $PY bench/scripts/gpu_tune.py "$FULL/tune" --budget 150 --steps correct,tune,step
if [ -f "$FULL/tune/kernel_configs.json" ]; then
    export DIFFPOOL_FAST_KERNEL_CONFIGS=$PWD/$FULL/tune/kernel_configs.json
    echo "later steps use the tuned kernel configurations in $DIFFPOOL_FAST_KERNEL_CONFIGS"
fi

# (with tune) Triton vs torch at the op table's shapes under "highest", winners written into the
# dispatch table that backend="auto" reads (the package's own file: the op step's auto rows then
# time what a user gets with it; the file is committed after the run)
step dispatch 90 $PY -m diffpool_fast profile --device cuda --mode full --backend torch,triton \
    --shapes 64x512x128x128,64x512x128x128:converged,64x1024x128x128,32x2048x128x128,256x128x32x64,256x512x128x128,64x512x128x128:bool \
    --precision highest --no-memory --repeats 10 --warmup 2 --out "$FULL/dispatch" \
    --write-dispatch diffpool_fast/ops/dispatch_table.json
[ -f diffpool_fast/ops/dispatch_table.json ] && [[ " $STEPS " == *" dispatch "* ]] && \
    cp diffpool_fast/ops/dispatch_table.json "$FULL/dispatch/dispatch_table.json"

step op ${GPU_LIMIT_OP:-150} $PY bench/scripts/gpu_op_table.py "$FULL/op"

step capture ${GPU_LIMIT_CAPTURE:-60} $PY bench/scripts/gpu_tune.py "$FULL/capture" --steps step,profile

step model ${GPU_LIMIT_MODEL:-120} $PY bench/scripts/gpu_train.py --data-root "$DATA" --out "$FULL/model" --budget 110

step sparse 30 $PY bench/scripts/gpu_checks.py sparse
step clusters 30 $PY bench/scripts/gpu_checks.py clusters

# Every test file on the GPU, 14 workers; -v prints each outcome as it happens, so a time-out
# still tells which tests failed.
step tests ${GPU_LIMIT_TESTS:-200} $PY -m pytest -v -n 14 -p no:cacheprovider tests

# at most 8 files at the top; everything in results.tar.gz
for f in op/profile.csv model/model_profile.csv capture/profile_step.txt tune/tune.log; do
    [ -f "$FULL/$f" ] && cp "$FULL/$f" "$OUT_DIR/$(basename "$f")"
done
[ -f "$FULL/tests.log" ] && cp "$FULL/tests.log" "$OUT_DIR/tests.log"
tar -czf "$OUT_DIR/results.tar.gz" -C "$OUT_DIR" full && rm -rf "$FULL"
echo "results in $OUT_DIR after $(( $(date +%s) - T0 )) s (compare with bench/notes/FLOOR.md)"
exit $status
