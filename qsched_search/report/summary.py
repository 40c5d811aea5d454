"""The report as a machine summary (JSON): schedule, cost, quality, the paired comparison, missing files, the gate."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qsched_search._version import __version__
from qsched_search.report.model import Report, _float
from qsched_search.results.compare import better

__all__ = ["JSON_SCHEMA_VERSION", "render_json"]

JSON_SCHEMA_VERSION = 2


def _clean(x: Any) -> Any:
    """JSON has no NaN: missing numbers become null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def render_json(report: Report) -> dict:
    """A machine summary: schedule, cost, quality, best-uniform comparison, missing files and the gate."""
    s = report.schedule
    bu = report.best_uniform
    comparison = None
    if bu is not None and s is not None:
        value = _float(s["quality"].get("value"))
        comparison = {
            **bu.__dict__,
            "difference": value - bu.value,
            "schedule_is_better": better(value, bu.value, report.higher_is_better),
        }
        paired = s.get("comparison")
        if paired and paired.get("baseline") == bu.schedule:
            comparison["paired"] = paired
    summary = {
        "schema_version": JSON_SCHEMA_VERSION,
        "tool_version": __version__,
        "results_dir": str(report.results.root),
        "model": (s or {}).get("model"),
        "schedule": None
        if s is None
        else {
            "levels": s["levels"],
            "timesteps": s.get("timesteps"),
            "steps": len(s["levels"]),
            "reference": report.reference,
        },
        "budget": (s or {}).get("budget"),
        "cost": (s or {}).get("cost"),
        "quality": (s or {}).get("quality"),
        "execution": None if s is None else {k: v for k, v in (s.get("execution") or {}).items() if k != "levels"} or None,
        "loras": None if s is None else s.get("loras"),
        "reference_run": report.reference_run,
        "best_uniform": comparison,
        "cheapest_uniform": None if report.cheapest_uniform is None else report.cheapest_uniform.__dict__,
        "uniforms": [p.__dict__ for p in report.uniforms],
        "pareto_points": 0 if report.front is None else int(len(report.front)),
        "missing": list(report.missing),
        "warnings": list(report.warnings),
        "gate": None if report.gate is None else report.gate.to_dict(),
    }
    return _clean(summary)
