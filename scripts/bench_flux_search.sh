#!/usr/bin/env bash
# `qsched probe` + `qsched search` of the FLUX.1-schnell config end to end on one GPU, timed phase by phase
# (issue 18, GPU row; results/bench/flux_search/README.md has the run and its numbers).
#
# The model: scripts/bench_fidelity.py `_flux_pipeline` (the stock FluxPipeline with the full FLUX.1-schnell
# transformer config, random weights of seed 0, the full VAE config, tiny random CLIP/T5 text encoders), written
# with save_pretrained to $MODEL and loaded by the CLI with --model $MODEL. Each `qsched` command runs under
# scripts/bench_flux_search.py `cli`, which times its phases (load, fingerprint, quantize, compile, denoiser
# calls, VAE decode, metrics, each evaluation) and writes TIMINGS.json beside the results.
#
# On the GPU machine, from the repository root (wheels from scripts/device_wheels.sh --full carried as .whl, the
# LPIPS backbone as .carry/weights/alexnet.pth):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD QSCHED_WEIGHTS_DIR=$PWD/.carry/weights
#   DEADLINE=$(( $(date +%s) + 560 )) scripts/bench_flux_search.sh "$OUT/flux"
#
# Settings (environment): MODEL (/tmp/flux-random), STATE (the --out folder of probe and search, /tmp/flux-search),
# SAMPLES (32), BATCH (16), STEPS (4), TRIALS (12), BUDGET (auto: the family's 0.5 when the cheapest uniform
# schedule leaves room under it, else a quarter of the way from that schedule's bops cost to 1), PRECISIONS (auto:
# fp8,w8a8,w4a16, the torchao defaults for bf16, leaving out w4a16 when one FLUX MLP Linear at this batch runs it
# more than 2x slower than bf16: 26x on the H200, so auto is fp8,w8a8 there), PHASES (build,kernels,probe,search),
# DEADLINE (unix seconds: every phase is interrupted then, and resumes on the next run with the same settings; probe
# cells and the study are kept in $STATE), SEARCH_MIN_S (0: start the search only with at least this many seconds
# left), FIT_TRIALS (0; 1: at most TRIALS, as many as the probe's timings say fit before DEADLINE).
# A rerun with the same settings resumes: the model is rebuilt only if $MODEL/bench_build.json is missing (same
# seed, same weights: the resumed probe and search check the denoiser's sha256), finished probe cells are reused,
# and the search adds TRIALS new evaluations to the study (pass the ones still missing).
# Writes into OUTDIR: phases.csv (phase, milliseconds, exit code), log.txt, state.tgz (the whole $STATE folder:
# probe.csv, probe_cells.jsonl, manifest.json, schedule.json, trials.csv, pareto.csv, study.db, *_timings.json).
#
# results/bench/flux_search/fp8_w8a8 came from
#   STATE=/tmp/flux-search-w8 PHASES=probe,search PRECISIONS=fp8,w8a8 FIT_TRIALS=1 DEADLINE=... scripts/bench_flux_search.sh
# (the search interrupted at the deadline, then run again with PHASES=search); results/bench/flux_search/fp8 from
#   PHASES=build ..., then PHASES=kernels,probe,search SEARCH_MIN_S=420 FIT_TRIALS=1 ..., then PHASES=search PRECISIONS=fp8
# with an earlier rule for PRECISIONS=auto that also dropped w8a8 on its eager timing.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR=${1:?usage: scripts/bench_flux_search.sh OUTDIR}
MODEL=${MODEL:-/tmp/flux-random}
STATE=${STATE:-/tmp/flux-search}
SAMPLES=${SAMPLES:-32}
BATCH=${BATCH:-16}
STEPS=${STEPS:-4}
TRIALS=${TRIALS:-12}
BUDGET=${BUDGET:-auto}
PRECISIONS=${PRECISIONS:-auto}
PHASES=${PHASES:-build,kernels,probe,search}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 100000 ))}
SEARCH_MIN_S=${SEARCH_MIN_S:-0}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

mkdir -p "$OUTDIR" "$STATE"
LOG="$OUTDIR/log.txt"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
has() { [[ ",$PHASES," == *",$1,"* ]]; }
# phase NAME CMD...: runs CMD (output to the log), interrupted (SIGINT) at the deadline; appends to phases.csv
phase() {
  local name=$1; shift
  local budget; budget=$(left)
  if (( budget < 5 )); then log "$name: skipped, no time left before the deadline"; return 124; fi
  log "$name: start ($budget s left)"
  local s e rc; s=$(date +%s%N)
  timeout -s INT -k 20 "$budget" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  e=$(date +%s%N)
  echo "$name,$(( (e - s) / 1000000 )),$rc" >> "$OUTDIR/phases.csv"
  log "$name: exit $rc after $(( (e - s) / 1000000000 )) s"
  return "$rc"
}
[ -f "$OUTDIR/phases.csv" ] || echo "phase,ms,exit" > "$OUTDIR/phases.csv"
log "settings: MODEL=$MODEL STATE=$STATE SAMPLES=$SAMPLES BATCH=$BATCH STEPS=$STEPS TRIALS=$TRIALS BUDGET=$BUDGET PRECISIONS=$PRECISIONS PHASES=$PHASES left=$(left)s"
"$PY" -c "import sys, torch, scipy, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'scipy', scipy.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" 2>&1 | tee -a "$LOG"

