#!/usr/bin/env bash
# Runs the attention benchmark and the FLUX step profile on the GPU machine, as one command of under 6 minutes.
#
# Here:   .whl/ holds the project's wheels (scripts/device_wheels.sh: diffusers 0.42.1, torchao 0.18.0, ...) and
#         nvidia_cudnn_frontend-1.23.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
#         (sha256 36c9bbaeae94e40157c6119cdd9eb52dbdfdb0cedb195984910ea32827029198).
# There:  scripts/device_attention.sh                 # from the repository root, .whl carried; writes under $OUT
#         scripts/device_attention.sh /some/folder    # or under that folder
#
# Writes <out>/attention/{attention.csv,summary.json,log.txt} and <out>/breakdown/{breakdown.csv,top_kernels.csv,
# summary.json,log.txt}: 7 files, within the 8 the device returns. Each script runs under its own `timeout` and
# writes its rows as it measures them, so the first one's overrun cannot cost the second its turn.
#   ATTN_S=150 PROFILE_S=190         the two time limits in seconds (with the install, about 350 s in all)
#   ATTN_ARGS=... PROFILE_ARGS=...   extra arguments, e.g. PROFILE_ARGS="--blocks 4,8" for a quick profile
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_ROOT=${1:-${OUT:?pass the output folder or set OUT}}
ATTN_S=${ATTN_S:-150}
PROFILE_S=${PROFILE_S:-190}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
if ! ls .whl/nvidia_cudnn_frontend-*.whl >/dev/null 2>&1; then
  echo "warning: no nvidia_cudnn_frontend wheel in .whl/: the cuDNN fp8 rows will say why they failed" >&2
fi
mkdir -p "$OUT_ROOT/attention" "$OUT_ROOT/breakdown"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader || true

echo "=== bench_attention.py (limit ${ATTN_S} s)"
# ${ATTN_ARGS:-} unquoted on purpose: it holds several arguments
timeout -k 5 "$ATTN_S" python3 scripts/bench_attention.py --out "$OUT_ROOT/attention" \
  --time-budget-s $((ATTN_S - 10)) --reserve-s 15 ${ATTN_ARGS:-} 2>&1 | tee "$OUT_ROOT/attention/log.txt"
attn_rc=${PIPESTATUS[0]}

echo "=== profile_flux_step.py (limit ${PROFILE_S} s)"
timeout -k 5 "$PROFILE_S" python3 scripts/profile_flux_step.py --out "$OUT_ROOT/breakdown" \
  --time-budget-s $((PROFILE_S - 10)) ${PROFILE_ARGS:-} 2>&1 | tee "$OUT_ROOT/breakdown/log.txt"
profile_rc=${PIPESTATUS[0]}

echo "=== exit codes: bench_attention $attn_rc, profile_flux_step $profile_rc (124: stopped by its time limit)"
for f in "$OUT_ROOT"/attention/attention.csv "$OUT_ROOT"/breakdown/breakdown.csv; do
  [ -f "$f" ] && { echo "--- $f"; cat "$f"; }
done
[ "$attn_rc" -eq 0 ] && [ "$profile_rc" -eq 0 ]
