"""Benchmarks the schedule search: hypervolume of the front found vs evaluations, per method, on the embedded model.

Two spaces on the embedded Fashion-MNIST LCM (objective: LPIPS to the all-fp32 images; cost: bit-operations):

* 4 steps x {fp32, w8a8, w4a8, w4a4} = 256 schedules, 64 samples each (the `qsched search` default evaluation
  set): all 256 are measured once (the exhaustive front), then every method is replayed on that table.
* 8 steps x {fp32, w8a8, w4a4} = 6,561 schedules, 16 samples each (fewer, for CPU time): methods measure what
  they propose (each schedule once, shared between methods); the reference front is the best front any method found.

Methods: random search, TPE and NSGA-II from scratch; the probe-warm-started search (`qsched search` as shipped:
the probe's cells reused, uniform + probe-DP + probe-greedy enqueued, then TPE); the additive-DP prediction alone
(the probe, then the predicted front's schedules measured in an order that covers the front evenly). The probe's
own evaluations count. Curves are hypervolume ratios (2-D, both objectives minimised, reference point
1.1 x the largest cost and 1.1 x the largest LPIPS of the table) of the front found after k evaluations.

The front runs use budget 1 (the whole front); the 4-step table is also searched at budget 0.5 (the default),
recording the best LPIPS within budget found after k evaluations.

Measured schedules are kept in `--out` (evals_*.csv), so a rerun only measures what is missing:

    nice -n 10 python scripts/bench_search.py               # ~20 min of CPU on 2 cores the first time
    python scripts/bench_search.py --only 4x4 --seeds 3     # the 4-step part
    python scripts/bench_search.py --only 4x4 --time-cli    # also time `qsched probe` + `qsched search` (defaults)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import torch  # noqa: E402

from qsched_search.errors import QschedError  # noqa: E402
from qsched_search.quant.costs import CostTable  # noqa: E402
from qsched_search.quant.levels import Menu, load_menu  # noqa: E402
from qsched_search.results.io import save_figure, write_csv, write_json, write_text  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, now, versions  # noqa: E402
from qsched_search.results.records import Estimate, Measurement  # noqa: E402
from qsched_search.results.tables import PROBE_COLUMNS, schedule_key  # noqa: E402
from qsched_search.search.priors import additive_front, additive_model, warm_start_schedules  # noqa: E402
from qsched_search.search.study import ScheduleSearch  # noqa: E402
from qsched_search.session import RunSettings  # noqa: E402

logger = logging.getLogger("bench_search")
METHODS = ("random", "tpe", "nsga2", "probe+tpe", "probe-dp")


@dataclass(frozen=True)
class Space:
    name: str
    steps: int
    precisions: tuple[str, ...]
    samples: int
    evaluations: int  # evaluations per method run
    exhaustive: bool


SPACES = {
    "4x4": Space("4x4", 4, ("w8a8", "w4a8", "w4a4"), 64, 64, True),
    "8x3": Space("8x3", 8, ("w8a8", "w4a4"), 16, 80, False),
}


class Table:
    """Every schedule measured so far in one space, on disk so that reruns reuse it; measures on demand."""

    def __init__(self, space: Space, out: Path):
        self.space = space
        self.out = out
        self.path = out / f"evals_{space.name}.csv"
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            for row in pd.read_csv(self.path).to_dict("records"):
                self.rows[row["schedule"]] = row
        self._session = None
        self.seconds = 0.0

    @property
    def session(self):
        if self._session is None:
            import yaml

            from qsched_search.search.stage import open_search_session

            # The recorded tables (results/bench/evals_*.csv) were measured with every Linear and Conv2d layer
            # rounded: target generic, so that a rerun measures the same space and reuses them.
            menu = self.out / "menu_generic.yaml"
            write_text(menu, yaml.safe_dump(Menu(levels=load_menu().levels, target="generic").to_dict(), sort_keys=False))
            settings = RunSettings(steps=self.space.steps, precisions=self.space.precisions, samples=self.space.samples,
                                   menu=str(menu))
            self._session = open_search_session(settings, "lpips")
            self._session.evaluator.timesteps  # the all-fp32 run, the baseline
        return self._session

    def costs(self) -> CostTable:
        return CostTable.from_bank(self.session.bank)

    def measure(self, levels: tuple[str, ...]) -> dict:
        key = schedule_key(levels)
        if key not in self.rows:
            started = time.perf_counter()
            ev = self.session.evaluator.evaluate(levels)
            self.seconds += time.perf_counter() - started
            est = ev.estimates.get("lpips")
            row = {"schedule": key, "value": est.value if est else math.nan, "ci_low": est.ci_low if est else math.nan,
                   "ci_high": est.ci_high if est else math.nan, "n": est.n if est else 0,
                   "fail_reason": ev.fail_reason or "", "seconds": round(time.perf_counter() - started, 3)}
            self.rows[key] = row
            new = not self.path.is_file()
            with open(self.path, "a") as f:
                pd.DataFrame([row]).to_csv(f, header=new, index=False)
        return self.rows[key]

    def evaluation(self, levels: tuple[str, ...]) -> Measurement:
        row = self.measure(levels)
        if row["fail_reason"] and isinstance(row["fail_reason"], str):
            return Measurement(fail_reason=row["fail_reason"])
        return Measurement(estimates={"lpips": Estimate(row["value"], row["ci_low"], row["ci_high"], int(row["n"]))})


def probe_frame(table: Table) -> tuple[pd.DataFrame, list[tuple[str, ...]]]:
    """The probe table `qsched probe` would write, from measured schedules (the same evaluation set), and the
    probe's schedules in the order it runs them."""
    space = table.space
    ref = ("fp32",) * space.steps
    order = [ref]
    order += [tuple(lv if i == s else "fp32" for i in range(space.steps)) for lv in space.precisions for s in range(space.steps)]
    order += [(lv,) * space.steps for lv in space.precisions]
    floor = table.measure(ref)["value"]
    rows = []
    for levels in order:
        r = table.measure(levels)
        if levels == ref:
            kind, step, precision = "reference", None, "fp32"
        elif len(set(levels)) == 1:
            kind, step, precision = "uniform", None, levels[0]
        else:
            step = next(i for i, lv in enumerate(levels) if lv != "fp32")
            kind, precision = "step", levels[step]
        rows.append(dict(kind=kind, step=step, timestep=None, precision=precision, metric="lpips", value=r["value"],
                         ci_low=r["ci_low"], ci_high=r["ci_high"], n=r["n"], delta=r["value"] - floor,
                         unhealthy_images=0, fail_reason=r["fail_reason"] if isinstance(r["fail_reason"], str) else ""))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS), order


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """2-D hypervolume of points (cost, value), both minimised, bounded by `ref`."""
    pts = sorted((c, v) for c, v in points if c < ref[0] and v < ref[1])
    front, best = [], math.inf
    for c, v in pts:
        if v < best:
            front.append((c, v))
            best = v
    hv = 0.0
    for i, (c, v) in enumerate(front):
        right = front[i + 1][0] if i + 1 < len(front) else ref[0]
        hv += (right - c) * (ref[1] - v)
    return hv


