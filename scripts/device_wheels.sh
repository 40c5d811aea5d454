#!/usr/bin/env bash
# Builds .whl/: the Python packages a GPU machine with torch 2.11 (and no package registry) needs to run qsched-search.
#
# The device image already has torch 2.11, transformers, huggingface_hub 1.33, safetensors 0.8, accelerate, numpy,
# pandas, scipy, pyyaml, typer, rich, matplotlib, torchmetrics, tqdm, requests, pillow, regex, filelock, zipp
# (see the device's package list); this fetches the rest, without their dependencies, for CPython 3.12 x86-64.
#
#   scripts/device_wheels.sh          # what scripts/bench_gpu.py needs: diffusers, torchao (about 10 MB)
#   scripts/device_wheels.sh --full   # also what the `qsched` commands need: optuna, jsonschema, lpips, clean-fid...
#
# Then, on the device, from the repository root (carrying .whl), one command runs the benchmark
# (scripts/run_bench_gpu.sh "$OUT/gpu" does the same with the settings of results/bench/gpu/):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; \
#   PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/log.txt"
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

# torchao wheels are tied to a torch release: 0.18.0 is the one built for torch 2.11 (the device's).
BENCH=(
  diffusers==0.42.1
  torchao==0.18.0
  importlib_metadata==10.2.0
)
FULL=(
  optuna==5.0.0
  alembic==1.20.1
  sqlalchemy==2.1.9
  mako==1.4.3
  colorlog==6.12.0
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  lpips==0.1.4
  clean-fid==0.1.35
)
packages=("${BENCH[@]}")
if [ "${1:-}" = "--full" ]; then
  packages+=("${FULL[@]}")
fi

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for pkg in "${packages[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "$pkg"
done

# One version of each package: two would stop the whole install on the device.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "error: several versions in $DEST of: $dupes; delete the old ones" >&2
  exit 1
fi
du -ch "$DEST"/*.whl | tail -1
ls "$DEST"
