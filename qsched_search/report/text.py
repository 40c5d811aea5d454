"""The report's words and tables, the same in every format: headline facts, Pareto rows, samples, provenance."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from qsched_search._version import __version__
from qsched_search.report.model import Report, _as_bool, _float
from qsched_search.results.assignment import brief_key
from qsched_search.results.compare import better
from qsched_search.results.metric_facts import METRICS
from qsched_search.results.tables import BUDGET_EPS, split_schedule

_IMAGE_KEY_COLUMNS = ("label", "schedule", "sample", "prompt", "seed", "file")
_IMAGE_LABELS = ("reference", "schedule", "best_uniform", "cheapest_uniform")


def _fmt(x: Any, digits: int = 4) -> str:
    f = _float(x)
    if math.isnan(f):
        return "—"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    return f"{f:.{digits}g}"


_FIGURE_DPI = 150
# Figures are rendered at 150 dpi for sharp text on high-density screens and shown at ~100 dpi, matplotlib's size.
_FIGURE_SCALE = 100 / _FIGURE_DPI


def _ci(value: Any, lo: Any, hi: Any, n: Any = None) -> str:
    text = _fmt(value)
    if not math.isnan(_float(lo)) and not math.isnan(_float(hi)):
        text += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
    if n is not None and not math.isnan(_float(n)):
        text += f" (n={int(_float(n))})"
    return text


def _headline_facts(report: Report) -> list[tuple[str, str, str]]:
    """(label, main value, detail) rows of the headline, the same in every format."""
    s = report.schedule
    facts: list[tuple[str, str, str]] = []
    if s is None:
        return facts
    ref = report.reference or "reference"
    budget, cm = s["budget"], report.cost_model
    cost = report.schedule_cost
    fits = cost is not None and not math.isnan(cost) and cost <= _float(budget.get("fraction")) + BUDGET_EPS
    facts.append(
        (
            "Budget",
            f"≤ {_fmt(budget.get('fraction'), 3)} of all-{ref}",
            f"cost model: {cm}; chosen schedule {'fits' if fits else 'does NOT fit'}",
        )
    )
    costs = ", ".join(
        f"{k} {_fmt(v, 3) if v is not None else 'not measured'}" + (" (budget)" if k == cm else "")
        for k, v in s["cost"].items()
    )
    facts.append(("Cost", f"{_fmt(cost, 3)} ({cm})", costs))
    q = s["quality"]
    metric = q["metric"]
    hib = report.higher_is_better
    details = [f"{'higher' if hib else 'lower'} is better"]
    rr = report.reference_run
    if rr is not None:
        what = ("noise floor (reference vs its re-run)" if metric in METRICS and METRICS[metric].paired
                else f"reference ({ref}) itself")
        details.append(f"{what}: {_ci(rr.get('value'), rr.get('ci_low'), rr.get('ci_high'))}")
    facts.append(
        (
            f"Quality vs {ref}",
            f"{metric} {_ci(q.get('value'), q.get('ci_low'), q.get('ci_high'), q.get('n'))}",
            "; ".join(details),
        )
    )
    bu = report.best_uniform
    if bu is not None:
        facts.append(("vs best uniform at ≤ cost", *_uniform_comparison(s, bu, metric, hib)))
    elif report.results.trials is not None:
        facts.append(
            ("vs best uniform at ≤ cost", "none", "no uniform schedule at or below this cost is in trials.csv")
        )
    per_step = _per_step_fact(s)
    if per_step is not None:
        facts.append(per_step)
    coefficients = _coefficients_fact(s)
    if coefficients is not None:
        facts.append(coefficients)
    loras = _loras_fact(s)
    if loras is not None:
        facts.append(loras)
    b = report.baseline.schedule if report.baseline is not None else None
    if b is not None:
        bq = b["quality"]
        quality = (
            f"{metric} {_fmt(q.get('value'))} vs {_fmt(bq.get('value'))}"
            if bq.get("metric") == metric
            else f"baseline measured {bq.get('metric')}, not {metric}"
        )
        facts.append(
            (
                "vs baseline",
                quality,
                f"{cm} cost {_fmt(cost, 3)} vs {_fmt(b['cost'].get(cm), 3)}; baseline {report.baseline.root}",
            )
        )
    return facts


def _uniform_comparison(schedule: dict, bu, metric: str, hib: bool) -> tuple[str, str]:
    """The headline's comparison with the best uniform schedule: the paired difference and its verdict when
    schedule.json has one (both measured on the same samples), else the two values side by side."""
    own = f"uniform {bu.level} (cost {_fmt(bu.cost, 3)}): {_ci(bu.value, bu.ci_low, bu.ci_high, bu.n)}"
    c = schedule.get("comparison")
    if c and c.get("baseline") == bu.schedule and c.get("metric") == metric:
        diff, lo, hi = _float(c.get("difference")), _float(c.get("ci_low")), _float(c.get("ci_high"))
        rel = f" ({diff / bu.value:+.0%})" if bu.value else ""
        return (f"{c['verdict']}: {_fmt(diff, 3)} {metric}{rel}",
                f"paired difference over the same {c.get('n')} samples, 95% CI [{_fmt(lo, 3)}, {_fmt(hi, 3)}]; {own}")
    value = _float(schedule["quality"].get("value"))
    diff = value - bu.value
    verdict = "better" if better(value, bu.value, hib) else ("equal" if diff == 0 else "worse")
    return f"{verdict}: {'+' if diff >= 0 else '−'}{_fmt(abs(diff))} {metric} (not paired)", own


def _per_step_fact(schedule: dict) -> tuple[str, str, str] | None:
    """A per-layer schedule against the best schedule without overrides at no more cost (paired)."""
    c = schedule.get("comparison_per_step")
    if not c:
        return None
    diff, base = _float(c.get("difference")), _float(c.get("baseline_value"))
    rel = f" ({diff / base:+.0%})" if base else ""
    count = sum(len(step) for step in schedule.get("overrides") or ())
    return ("vs best per-step at ≤ cost", f"{c['verdict']}: {_fmt(diff, 3)} {c['metric']}{rel}",
            f"{count} per-layer overrides; paired difference over the same {c.get('n')} samples, 95% CI "
            f"[{_fmt(_float(c.get('ci_low')), 3)}, {_fmt(_float(c.get('ci_high')), 3)}] vs {brief_key(c['baseline'])} "
            f"({_fmt(base)})")


def _coefficients_fact(schedule: dict) -> tuple[str, str, str] | None:
    """The schedule's Q-Sched coefficients, and what `search --with-coefficients` measured with and without them."""
    from qsched_search.results.coefficients import Coefficients

    section = schedule.get("coefficients")
    measured = (schedule.get("search") or {}).get("coefficients")
    if section is None and measured is None:
        return None
    value = Coefficients.from_dict(section).describe() if section is not None else "none"
    detail = "applied by `qsched generate` and `apply_schedule`" if section is not None else ""
    if measured:
        without, with_ = measured.get("without") or {}, measured.get("with") or {}
        detail = (f"{without.get('metric')} without {_ci(without.get('value'), without.get('ci_low'), without.get('ci_high'))}, "
                  f"with {measured.get('with_coefficients', '')} "
                  f"{_ci(with_.get('value'), with_.get('ci_low'), with_.get('ci_high')) if with_ else '(same: identity)'}; "
                  f"{'kept: they measured better' if measured.get('applied') else 'not kept: they did not measure better'} "
                  f"({measured.get('loss')} loss; every candidate in {measured.get('file')})")
    return ("Coefficients", value, detail)


