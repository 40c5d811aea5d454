"""Trajectory prefix reuse: denoiser calls and wall time of the probe and of searches, with and without it, in one run.

On the embedded model (4 steps, {fp32, w8a8, w4a8, w4a4}, 64 samples, LPIPS, bit-operations), each workload runs
twice in the same process, once with the rollout's prefix cache and once with it off (`PrefixCache(0)`), and the
two runs' measurements are compared value by value (they must be equal: reuse is exact):

- the probe (noise floor, 12 step cells, 3 uniform schedules);
- the exhaustive study of all 256 schedules (Optuna's brute force, as `qsched search --sampler exhaustive`);
- a warm-started 24-trial search at budget 0.67 (the probe's cells reused, uniform + probe-DP + probe-greedy
  schedules enqueued, then TPE: `qsched search` as shipped).

    python scripts/bench_reuse.py --out results/bench/reuse        # ~25 min on 2 CPU cores
    python scripts/bench_reuse.py --samples 8 --out /tmp/reuse     # the script, checked in a few minutes
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search.logs import quiet_libraries  # noqa: E402
from qsched_search.pipeline.prefix_cache import PrefixCache  # noqa: E402
from qsched_search.quant.costs import CostTable  # noqa: E402
from qsched_search.results.io import write_csv, write_json  # noqa: E402
from qsched_search.results.layout import ResultsDir  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, now, versions  # noqa: E402
from qsched_search.search.priors import additive_model, warm_start_schedules  # noqa: E402
from qsched_search.search.probe import run_probe  # noqa: E402
from qsched_search.search.stage import open_search_session  # noqa: E402
from qsched_search.search.study import ScheduleSearch  # noqa: E402
from qsched_search.session import RunSettings  # noqa: E402

logger = logging.getLogger("bench_reuse")


def _session(args, reuse: bool):
    settings = RunSettings(steps=4, precisions=("w8a8", "w4a8", "w4a4"), samples=args.samples, seed=0)
    session = open_search_session(settings, "lpips")
    if not reuse:
        session.runner.cache = PrefixCache(0)
    return session


def _values(measurements) -> dict[str, float]:
    return {key: m.estimates["lpips"].value for key, m in measurements.items() if "lpips" in m.estimates}


def _search(session, probe, sampler: str, trials: int | None, budget: float):
    bank, steps = session.bank, session.runner.steps
    choices = ("fp32", "w8a8", "w4a8", "w4a4")
    costs = CostTable.from_bank(bank)
    model = additive_model(probe.table, "lpips", False, steps, choices, "fp32") if probe is not None else None
    known = {} if probe is None else _probe_by_schedule(probe, steps)
    warm = warm_start_schedules(choices, "fp32", steps, costs.model("bops"), budget, model) if probe is not None else []
    search = ScheduleSearch(session.evaluator.evaluate, choices=choices, reference="fp32", steps=steps, metric="lpips",
                            higher_is_better=False, costs=costs, budget=budget, storage=None, sampler=sampler,
                            trials=trials, seed=0, warm_start=warm, known=known)
    search.run()
    return search.evaluated()


def _probe_by_schedule(probe, steps):
    return {",".join(cell.levels("fp32", steps)): probe.measurements[cell.key] for cell in probe.cells}


def run(workload: str, args, out, rows):
    results = {}
    for reuse in (True, False):
        probe = None
        if workload == "warm":  # the probe a search starts from, in its own process as `qsched probe` would be
            session = _session(args, reuse)
            try:
                probe = run_probe(session.evaluator, ("w8a8", "w4a8", "w4a4"), ResultsDir(out / f"warm-probe-{reuse}"),
                                  {"workload": workload, "reuse": reuse})
            finally:
                session.close()
        session = _session(args, reuse)
        try:
            _ = session.evaluator.timesteps  # the all-reference run, the paired baseline of every workload
            started = time.perf_counter()
            if workload == "probe":
                probe = run_probe(session.evaluator, ("w8a8", "w4a8", "w4a4"), ResultsDir(out / f"probe-{reuse}"),
                                  {"workload": workload, "reuse": reuse})
                measured = probe.measurements
            elif workload == "exhaustive":
                measured = _search(session, None, "exhaustive", None, 1.0)
            else:
                measured = _search(session, probe, "tpe", 24, args.budget)
            seconds = time.perf_counter() - started
            stats = session.runner.cache.stats()
        finally:
            session.close()
        results[reuse] = _values(measured)
        rows.append({"workload": workload, "reuse": reuse, "evaluations": len(measured), "seconds": round(seconds, 1),
                     "denoiser_calls_run": stats["denoiser_calls_run"],
                     "denoiser_calls_without_reuse": stats["denoiser_calls_without_reuse"]})
        logger.info("%s", rows[-1])
    same = results[True] == results[False]
    for row in rows[-2:]:
        row["identical_to_other_run"] = same
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "reuse")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.67)
    parser.add_argument("--workloads", default="probe,exhaustive,warm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 behaves best on a shared 2-core machine)")
    args = parser.parse_args()
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*probe-*"):  # a previous run's probe journals would be resumed, not measured
        shutil.rmtree(old)
    rows: list[dict] = []
    identical = {}
    for workload in args.workloads.split(","):
        identical[workload] = run(workload, args, args.out, rows)
        write_csv(args.out / "reuse.csv", pd.DataFrame(rows))
    for row in rows:
        cold = next(r for r in rows if r["workload"] == row["workload"] and not r["reuse"])
        row["calls_fewer_x"] = round(cold["denoiser_calls_run"] / row["denoiser_calls_run"], 3)
        row["seconds_fewer_x"] = round(cold["seconds"] / row["seconds"], 3) if row["seconds"] else None
    write_csv(args.out / "reuse.csv", pd.DataFrame(rows))
    write_json(args.out / "summary.json", {"command": command_line(), "created": now(), "device": device_name("cpu"),
                                           "versions": versions(), "samples": args.samples, "budget": args.budget,
                                           "identical_with_and_without_reuse": identical, "rows": rows})


if __name__ == "__main__":
    main()
