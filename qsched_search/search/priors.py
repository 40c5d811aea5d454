"""Warm start from the probe: the additive prediction of a schedule's harm, its exact front, and greedy picks.

The prediction only chooses what to measure first: every schedule it proposes is measured like any other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from qsched_search.results.tables import BUDGET_EPS

logger = logging.getLogger(__name__)

__all__ = ["DP_POINTS", "AdditiveModel", "Prediction", "additive_front", "additive_model", "choice_front", "choice_greedy",
           "dp_schedule", "greedy_schedule", "row_harm", "warm_start_schedules"]

# Probe-DP warm-start points: the predicted optimum at the budget plus points spread over the predicted front.
DP_POINTS = 8


@dataclass(frozen=True)
class AdditiveModel:
    """The probe's prediction: a schedule's harm is the sum over steps of the harm of that step alone at its level.

    Harm is the probe's `delta` turned so that larger is worse (`-delta` for a higher-is-better metric); the
    reference level's harm is 0 and a probe cell that failed (or is missing) has infinite harm.
    """

    harm: Mapping[tuple[int, str], float]
    steps: int
    levels: tuple[str, ...]  # every level the schedule may use, the reference first
    reference: str

    def step_harm(self, step: int, level: str) -> float:
        if level == self.reference:
            return 0.0
        return self.harm.get((step, level), math.inf)

    def predict(self, levels: Sequence[str]) -> float:
        return sum(self.step_harm(i, lv) for i, lv in enumerate(levels))


def additive_model(probe: pd.DataFrame, metric: str, higher_is_better: bool, steps: int, levels: Sequence[str],
                   reference: str) -> AdditiveModel | None:
    """Builds the additive prediction from a probe table (probe.csv); None when the table does not fit the search.

    Args:
        probe (`pd.DataFrame`): the probe table (columns of `qsched_search.results.tables.PROBE_COLUMNS`).
        metric (`str`): the search objective; the probe must have rows for it.
        higher_is_better (`bool`): the metric's direction.
        steps (`int`): the search's steps; the probe must cover the same steps.
        levels (`Sequence[str]`): the levels the search may use, the reference included.
        reference (`str`): the reference level.
    """
    absent = [c for c in ("kind", "step", "precision", "metric", "delta") if c not in probe.columns]
    if absent:
        logger.warning("probe table lacks column(s) %s; no probe warm start", ", ".join(absent))
        return None
    rows = probe[(probe["kind"] == "step") & (probe["metric"] == metric)]
    if rows.empty:
        logger.warning("probe table has no per-step rows for metric %r; no probe warm start (probe with --metrics %s)", metric, metric)
        return None
    probed_steps = sorted(int(s) for s in rows["step"].dropna().unique())
    if probed_steps != list(range(steps)):
        logger.warning("probe table covers steps %s but the search has %d steps; no probe warm start (re-run the probe with --steps %d)",
                       probed_steps, steps, steps)
        return None
    sign = -1.0 if higher_is_better else 1.0
    harm: dict[tuple[int, str], float] = {}
    for row in rows.itertuples(index=False):
        if row.precision not in levels or row.precision == reference:
            continue
        harm[(int(row.step), str(row.precision))] = row_harm(row, sign)
    unprobed = [lv for lv in levels if lv != reference and not any(k[1] == lv for k in harm)]
    if unprobed:
        logger.warning("probe table has no rows for %s; the probe warm start avoids them", ", ".join(unprobed))
    return AdditiveModel(harm=harm, steps=steps, levels=tuple(dict.fromkeys([reference, *levels])), reference=reference)


def row_harm(row, sign: float) -> float:
    """A probe row's harm: `sign * delta` (`sign` -1 for a higher-is-better metric), infinite for a failed cell or a
    missing delta."""
    reason = getattr(row, "fail_reason", None)
    delta = getattr(row, "delta", None)
    delta = float(delta) if delta is not None and not pd.isna(delta) else math.nan
    return math.inf if (isinstance(reason, str) and reason) or math.isnan(delta) else sign * delta


@dataclass(frozen=True)
class Prediction:
    levels: tuple[str, ...]
    harm: float
    cost: float


def additive_front(model: AdditiveModel, level_costs: Mapping[str, float]) -> list[Prediction]:
    """The exact Pareto front of (predicted harm, cost) over all schedules, by dynamic programming over steps.

    Harm and cost are both sums over steps, so a prefix dominated by another prefix of the same length can only
    lead to dominated schedules: keeping the non-dominated prefixes after every step is exact (a multiple-choice
    knapsack solved for every budget at once). The states stay few: at most one per distinct prefix cost.

    Returns:
        `list[Prediction]`: non-dominated schedules sorted by cost (ascending), harm descending along the list.
    """
    return [Prediction(levels, harm, cost / model.steps) for cost, harm, levels in choice_front(_step_options(model, level_costs))]


def _step_options(model: AdditiveModel, level_costs: Mapping[str, float]) -> list[list[tuple[str, float, float]]]:
    return [[(lv, float(level_costs[lv]), model.step_harm(step, lv)) for lv in model.levels] for step in range(model.steps)]


def choice_front(options: Sequence[Sequence[tuple[str, float, float]]],
                 max_states: int | None = None) -> list[tuple[float, float, tuple[str, ...]]]:
    """The Pareto front of (total cost, total harm) over one choice per item: `options[i]` lists item i's
    `(label, cost, harm)` choices (an infinite harm is never chosen). Exact by dynamic programming over items (see
    `additive_front`); with `max_states`, the kept prefixes are thinned to that many, evenly over cost, after each
    item (for spaces of many items, such as steps x layer groups).

    Returns:
        `(cost, harm, labels)` states sorted by cost, harm descending along the list.
    """
    states: list[tuple[float, float, tuple[str, ...]]] = [(0.0, 0.0, ())]
    for choices in options:
        grown = []
        for cost, harm, prefix in states:
            for label, c, h in choices:
                if math.isfinite(h):
                    grown.append((cost + float(c), harm + h, prefix + (label,)))
        states = _pareto_states(grown)
        if max_states is not None and len(states) > max_states:
            keep = np.linspace(0, len(states) - 1, num=max_states).round().astype(int)
            states = [states[i] for i in sorted(set(keep.tolist()))]
    return states


def _pareto_states(states: list[tuple[float, float, tuple[str, ...]]]) -> list[tuple[float, float, tuple[str, ...]]]:
    # Sort by cost, then harm; keep a state only if it is strictly less harmful than every cheaper one.
    states.sort(key=lambda s: (round(s[0], 12), s[1], s[2]))
    out, best = [], math.inf
    for state in states:
        if state[1] < best - 1e-15:
            out.append(state)
            best = state[1]
    return out


def dp_schedule(model: AdditiveModel, level_costs: Mapping[str, float], budget: float) -> tuple[str, ...] | None:
    """The schedule with the least predicted harm whose cost is within `budget` (ties: the cheaper); None if none."""
    feasible = [p for p in additive_front(model, level_costs) if p.cost <= budget + BUDGET_EPS]
    return min(feasible, key=lambda p: (p.harm, p.cost)).levels if feasible else None


def greedy_schedule(model: AdditiveModel, level_costs: Mapping[str, float], budget: float) -> tuple[str, ...] | None:
    """The probe-greedy schedule: from all-reference, lower the step whose harm per cost saved is least until
    within budget, then spend what is left of the budget on the upgrades that remove the most harm."""
    return choice_greedy(_step_options(model, level_costs), [model.reference] * model.steps, budget, model.steps)


def choice_greedy(options: Sequence[Sequence[tuple[str, float, float]]], start: Sequence[str], budget: float,
                  divisor: float = 1.0) -> tuple[str, ...] | None:
    """Greedy over items with `(label, cost, harm)` choices (see `choice_front`), from the labels `start`: lower the
    item whose harm added per cost saved is least until the total cost / `divisor` is within `budget`, then take
    the upgrades that remove the most harm while it stays within. None if the budget cannot be met."""
    table = [{label: (float(c), h) for label, c, h in choices} for choices in options]
    labels = list(start)
    cost = lambda ls: sum(table[i][lb][0] for i, lb in enumerate(ls)) / divisor  # noqa: E731
    while cost(labels) > budget + BUDGET_EPS:
        moves = []
        for i, current in enumerate(labels):
            for label, (c, h) in table[i].items():
                saved = table[i][current][0] - c
                added = h - table[i][current][1]
                if saved > 0 and math.isfinite(added):
                    moves.append((added / saved, -saved, i, label))
        if not moves:
            return None
        _, _, i, label = min(moves)
        labels[i] = label
    while True:
        moves = []
        for i, current in enumerate(labels):
            for label, (c, h) in table[i].items():
                gain = table[i][current][1] - h
                trial = labels[:i] + [label] + labels[i + 1:]
                if gain > 0 and cost(trial) <= budget + BUDGET_EPS:
                    moves.append((-gain, i, label))
        if not moves:
            return tuple(labels)
        _, i, label = min(moves)
        labels[i] = label


def warm_start_schedules(levels: Sequence[str], reference: str, steps: int, level_costs: Mapping[str, float],
                         budget: float, model: AdditiveModel | None = None,
                         dp_points: int = DP_POINTS) -> list[tuple[tuple[str, ...], str]]:
    """The schedules a search starts from, each with its source, without duplicates.

    Uniform schedules (cheapest first, so that a feasible one is measured early), then from the probe: the
    exact additive optimum at the budget and `dp_points - 1` more points spread evenly over the predicted front
    within the budget ("probe-dp"), and the greedy schedule ("probe-greedy").
    """
    out: dict[tuple[str, ...], str] = {}
    for level in sorted(dict.fromkeys([reference, *levels]), key=lambda lv: (float(level_costs[lv]), lv)):
        out.setdefault((level,) * steps, "uniform")
    if model is not None:
        front = [p for p in additive_front(model, level_costs) if p.cost <= budget + BUDGET_EPS]
        if front:
            best = min(front, key=lambda p: (p.harm, p.cost))
            out.setdefault(best.levels, "probe-dp")
            picks = np.linspace(0, len(front) - 1, num=min(max(dp_points, 1), len(front))).round().astype(int)
            for i in sorted(set(picks.tolist()), reverse=True):
                if len([s for s in out.values() if s == "probe-dp"]) >= dp_points:
                    break
                out.setdefault(front[i].levels, "probe-dp")
        greedy = greedy_schedule(model, level_costs, budget)
        if greedy is not None:
            out.setdefault(greedy, "probe-greedy")
    # The predicted optimum right after the uniform schedules, the other probe picks grouped by prefix: schedules
    # measured one after another then share their first steps' denoiser outputs (the rollout's prefix cache).
    items = list(out.items())
    uniform = [i for i in items if i[1] == "uniform"]
    picks = [i for i in items if i[1] != "uniform"]
    return uniform + picks[:1] + sorted(picks[1:], key=lambda item: item[0])
