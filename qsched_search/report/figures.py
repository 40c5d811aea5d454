"""The report's figures: `qsched_search.plots`' pictures of the folder's data, as PNG bytes."""

from __future__ import annotations

from qsched_search.plots import plot_override_map, plot_pareto, plot_probe_heatmap, plot_schedule_strip
from qsched_search.report.model import Report, _float
from qsched_search.results.metric_facts import METRICS

__all__ = ["heatmap_png", "overrides_png", "pareto_png", "schedule_png"]


def schedule_png(report: Report) -> bytes | None:
    s = report.schedule
    if s is None:
        return None
    return plot_schedule_strip(list(s["levels"]), list(s.get("timesteps") or []), report.colours, legend=report.levels)


def overrides_png(report: Report) -> bytes | None:
    """The chosen schedule's per-layer overrides as a group x step picture; None for a per-step schedule."""
    s = report.schedule
    if s is None or not any(s.get("overrides") or ()):
        return None
    groups = list(((s.get("layer_groups") or {}).get("groups") or {}))
    return plot_override_map(list(s["levels"]), s["overrides"], groups, report.colours, legend=report.levels)


def heatmap_png(report: Report) -> bytes | None:
    probe, metric = report.results.probe, report.heatmap_metric
    if probe is None or metric is None:
        return None
    known = METRICS.get(metric)
    hib = report.higher_is_better if metric == report.quality_metric else bool(known and known.higher_is_better)
    return plot_probe_heatmap(probe, metric, hib, levels_order=report.levels)


def pareto_png(report: Report) -> bytes | None:
    trials = report.results.trials
    if trials is None and report.front is None:
        return None
    s = report.schedule
    chosen = None
    budget = None
    if s is not None:
        budget = _float(s["budget"].get("fraction"))
        chosen = (report.schedule_cost, _float(s["quality"].get("value")))
    frame = trials if trials is not None else report.front
    steps = len(s["levels"]) if s is not None else None
    return plot_pareto(frame, report.front, budget, report.cost_model, report.quality_metric or "value",
                       report.higher_is_better, steps, chosen=chosen, colours=report.colours,
                       reference=report.reference)