def front_of(points: dict[str, tuple[float, float]]) -> set[str]:
    ordered = sorted(points.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    out, best = set(), math.inf
    for key, (c, v) in ordered:
        if v < best:
            out.add(key)
            best = v
    return out


def van_der_corput(n: int) -> list[int]:
    """0..n-1 in an order that covers the range evenly early on (ends first, then halves, quarters...)."""
    if n <= 2:
        return list(range(n))
    order, seen = [0, n - 1], {0, n - 1}
    k = 1
    while len(order) < n:
        for j in range(1, 2 ** k, 2):
            i = round(j * (n - 1) / 2 ** k)
            if i not in seen:
                seen.add(i)
                order.append(i)
        k += 1
    return order


def run_method(method: str, seed: int, table: Table, costs: CostTable, budget: float, evaluations: int) -> list[str]:
    """The schedules a method measures, in order (the probe's first for probe methods)."""
    space = table.space
    choices = ("fp32", *space.precisions)
    order: list[str] = []
    known, warm, prefix = None, [], []
    if method in ("probe+tpe", "probe-dp"):
        frame, probe_order = probe_frame(table)
        prefix = [schedule_key(s) for s in dict.fromkeys(probe_order)]
        model = additive_model(frame, "lpips", False, space.steps, choices, "fp32")
        if method == "probe-dp":
            front = [p for p in additive_front(model, costs.model("bops")) if p.cost <= budget + 1e-9]
            if budget < 1:
                picks = sorted(front, key=lambda p: (p.harm, p.cost))  # the optimum at the budget first
            else:
                picks = [front[i] for i in van_der_corput(len(front))]
            out = list(prefix)
            for p in picks:
                key = schedule_key(p.levels)
                if key not in out:
                    table.measure(p.levels)
                    out.append(key)
                if len(out) >= evaluations:
                    break
            return out[:evaluations]
        known = {}
        for levels in probe_order:
            r = table.measure(levels)
            known[schedule_key(levels)] = Measurement(
                estimates={"lpips": Estimate(r["value"], r["ci_low"], r["ci_high"], int(r["n"]))}, origin="probe")
        warm = warm_start_schedules(space.precisions, "fp32", space.steps, costs.model("bops"), budget, model)

    def evaluate(levels):
        order.append(schedule_key(levels))
        return table.evaluation(tuple(levels))

    sampler = "tpe" if method == "probe+tpe" else method
    search = ScheduleSearch(evaluate, choices=choices, reference="fp32", steps=space.steps, metric="lpips",
                            higher_is_better=False, costs=costs, cost_model="bops", budget=budget, storage=None,
                            sampler=sampler, trials=evaluations - len(prefix), seed=seed,
                            fingerprint={"bench": space.name}, warm_start=warm, known=known)
    search.run()
    return prefix + order


def curves(space: Space, table: Table, costs: CostTable, seeds: int, budget: float, log) -> list[dict]:
    rows = []
    for method in METHODS:
        for seed in range(1 if method == "probe-dp" else seeds):
            started = time.perf_counter()
            order = run_method(method, seed, table, costs, budget, space.evaluations)
            log(f"{space.name} budget {budget:g} {method} seed {seed}: {len(order)} evaluations, "
                f"{time.perf_counter() - started:.1f} s (measured so far: {len(table.rows)})")
            rows.append({"method": method, "seed": seed, "order": order})
    return rows


def score_curves(runs: list[dict], table: Table, costs: CostTable, budget: float | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per (method, seed, evaluations): hypervolume ratio and share of the reference front found."""
    bops = costs.model("bops")
    points = {k: (sum(bops[lv] for lv in k.split(",")) / table.space.steps, float(r["value"]))
              for k, r in table.rows.items() if not (isinstance(r["fail_reason"], str) and r["fail_reason"])}
    ref = (1.1 * max(c for c, _ in points.values()), 1.1 * max(v for _, v in points.values()))
    front = front_of(points)
    hv_ref = hypervolume([points[k] for k in front], ref)
    best_feasible = min((v for c, v in points.values() if c <= (budget or 1) + 1e-9), default=math.nan)
    rows = []
    for run in runs:
        seen: list[tuple[float, float]] = []
        found: set[str] = set()
        best = math.inf
        # A method that runs out of proposals (probe-dp after its predicted front) keeps its last front.
        order = run["order"] + [None] * (table.space.evaluations - len(run["order"]))
        for k, key in enumerate(order, start=1):
            if key is not None and key in points:
                seen.append(points[key])
                found.add(key)
                if budget is not None and points[key][0] <= budget + 1e-9:
                    best = min(best, points[key][1])
            row = {"method": run["method"], "seed": run["seed"], "evaluations": k, "proposed": key is not None}
            if budget is None:
                row.update(hv_ratio=hypervolume(seen, ref) / hv_ref, front_found=len(found & front) / len(front))
            else:
                row.update(best_within_budget=best if math.isfinite(best) else math.nan,
                           regret=(best - best_feasible) if math.isfinite(best) else math.nan)
            rows.append(row)
    meta = {"reference_point": list(ref), "reference_front_size": len(front), "reference_hypervolume": hv_ref,
            "measured_schedules": len(points)}
    if budget is not None:
        meta.update(budget=budget, best_within_budget=best_feasible,
                    best_schedule_within_budget=min((k for k, (c, v) in points.items() if c <= budget + 1e-9),
                                                    key=lambda k: points[k][1]))
    return pd.DataFrame(rows), meta


def plot(frames: dict[str, pd.DataFrame], metas: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"random": "#7f7f7f", "tpe": "#1f77b4", "nsga2": "#9467bd", "probe+tpe": "#2ca02c", "probe-dp": "#d62728"}
    panels = []
    for name, frame in frames.items():
        panels.append((name, frame, False))
        if "hv_ratio" in frame.columns:
            panels.append((name, frame, True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.3), squeeze=False)
    for ax, (name, frame, zoom) in zip(axes[0], panels):
        column = "hv_ratio" if "hv_ratio" in frame.columns else "best_within_budget"
        for method, group in frame.groupby("method", sort=False):
            stats = group.groupby("evaluations")[column].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], color=colours[method], label=method, linewidth=1.6,
                    linestyle="--" if method == "probe-dp" else "-")
            ax.fill_between(stats.index, stats["min"], stats["max"], color=colours[method], alpha=0.15, linewidth=0)
        meta = metas[name]
        if column == "hv_ratio":
            ax.axhline(0.99, color="black", linestyle=":", linewidth=1, label="99%")
            if meta.get("space_size") and 0.15 * meta["space_size"] <= frame["evaluations"].max():
                ax.axvline(0.15 * meta["space_size"], color="black", linestyle="--", linewidth=1,
                           label=f"15% of {meta['space_size']}")
            ax.set_ylim(0.95 if zoom else max(0.0, frame[column].min() - 0.02), 1.002)
            ax.set_ylabel("hypervolume / reference front's" + (" (zoom)" if zoom else ""))
        else:
            ax.axhline(meta["best_within_budget"], color="black", linestyle=":", linewidth=1, label="exhaustive optimum")
            ax.set_yscale("log")
            ax.set_ylabel("best LPIPS within budget found")
        ax.set_xlabel("schedules evaluated (the probe's included)")
        ax.set_title(meta["title"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(path, fig, dpi=130)
    plt.close(fig)


def time_cli(out: Path, log, threads: int) -> dict:
    """Wall and CPU time of `qsched probe` + `qsched search` with every default, in a fresh folder.

    The commands run with OMP_NUM_THREADS=`threads`: on a 2-core machine shared with other jobs, two torch threads
    per process spin against each other and run several times slower than one.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        result = {"omp_num_threads": threads, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
        for stage in ("probe", "search"):
            cmd = [str(Path(sys.executable).with_name("qsched")), stage, "--out", tmp]
            started = time.time()
            before = os.times()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            after = os.times()
            result[stage] = {"command": " ".join(["qsched", stage, "--out", "DIR"]), "wall_s": round(time.time() - started, 1),
                             "cpu_s": round((after.children_user - before.children_user) + (after.children_system - before.children_system), 1),
                             "exit_code": proc.returncode}
            log(f"{stage}: {result[stage]}")
            if proc.returncode != 0:
                log(proc.stderr[-2000:])
                break
        if (Path(tmp) / "schedule.json").is_file():
            schedule = json.loads((Path(tmp) / "schedule.json").read_text())
            result["schedule"] = {k: schedule[k] for k in ("levels", "cost", "quality")}
            trials = pd.read_csv(Path(tmp) / "trials.csv")
            result["trials"] = int(len(trials))
            result["search_evaluations"] = int((trials["source"] != "cache").sum())
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_wall_s"] = round(sum(v["wall_s"] for v in result.values() if isinstance(v, dict) and "wall_s" in v), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "results" / "bench"))
    parser.add_argument("--only", choices=sorted(SPACES), default=None)
    parser.add_argument("--seeds", type=int, default=5, help="Seeds per stochastic method (4x4); 8x3 uses min(3, seeds).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 behaves best on a shared 2-core machine).")
    parser.add_argument("--time-cli", action="store_true", help="Also time `qsched probe` + `qsched search` with defaults.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = logger.info
    started, cpu0 = time.time(), time.process_time()
    summary: dict = {"command": command_line(), "created": now(), "device": device_name("cpu"), "versions": versions(),
                     "spaces": {}}
    for name, space in SPACES.items():
        if args.only and name != args.only:
            continue
        table = Table(space, out)
        costs = table.costs()
        if space.exhaustive:
            for levels in itertools.product(("fp32", *space.precisions), repeat=space.steps):
                table.measure(levels)
            log(f"{name}: all {len(table.rows)} schedules measured ({table.seconds:.0f} s of new measurements)")
        seeds = args.seeds if space.exhaustive else min(3, args.seeds)
        frames, metas = {}, {}
        runs = curves(space, table, costs, seeds, 1.0, log)
        frame, meta = score_curves(runs, table, costs)
        size = (1 + len(space.precisions)) ** space.steps
        meta.update(space_size=size, samples=space.samples, steps=space.steps, levels=["fp32", *space.precisions],
                    reference=("exhaustive front" if space.exhaustive else "best front found by any method"),
                    title=f"{space.steps} steps x {1 + len(space.precisions)} levels ({size} schedules), "
                          f"{space.samples} samples\nvs the {'exhaustive front' if space.exhaustive else 'best front any method found'}"
                          + ("" if space.exhaustive else f" ({len(table.rows)} measured)"))
        write_csv(out / f"search_{name}.csv", frame)
        frames[name], metas[name] = frame, meta
        if space.exhaustive:
            budget_runs = curves(space, table, costs, seeds, 0.5, log)
            bframe, bmeta = score_curves(budget_runs, table, costs, budget=0.5)
            bmeta.update(title=f"{space.steps} steps x {1 + len(space.precisions)} levels, {space.samples} samples\n"
                               "best LPIPS found within bops budget 0.5 (the default)")
            write_csv(out / f"search_{name}_budget.csv", bframe)
            frames[f"{name} budget"], metas[f"{name} budget"] = bframe, bmeta
            meta["budget_0.5"] = bmeta
        plot(frames, metas, out / f"search_{name}.png")
        headline = {}
        limit = int(0.15 * size)
        for method, group in frame.groupby("method", sort=False):
            at = group[group["evaluations"] == min(limit, space.evaluations)]["hv_ratio"]
            reach = group[group["hv_ratio"] >= 0.99].groupby("seed")["evaluations"].min()
            headline[method] = {f"hv_ratio_at_{min(limit, space.evaluations)}_mean": round(float(at.mean()), 5),
                                f"hv_ratio_at_{min(limit, space.evaluations)}_min": round(float(at.min()), 5),
                                "evaluations_to_99pct_max_over_seeds": (int(reach.max()) if len(reach) == group["seed"].nunique() else None)}
        meta["headline"] = headline
        meta.update(command=command_line(), created=now(), threads=args.threads)
        meta["measurement_seconds_total"] = round(float(pd.read_csv(table.path)["seconds"].sum()), 1)
        meta["new_measurement_seconds_this_run"] = round(table.seconds, 1)
        summary["spaces"][name] = meta
        log(f"{name}: {json.dumps(headline)}")
    if args.time_cli:
        summary["cli_timing"] = {**time_cli(out, log, args.threads), "bench_command": command_line(), "created": now()}
    summary["wall_s"] = round(time.time() - started, 1)
    summary["cpu_s_this_process"] = round(time.process_time() - cpu0, 1)
    summary["threads"] = args.threads
    path = out / "summary.json"
    if path.is_file() and args.only:
        previous = json.loads(path.read_text())
        previous["spaces"].update(summary["spaces"])
        summary = {**previous, **{k: v for k, v in summary.items() if k != "spaces"}, "spaces": previous["spaces"]}
    write_json(path, summary)
    log(f"wrote {out} in {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except QschedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
