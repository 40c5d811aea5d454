#!/usr/bin/env bash
# Builds the wheel, installs it into a new virtualenv outside the checkout and runs it from there: the precision menu,
# a one-step probe and search on the embedded model, and apply_schedule from Python. Proves that the configs, the
# schema, the report's CSS and the embedded models are package data (found through the installed package).
#
# The dependencies (torch and the rest, several GB) are taken from the project's virtualenv as a plain path entry:
# its .pth files, the editable install of this checkout among them, are not run, so only the wheel provides
# qsched_search. Usage: scripts/check_wheel.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/qsched-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . >/dev/null
"$PY" -m venv --without-pip "$work/venv"
deps=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -m pip install -q --no-deps --target "$own" "$work"/dist/*.whl
echo "$deps" > "$own/zz-project-deps.pth"
cd "$work"  # nothing of the checkout on the path from here on
export PATH="$work/venv/bin:$PATH"
python - <<PYEOF
import qsched_search, sys
assert qsched_search.__file__.startswith("$own"), f"qsched_search imported from {qsched_search.__file__}, not the wheel"
print("wheel:", qsched_search.__file__)
PYEOF
python -m qsched_search precisions >/dev/null
python -m qsched_search probe --steps 1 --samples 2 --precisions w8a8 --out "$work/out" >/dev/null
python -m qsched_search search --steps 1 --samples 2 --precisions w8a8 --budget 0.9 --images 0 --out "$work/out" >/dev/null
python - <<PYEOF
from diffusers import DiffusionPipeline

from qsched_search import apply_schedule
from qsched_search.resources import EMBEDDED_MODEL_DIR
from qsched_search.results.schedule import load_schedule

pipe = DiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL_DIR))
applied = apply_schedule(pipe, "$work/out/schedule.json")
pipe(["sneaker"], num_inference_steps=1, guidance_scale=0.0, height=32, width=32)
levels = load_schedule("$work/out/schedule.json").levels
assert dict(applied.bank.calls) == {levels[0]: 1} and levels[0] != "fp32", (levels, applied.bank.calls)
applied.remove()
print("apply_schedule from the wheel:", dict(applied.bank.calls))
PYEOF
echo "wheel check passed"
