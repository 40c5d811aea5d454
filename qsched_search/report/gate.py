"""The regression gate: `--fail-if-worse METRIC:TOLERANCE` against a baseline results folder."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qsched_search.errors import QschedError
from qsched_search.report.loading import Results, _float
from qsched_search.results.compare import paired_difference
from qsched_search.results.metric_facts import METRICS
from qsched_search.results.tables import BUDGET_EPS, completed

__all__ = ["GateResult", "GateSpec", "baseline_warnings", "check_gate", "parse_fail_if_worse"]

# Equal metric values must pass the gate despite float round-trips through CSV and JSON.
_VALUE_EPS = 1e-12


@dataclass(frozen=True)
class GateSpec:
    """`--fail-if-worse METRIC:TOLERANCE`, parsed."""

    metric: str
    tolerance: float

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric].higher_is_better


@dataclass(frozen=True)
class GateResult:
    """The regression gate's verdict; `reason` is one line either way."""

    passed: bool
    reason: str
    metric: str
    tolerance: float
    higher_is_better: bool
    value: float
    baseline_value: float
    cost_model: str
    cost: float
    baseline_cost: float
    baseline_dir: str
    paired: dict | None = None  # the schedule minus the baseline, sample by sample, when both ran the same samples

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_fail_if_worse(spec: str) -> GateSpec:
    """Parses `METRIC:TOLERANCE` (e.g. `lpips:0.01`).

    Raises:
        `QschedError`: not of that form, an unknown metric, or a tolerance that is not a number >= 0.
    """
    allowed = ", ".join(sorted(METRICS))
    metric, sep, tol = str(spec).partition(":")
    metric = metric.strip().lower()
    if not sep or not metric or not tol.strip():
        raise QschedError(
            f"--fail-if-worse {spec!r} is not METRIC:TOLERANCE; METRIC is one of {allowed} and TOLERANCE a number "
            f">= 0; e.g. --fail-if-worse lpips:0.01"
        )
    if metric not in METRICS:
        raise QschedError(
            f"--fail-if-worse {spec!r}: unknown metric {metric!r}; use one of {allowed} (e.g. lpips:0.01)"
        )
    try:
        tolerance = float(tol)
    except ValueError:
        tolerance = math.nan
    if not math.isfinite(tolerance) or tolerance < 0:
        raise QschedError(
            f"--fail-if-worse {spec!r}: tolerance {tol.strip()!r} is not a finite number >= 0; "
            f"e.g. --fail-if-worse {metric}:0.01"
        )
    return GateSpec(metric=metric, tolerance=tolerance)


def _quality_on(results: Results, metric: str, which: str) -> float:
    """The chosen schedule's value on `metric`: schedule.json's quality, else its trials.csv row for that metric."""
    if results.schedule is None:
        raise QschedError(
            f"{which} {results.root}: schedule.json is missing, so there is no chosen schedule to gate on; "
            f"run `qsched search` there or pass another folder"
        )
    quality = results.schedule["quality"]
    if str(quality["metric"]) == metric:
        value = _float(quality["value"])
    else:
        value = math.nan
        if results.trials is not None and "metric" in results.trials.columns:
            chosen = ",".join(results.schedule["levels"])
            rows = completed(results.trials, metric)
            rows = rows[rows["schedule"] == chosen]
            if len(rows):
                value = float(rows["value"].iloc[-1])
        if math.isnan(value):
            raise QschedError(
                f"--fail-if-worse {metric}: {which} {results.root} has no {metric} value for its chosen schedule "
                f"(schedule.json measures {quality['metric']}); gate on {quality['metric']} or search with "
                f"metric {metric}"
            )
    if math.isnan(value):
        raise QschedError(
            f"{which} {results.root}: schedule.json quality value is {quality['value']!r}, not a number; "
            f"re-run `qsched search`"
        )
    return value


