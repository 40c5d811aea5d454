"""The rules read off the result tables, shared by the search and the report: the front, the pick, the baselines."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from qsched_search.results.tables import (TRIALS_COLUMNS, best_uniform_at_most, choose_schedule, completed,
                                          pareto_front, schedule_key, split_schedule, uniform_rows)


def _trials(rows) -> pd.DataFrame:
    """rows: (schedule, cost, value[, state[, metric]]); trial numbers in order."""
    out = []
    for i, row in enumerate(rows):
        schedule, cost, value, *rest = row
        state = rest[0] if rest else "COMPLETE"
        metric = rest[1] if len(rest) > 1 else "lpips"
        out.append(dict(trial=i, schedule=schedule, source="tpe", state=state, fail_reason="", cost=cost,
                        cost_bops=cost, cost_memory=cost, cost_latency="", feasible=cost <= 0.5, metric=metric,
                        value=value if state == "COMPLETE" else None, ci_low=None, ci_high=None, n=8))
    return pd.DataFrame(out, columns=TRIALS_COLUMNS)


def test_schedule_keys_tolerate_hand_edits():
    assert schedule_key(["w8a8", "fp32"]) == "w8a8,fp32"
    assert split_schedule(" w8a8 , fp32,") == ["w8a8", "fp32"]


def test_a_schedule_measured_twice_counts_once_its_first_trial():
    trials = _trials([("w8a8,fp32", 0.5, 0.02), ("fp32,fp32", 1.0, 0.0), ("w8a8, fp32", 0.5, 0.01),
                      ("w4a4,w4a4", 0.2, math.nan), ("w4a4,fp32", 0.4, None, "FAIL")])
    done = completed(trials)
    assert list(done["schedule"]) == ["w8a8,fp32", "fp32,fp32"]  # the NaN value and the failure are left out too
    assert done.set_index("schedule").loc["w8a8,fp32", "value"] == 0.02  # the first trial, not the better second
    front = pareto_front(trials, higher_is_better=False)
    assert list(front["schedule"]) == ["w8a8,fp32", "fp32,fp32"] and list(front["trial"]) == [0, 1]
    assert choose_schedule(trials, 0.5, higher_is_better=False)["trial"] == 0


def test_ties_are_broken_by_value_then_cost_then_trial():
    trials = _trials([("a,a", 0.4, 0.05), ("b,b", 0.3, 0.05), ("c,c", 0.3, 0.05), ("d,d", 0.3, 0.07)])
    # The same value: the cheaper wins; the same value and cost: the earlier trial.
    assert choose_schedule(trials, 0.5, higher_is_better=False)["schedule"] == "b,b"
    front = pareto_front(trials, higher_is_better=False)
    assert list(front["schedule"]) == ["b,b"] and front["on_front"].all()
    # Higher is better: the better value first, whatever it costs within the budget.
    assert choose_schedule(trials, 0.5, higher_is_better=True)["schedule"] == "d,d"
    assert list(pareto_front(trials, higher_is_better=True)["schedule"]) == ["d,d"]
    assert choose_schedule(trials, 0.29, higher_is_better=False) is None


def test_budget_and_baseline_costs_exactly_at_the_limit_count():
    cost = (0.066 + 1.0) / 2  # a float that does not round-trip exactly
    trials = _trials([("w8a8,fp32", cost, 0.02), ("w8a8,w8a8", 0.066, 0.03), ("fp32,fp32", 1.0, 0.0)])
    assert choose_schedule(trials, float(f"{cost:.17g}"), higher_is_better=False)["schedule"] == "w8a8,fp32"
    assert best_uniform_at_most(trials, 0.066, higher_is_better=False)["schedule"] == "w8a8,w8a8"
    assert best_uniform_at_most(trials, 0.065, higher_is_better=False) is None
    assert best_uniform_at_most(trials, math.nan, higher_is_better=False) is None


def test_best_uniform_follows_steps_and_metric():
    trials = _trials([("w8a8,w8a8", 0.07, 0.03), ("w4a4,w4a4", 0.02, 0.2), ("w4a4,w4a4,w4a4", 0.02, 0.001),
                      ("w4a4,w4a4", 0.02, 30.0, "COMPLETE", "psnr"), ("fp32,fp32", 1.0, 0.0)])
    uniform = uniform_rows(trials, steps=2, metric="lpips")
    assert list(uniform["schedule"]) == ["w4a4,w4a4", "w8a8,w8a8", "fp32,fp32"]  # cheapest first
    assert list(uniform["level"]) == ["w4a4", "w8a8", "fp32"]
    assert best_uniform_at_most(trials, 0.5, False, steps=2, metric="lpips")["schedule"] == "w8a8,w8a8"
    # Without the step filter the 3-step schedule would win; without the metric filter psnr's 30 is not lpips.
    assert best_uniform_at_most(trials, 0.5, False, metric="lpips")["schedule"] == "w4a4,w4a4,w4a4"
    assert best_uniform_at_most(trials, 0.05, True, steps=2, metric="psnr")["value"] == 30.0
    assert best_uniform_at_most(trials, 0.05, False, steps=2, metric="lpips")["value"] == pytest.approx(0.2)
