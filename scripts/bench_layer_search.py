"""Search cost on a large space: per-step x per-layer schedules of 8 steps x 4 levels x 5 layer groups, the
warm-started per-layer search against random search, plain TPE and two published per-step strategies, with the
same number of evaluations.

On the embedded model (8 steps, {fp32, w8a8, w4a8, w4a4}, LPIPS to the fp32 output on 16 samples, bit-operations,
simulated backend, grouping `role`, which on the embedded model's quantized layers resolves to 5 groups: attn1.qkv,
attn1.out, attn2.qkv, attn2.out and ff; so 4^40 schedules). Each method has
`--evaluations` measured schedules in all for the front: the best LPIPS within each of the `--budgets`, the budgets
visited in turn, each given an equal share of what is left; a schedule a method measured before is reused for free
and one over the budget is never measured (costs are exact). Methods:

* `layer-search`: `qsched probe --layers` then `qsched search --layers`: the step probe (the reference, each step
  alone at each level) and the layer probe (each group alone at w4a4 in each step), then per budget the per-step
  study (`ScheduleSearch`: TPE from the step probe's picks, 40% of the share) and the per-layer stage
  (`LayerSearch`: the additive layer prior's DP and greedy picks, then the measured climb). The probes count.
* `random`: per-item levels drawn uniformly, redrawn until within the budget.
* `tpe`: Optuna's TPESampler over the 64 (step, item) levels, the budget as a constraint (`constraints_func`);
  over-budget proposals are not measured and not counted.
* `tmpdiff`: TMPDiff's adaptive bisection (arXiv 2603.14062), per step: each step alone at each lower level is
  measured (linear in steps x levels; counted), then a threshold on measured harm per cost saved is bisected; at a
  threshold each step takes its cheapest level under it, and the bisection measures each feasible midpoint and
  tightens towards the budget until the schedule stops changing.
* `budcache`: BudCache's search (arXiv 2606.13496) over per-step decisions: simulated annealing (one step moved one
  level, Metropolis acceptance on relative LPIPS change, geometric cooling) for 70% of the share, then hill climbing
  (the best single-step change, until none improves) from the best schedule found, restarted from random
  schedules within the budget while evaluations are left.

The reference front is the best LPIPS at each budget that any method found; every measured schedule is kept in
`--out`/measured.jsonl, so a rerun measures only what is missing.

    nice -n 10 python scripts/bench_layer_search.py --out results/bench/layer_search    # ~45 min on 2 CPU cores
    python scripts/bench_layer_search.py --evaluations 40 --seeds 1 --out /tmp/ls         # a quick check
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import torch  # noqa: E402

from qsched_search.errors import QschedError  # noqa: E402
from qsched_search.logs import quiet_libraries  # noqa: E402
from qsched_search.quant.costs import CostTable  # noqa: E402
from qsched_search.results.assignment import as_steps, brief_key  # noqa: E402
from qsched_search.results.compare import compare_paired  # noqa: E402
from qsched_search.results.io import save_figure, write_csv, write_json  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, fingerprint, now, versions  # noqa: E402
from qsched_search.results.records import Measurement  # noqa: E402
from qsched_search.results.tables import BUDGET_EPS, PROBE_LAYER_COLUMNS, schedule_key  # noqa: E402
from qsched_search.search.layer_search import LayerSearch, item_costs, labels_to_steps, layer_prior  # noqa: E402
from qsched_search.search.priors import additive_model, row_harm, warm_start_schedules  # noqa: E402
from qsched_search.search.probe import CellStore, layer_probe_cells, probe_cells, probe_table  # noqa: E402
from qsched_search.search.study import ScheduleSearch  # noqa: E402
from qsched_search.session import RunSettings  # noqa: E402

logger = logging.getLogger("bench_layer_search")
STEPS, SAMPLES, GROUPING, METRIC = 8, 16, "role", "lpips"
LEVELS = ("fp32", "w8a8", "w4a8", "w4a4")  # most precise first
LAYER_PROBE_LEVEL = "w4a4"
METHODS = ("layer-search", "random", "tpe", "tmpdiff", "budcache")
STOCHASTIC = ("layer-search", "random", "tpe", "budcache")
STEP_STUDY_SHARE = 40  # percent of a budget's evaluations the layer search's per-step study gets


class Exhausted(QschedError):
    """A method asked for one evaluation more than it has (a QschedError, so LayerSearch lets it through)."""


class Space:
    """The embedded model's session, its layer items and exact costs, and every schedule measured (kept on disk)."""

    def __init__(self, out: Path):
        from qsched_search.quant.groups import bank_groups
        from qsched_search.search.stage import open_search_session

        settings = RunSettings(steps=STEPS, precisions=LEVELS[1:], samples=SAMPLES, seed=0)
        self.session = open_search_session(settings, METRIC)
        self.groups = bank_groups(self.session.bank, self.session.model.family, GROUPING)
        self.session.runner.groups = self.groups
        self.table = CostTable.from_bank(self.session.bank, groups=self.groups)
        self.costs = item_costs(self.groups, self.session.bank.layer_costs(), LEVELS, "bops")
        self.items = self.costs.items
        self.store = CellStore(out / "measured.jsonl", fingerprint({"bench": "layer_search", "steps": STEPS,
                                                                   "samples": SAMPLES, "grouping": GROUPING}))
        self.seconds = 0.0

    def measure(self, steps) -> Measurement:
        key = schedule_key(steps)
        if key not in self.store.done:
            started = time.perf_counter()
            self.store.add(key, self.session.evaluator.evaluate(as_steps(steps)).measurement)
            self.seconds += time.perf_counter() - started
        return self.store.done[key]

    def value(self, key: str) -> float:
        m = self.store.done[key]
        est = m.estimates.get(METRIC)
        return math.inf if m.fail_reason or est is None or not math.isfinite(est.value) else est.value

    def cost(self, steps) -> float:
        return self.table.costs(as_steps(steps))["bops"]

    def labels_cost(self, labels) -> float:
        return self.costs.schedule_cost(labels)