def check_gate(results: Results, baseline: Results, spec: GateSpec) -> GateResult:
    """Fails when the schedule is worse than the baseline's on `spec.metric` by more than the tolerance, or costs more.

    Cost is compared under the results' budget cost model. Equal values pass.
    """
    value = _quality_on(results, spec.metric, "RESULTS_DIR")
    base_value = _quality_on(baseline, spec.metric, "--baseline")
    cost_model = str(results.schedule["budget"].get("cost_model", ""))
    cost = _float(results.schedule["cost"].get(cost_model))
    base_cost = _float(baseline.schedule["cost"].get(cost_model))
    if math.isnan(cost) or math.isnan(base_cost):
        raise QschedError(
            f"cost model {cost_model!r} (RESULTS_DIR's budget): cost is {cost} in {results.root} and {base_cost} in "
            f"--baseline {baseline.root}; both schedule.json files need a numeric cost under it; "
            f"re-run the search with that cost model measured"
        )
    worse_by = (base_value - value) if spec.higher_is_better else (value - base_value)
    direction = "higher" if spec.higher_is_better else "lower"
    problems = []
    if worse_by > spec.tolerance + _VALUE_EPS:
        problems.append(
            f"{spec.metric} {value:.4g} is worse than the baseline's {base_value:.4g} by {worse_by:.4g} "
            f"> tolerance {spec.tolerance:g} ({direction} is better)"
        )
    if cost > base_cost + BUDGET_EPS:
        problems.append(f"{cost_model} cost {cost:.4g} is higher than the baseline's {base_cost:.4g}")
    paired = _paired(results, baseline, spec)
    evidence = "" if paired is None else f"; paired difference {paired.describe()}"
    if problems:
        reason = "gate failed: " + "; ".join(problems) + evidence
    else:
        reason = (
            f"gate passed: {spec.metric} {value:.4g} vs baseline {base_value:.4g} (tolerance {spec.tolerance:g}, "
            f"{direction} is better); {cost_model} cost {cost:.4g} vs baseline {base_cost:.4g}{evidence}"
        )
    return GateResult(
        passed=not problems,
        reason=reason,
        metric=spec.metric,
        tolerance=spec.tolerance,
        higher_is_better=spec.higher_is_better,
        value=value,
        baseline_value=base_value,
        cost_model=cost_model,
        cost=cost,
        baseline_cost=base_cost,
        baseline_dir=str(baseline.root),
        paired=None if paired is None else paired.to_dict(),
    )


def _paired(results: Results, baseline: Results, spec: GateSpec):
    """The paired difference of the two chosen schedules on `spec.metric`, when both schedule.json files hold each
    sample's value and were measured on the same prompts and seeds; else None."""
    a, b = results.schedule, baseline.schedule
    qa, qb = a["quality"], b["quality"]
    same_samples = (a.get("provenance", {}).get("prompts_sha256") == b.get("provenance", {}).get("prompts_sha256"))
    if not same_samples or qa.get("metric") != spec.metric or qb.get("metric") != spec.metric:
        return None
    va, vb = qa.get("per_image"), qb.get("per_image")
    if not va or not vb or len(va) != len(vb):
        return None
    nan = float("nan")
    return paired_difference([nan if v is None else v for v in va], [nan if v is None else v for v in vb],
                             spec.higher_is_better)


def baseline_warnings(results: Results, baseline: Results) -> list[str]:
    """Differences that make a baseline comparison apples-to-oranges; reported, never fatal."""
    if results.schedule is None or baseline.schedule is None:
        return []
    a, b = results.schedule, baseline.schedule
    out = []
    if a.get("model", {}).get("id") != b.get("model", {}).get("id"):
        out.append(
            f"the baseline is of another model ({b.get('model', {}).get('id')!r} vs {a.get('model', {}).get('id')!r})"
        )
    pa, pb = a.get("provenance", {}).get("prompts_sha256"), b.get("provenance", {}).get("prompts_sha256")
    if pa and pb and pa != pb:
        out.append("the baseline was measured on other prompts (prompts_sha256 differs): quality is not paired")
    if len(a["levels"]) != len(b["levels"]):
        out.append(f"the baseline has {len(b['levels'])} steps, this schedule {len(a['levels'])}")
    return out
