#!/usr/bin/env bash
# Runs scripts/bench_fidelity.py on a GPU machine with torch 2.11, the wheels of `scripts/device_wheels.sh --full`
# in .whl/ and the LPIPS backbone in .carry/weights (carried along), then the GPU tests.
#
# Here:   scripts/device_wheels.sh --full; mkdir -p .carry/weights; cp ~/.cache/qsched-search/weights/alexnet.pth .carry/weights/
# There:  scripts/run_bench_fidelity.sh "$OUT" embedded,picks,calls     # or e2e; from the repository root
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/bench/fidelity}
PARTS=${2:-embedded,picks,calls,e2e}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QSCHED_WEIGHTS_DIR=$PWD/.carry/weights
mkdir -p "$OUT_DIR"
timeout "${BENCH_SECONDS:-420}" python3 scripts/bench_fidelity.py --out "$OUT_DIR" --parts "$PARTS" 2>&1 \
  | grep -v "Warning\|warn(\|^ *$\|select_algorithm" | tee "$OUT_DIR/log.txt" | tail -40