if has build; then
  if [ -f "$MODEL/bench_build.json" ]; then
    log "build: $MODEL is there already (bench_build.json), not rebuilt"
  else
    rm -rf "$MODEL"
    phase build "$PY" scripts/bench_flux_search.py build "$MODEL" || exit 1
    cp "$MODEL/bench_build.json" "$STATE/bench_build.json"
  fi
fi

if [ "$PRECISIONS" = auto ]; then
  PRECISIONS=fp8,w8a8,w4a16
  if has kernels; then
    if [ ! -f "$STATE/kernels.json" ]; then
      phase kernels "$PY" scripts/bench_flux_search.py kernels "$STATE/kernels.json" --batch "$BATCH"
    fi
    if [ -f "$STATE/kernels.json" ]; then
      # Only w4a16 is judged: eager int8 W8A8 is unfused (58 ms against bf16's 7 ms on the H200; compiled, the bank
      # runs it at 1.07x bf16's time per call), while tinygemm is one aten op, as fast eager as compiled.
      PRECISIONS=$("$PY" -c "import json; ms = json.load(open('$STATE/kernels.json'))['ms']; print('fp8,w8a8' + (',w4a16' if ms.get('w4a16', 1e9) <= 2 * ms['bf16'] else ''))")
    fi
  fi
fi
log "precisions: $PRECISIONS"

COMMON=(--model "$MODEL" --family flux-schnell --backend torchao --device cuda --dtype bfloat16 --reference bf16
        --precisions "$PRECISIONS" --steps "$STEPS" --samples "$SAMPLES" --batch-size "$BATCH" --seed 0 --out "$STATE")
n=$(ls "$STATE"/probe_timings*.json 2>/dev/null | wc -l)
if has probe; then
  phase "probe$([ "$n" = 0 ] || echo ".$n")" "$PY" scripts/bench_flux_search.py cli "$STATE/probe_timings$([ "$n" = 0 ] || echo ".$n").json" -- \
    probe "${COMMON[@]}" --metrics lpips
fi

if has search; then
  if [ ! -f "$STATE/probe.csv" ]; then
    log "search: skipped, the probe has not finished (no $STATE/probe.csv)"
  elif (( $(left) < SEARCH_MIN_S )); then
    log "search: skipped, $(left) s left < SEARCH_MIN_S=$SEARCH_MIN_S"
  else
    if [ "$BUDGET" = auto ]; then
      BUDGET=$("$PY" -c "
import json, math
costs = json.load(open('$STATE/manifest.json'))['stages']['probe']['level_costs']
cheapest = min(c['bops'] for lv, c in costs.items() if lv in '$PRECISIONS'.split(','))
print(0.5 if cheapest <= 0.45 else math.ceil((cheapest + (1 - cheapest) / 4) * 100) / 100)")
    fi
    log "budget: $BUDGET (bops)"
    if [ "${FIT_TRIALS:-0}" = 1 ]; then  # as many of TRIALS as the probe's timings say fit before the deadline
      TRIALS=$("$PY" - "$STATE" "$(left)" "$TRIALS" <<'EOF_PY'
import glob, json, math, statistics, sys
state, left, most = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
timings = [json.load(open(f)) for f in sorted(glob.glob(f"{state}/probe_timings*.json"))]
phases = timings[0]["phases"]
setup = sum(phases.get(k, {}).get("seconds", 0) for k in ("load_model", "weights_sha256", "capture_denoiser_call",
                                                           "build_bank", "denoiser_first_calls (compile)"))
cells = [json.loads(line) for line in open(f"{state}/probe_cells.jsonl")]
seconds = {c["cell"]: c.get("seconds") or 0 for c in cells}
reference = seconds.get("reference:bf16:", 60)
uniform = [s for k, s in seconds.items() if k.startswith("uniform:")] or [reference]
per_trial = max(uniform) + 2  # a trial runs 3 or 4 new steps of one schedule, like a uniform cell (3 new steps)
fit = math.floor((left - setup - reference - 40) / per_trial)
print(max(1, min(most, fit)))
print(f"fit: {left:.0f} s left, setup {setup:.0f} s, reference {reference:.0f} s, {per_trial:.0f} s per trial -> {fit}", file=sys.stderr)
EOF_PY
)
      log "trials fitted to the time left: $TRIALS"
    fi
    m=$(ls "$STATE"/search_timings*.json 2>/dev/null | wc -l)
    phase "search$([ "$m" = 0 ] || echo ".$m")" "$PY" scripts/bench_flux_search.py cli "$STATE/search_timings$([ "$m" = 0 ] || echo ".$m").json" -- \
      search "${COMMON[@]}" --objective lpips --cost bops --budget "$BUDGET" --trials "$TRIALS" --images 0
  fi
fi

cp "$LOG" "$STATE/bench_log.txt"
cp "$OUTDIR/phases.csv" "$STATE/phases.csv"
tar czf "$OUTDIR/state.tgz" -C "$STATE" .
log "packed $STATE into $OUTDIR/state.tgz ($(du -h "$OUTDIR/state.tgz" | cut -f1))"
