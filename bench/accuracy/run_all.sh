#!/usr/bin/env bash
# 10-fold CV accuracy runs recorded in bench/accuracy/ (see README.md there).
# One-thread runs, two at a time (the build machine has 2 cores shared with other jobs).
# Usage: bash bench/accuracy/run_all.sh [DATA_ROOT] [DATASET ...]   (default ../shared/tudata, all three)
set -u
cd "$(dirname "$0")/../.."
ROOT=${1:-../shared/tudata}; shift || true
WANT=${*:-MUTAG PROTEINS ENZYMES}
mkdir -p runs/accuracy
run() {  # name, extra args...
    local name=$1; shift
    case " $WANT " in *" $name "*) ;; *) return 0;; esac
    local out=runs/accuracy/$name
    local resume=""; [ -f "$out/checkpoint.pt" ] && resume="--resume"
    /usr/bin/time -v diffpool-fast train --dataset "$name" --data-root "$ROOT" --folds 10 --threads 1 \
        --progress off --out "$out" $resume "$@" > "runs/accuracy/$name.log" 2>&1
    mkdir -p "bench/accuracy/$name"
    cp "$out/results.json" "$out/metrics.csv" "bench/accuracy/$name/" 2>/dev/null
    cp "runs/accuracy/$name.log" "bench/accuracy/$name/train.log"
}
( run MUTAG --epochs 100; run ENZYMES --node-attr --epochs 150 --norm batch ) &
( run PROTEINS --epochs 50 --ratio 0.1 ) &
wait