def _loras_fact(schedule: dict) -> tuple[str, str, str] | None:
    """The LoRAs fused into the model when the schedule was measured, and how far they moved its reference images."""
    section = schedule.get("loras")
    if not section:
        return None
    adapters = section.get("adapters") or []
    value = ", ".join(f"{a.get('id')} (scale {_fmt(a.get('scale'), 3)})" for a in adapters)
    details = [f"{a.get('id')}: sha256 {str(a.get('sha256'))[:12]}" for a in adapters]
    effect = section.get("effect")
    if effect:
        details.append(f"reference images vs the base model's: mean |pixel difference| {_fmt(effect.get('mean_abs_diff'))} "
                       f"(noise floor {_fmt(effect.get('noise_floor_mean_abs_diff'))}, {effect.get('samples')} samples)")
    details.append("apply_schedule warns on a pipeline with other LoRAs or none")
    return ("LoRAs", value, "; ".join(details))


def _image_grid(report: Report) -> tuple[list[str], list[dict]]:
    """Columns present (in the fixed order) and one row per sample: {sample, prompt, seed, cells: {label: row}}."""
    images = report.results.images
    if images is None or not len(images):
        return [], []
    labels = [lbl for lbl in _IMAGE_LABELS if lbl in set(images["label"].astype(str))]
    rows = []
    for sample, group in images.groupby("sample", sort=True):
        first = group.iloc[0]
        cells = {str(r["label"]): r for _, r in group.iterrows()}
        rows.append({"sample": sample, "prompt": first.get("prompt"), "seed": first.get("seed"), "cells": cells})
    return labels, rows


def _image_metrics(row: pd.Series) -> list[tuple[str, str]]:
    out = []
    for key, v in row.items():
        if key in _IMAGE_KEY_COLUMNS:
            continue
        f = _float(v)
        if not math.isnan(f):
            out.append((str(key), _fmt(f)))
    return out


