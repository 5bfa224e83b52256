#!/usr/bin/env bash
# Epoch time of `diffpool-fast train` (generated dataset, 2 epochs) with 2 and with 1 torch thread,
# with no other process, beside a Python spin loop on one core, and beside a 1-thread torch job:
# why `train` without --threads uses only the cores other processes leave idle.
# Usage (from the repository root; a new folder bench/results/<UTC date>-<device>-threads_under_load/,
# bench/README.md; the reading of the recorded run is bench/notes/threads_under_load.md):
#   bash bench/scripts/threads_under_load.sh > "$(python bench/scripts/provenance.py threads_under_load)/threads_under_load.md"
set -euo pipefail
cd "$(dirname "$0")/../.."
epoch() {  # threads -> s/epoch as train prints it
    diffpool-fast train --dataset synthetic --epochs 2 --progress off --threads "$1" --out "$(mktemp -d)" 2>&1 \
        | sed -n 's/.*; \([0-9.]*\) s\/epoch$/\1/p' | head -1
}
echo "# diffpool-fast train epoch time with and without a busy core"
echo
echo "- command: \`bash bench/scripts/threads_under_load.sh\`"
echo "- machine: $(uname -m), $(nproc) cores, $(uname -sr)"
echo "- versions: $(python -c 'import torch, platform, diffpool_fast; print("torch", torch.__version__, "| diffpool_fast", diffpool_fast.__version__, "| python", platform.python_version())')"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| other busy processes | --threads 2 s/epoch | --threads 1 s/epoch |"
echo "| ---: | ---: | ---: |"
echo "| 0 | $(epoch 2) | $(epoch 1) |"
python -c "while True: pass" & spin=$!
trap 'kill $spin 2>/dev/null' EXIT
sleep 1
echo "| 1 (Python spin loop) | $(epoch 2) | $(epoch 1) |"
kill $spin
python -c "
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a)
" & spin=$!
sleep 2
echo "| 1 (1-thread torch matmul loop) | $(epoch 2) | $(epoch 1) |"
