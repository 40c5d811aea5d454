#!/usr/bin/env bash
# Runs the GPU benchmark on a machine with torch 2.11 and the wheels of scripts/device_wheels.sh in .whl/.
#
# Here:       scripts/device_wheels.sh                       # builds .whl/ (diffusers, torchao 0.18, importlib_metadata)
# There:      scripts/run_bench_gpu.sh "$OUT/gpu"           # from the repository root, .whl/ carried along
#
# The defaults are the settings of results/bench/gpu/ (one H200, about 340 s); extra arguments go to bench_gpu.py.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/bench/gpu}
shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
# inductor's autotuner prints one warning per candidate; the log keeps everything else.
timeout 515 python3 scripts/bench_gpu.py --out "$OUT_DIR" --models flux,sdxl --resolutions 1024,512 --batches 1,4 \
  --levels bf16,fp8,w8a8 --schedule-levels bf16,fp8 --repeats 10 --warmup 2 --loop-repeats 2 --switch-calls 16 \
  --switch-repeats 5 --model-deadlines flux=290 --time-budget-s 470 "$@" 2>&1 \
  | grep -v "Warning\|warn(\|^ *$\|select_algorithm" | tee "$OUT_DIR/log.txt"