def _column_title(report: Report, label: str, rows: list[dict]) -> str:
    sched = ""
    for r in rows:
        if label in r["cells"] and not pd.isna(r["cells"][label].get("schedule")):
            sched = str(r["cells"][label]["schedule"])
            break
    levels = split_schedule(sched)
    short = levels[0] if levels and len(set(levels)) == 1 else ""
    return {
        "reference": f"Reference{f' ({short})' if short else ''}",
        "schedule": "Chosen schedule",
        "best_uniform": f"Best uniform at ≤ cost{f' ({short})' if short else ''}",
        "best_per_step": "Best per-step at ≤ cost",
        "cheapest_uniform": f"Cheapest uniform{f' ({short})' if short else ''}",
    }.get(label, label)


def _front_rows(report: Report) -> tuple[list[str], list[tuple[bool, dict[str, str]]]] | None:
    """The Pareto points as display strings, cheapest first: (headers, [(is_chosen, {header: text})])."""
    if report.front is None or not len(report.front):
        return None
    front = report.front.sort_values("cost")
    cm, metric = report.cost_model, report.quality_metric or "value"
    cost_header = f"cost ({cm})" if cm else "cost"
    # The budget's cost model is the `cost` column already; other cost models only where something was measured.
    others = [
        c
        for c in ("cost_bops", "cost_memory", "cost_latency")
        if c in front.columns and c != f"cost_{cm}" and pd.to_numeric(front[c], errors="coerce").notna().any()
    ]
    headers = [
        "trial",
        "schedule",
        "source",
        cost_header,
        *[c.removeprefix("cost_") for c in others],
        metric,
        "n",
        "within budget",
    ]
    chosen = ",".join(report.schedule["levels"]) if report.schedule is not None else None
    rows = []
    for _, r in front.iterrows():
        cells = {
            "trial": "—" if pd.isna(r.get("trial")) else str(int(r["trial"])),
            "schedule": brief_key(r["schedule"]),
            "source": "" if pd.isna(r.get("source")) else str(r.get("source")),
            cost_header: _fmt(r["cost"]),
            metric: _ci(r["value"], r.get("ci_low"), r.get("ci_high")),
            "n": "—" if pd.isna(r.get("n")) else str(int(_float(r["n"]))),
            "within budget": "—"
            if "feasible" not in r or pd.isna(r["feasible"])
            else ("yes" if _as_bool(r["feasible"]) else "no"),
        }
        for c in others:
            cells[c.removeprefix("cost_")] = _fmt(r[c])
        rows.append((cells["schedule"] == chosen, cells))
    return headers, rows


def _provenance(report: Report) -> list[tuple[str, str]]:
    """(label, text) rows from schedule.json and manifest.json; a value both record alike is shown once."""
    s, m = report.schedule, report.results.manifest
    search = dict((s or {}).get("provenance", {}))
    manifest = dict(m or {})
    items: list[tuple[str, str]] = []
    model = (s or {}).get("model", {})
    if model.get("id") or manifest.get("model"):
        items.append(("model", str(model.get("id") or manifest.get("model"))))
    if model.get("weights_sha256"):
        items.append(("weights sha256", str(model["weights_sha256"])))
    if manifest.get("stage"):
        items.append(("manifest stage", str(manifest["stage"])))
    for key in ("command", "seed", "prompts_sha256", "created"):
        a, b = search.get(key), manifest.get(key)
        label = key.replace("_", " ")
        if a is not None and b is not None and str(a) != str(b):
            items += [(f"search {label}", str(a)), (f"manifest {label}", str(b))]
        elif a is not None or b is not None:
            items.append((label, str(a if a is not None else b)))
    if isinstance(manifest.get("prompts"), list):
        prompts = manifest["prompts"]
        items.append(
            ("prompts", f"{len(prompts)}: " + "; ".join(map(str, prompts[:8])) + (" …" if len(prompts) > 8 else ""))
        )
    if manifest.get("device"):
        items.append(("device", str(manifest["device"])))
    if (s or {}).get("timesteps"):
        items.append(("timesteps", ", ".join(map(str, s["timesteps"]))))
    if search.get("tool_version"):
        items.append(("search tool version", f"qsched {search['tool_version']}"))
    versions = manifest.get("versions")
    if isinstance(versions, dict) and versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    items.append(("report", f"qsched {__version__}, from {report.results.root}"))
    return items


def _failures(report: Report) -> str | None:
    trials = report.results.trials
    if trials is None or "state" not in trials.columns:
        return None
    failed = trials[trials["state"].astype(str).str.upper() == "FAIL"]
    if not len(failed):
        return None
    reasons = (
        failed["fail_reason"].fillna("no reason recorded").astype(str).value_counts()
        if "fail_reason" in failed.columns
        else pd.Series(dtype=int)
    )
    detail = "; ".join(f"{r} ×{c}" for r, c in reasons.items())
    return f"{len(failed)} of {len(trials)} trials failed and are not plotted ({detail})"
