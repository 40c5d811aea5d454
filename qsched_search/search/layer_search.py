"""Per-step x per-layer schedules: the step x group probe's additive prior, its front under the budget, and a
measured search that starts from the prior's picks and climbs from the best measured schedule.

A schedule here gives every (step, layer group) a level: each step keeps a default level (that of its ungrouped
layers, or of most of its multiply-accumulates) and lists the groups at other levels as overrides
(`qsched_search.results.assignment`). The prior predicts a schedule's harm as the sum over (step, group) of that
group's harm at its level in that step, read from `qsched probe --layers`; it only decides what to measure: the
schedule chosen is always one that was measured.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from qsched_search.errors import QschedError
from qsched_search.quant.costs import override_latency_unknown
from qsched_search.results.assignment import Override, StepAssignment, as_steps
from qsched_search.results.records import Measurement
from qsched_search.results.tables import BUDGET_EPS, schedule_key
from qsched_search.search.priors import AdditiveModel, choice_front, choice_greedy, row_harm
from qsched_search.search.probe import CellStore

logger = logging.getLogger(__name__)

__all__ = ["LAYER_SOURCES", "UNGROUPED", "ItemCosts", "LayerPrior", "LayerSearch", "LayerSearchOutcome", "item_costs",
           "layer_prior", "labels_to_steps", "steps_to_labels"]

# The item that stands for a step's ungrouped layers: they follow the step's default level.
UNGROUPED = "(ungrouped)"
LAYER_SOURCES = ("layer-dp", "layer-dp-raw", "layer-greedy", "layer-local")
# Prefix states kept per item by the dynamic programme over (step, group) items: thinned evenly over cost.
MAX_STATES = 400
# Prior picks measured first: the optimum at the budget and optima at budgets spread below it.
DP_POINTS = 6

Labels = tuple[tuple[str, ...], ...]  # labels[step][item]: the level of each item (groups, then UNGROUPED) in a step


# ================================================================================================ costs


@dataclass(frozen=True)
class ItemCosts:
    """What each (item, level) adds to one step's cost, relative to the all-reference step (which costs 1).

    A step's cost is `fixed + sum(cost[item, level])` over its items; a schedule's is the mean over its steps.
    `fixed` is the share of the layers no level switches (excluded layers, attention products).
    """

    items: tuple[str, ...]
    cost: Mapping[tuple[str, str], float]
    fixed: float
    reference: str

    def share(self, item: str) -> float:
        """The item's part of the all-reference step's cost."""
        return self.cost[(item, self.reference)]

    def step_cost(self, step_labels: Sequence[str]) -> float:
        return self.fixed + sum(self.cost[(item, lv)] for item, lv in zip(self.items, step_labels))

    def schedule_cost(self, labels: Labels) -> float:
        return sum(self.step_cost(s) for s in labels) / len(labels)


def item_costs(groups, layer_costs, levels: Sequence[str], cost_model: str) -> ItemCosts:
    """Each group's (and the ungrouped layers') exact share of a step's `bops` or `memory` at each level.

    Args:
        groups (`LayerGroups`): the resolved layer groups.
        layer_costs (`LayerCosts`): the per-layer table (`Bank.layer_costs()`).
        levels (`Sequence[str]`): the levels, the reference included.
        cost_model (`str`): `bops` or `memory` (latency of a mixed step is known only when measured).
    """
    from qsched_search.quant.groups import LayerAssignment

    if cost_model not in ("bops", "memory"):
        raise override_latency_unknown(f"--cost {cost_model}")
    members = {g: tuple(ls) for g, ls in groups.groups.items()}
    if groups.ungrouped:
        members[UNGROUPED] = tuple(groups.ungrouped)
    reference = layer_costs.reference
    # Costs are linear in the layers: an item's share at a level is the step cost with only that item moved there,
    # less the all-reference step, plus the item's share at the reference (its part of the all-reference cost).
    ref_share = {item: _share(layer_costs, ls, cost_model) for item, ls in members.items()}
    cost = {}
    for item, ls in members.items():
        for lv in levels:
            moved = layer_costs.cost(LayerAssignment(reference, tuple((n, lv) for n in ls)))[cost_model]
            cost[(item, lv)] = ref_share[item] + (moved - 1.0)
    return ItemCosts(tuple(members), cost, 1.0 - sum(ref_share.values()), reference)


def _share(layer_costs, layers: Sequence[str], cost_model: str) -> float:
    """The layers' part of the all-reference step's `bops` (MACs) or `memory` (parameters)."""
    if cost_model == "bops":
        total = sum(layer_costs.macs.values())
        return layer_costs.macs_of(layers) / total if total else 0.0
    return layer_costs.params_of(layers) / layer_costs.total_params if layer_costs.total_params else 0.0


# ================================================================================================ the prior


@dataclass(frozen=True)
class LayerPrior:
    """The predicted harm of each (step, item, level); the reference's is 0, an unusable level's infinite.

    `origin` counts where the harms came from: `probed` (the layer probe at that level), `scaled` (the layer probe
    at another level, scaled by the step probe's ratio of the two levels) and `macs` (no layer probe: the step's
    harm shared out by multiply-accumulates).
    """

    harm: Mapping[tuple[int, str, str], float]
    items: tuple[str, ...]
    steps: int
    levels: tuple[str, ...]
    reference: str
    origin: Mapping[str, int] = field(default_factory=dict)

    def item_harm(self, step: int, item: str, level: str) -> float:
        if level == self.reference:
            return 0.0
        return self.harm.get((step, item, level), math.inf)

    def predict(self, labels: Labels) -> float:
        return sum(self.item_harm(s, item, lv) for s, row in enumerate(labels) for item, lv in zip(self.items, row))


def layer_prior(step_model: AdditiveModel, layer_probe: pd.DataFrame | None, metric: str, higher_is_better: bool,
                groups, layer_costs, calibrate: bool = True) -> LayerPrior:
    """Builds the prior from the step probe (`additive_model`) and the layer probe table (probe_layers.csv).

    With `calibrate`, each step's group harms at a level are scaled so that they add up to the step probe's harm of
    that step at that level (the probe's one-group-at-a-time cells miss how groups interact); ungrouped layers get
    what the groups leave of the step's harm. A level the layer probe did not cover takes the harms of a covered
    level scaled by the step probe's ratio of the two; with no layer probe at all, a step's harm is shared out by
    multiply-accumulates.
    """
    steps, reference, levels = step_model.steps, step_model.reference, step_model.levels
    names = list(groups.groups)
    items = tuple(names + ([UNGROUPED] if groups.ungrouped else []))
    sign = -1.0 if higher_is_better else 1.0
    probed: dict[tuple[int, str, str], float] = {}
    if layer_probe is not None and {"kind", "step", "group", "precision", "metric", "delta"} <= set(layer_probe.columns):
        rows = layer_probe[(layer_probe["kind"] == "group") & (layer_probe["metric"] == metric)]
        for row in rows.itertuples(index=False):
            if row.group in groups.groups and row.precision in levels:
                probed[(int(row.step), str(row.group), str(row.precision))] = max(0.0, row_harm(row, sign))
    macs = {g: layer_costs.macs_of(groups.groups[g]) for g in names}
    total_macs = sum(macs.values()) + layer_costs.macs_of(groups.ungrouped)
    harm: dict[tuple[int, str, str], float] = {}
    origin = {"probed": 0, "scaled": 0, "macs": 0}
    for s in range(steps):
        for lv in levels:
            if lv == reference:
                continue
            step_harm = max(0.0, step_model.step_harm(s, lv))
            if not math.isfinite(step_harm):
                continue  # the level failed or was not probed at this step: never chosen
            own: dict[str, float] = {}
            for g in names:
                value, how = _group_harm(probed, step_model, s, g, lv, levels, reference)
                if value is None:
                    value, how = step_harm * macs[g] / total_macs if total_macs else 0.0, "macs"
                own[g] = value
                origin[how] += 1
            grouped = sum(v for v in own.values() if math.isfinite(v))
            if groups.ungrouped:
                harm[(s, UNGROUPED, lv)] = max(0.0, step_harm - grouped) if calibrate else 0.0
            elif calibrate and grouped > 0:
                own = {g: v * step_harm / grouped for g, v in own.items()}
            for g, v in own.items():
                harm[(s, g, lv)] = v
    return LayerPrior(harm, items, steps, tuple(levels), reference, origin)


def _group_harm(probed, step_model, step, group, level, levels, reference) -> tuple[float | None, str]:
    if (step, group, level) in probed:
        return probed[(step, group, level)], "probed"
    target = step_model.step_harm(step, level)
    for other in levels:  # scale from another probed level of this group and step
        if other == reference or (step, group, other) not in probed:
            continue
        base = step_model.step_harm(step, other)
        if base > 0 and math.isfinite(base) and math.isfinite(probed[(step, group, other)]):
            return probed[(step, group, other)] * max(0.0, target) / base, "scaled"
    return None, ""


# ================================================================================================ schedules <-> labels


def labels_to_steps(labels: Labels, costs: ItemCosts) -> tuple[StepAssignment, ...]:
    """The schedule of item labels (`costs.items` order): each step's default level is its ungrouped layers' level,
    or else the level that holds the largest share of its cost at the reference (the fewest overrides to write),
    and every group at another level an override."""
    out = []
    for row in labels:
        by_item = dict(zip(costs.items, row))
        if UNGROUPED in by_item:
            default = by_item[UNGROUPED]
        else:
            weight: dict[str, float] = {}
            for item, lv in by_item.items():
                weight[lv] = weight.get(lv, 0.0) + costs.share(item) + 1e-12
            default = max(weight, key=lambda lv: (weight[lv], -list(row).index(lv)))
        overrides = tuple(Override(lv, group=item) for item, lv in by_item.items() if item != UNGROUPED and lv != default)
        out.append(StepAssignment(default, overrides))
    return tuple(out)


def steps_to_labels(steps: Sequence, items: Sequence[str], groups) -> Labels:
    """Item labels of a schedule (per-step levels or steps with group overrides; a pattern override is not an item
    and is refused)."""
    out = []
    for step in as_steps(steps):
        by_item = {item: step.level for item in items}
        for o in step.overrides:
            if o.group is None:
                raise QschedError(f"override {o} is a pattern; a per-layer search works on layer groups")
            if o.group not in groups.groups:
                groups.layers_of(o.group)  # the one-line error naming the groups
            by_item[o.group] = o.level
        out.append(tuple(by_item[item] for item in items))
    return tuple(out)


# ================================================================================================ the search


@dataclass
class LayerSearchOutcome:
    """What `LayerSearch.run` measured: every schedule's trial row, the best within the budget, and counts."""

    trials: pd.DataFrame
    measured: dict[str, Measurement]
    best: str | None
    new_evaluations: int
    stopped_because: str


class LayerSearch:
    """A measured search over per-step x per-layer schedules under a cost budget.

    First the prior's picks (the predicted optimum at the budget and at budgets spread below it, the optimum of the
    uncalibrated prior, the greedy schedule), then a climb: from the best measured schedule within the budget, the
    one-group and two-group changes (an upgrade paid for by a downgrade) the prior ranks best are measured in turn,
    and a change that measures better becomes the new start. Measurements are kept in `store` (one JSON line each),
    so the same search resumes without re-measuring; `trials` counts all of this stage's evaluations, kept ones
    included.

    Args:
        evaluate (`Callable`): runs and scores a schedule (`ScheduleEvaluator.evaluate`) given its steps.
        prior (`LayerPrior`), raw_prior (`LayerPrior`, *optional*): the calibrated and uncalibrated priors.
        costs (`ItemCosts`): item costs under the budget's cost model.
        schedule_costs (`Callable`): a schedule's costs under every model (`CostTable.costs`), for the rows.
        metric (`str`), higher_is_better (`bool`): the objective.
        budget (`float`): a fraction of the all-reference cost.
        trials (`int`): evaluations of this stage.
        store (`Path`, *optional*): the JSON-lines file of measured schedules; `fingerprint` tags its lines.
        start (`Mapping[str, Measurement]`, *optional*): schedules measured elsewhere on the same samples (the
            per-step study's), which the climb may start from.
        cost_model (`str`): the name of the cost in the rows.
    """

    def __init__(self, evaluate: Callable, *, prior: LayerPrior, costs: ItemCosts, schedule_costs: Callable, metric: str,
                 higher_is_better: bool, budget: float, trials: int, groups, store: Path | None = None,
                 fingerprint: str = "", start: Mapping[str, Measurement] | None = None, raw_prior: LayerPrior | None = None,
                 cost_model: str = "bops", dp_points: int = DP_POINTS):
        if trials < 0:
            raise QschedError(f"--layer-trials {trials} is negative; allowed: 0 or more per-layer evaluations")
        self.evaluate, self.prior, self.raw_prior, self.costs = evaluate, prior, raw_prior, costs
        self.schedule_costs, self.metric, self.higher_is_better = schedule_costs, metric, higher_is_better
        self.budget, self.trials, self.groups, self.cost_model = float(budget), int(trials), groups, cost_model
        self.dp_points = dp_points
        self.items, self.steps, self.levels = prior.items, prior.steps, prior.levels
        self.start = dict(start or {})
        self.store = CellStore(store, fingerprint) if store is not None else None
        self.rows: list[dict] = []
        self.measured: dict[str, Measurement] = {}
        self.new_evaluations = 0

    # ------------------------------------------------------------------------------------------- public

    def run(self, on_trial: Callable[[dict], None] | None = None) -> LayerSearchOutcome:
        self._on_trial = on_trial
        stopped = f"{self.trials} per-layer evaluations done"
        warm = self.warm_start()
        for labels, source in warm:
            if len(self.rows) >= self.trials:
                break
            self._measure(labels, source)
        tried = {schedule_key(self._steps(lb)) for lb, _ in warm} | set(self.measured)
        while len(self.rows) < self.trials:
            ranked = self._ranked()
            if not ranked:
                stopped = "no measured schedule within the budget to climb from"
                break
            # From the best measured schedule; once every change around it is measured, from the next best.
            move = next((m for start in ranked for m in self.moves(start) if schedule_key(self._steps(m)) not in tried), None)
            if move is None:
                stopped = "every change the prior proposes around the measured schedules is measured"
                break
            tried.add(schedule_key(self._steps(move)))
            self._measure(move, "layer-local")
        ranked = self._ranked()
        best = ranked[0] if ranked else None
        return LayerSearchOutcome(pd.DataFrame(self.rows), dict(self.measured),
                                  None if best is None else schedule_key(self._steps(best)), self.new_evaluations, stopped)

    def warm_start(self) -> list[tuple[Labels, str]]:
        """The prior's picks, in the order they are measured, without duplicates."""
        out: dict[Labels, str] = {}
        front = self.front(self.prior)
        feasible = [s for s in front if self._fits(s[0])]
        if feasible:
            cheapest, best = feasible[0][0], feasible[-1][0]
            # Optima at budgets from the budget down to halfway to the cheapest feasible, denser near the budget
            # (where the optimum is): the prior's error makes the best measured pick often sit a little below it.
            for k in range(self.dp_points):
                target = best - (best - cheapest) * 0.5 * (k / max(self.dp_points - 1, 1)) ** 2
                pick = min((s for s in feasible if s[0] <= target + 1e-15), key=lambda s: (s[1], -s[0]), default=None)
                if pick is not None:
                    out.setdefault(pick[2], "layer-dp")
        if self.raw_prior is not None:
            raw = [s for s in self.front(self.raw_prior) if self._fits(s[0])]
            if raw:
                out.setdefault(min(raw, key=lambda s: (s[1], -s[0]))[2], "layer-dp-raw")
        greedy = self.greedy()
        if greedy is not None:
            out.setdefault(greedy, "layer-greedy")
        return list(out.items())

    def front(self, prior: LayerPrior) -> list[tuple[float, float, Labels]]:
        """The prior's (cost, harm) front over all (step, item) choices: `(schedule cost, harm, labels)`, by cost."""
        options = self._options(prior)
        states = choice_front(options, max_states=MAX_STATES)
        n = len(self.items)
        return [(self.costs.fixed + cost, harm, tuple(tuple(lb[s * n:(s + 1) * n]) for s in range(self.steps)))
                for cost, harm, lb in states]

    def greedy(self) -> Labels | None:
        options = self._options(self.prior)
        start = [self.prior.reference] * (self.steps * len(self.items))
        picked = choice_greedy(options, start, self.budget - self.costs.fixed)
        if picked is None:
            return None
        n = len(self.items)
        return tuple(tuple(picked[s * n:(s + 1) * n]) for s in range(self.steps))

    def moves(self, labels: Labels) -> list[Labels]:
        """Changes of one item, or of two (an upgrade paid for by the downgrade the prior finds least harmful),
        within the budget, ranked by predicted harm change (the most promising first)."""
        steps = self.steps
        cost_now = self.costs.schedule_cost(labels)
        slack = self.budget + BUDGET_EPS - cost_now
        changes = []  # (dharm, dcost, step, item index, level)
        for s in range(steps):
            for i, item in enumerate(self.items):
                current = labels[s][i]
                h0, c0 = self.prior.item_harm(s, item, current), self.costs.cost[(item, current)]
                for lv in self.levels:
                    if lv == current:
                        continue
                    dh = self.prior.item_harm(s, item, lv) - h0
                    if math.isfinite(dh):
                        changes.append((dh, (self.costs.cost[(item, lv)] - c0) / steps, s, i, lv))
        singles = [c for c in changes if c[1] <= slack]
        downs = sorted((c for c in changes if c[1] < 0), key=lambda c: c[0])
        ranked: list[tuple[float, tuple]] = [(c[0], (c,)) for c in singles]
        for up in changes:
            if up[1] <= slack:
                continue
            for down in downs:  # the least harmful downgrade that pays for this upgrade
                if (down[2], down[3]) != (up[2], up[3]) and up[1] + down[1] <= slack:
                    ranked.append((up[0] + down[0], (up, down)))
                    break
        ranked.sort(key=lambda r: (r[0], len(r[1])))
        out = []
        for _, combo in ranked:
            rows = [list(r) for r in labels]
            for _, _, s, i, lv in combo:
                rows[s][i] = lv
            out.append(tuple(tuple(r) for r in rows))
        return out

    # ------------------------------------------------------------------------------------------- internals

    def _options(self, prior: LayerPrior):
        return [[(lv, self.costs.cost[(item, lv)] / self.steps, prior.item_harm(s, item, lv)) for lv in self.levels]
                for s in range(self.steps) for item in self.items]

    def _fits(self, cost: float) -> bool:
        return cost <= self.budget + BUDGET_EPS

    def _steps(self, labels: Labels) -> tuple[StepAssignment, ...]:
        return labels_to_steps(labels, self.costs)

    def _value(self, key: str) -> float | None:
        m = self.measured.get(key) or self.start.get(key)
        if m is None or m.fail_reason or self.metric not in m.estimates:
            return None
        v = m.estimates[self.metric].value
        return v if math.isfinite(v) else None

    def _ranked(self) -> list[Labels]:
        """The measured schedules within the budget, this stage's and those it may start from, the best first."""
        found: dict[Labels, float] = {}
        for key in [*self.start, *(r["schedule"] for r in self.rows)]:
            value = self._value(key)
            if value is None:
                continue
            try:
                labels = steps_to_labels(as_steps(key.split(",")), self.items, self.groups)
            except QschedError:
                continue
            if len(labels) == self.steps and self._fits(self.costs.schedule_cost(labels)):
                found.setdefault(labels, value)
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(found, key=lambda lb: sign * found[lb])

    def _measure(self, labels: Labels, source: str) -> None:
        steps = self._steps(labels)
        key = schedule_key(steps)
        measurement = self.start.get(key) or (self.store.done.get(key) if self.store else None)
        if measurement is None:
            measurement = self._run(steps)
            self.new_evaluations += 1
            if self.store:
                self.store.add(key, measurement)
        self.measured[key] = measurement
        costs = self.schedule_costs(steps)
        est = measurement.estimates.get(self.metric)
        row = {"schedule": key, "source": source, "state": "FAIL" if measurement.fail_reason or est is None else "COMPLETE",
               "fail_reason": measurement.fail_reason or "", "cost": costs[self.cost_model], "cost_bops": costs["bops"],
               "cost_memory": costs["memory"], "cost_latency": "" if costs.get("latency") is None else costs["latency"],
               "feasible": bool(costs[self.cost_model] <= self.budget + BUDGET_EPS), "metric": self.metric,
               "value": None if est is None else est.value, "ci_low": None if est is None else est.ci_low,
               "ci_high": None if est is None else est.ci_high, "n": None if est is None else est.n,
               "predicted_harm": self.prior.predict(labels)}
        self.rows.append(row)
        if self._on_trial:
            self._on_trial(row)

    def _run(self, steps) -> Measurement:
        from qsched_search.search.study import failure_reason, measurement_of

        try:
            return measurement_of(self.evaluate(steps))
        except (QschedError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # a kernel or numeric error of one schedule must not end the search
            return Measurement(estimates={}, timesteps=(), fail_reason=failure_reason(exc))