class Run:
    """One method's evaluations: each new schedule counted once, up to `limit` in all and `cap` for the budget at
    hand; `order` is what it measured. A schedule measured before (for another budget too) is free."""

    def __init__(self, space: Space, limit: int):
        self.space, self.limit, self.cap = space, limit, limit
        self.order: list[str] = []
        self.seen: dict[str, Measurement] = {}

    @property
    def left(self) -> int:
        return self.limit - len(self.order)

    def evaluate(self, steps) -> Measurement:
        key = schedule_key(as_steps(steps))
        if key not in self.seen:
            if len(self.order) >= min(self.cap, self.limit):
                raise Exhausted("evaluations spent")
            self.seen[key] = self.space.measure(steps)
            self.order.append(key)
        return self.seen[key]

    def value(self, steps) -> float:
        self.evaluate(steps)
        return self.space.value(schedule_key(as_steps(steps)))


# ================================================================================================ methods


def probe(run: Run, uniform: bool = True, group_level: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """`qsched probe`'s cells and table (`probe_cells`, `probe_table`) measured through the run, without the uniform
    cells unless `uniform`; with `group_level`, also `qsched probe --layers`' cells at that level and their table.

    Step cells are measured level by level (the order the committed runs used: it feeds TPE's trial weights)."""
    ref = LEVELS[0]
    cells = [c for c in probe_cells(LEVELS[1:], ref, STEPS) if uniform or c.kind != "uniform"]
    order = sorted(cells, key=lambda c: (("reference", "step", "uniform").index(c.kind), LEVELS.index(c.precision), c.step or 0))
    measured = {c.key: run.evaluate(c.levels(ref, STEPS)) for c in order}
    steps = probe_table(cells, measured)
    if group_level is None:
        return steps, None
    group_cells = layer_probe_cells([group_level], ref, STEPS, run.space.groups.names)
    measured = {c.key: run.evaluate(c.levels(ref, STEPS)) for c in group_cells}
    return steps, probe_table(group_cells, measured, PROBE_LAYER_COLUMNS)


def layer_search(run: Run, budgets, seed: int) -> None:
    space = run.space
    probe_steps, layer_probe = probe(run, group_level=LAYER_PROBE_LEVEL)
    model = additive_model(probe_steps, METRIC, False, STEPS, LEVELS, LEVELS[0])
    layer_costs = space.session.bank.layer_costs()
    prior = layer_prior(model, layer_probe, METRIC, False, space.groups, layer_costs)
    raw = layer_prior(model, layer_probe, METRIC, False, space.groups, layer_costs, calibrate=False)
    for i, budget in enumerate(budgets):
        share = run.left // (len(budgets) - i)

        def both_stages():
            # The per-step study first (TPE from the step probe's picks), then the per-layer stage from everything
            # measured; `--trials` and `--layer-trials` split the share.
            known = {k: m for k, m in run.seen.items() if not any(st.overrides for st in as_steps(k.split(",")))}
            warm = warm_start_schedules(LEVELS, LEVELS[0], STEPS, space.table.model("bops"), budget, model)
            ScheduleSearch(run.evaluate, choices=LEVELS, reference=LEVELS[0], steps=STEPS, metric=METRIC,
                           higher_is_better=False, costs=space.table, budget=budget, sampler="tpe",
                           trials=share * STEP_STUDY_SHARE // 100, seed=seed + i, warm_start=warm, known=known).run()
            LayerSearch(run.evaluate, prior=prior, raw_prior=raw, costs=space.costs, schedule_costs=space.table.costs,
                        metric=METRIC, higher_is_better=False, budget=budget, trials=10 * share, groups=space.groups,
                        start=dict(run.seen)).run()

        _spend(run, share, both_stages)


def random_search(run: Run, budgets, seed: int) -> None:
    rng = np.random.default_rng(seed)
    space = run.space
    # cost[item, level]: a schedule's cost is fixed + the mean over steps of the sum over items.
    cost = np.array([[space.costs.cost[(item, lv)] for lv in LEVELS] for item in space.items])
    items = np.arange(len(space.items))
    for i, budget in enumerate(budgets):
        share = run.left // (len(budgets) - i)

        def sample():
            for _ in range(200):  # batches of uniform draws, the ones within the budget kept in order
                draws = rng.integers(len(LEVELS), size=(50_000, STEPS, len(items)))
                within = draws[space.costs.fixed + cost[items, draws].sum(-1).mean(-1) <= budget + BUDGET_EPS]
                for d in within:
                    run.evaluate(labels_to_steps(tuple(tuple(LEVELS[k] for k in step) for step in d), space.costs))
            raise Exhausted(f"too few schedules within {budget} in 10,000,000 uniform draws")

        _spend(run, share, sample)


def tpe_search(run: Run, budgets, seed: int) -> None:
    space = run.space
    for i, budget in enumerate(budgets):
        share = run.left // (len(budgets) - i)
        target = len(run.order) + share
        sampler = optuna.samplers.TPESampler(seed=seed + i, constraints_func=lambda t: (t.user_attrs["over"],))
        study = optuna.create_study(sampler=sampler)

        def objective(trial: optuna.Trial) -> float:
            labels = tuple(tuple(trial.suggest_categorical(f"s{s}/{item}", LEVELS) for item in space.items)
                           for s in range(STEPS))
            over = space.labels_cost(labels) - budget - BUDGET_EPS
            trial.set_user_attr("over", over)
            if over > 0 or len(run.order) >= target:
                if over <= 0:
                    trial.study.stop()
                return 1.0  # not measured: over the budget (the constraint marks it infeasible) or the share spent
            return run.value(labels_to_steps(labels, space.costs))

        def optimise():
            while len(run.order) < target and len(study.trials) < 60 * share:
                study.optimize(objective, n_trials=50)
            raise Exhausted("TPE proposes only schedules measured before")

        _spend(run, share, optimise)


def tmpdiff_search(run: Run, budgets, seed: int) -> None:
    space = run.space
    probe_steps, _ = probe(run, uniform=False)
    cells = probe_steps[(probe_steps["kind"] == "step") & (probe_steps["metric"] == METRIC)]
    harm = {(int(row.step), row.precision): row_harm(row, 1.0) for row in cells.itertuples(index=False)}
    level_cost = {lv: space.cost((lv,) * STEPS) for lv in LEVELS}
    # Harm per cost saved: the price of each (step, level) in quality per bit-operation given up.
    ratio = {(s, lv): max(h, 0.0) / max(level_cost[LEVELS[0]] - level_cost[lv], 1e-12) for (s, lv), h in harm.items()}

    def at(threshold: float):
        out = []
        for s in range(STEPS):
            fit = [lv for lv in LEVELS[1:] if ratio[(s, lv)] <= threshold]
            out.append(fit[-1] if fit else LEVELS[0])  # the cheapest level whose price is under the threshold
        return tuple(out)

    for i, budget in enumerate(budgets):
        share = run.left // (len(budgets) - i)
        target = len(run.order) + share

        def bisect():
            lo, hi = 0.0, max(ratio.values()) * 1.01
            if space.cost(at(hi)) > budget + BUDGET_EPS:
                return
            run.evaluate(at(hi))
            while at(lo) != at(hi) and len(run.order) < target:
                mid = (lo + hi) / 2
                if at(mid) in (at(lo), at(hi)) and hi - lo < 1e-9:
                    break
                if space.cost(at(mid)) <= budget + BUDGET_EPS:
                    run.evaluate(at(mid))
                    hi = mid  # feasible: a lower threshold keeps more steps precise
                else:
                    lo = mid

        _spend(run, share, bisect)


def budcache_search(run: Run, budgets, seed: int) -> None:
    rng = random.Random(seed)
    space = run.space

    def feasible(levels, budget):
        return space.cost(levels) <= budget + BUDGET_EPS

    def neighbours(levels, budget):
        out = []
        for s in range(STEPS):
            k = LEVELS.index(levels[s])
            for d in (-1, 1):
                if 0 <= k + d < len(LEVELS):
                    cand = tuple(LEVELS[k + d] if i == s else lv for i, lv in enumerate(levels))
                    if feasible(cand, budget):
                        out.append(cand)
        return out

    for i, budget in enumerate(budgets):
        share = run.left // (len(budgets) - i)
        target = len(run.order) + share
        anneal_until = target - int(0.3 * share)
        # Geometric cooling from 1 (a 2x worse schedule accepted with p = 1/e) to 0.01 over the annealing part.
        cooling = 0.01 ** (1 / max(share - int(0.3 * share), 1))

        def anneal():
            start = next(((lv,) * STEPS for lv in LEVELS if feasible((lv,) * STEPS, budget)), None)
            if start is None:
                return
            current, value = start, run.value(start)
            best, best_value = current, value
            temperature = 1.0
            # Proposals are bounded too: a walk that only revisits measured schedules spends nothing.
            for _ in range(20 * share):
                if len(run.order) >= anneal_until:
                    break
                options = neighbours(current, budget)
                if not options:
                    break
                cand = rng.choice(options)
                v = run.value(cand)
                change = (v - value) / max(value, 1e-12)
                if change <= 0 or rng.random() < math.exp(-change / temperature):
                    current, value = cand, v
                if v < best_value:
                    best, best_value = cand, v
                temperature *= cooling
            for _ in range(20):  # hill climbing from the best found; restarted from a random schedule once stuck
                while True:
                    scored = [(run.value(c), c) for c in neighbours(best, budget)]
                    top = min(scored, default=None)
                    if top is None or top[0] >= best_value:
                        break
                    best_value, best = top
                restart = next((c for c in (tuple(rng.choice(LEVELS) for _ in range(STEPS)) for _ in range(10_000))
                                if feasible(c, budget)), None)
                if restart is None:
                    return
                best, best_value = restart, run.value(restart)

        _spend(run, share, anneal)


def _spend(run: Run, share: int, work) -> None:
    """Runs a method's part for one budget; it ends when the method does or its share is spent."""
    start = len(run.order)
    run.cap = start + share
    try:
        work()
    except Exhausted:
        pass
    finally:
        run.cap = run.limit
    logger.info("  %d evaluations (%d in all)", len(run.order) - start, len(run.order))


RUNNERS = {"layer-search": layer_search, "random": random_search, "tpe": tpe_search, "tmpdiff": tmpdiff_search,
           "budcache": budcache_search}


# ================================================================================================ scoring


def score(space: Space, runs: list[dict], budgets, evaluations: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Best LPIPS within each budget after k evaluations, per run; the reference front; the final table.

    A run reaches the front at the first k where its best is at least as low as the front's at every budget; it
    matches the front where, at every budget, it reaches it or the paired 95% CI of (its best - the front's best) on
    the same samples includes 0."""
    costs = {k: space.cost(as_steps(k.split(","))) for r in runs for k in r["order"]}
    reference = {b: min(((space.value(k), k) for k in costs if costs[k] <= b + BUDGET_EPS), default=(math.inf, None))
                 for b in budgets}
    paired: dict[tuple[str, str], dict] = {}

    def compared(key: str, b: float) -> dict:
        ref_key = reference[b][1]
        if (key, ref_key) not in paired:
            paired[(key, ref_key)] = compare_paired(space.store.done[key], space.store.done[ref_key], METRIC, ref_key)
        return paired[(key, ref_key)]

    def matches(key: str | None, b: float) -> bool:
        if key is None:
            return False
        return key == reference[b][1] or space.value(key) <= reference[b][0] or compared(key, b)["verdict"] != "worse"
    curve_rows, final_rows = [], []
    for r in runs:
        best = {b: (math.inf, None) for b in budgets}
        reached_at = matched_at = None
        for k in range(1, evaluations + 1):
            if k <= len(r["order"]):
                key = r["order"][k - 1]
                for b in budgets:
                    if costs[key] <= b + BUDGET_EPS:
                        best[b] = min(best[b], (space.value(key), key))
            if reached_at is None and all(best[b][0] <= reference[b][0] for b in budgets):
                reached_at = k
            if matched_at is None and all(matches(best[b][1], b) for b in budgets):
                matched_at = k
            for b in budgets:
                curve_rows.append({"method": r["method"], "seed": r["seed"], "evaluations": k, "budget": b,
                                   "best_lpips": best[b][0] if math.isfinite(best[b][0]) else math.nan})
        for b in budgets:
            value, key = best[b]
            ref_value, ref_key = reference[b]
            row = {"method": r["method"], "seed": r["seed"], "budget": b, "evaluations": len(r["order"]),
                   "best_lpips": value if math.isfinite(value) else math.nan,
                   "best_schedule": brief_key(key) if key else "", "overrides": _overrides(key),
                   "reached": bool(key) and value <= ref_value, "matched": matches(key, b),
                   "reference_lpips": ref_value, "relative_to_reference": value / ref_value - 1 if key else math.nan,
                   "reaches_front_at": reached_at, "matches_front_at": matched_at}
            if key and key != ref_key:
                c = compared(key, b)
                row.update(paired_difference=c["difference"], ci_low=c["ci_low"], ci_high=c["ci_high"])
            else:
                row.update(paired_difference=0.0 if key else math.nan, ci_low=math.nan, ci_high=math.nan)
            final_rows.append(row)
    meta = {"reference_front": {str(b): {"lpips": v, "schedule": brief_key(k) if k else None,
                                         "found_by": sorted({r["method"] for r in runs if k in r["order"]})}
                                for b, (v, k) in reference.items()},
            "measured_schedules": len(costs)}
    return pd.DataFrame(curve_rows), pd.DataFrame(final_rows), meta


def _overrides(key: str | None) -> int:
    return sum(len(s.overrides) for s in as_steps(key.split(","))) if key else 0


def plot(curves: pd.DataFrame, budgets, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"layer-search": "#d62728", "random": "#7f7f7f", "tpe": "#1f77b4", "tmpdiff": "#ff7f0e", "budcache": "#2ca02c"}
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.2 * len(budgets), 4.2), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        frame = curves[curves["budget"] == b]
        for method, group in frame.groupby("method", sort=False):
            stats = group.groupby("evaluations")["best_lpips"].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], color=colours[method], label=method, linewidth=1.6)
            ax.fill_between(stats.index, stats["min"], stats["max"], color=colours[method], alpha=0.15, linewidth=0)
        ax.axhline(meta["reference_front"][str(b)]["lpips"], color="black", linestyle=":", linewidth=1,
                   label="best any method found")
        ax.set_yscale("log")
        ax.set_xlabel("schedules evaluated (probes included)")
        ax.set_ylabel("best LPIPS within budget")
        ax.set_title(f"bops budget {b:g}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{STEPS} steps x {len(LEVELS)} levels x {len(meta['items'])} layer items (embedded model, "
                 f"{SAMPLES} samples)", fontsize=10)
    fig.tight_layout()
    save_figure(path, fig, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench/layer_search")
    parser.add_argument("--evaluations", type=int, default=300, help="measured schedules per method run, in all")
    parser.add_argument("--budgets", default="0.668,0.69,0.75", help="bit-operation budgets (fractions of fp32)")
    parser.add_argument("--seeds", type=int, default=3, help="runs of each stochastic method (random, tpe, budcache)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    budgets = tuple(float(b) for b in args.budgets.split(","))
    space = Space(out)
    started = time.time()
    runs = []
    try:
        for method in args.methods.split(","):
            for seed in range(args.seeds if method in STOCHASTIC else 1):
                logger.info("%s seed %d", method, seed)
                run = Run(space, args.evaluations)
                t0 = time.time()
                RUNNERS[method](run, budgets, seed)
                runs.append({"method": method, "seed": seed, "order": run.order, "seconds": round(time.time() - t0, 1)})
    finally:
        space.session.close()
    curves, final, meta = score(space, runs, budgets, args.evaluations)
    meta.update(items=list(space.items), fixed_share=space.costs.fixed,
                level_costs={lv: space.cost((lv,) * STEPS) for lv in LEVELS})
    write_csv(out / "curves.csv", curves)
    write_csv(out / "evaluations.csv", pd.DataFrame(
        [{"method": r["method"], "seed": r["seed"], "evaluation": k + 1, "schedule": key,
          "bops": space.cost(as_steps(key.split(","))), "lpips": space.value(key)}
         for r in runs for k, key in enumerate(r["order"])]))
    write_csv(out / "table.csv", final)
    write_json(out / "run.json", {"command": command_line(), "created": now(), "device": device_name("cpu"),
                                  "versions": versions(), "steps": STEPS, "levels": list(LEVELS), "samples": SAMPLES,
                                  "grouping": GROUPING, "budgets": list(budgets), "evaluations": args.evaluations,
                                  "seeds": args.seeds, "seconds": round(time.time() - started, 1),
                                  "measure_seconds": round(space.seconds, 1),
                                  "runs": [{k: v for k, v in r.items() if k != "order"} | {"measured": len(r["order"])}
                                           for r in runs], **meta})
    plot(curves, budgets, meta, out / "curves.png")
    print(final.drop(columns=["best_schedule"]).to_string(index=False))


if __name__ == "__main__":
    main()
