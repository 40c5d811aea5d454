"""The report model: what every renderer shows, computed once from a results folder (and a baseline)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qsched_search.errors import QschedError
from qsched_search.report.gate import GateResult, GateSpec, baseline_warnings, check_gate
from qsched_search.report.loading import Results, _as_bool, _float, _int_or_none  # noqa: F401 (text.py's too)
from qsched_search.results.metric_facts import METRICS
from qsched_search.results.assignment import parse_schedule_key
from qsched_search.results.tables import best_uniform_at_most, completed, pareto_front, split_schedule, uniform_rows

__all__ = ["Report", "UniformPoint", "build_report"]


@dataclass(frozen=True)
class UniformPoint:
    """A schedule that runs every step at one level, as measured in trials.csv."""

    level: str
    schedule: str
    trial: int | None
    cost: float
    value: float
    ci_low: float
    ci_high: float
    n: int | None


@dataclass
class Report:
    """Everything the renderers show, computed once from a `Results` (and optionally a baseline and a gate)."""

    results: Results
    levels: list[str]  # every level seen, the reference first, then from high to low precision
    colours: dict[str, str]
    reference: str | None
    uniforms: list[UniformPoint]
    best_uniform: UniformPoint | None
    cheapest_uniform: UniformPoint | None
    reference_run: dict | None  # probe.csv's reference row for the quality metric
    heatmap_metric: str | None
    front: pd.DataFrame | None
    front_recomputed: bool
    warnings: list[str]
    quality_metric: str | None  # the search objective: schedule.json's quality metric, else trials.csv's
    higher_is_better: bool
    baseline: Results | None = None
    gate: GateResult | None = None

    @property
    def schedule(self) -> dict | None:
        return self.results.schedule

    @property
    def missing(self) -> list[str]:
        return self.results.missing

    @property
    def cost_model(self) -> str | None:
        if self.schedule is None:
            return None
        return self.schedule["budget"].get("cost_model")

    @property
    def schedule_cost(self) -> float | None:
        if self.schedule is None or self.cost_model is None:
            return None
        return _float(self.schedule["cost"].get(self.cost_model))


def _level_key(name: str) -> tuple:
    """Sorts levels from high to low precision: wXaY by (X, Y), else by the first number in the name."""
    n = name.lower()
    m = re.fullmatch(r"w(\d+)a(\d+)", n)
    if m:
        w, a = int(m.group(1)), int(m.group(2))
    else:
        m = re.search(r"(\d+)", n)
        w = a = int(m.group(1)) if m else 0
    return (-w, -a, n)


def _levels_and_colours(results: Results, reference: str | None) -> tuple[list[str], dict[str, str]]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    seen: set[str] = set()
    if results.schedule is not None:
        seen.update(results.schedule["levels"])
        seen.update(o["level"] for step in results.schedule.get("overrides") or () for o in step)
    if results.probe is not None:
        seen.update(str(p) for p in results.probe["precision"].dropna())
    for frame in (results.trials, results.pareto):
        if frame is not None:
            for s in frame["schedule"].dropna():
                seen.update(lv for step in parse_schedule_key(s) for lv in step.levels)
    if reference:
        seen.add(reference)
    ordered = sorted((x for x in seen if x != reference), key=_level_key)
    if reference:
        ordered.insert(0, reference)
    # Cool for full precision, warm for aggressive quantization, so the eye finds the risky steps first.
    cmap = colormaps["RdYlBu_r"]
    stops = np.linspace(0.06, 0.94, len(ordered)) if len(ordered) > 1 else [0.06]
    return ordered, {lvl: to_hex(cmap(float(s))) for lvl, s in zip(ordered, stops)}


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def _reference_level(results: Results) -> str | None:
    if results.schedule is not None and results.schedule.get("reference"):
        return str(results.schedule["reference"])
    if results.probe is not None:
        ref = results.probe[results.probe["kind"] == "reference"]["precision"].dropna()
        if len(ref):
            return str(ref.iloc[0])
    return None


def _uniform_point(row) -> UniformPoint:
    return UniformPoint(level=str(row["level"]), schedule=str(row["schedule"]), trial=_int_or_none(row.get("trial")),
                        cost=float(row["cost"]), value=float(row["value"]), ci_low=_float(row.get("ci_low")),
                        ci_high=_float(row.get("ci_high")), n=_int_or_none(row.get("n")))


def build_report(results: Results, *, baseline: Results | None = None, gate: GateSpec | None = None) -> Report:
    """Computes what the report shows: level colours, uniform comparisons, the Pareto front and the gate.

    Args:
        results (`Results`): from `load_results`.
        baseline (`Results`, *optional*): another results folder to compare with; defaults to `None`.
        gate (`GateSpec`, *optional*): from `parse_fail_if_worse`; needs `baseline`. Defaults to `None` (no gate).

    Returns:
        `Report`: the model every renderer reads.
    """
    if gate is not None and baseline is None:
        raise QschedError(
            f"--fail-if-worse {gate.metric}:{gate.tolerance:g} needs --baseline OTHER_RESULTS_DIR to compare with; "
            f"pass the baseline results folder too"
        )
    reference = _reference_level(results)
    levels, colours = _levels_and_colours(results, reference)
    schedule = results.schedule
    warnings: list[str] = []

    metric = str(schedule["quality"]["metric"]) if schedule is not None else None
    if metric is None and results.trials is not None and "metric" in results.trials.columns:
        found = results.trials["metric"].dropna().unique()
        metric = str(found[0]) if len(found) else None
    if schedule is not None and "higher_is_better" in schedule["quality"]:
        hib = bool(schedule["quality"]["higher_is_better"])
    else:
        hib = bool(METRICS[metric].higher_is_better) if metric in METRICS else False
        if metric and metric not in METRICS:
            warnings.append(f"metric {metric!r} has no known direction; assumed lower is better")

    steps = len(schedule["levels"]) if schedule is not None else None
    # The same rules as the search's (qsched_search.results.tables), so both name the same baseline.
    uniform_frame = uniform_rows(results.trials, steps, metric) if results.trials is not None else None
    uniforms = [] if uniform_frame is None else [_uniform_point(r) for _, r in uniform_frame.iterrows()]
    cheapest_uniform = uniforms[0] if uniforms else None
    best_uniform = None
    cost = _float(schedule["cost"].get(schedule["budget"].get("cost_model"))) if schedule is not None else math.nan
    if uniform_frame is not None and not math.isnan(cost):
        row = best_uniform_at_most(results.trials, cost, hib, steps, metric)
        best_uniform = None if row is None else _uniform_point({**row.to_dict(), "level": split_schedule(row["schedule"])[0]})

    reference_run = None
    if results.probe is not None and metric is not None:
        rows = results.probe[(results.probe["kind"] == "reference") & (results.probe["metric"].astype(str) == metric)]
        if len(rows):
            r = rows.iloc[-1]
            reference_run = {k: r.get(k) for k in ("precision", "value", "ci_low", "ci_high", "n", "delta")}

    heatmap_metric = None
    if results.probe is not None:
        step_metrics = list(dict.fromkeys(results.probe.loc[results.probe["kind"] == "step", "metric"].astype(str)))
        if step_metrics:
            heatmap_metric = "lpips" if "lpips" in step_metrics else step_metrics[0]

    front, recomputed = None, False
    if results.pareto is not None:
        front = completed(results.pareto, metric)
    elif results.trials is not None:
        front = pareto_front(results.trials, hib, metric)
        recomputed = True

    if schedule is not None and results.manifest is not None:
        a, b = schedule.get("provenance", {}).get("prompts_sha256"), results.manifest.get("prompts_sha256")
        if a and b and a != b:
            warnings.append(
                f"schedule.json and manifest.json record different prompt sets ({a[:12]}… vs {b[:12]}…): "
                f"they come from different runs"
            )

    report = Report(
        results=results,
        levels=levels,
        colours=colours,
        reference=reference,
        uniforms=uniforms,
        best_uniform=best_uniform,
        cheapest_uniform=cheapest_uniform,
        reference_run=reference_run,
        heatmap_metric=heatmap_metric,
        front=front,
        front_recomputed=recomputed,
        warnings=warnings,
        quality_metric=metric,
        higher_is_better=hib,
        baseline=baseline,
    )
    if baseline is not None:
        report.warnings.extend(baseline_warnings(results, baseline))
    if gate is not None:
        report.gate = check_gate(results, baseline, gate)
    return report
