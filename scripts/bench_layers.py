"""Per-step x per-layer schedules against the best per-step schedule, at three bit-operation budgets, on seeds the
search never saw.

On the embedded model (4 steps, {fp32, w8a8, w4a8, w4a4}, LPIPS to the fp32 output, bit-operations, simulated
backend), as a user runs it:

1. `qsched probe --layers`: the step probe and every layer group (grouping `block-role`, 35 groups) alone at
   w4a4 in each step; the prior takes w8a8's and w4a8's group harms from w4a4's, scaled by the step probe.
2. For each budget, `qsched search --sampler exhaustive --layers`: all 256 per-step schedules (so the best
   per-step schedule is exact; the three budgets share one study database, which measures each schedule once),
   then the per-layer stage's `--layer-trials` evaluations.
3. Each budget's chosen per-layer schedule and best per-step schedule run again on `--holdout-samples` samples with
   seeds from `--holdout-seed` (none of the search's): LPIPS of each, the paired difference and its 95% CI.

    python scripts/bench_layers.py --out results/bench/layers            # ~25 min on 2 CPU cores
    python scripts/bench_layers.py --samples 8 --layer-trials 4 --budgets 0.666 --out /tmp/layers   # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search.logs import quiet_libraries  # noqa: E402
from qsched_search.results.assignment import brief_key, parse_schedule_key  # noqa: E402
from qsched_search.results.compare import compare_paired  # noqa: E402
from qsched_search.results.io import write_csv, write_json  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, now, versions  # noqa: E402
from qsched_search.results.schedule import load_schedule  # noqa: E402

LEVELS = "w8a8,w4a8,w4a4"


def qsched(*args: str) -> float:
    """Runs a `qsched` command as a user would; returns its wall time."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "qsched_search", *args], check=True, cwd=REPO)
    return time.time() - started


def holdout(args, schedules: dict[str, str]) -> dict:
    """Each schedule's measurement on the held-out seeds (one session: the same samples for all)."""
    from qsched_search.quant.groups import bank_groups
    from qsched_search.search.stage import open_search_session
    from qsched_search.session import RunSettings

    settings = RunSettings(steps=4, precisions=tuple(LEVELS.split(",")), samples=args.holdout_samples,
                           seed=args.holdout_seed)
    session = open_search_session(settings, "lpips")
    try:
        session.runner.groups = bank_groups(session.bank, session.model.family)
        return {key: session.evaluator.evaluate(parse_schedule_key(key)).measurement for key in dict.fromkeys(schedules.values())}
    finally:
        session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench/layers")
    parser.add_argument("--samples", type=int, default=64, help="samples of the probe and the search (seed 0)")
    parser.add_argument("--layer-trials", type=int, default=24)
    parser.add_argument("--budgets", default="0.662,0.666,0.670", help="bit-operation budgets (fractions of fp32)")
    parser.add_argument("--holdout-samples", type=int, default=128)
    parser.add_argument("--holdout-seed", type=int, default=10_000)
    args = parser.parse_args()
    quiet_libraries()
    out = Path(args.out)
    probe_dir = out / "probe"
    common = ["--steps", "4", "--samples", str(args.samples), "--precisions", LEVELS, "--seed", "0"]
    phases = {"probe": qsched("probe", *common, "--layers", "--layer-precisions", "w4a4", "--out", str(probe_dir))}
    storage = f"sqlite:///{(probe_dir / 'study.db').resolve()}"
    rows, picks = [], {}
    for budget in args.budgets.split(","):
        folder = out / f"budget-{budget}"
        phases[f"search {budget}"] = qsched("search", *common, "--budget", budget, "--sampler", "exhaustive", "--layers",
                                            "--layer-trials", str(args.layer_trials), "--probe", str(probe_dir / "probe.csv"),
                                            "--storage", storage, "--images", "0", "--out", str(folder))
        schedule = json.loads((folder / "schedule.json").read_text())
        steps = load_schedule(folder / "schedule.json").step_assignments
        manifest = json.loads((folder / "manifest.json").read_text())["stages"]["search"]
        trials = pd.read_csv(folder / "trials.csv")
        chosen = ",".join(str(s) for s in steps)
        per_step = manifest["layers"]["best_per_step"]
        picks[budget] = {"per_layer": chosen, "per_step": per_step}
        c = schedule.get("comparison_per_step") or {}
        layer_rows = trials[trials["source"].astype(str).str.startswith("layer-")]
        rows.append({"budget": float(budget), "per_step_schedule": per_step,
                     "per_step_lpips": _value(trials, per_step), "per_layer_schedule": brief_key(chosen),
                     "overrides": sum(len(s) for s in schedule.get("overrides") or ()),
                     "per_layer_lpips": schedule["quality"]["value"], "per_layer_cost": schedule["cost"]["bops"],
                     "search_difference": c.get("difference"), "search_ci_low": c.get("ci_low"),
                     "search_ci_high": c.get("ci_high"), "per_step_evaluations": int((~trials["source"].astype(str)
                                                                                      .str.startswith("layer-")).sum()),
                     "per_layer_evaluations": int(len(layer_rows)),
                     "per_layer_best_source": str(trials.loc[trials["schedule"] == chosen, "source"].iloc[0])})
    started = time.time()
    measured = holdout(args, {f"{b} {k}": v for b, p in picks.items() for k, v in p.items()})
    phases["holdout"] = time.time() - started
    for row, (budget, p) in zip(rows, picks.items()):
        a, b = measured[p["per_layer"]], measured[p["per_step"]]
        c = compare_paired(a, b, "lpips", p["per_step"])
        row.update({"holdout_per_step_lpips": b.estimates["lpips"].value, "holdout_per_layer_lpips": a.estimates["lpips"].value,
                    "holdout_difference": c["difference"], "holdout_ci_low": c["ci_low"], "holdout_ci_high": c["ci_high"],
                    "holdout_relative": c["difference"] / c["baseline_value"], "holdout_verdict": c["verdict"]})
    table = pd.DataFrame(rows)
    write_csv(out / "table.csv", table)
    write_json(out / "run.json", {"command": command_line(), "created": now(), "device": device_name("cpu"),
                                  "versions": versions(), "samples": args.samples, "layer_trials": args.layer_trials,
                                  "holdout_samples": args.holdout_samples, "holdout_seed": args.holdout_seed,
                                  "seconds": {k: round(v, 1) for k, v in phases.items()}, "picks": picks})
    print(table.to_string(index=False))


def _value(trials: pd.DataFrame, key: str) -> float:
    return float(trials.loc[trials["schedule"] == key, "value"].iloc[0])


if __name__ == "__main__":
    main()
