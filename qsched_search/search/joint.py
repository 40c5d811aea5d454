"""Calibrates Q-Sched coefficients for the Pareto schedules of a search and measures each with and without them.

The two levers (a precision per step, and coefficients that rescale each sampler step) are searched jointly in the
cheap way: the precision search runs first, then every Pareto schedule within the budget gets its own coefficients
(`qsched_search.search.calibrate`, on calibration seeds disjoint from the evaluation seeds) and is measured again on the
search's evaluation set. Coefficients cost nothing at run time (two multiplies per step), so a schedule keeps its
cost; schedule.json carries them only when they measured better on the search's objective.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from qsched_search.errors import QschedError
from qsched_search.pipeline.coefficients import apply_coefficients
from qsched_search.results.compare import better, compare_paired
from qsched_search.results.records import Measurement
from qsched_search.results.schedule import Quality, Schedule
from qsched_search.results.tables import BUDGET_EPS, COEFFICIENTS_FRONT_COLUMNS, split_schedule
from qsched_search.search.calibrate import CalibrationSettings, build_objective, calibrate

__all__ = ["COEFFICIENT_LOSSES", "JointSettings", "JointResult", "calibrate_front"]

logger = logging.getLogger(__name__)

COEFFICIENT_LOSSES = ("auto", "jaq", "reference")


@dataclass(frozen=True)
class JointSettings:
    """How `qsched search --with-coefficients` calibrates the Pareto schedules.

    Args:
        loss (`str`, defaults to `"auto"`): `jaq`, `reference`, or `auto`: `reference` (LPIPS to full precision)
            when the search's objective is paired with the reference images (LPIPS, PSNR, SSIM), else `jaq`, so that
            the coefficients are learned for what the search measures.
        param (`str`, defaults to `"ramp"`): `ramp` (the published two scalars) or `per-step`.
        trials (`int`, defaults to 12): calibration trials per schedule after the identity.
        samples (`int`, defaults to 32): calibration samples per trial.
        candidates (`int`, defaults to 3): Pareto schedules within the budget to calibrate, the best first.
    """

    loss: str = "auto"
    param: str = "ramp"
    trials: int = 12
    samples: int = 32
    candidates: int = 3

    def __post_init__(self):
        if self.loss not in COEFFICIENT_LOSSES:
            raise QschedError(f"--coefficients-loss {self.loss!r} is unknown; allowed: {', '.join(COEFFICIENT_LOSSES)}")
        if self.candidates < 1:
            raise QschedError(f"--coefficients-candidates {self.candidates} is too few; allowed: 1 or more Pareto schedules")
        # The rest is CalibrationSettings' to check, with its own messages.
        CalibrationSettings(loss="jaq", param=self.param, trials=self.trials, samples=self.samples)

    def loss_for(self, metric) -> str:
        if self.loss != "auto":
            return self.loss
        return "reference" if metric.paired else "jaq"


@dataclass
class JointResult:
    """`front`: one pareto_coefficients.csv row per calibrated schedule; `schedule`: what schedule.json is to hold."""

    front: pd.DataFrame
    schedule: Schedule
    applied: bool


def _candidates(front: pd.DataFrame, budget: float, reference: str, higher_is_better: bool, n: int) -> pd.DataFrame:
    """The best `n` Pareto schedules within the budget; all-reference schedules are left out (nothing to correct)."""
    inside = front[front["cost"] <= budget + BUDGET_EPS]
    quantized = inside[inside["schedule"].map(lambda s: set(split_schedule(s)) != {reference})]
    return quantized.sort_values(["value", "cost"], ascending=[not higher_is_better, True]).head(n)


def calibrate_front(session, search, settings: JointSettings,
                    on_status: Callable[[str], None] | None = None) -> JointResult:
    """Calibrates coefficients for the best Pareto schedules of a finished study and re-measures them.

    Nothing is written here: the search stage writes pareto_coefficients.csv and the schedule it returns.

    Args:
        session (`Session`): the search's session (model, bank, evaluator over the evaluation set).
        search (`SearchResult`): the study's pick and front (from `run_search`, before its files are written).
        settings (`JointSettings`): loss, parametrisation, trials, samples, candidates.
        on_status (`Callable[[str], None]`, *optional*): one-line status messages.

    Returns:
        `JointResult`.
    """
    status = on_status or logger.info
    schedule = search.schedule
    metric_name, higher = schedule.quality.metric, schedule.quality.higher_is_better
    metric = next(m for m in session.evaluator.metrics if m.name == metric_name)
    loss = settings.loss_for(metric)
    family = session.model.family
    prompts = tuple(family.default_prompts or session.eval_set.prompts)
    objective = build_objective(loss, family.family, device=str(session.settings.device),
                                weights_dir=session.settings.weights_dir)
    calib = CalibrationSettings(loss=loss, param=settings.param, trials=settings.trials, samples=settings.samples,
                                prompts=prompts, seed=int(session.settings.seed))
    chosen_key = ",".join(schedule.levels)
    candidates = _candidates(search.front, schedule.budget, schedule.reference, higher, settings.candidates)
    if chosen_key not in set(candidates["schedule"]) and set(schedule.levels) != {schedule.reference}:
        candidates = pd.concat([candidates, search.front[search.front["schedule"] == chosen_key]]).head(settings.candidates + 1)
    rows, found = [], {}
    for k, row in enumerate(candidates.itertuples(index=False), start=1):
        levels = tuple(split_schedule(row.schedule))
        status(f"coefficients {k}/{len(candidates)}: calibrating {row.schedule} with {objective.name} "
               f"({calib.evaluations} runs of {calib.samples} calibration samples)")
        out = {"schedule": row.schedule, "cost": float(row.cost), "metric": metric_name, "value": float(row.value),
               "ci_low": row.ci_low, "ci_high": row.ci_high, "n": int(row.n), "fail_reason": None}
        try:
            result = calibrate(session.runner, levels, calib, objective, eval_seeds=session.eval_set.seeds)
            coeffs = result.coefficients
            evaluation = None
            if not coeffs.is_identity:  # the identity is the stock sampler: its measurement is the search's
                with apply_coefficients(session.model.pipe, coeffs):
                    evaluation = session.evaluator.evaluate(levels)
        except QschedError:
            raise
        except Exception as exc:  # one schedule's numeric failure must not lose the others
            out["fail_reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append(out)
            continue
        out.update(coefficients=coeffs.describe(), calibration_value=float(result.best["value"]),
                   identity_value=float(result.baseline["value"]), calibration_evaluations=int(result.evaluations))
        if evaluation is None:
            out.update(value_with=out["value"], ci_low_with=out["ci_low"], ci_high_with=out["ci_high"], improved=False)
        elif evaluation.failed:
            out.update(fail_reason=evaluation.fail_reason, improved=False)
        else:
            est = evaluation.estimates[metric_name]
            out.update(value_with=float(est.value), ci_low_with=est.ci_low, ci_high_with=est.ci_high,
                       improved=better(est.value, out["value"], higher))
            found[row.schedule] = (coeffs, est)
        rows.append(out)
    front = pd.DataFrame(rows, columns=COEFFICIENTS_FRONT_COLUMNS)

    chosen = front[front["schedule"] == chosen_key]
    applied = bool(len(chosen) and chosen["improved"].fillna(False).astype(bool).iloc[0])
    obj = schedule.to_dict()
    obj.setdefault("search", {})["coefficients"] = {
        "loss": loss, "param": settings.param, "trials": settings.trials, "samples": settings.samples,
        "candidates": int(len(front)), "applied": applied,
        "without": schedule.quality.to_dict(),
        "with": _quality(metric_name, found[chosen_key][1], higher).to_dict() if chosen_key in found else None,
        "with_coefficients": found[chosen_key][0].describe() if chosen_key in found else "identity",
        "file": "pareto_coefficients.csv",
    }
    if applied:
        coeffs, est = found[chosen_key]
        obj["coefficients"] = coeffs.to_dict()
        obj["quality"] = _quality(metric_name, est, higher).to_dict()
        baseline = (search.comparison or {}).get("baseline")
        if baseline in search.measured:  # the paired comparison, now of the schedule with its coefficients
            obj["comparison"] = compare_paired(Measurement(estimates={metric_name: est}), search.measured[baseline],
                                               metric_name, baseline)
    updated = Schedule.from_dict(obj, source="schedule with coefficients")
    return JointResult(front=front, schedule=updated, applied=applied)


def _quality(metric: str, est, higher_is_better: bool) -> Quality:
    def ci(x):
        return None if x is None or math.isnan(x) else float(x)

    return Quality(metric, float(est.value), ci(est.ci_low), ci(est.ci_high), int(est.n), bool(higher_is_better),
                   est.per_image)
