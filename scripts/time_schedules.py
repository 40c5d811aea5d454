"""Wall time of pipeline calls under a searched schedule, its per-step levels alone, and the all-reference run, on the
real-kernel bank (`apply_schedule`, backend torchao) of a CUDA GPU, side by side in one process.

The pipeline is loaded as the schedule was searched (model, dtype) and called on the schedule's prompts at its
search batch; each variant gets a warm-up call (compile, assembled copies) and `--repeats` timed calls.

    python3 scripts/time_schedules.py --schedule OUT/schedule.json --out OUT/timing.csv    # on the GPU machine
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search import apply_schedule  # noqa: E402
from qsched_search.logs import quiet_libraries  # noqa: E402
from qsched_search.pipeline.loading import load_model  # noqa: E402
from qsched_search.quant.latency import time_pipeline_calls  # noqa: E402
from qsched_search.results.io import write_csv  # noqa: E402
from qsched_search.results.provenance import device_name, now, versions  # noqa: E402
from qsched_search.results.schedule import load_schedule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", help="the dtype the schedule was searched with")
    args = parser.parse_args()
    quiet_libraries()
    schedule = load_schedule(args.schedule)
    execution = schedule.execution
    model = load_model(schedule.model_id, device="cuda", dtype=args.dtype)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = (schedule.extras.get("search", {}).get("prompts") or ["a bag"]) * args.batch
    call = {**model.family.call_defaults, "prompt": prompts[:args.batch], "num_inference_steps": schedule.steps}
    variants = {"schedule": schedule, "per-step levels": replace(schedule, overrides=()),
                "reference": replace(schedule, levels=(schedule.reference,) * schedule.steps, overrides=())}
    rows = []
    for name, variant in variants.items():
        applied = apply_schedule(pipe, variant, backend="torchao")
        try:
            first, ms = time_pipeline_calls(lambda k: pipe(**call, generator=torch.Generator("cuda").manual_seed(k)),
                                            "cuda", args.repeats)
            memory = applied.bank.memory() if hasattr(applied.bank, "memory") else {}
            rows.append({"variant": name, "levels": ",".join(variant.levels),
                         "overrides": sum(len(s) for s in variant.overrides), "batch": args.batch,
                         "ms_median": ms[len(ms) // 2], "ms_min": ms[0], "ms_max": ms[-1], "repeats": len(ms),
                         "first_call_s": round(first, 2), "assignment_copies": memory.get("assignment_copies"),
                         "assignment_extra_bytes": memory.get("assignment_extra_bytes"),
                         "compile": execution.get("compile"), "device": device_name("cuda"), "created": now(),
                         "torch": versions().get("torch"), "torchao": versions().get("torchao")})
            print(rows[-1], flush=True)
        finally:
            applied.remove()
    write_csv(Path(args.out), pd.DataFrame(rows))


if __name__ == "__main__":
    main()
