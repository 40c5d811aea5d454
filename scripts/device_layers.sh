#!/usr/bin/env bash
# On a GPU machine (torch 2.11, the wheels of `scripts/device_wheels.sh --full` in .whl/, the LPIPS backbone in
# .carry/weights): the embedded probe with the defaults under the machine's Python (3.12, SciPy 1.18), then a
# per-layer search on the real-kernel bank (embedded model in bfloat16, torchao fp8/w8a8, grouping `role`) and the
# wall time of its schedule against its per-step levels and all-bf16.
#
#   scripts/device_layers.sh "$OUT"          # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-/tmp/device_layers}
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QSCHED_WEIGHTS_DIR=$PWD/.carry/weights
python3 -c "import sys, scipy, numpy, torch; print('python', sys.version.split()[0], 'scipy', scipy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)" | tee "$OUT_DIR/versions.txt"
start=$(date +%s)
python3 -m qsched_search probe --steps 4 --samples 16 --device cuda --out "$OUT_DIR/py312-probe" > "$OUT_DIR/py312-probe.txt" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT_DIR/py312-probe.txt"; tail -3 "$OUT_DIR/py312-probe.txt"
L="$OUT_DIR/layers-gpu"
COMMON="--steps 4 --samples 16 --batch-size 16 --device cuda --dtype bfloat16 --reference bf16 --precisions fp8,w8a8 --grouping role"
start=$(date +%s)
python3 -m qsched_search probe $COMMON --layers --layer-precisions fp8 --out "$L" > "$L.probe.txt" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$L.probe.txt"; tail -2 "$L.probe.txt"
start=$(date +%s)
python3 -m qsched_search search $COMMON --layers --layer-trials 8 --budget 0.8 --images 0 --out "$L" > "$L.search.txt" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$L.search.txt"; tail -12 "$L.search.txt"
python3 scripts/time_schedules.py --schedule "$L/schedule.json" --out "$L/timing.csv" --batch 16 2>&1 | tail -4
rm -f "$L/study.db" "$L"/*.lock
