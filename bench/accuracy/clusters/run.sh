#!/usr/bin/env bash
# The 16 runs of bench/accuracy/clusters/PROTOCOL.md, two lanes of one-thread runs side by side.
# Usage: bash bench/accuracy/clusters/run.sh [DATA_ROOT]   (default /work/shared/tudata); resumes
# a run whose checkpoint exists.
set -u
cd "$(dirname "$0")/../../.."
ROOT=${1:-/work/shared/tudata}
mkdir -p runs/accuracy-clusters
base() {
    case $1 in
        MUTAG) echo "--epochs 100" ;;
        PROTEINS) echo "--epochs 40 --ratio 0.1 --readout max --readout-levels all" ;;
        ENZYMES) echo "--epochs 60 --node-attr --norm batch" ;;
        NCI1) echo "--epochs 20" ;;
    esac
}
opts() {
    case $1 in
        fixed-frob) echo "" ;;
        pergraph-frob) echo "--clusters-per-graph" ;;
        fixed-bce) echo "--link-loss bce" ;;
        pergraph-bce) echo "--clusters-per-graph --link-loss bce" ;;
    esac
}
run() {  # dataset, configuration
    local name=$1-$2 out=runs/accuracy-clusters/$1-$2 resume=""
    [ -f "$out/checkpoint.pt" ] && resume="--resume"
    [ -f "bench/accuracy/clusters/$name/results.json" ] && return 0
    if [ -n "$resume" ]; then
        /usr/bin/time -v diffpool-fast train --resume --out "$out" --progress off >> "runs/accuracy-clusters/$name.log" 2>&1
    else
        # shellcheck disable=SC2046
        /usr/bin/time -v diffpool-fast train --dataset "$1" --data-root "$ROOT" --folds 10 --threads 1 --progress off \
            --seed 0 $(base "$1") $(opts "$2") --out "$out" > "runs/accuracy-clusters/$name.log" 2>&1
    fi
    mkdir -p "bench/accuracy/clusters/$name"
    cp "$out/results.json" "$out/metrics.csv" "bench/accuracy/clusters/$name/" 2>/dev/null
    cp "runs/accuracy-clusters/$name.log" "bench/accuracy/clusters/$name/train.log"
}
CONFIGS="fixed-frob pergraph-frob fixed-bce pergraph-bce"
( for c in $CONFIGS; do run MUTAG "$c"; done; for c in $CONFIGS; do run PROTEINS "$c"; done ) &
( for c in $CONFIGS; do run ENZYMES "$c"; done; for c in $CONFIGS; do run NCI1 "$c"; done ) &
wait
