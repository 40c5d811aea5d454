"""The result tables' columns and the rules read off them: the Pareto front, the pick, and the uniform baselines.

Search and report both call these, so that the front one draws and the baseline the other names cannot differ.
A schedule measured more than once (a cache answer, a retry) counts once: its first trial stands for it.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

__all__ = ["BUDGET_EPS", "COEFFICIENTS_FRONT_COLUMNS", "PROBE_COLUMNS", "PROBE_LAYER_COLUMNS", "TRIALS_COLUMNS", "best_per_step_at_most", "best_uniform_at_most",
           "choose_schedule", "completed", "pareto_front", "schedule_key", "split_schedule", "uniform_rows"]

# Costs go through floats, CSV and JSON; a schedule exactly at the budget must stay within it.
BUDGET_EPS = 1e-9

PROBE_COLUMNS = ["kind", "step", "timestep", "precision", "metric", "value", "ci_low", "ci_high", "n", "delta",
                 "unhealthy_images", "fail_reason"]
# probe_layers.csv: the probe's columns with the group (and how many layers it holds) of each step x group cell.
PROBE_LAYER_COLUMNS = ["kind", "step", "timestep", "group", "layers", "precision", "metric", "value", "ci_low", "ci_high",
                       "n", "delta", "unhealthy_images", "fail_reason"]
TRIALS_COLUMNS = ["trial", "schedule", "source", "state", "fail_reason", "cost", "cost_bops", "cost_memory",
                  "cost_latency", "feasible", "metric", "value", "ci_low", "ci_high", "n"]
COEFFICIENTS_FRONT_COLUMNS = ["schedule", "cost", "metric", "value", "ci_low", "ci_high", "value_with", "ci_low_with",
                              "ci_high_with", "n", "improved", "coefficients", "calibration_value", "identity_value",
                              "calibration_evaluations", "fail_reason"]


def schedule_key(levels: Sequence) -> str:
    """A schedule's name in every table and cache: its steps' keys comma-joined (a step's key is its level, with
    its per-layer overrides in braces if it has any: `qsched_search.results.assignment`)."""
    return ",".join(str(s) for s in levels)


def split_schedule(key) -> list[str]:
    """The step keys of a `schedule` cell (tolerates spaces a hand edit left); for a per-step schedule, its levels."""
    return [s.strip() for s in str(key).split(",") if s.strip()]


def completed(trials: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Completed rows with numeric cost and value, of `metric` if given, one per schedule (its first trial)."""
    done = trials
    if "state" in done.columns:
        done = done[done["state"].astype(str).str.upper() == "COMPLETE"]
    if metric is not None and "metric" in done.columns:
        done = done[done["metric"].astype(str) == metric]
    done = done.assign(cost=pd.to_numeric(done["cost"], errors="coerce"),
                       value=pd.to_numeric(done["value"], errors="coerce"))
    done = done.dropna(subset=["cost", "value"])
    if "trial" in done.columns:
        done = done.sort_values("trial", kind="stable")
    return done.assign(schedule=done["schedule"].map(lambda s: schedule_key(split_schedule(s)))).drop_duplicates(
        "schedule", keep="first")


def pareto_front(trials: pd.DataFrame, higher_is_better: bool, metric: str | None = None) -> pd.DataFrame:
    """pareto.csv: the completed schedules that no other completed schedule beats on both cost and quality.

    Computed over all completed trials, not taken from Optuna's `best_trials`, which mixes in the constraint and is
    empty when nothing is feasible. Ties on cost keep the better value, then the earlier trial.
    """
    done = completed(trials, metric)
    keys = ["cost", "value"] + (["trial"] if "trial" in done.columns else [])
    ordered = done.sort_values(keys, ascending=[True, not higher_is_better] + [True] * (len(keys) - 2), kind="stable")
    keep, best = [], None
    for idx, value in ordered["value"].items():
        if best is None or (value > best if higher_is_better else value < best):
            keep.append(idx)
            best = value
    front = ordered.loc[keep].copy()
    front["on_front"] = True
    return front.reset_index(drop=True)


def _best(rows: pd.DataFrame, higher_is_better: bool) -> pd.Series | None:
    """The best value; ties: the cheaper, then the earlier trial."""
    if rows.empty:
        return None
    keys = ["value", "cost"] + (["trial"] if "trial" in rows.columns else [])
    return rows.sort_values(keys, ascending=[not higher_is_better, True] + [True] * (len(keys) - 2), kind="stable").iloc[0]


def choose_schedule(trials: pd.DataFrame, budget: float, higher_is_better: bool,
                    metric: str | None = None) -> pd.Series | None:
    """The completed schedule with the best quality whose cost is within `budget`; None if none completed."""
    done = completed(trials, metric)
    return _best(done[done["cost"] <= budget + BUDGET_EPS], higher_is_better)


def best_per_step_at_most(trials: pd.DataFrame, cost: float, higher_is_better: bool, steps: int | None = None,
                          metric: str | None = None) -> pd.Series | None:
    """The best schedule without per-layer overrides costing at most `cost` (what a per-layer schedule must beat)."""
    done = completed(trials, metric)
    plain = done[~done["schedule"].astype(str).str.contains("{", regex=False)]
    if steps is not None:
        plain = plain[plain["schedule"].map(lambda k: len(split_schedule(k)) == steps)]
    return _best_at_most(plain, cost, higher_is_better)


def uniform_rows(trials: pd.DataFrame, steps: int | None = None, metric: str | None = None) -> pd.DataFrame:
    """Completed uniform schedules (every step at one level), with a `level` column, cheapest first."""
    done = completed(trials, metric)
    parts = done["schedule"].map(split_schedule)
    uniform = done[parts.map(lambda p: bool(p) and len(set(p)) == 1 and "{" not in p[0]
                             and (steps is None or len(p) == steps))].copy()
    uniform["level"] = uniform["schedule"].map(lambda s: split_schedule(s)[0])
    keys = ["cost"] + (["trial"] if "trial" in uniform.columns else [])
    return uniform.sort_values(keys, kind="stable")


def best_uniform_at_most(trials: pd.DataFrame, cost: float, higher_is_better: bool, steps: int | None = None,
                         metric: str | None = None) -> pd.Series | None:
    """The best uniform schedule costing at most `cost` (the baseline a schedule must beat); None if none does."""
    return _best_at_most(uniform_rows(trials, steps, metric), cost, higher_is_better)


def _best_at_most(done: pd.DataFrame, cost: float, higher_is_better: bool) -> pd.Series | None:
    if cost is None or (isinstance(cost, float) and math.isnan(cost)):
        return None
    return _best(done[done["cost"] <= cost + BUDGET_EPS], higher_is_better)
