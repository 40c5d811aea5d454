"""Turns one results folder into the report people read (html, md) or gate on in CI (json, the regression gate)."""

from __future__ import annotations

import base64
import html
import io as _bytes_io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsched_search import io
from qsched_search._version import __version__
from qsched_search.compare import better
from qsched_search.errors import QschedError
from qsched_search.paths import ResultsDir

__all__ = [
    "CI_SNIPPET",
    "FORMATS",
    "METRIC_HIGHER_IS_BETTER",
    "GateResult",
    "GateSpec",
    "Report",
    "ReportOutcome",
    "Results",
    "UniformPoint",
    "build_report",
    "check_gate",
    "load_results",
    "make_report",
    "parse_fail_if_worse",
    "render_html",
    "render_json",
    "render_markdown",
    "write_report",
]

FORMATS = ("html", "md", "json")

# The direction of every metric the gate understands; the single source of truth for "worse".
METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "lpips": False,
    "fid": False,
    "judge_fd": False,
    "psnr": True,
    "ssim": True,
    "judge_acc": True,
}

# Metrics that compare each image with the reference image of the same prompt and seed; their reference row in
# probe.csv is the noise floor (the reference against a re-run of itself), not a quality of the reference.
PAIRED_METRICS = ("lpips", "psnr", "ssim")

JSON_SCHEMA_VERSION = 1
SCHEDULE_SCHEMA_VERSION = 1

# Columns the readers need; extra columns are kept and ignored.
_PROBE_COLUMNS = ("kind", "step", "precision", "metric", "value")
_TRIALS_COLUMNS = ("trial", "schedule", "state", "cost", "value")
_IMAGES_COLUMNS = ("label", "sample", "file")
_IMAGE_KEY_COLUMNS = ("label", "schedule", "sample", "prompt", "seed", "file")
_IMAGE_LABELS = ("reference", "schedule", "best_uniform", "cheapest_uniform")

# Equal costs and equal metric values must pass the gate despite float round-trips through CSV and JSON.
_COST_EPS = 1e-9
_VALUE_EPS = 1e-12

CI_SNIPPET = """\
## Quality gate in CI

`qsched report` exits 1 when the chosen schedule is worse than a committed baseline on a metric by more than a
tolerance, or costs more under the budget's cost model; it exits 0 otherwise and 2 on bad input. The report is
written either way (`results/report.html`), so upload it to see why a run failed.

```yaml
      - name: qsched quality gate
        run: qsched report results/ --baseline baseline/ --fail-if-worse lpips:0.01
      - name: Upload the qsched report
        if: always()
        uses: actions/upload-artifact@v4
        with:
          name: qsched-report
          path: results/report.html
```
"""


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Results:
    """What one results folder holds; a file that is absent is `None` and named in `missing`."""

    root: Path
    schedule: dict | None = None
    manifest: dict | None = None
    probe: pd.DataFrame | None = None
    trials: pd.DataFrame | None = None
    pareto: pd.DataFrame | None = None
    images: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QschedError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            f"expected the JSON object that qsched writes; re-run the stage that wrote it or restore the file"
        ) from None
    if not isinstance(obj, dict):
        raise QschedError(
            f"{what} {path} holds a JSON {type(obj).__name__}, expected a JSON object; "
            f"re-run the stage that wrote it or restore the file"
        )
    return obj


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame(columns=list(required))
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise QschedError(f"{path} is not a readable CSV ({e}); re-run the stage that wrote it") from None
    absent = [c for c in required if c not in frame.columns]
    if absent:
        raise QschedError(
            f"{path} lacks the column(s) {', '.join(absent)} (it has {', '.join(map(str, frame.columns)) or 'none'}); "
            f"it was written by another version of qsched or by hand: re-run the stage that writes it"
        )
    return frame


def _check_schedule(schedule: dict, path: Path) -> None:
    version = schedule.get("schema_version", SCHEDULE_SCHEMA_VERSION)
    if version != SCHEDULE_SCHEMA_VERSION:
        raise QschedError(
            f"{path}: schema_version {version!r} is not the one this qsched {__version__} reads "
            f"({SCHEDULE_SCHEMA_VERSION}); use the qsched version that wrote it"
        )
    levels = schedule.get("levels")
    if not isinstance(levels, list) or not levels or not all(isinstance(x, str) for x in levels):
        raise QschedError(
            f"{path}: 'levels' is {levels!r}, expected a non-empty list of level names, one per step "
            f'(e.g. ["fp32", "w8a8"]); re-run `qsched search`'
        )
    for key in ("budget", "cost", "quality"):
        if not isinstance(schedule.get(key), dict):
            raise QschedError(
                f"{path}: '{key}' is {schedule.get(key)!r}, expected a JSON object; re-run `qsched search`"
            )
    if "metric" not in schedule["quality"] or "value" not in schedule["quality"]:
        raise QschedError(
            f"{path}: 'quality' is {schedule['quality']!r}, expected at least 'metric' and 'value'; "
            f"re-run `qsched search`"
        )


def load_results(results_dir: str | Path, *, argument: str = "RESULTS_DIR") -> Results:
    """Reads every result file that is present in a results folder.

    Args:
        results_dir (`str` or `Path`): the folder `qsched probe` / `qsched search` wrote.
        argument (`str`, *optional*): how error messages name the folder; defaults to `RESULTS_DIR`.

    Returns:
        `Results`: the parsed files; `missing` has one line per absent file saying what the report lacks for it.

    Raises:
        `QschedError`: the folder does not exist, holds none of the result files, or a file is malformed.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise QschedError(
            f"{argument} {str(root)!r} is not a folder; pass the folder that `qsched probe` or `qsched search` "
            f"wrote (e.g. results/)"
        )
    rd = ResultsDir(root)
    files = {
        "schedule.json": rd.schedule,
        "manifest.json": rd.manifest,
        "probe.csv": rd.probe_csv,
        "trials.csv": rd.trials_csv,
        "pareto.csv": rd.pareto_csv,
        "images/index.csv": rd.images_index,
    }
    if not any(p.is_file() for p in files.values()):
        raise QschedError(
            f"{argument} {str(root)!r} holds none of the result files ({', '.join(files)}); "
            f"pass the folder that `qsched probe` or `qsched search` wrote, or run them first"
        )
    out = Results(root=root)
    if rd.schedule.is_file():
        out.schedule = _read_json(rd.schedule, "schedule.json")
        _check_schedule(out.schedule, rd.schedule)
    else:
        out.missing.append(
            "schedule.json is missing: no chosen schedule, cost or quality headline (run `qsched search`)"
        )
    if rd.manifest.is_file():
        out.manifest = _read_json(rd.manifest, "manifest.json")
    else:
        out.missing.append("manifest.json is missing: provenance shows only what schedule.json records")
    if rd.probe_csv.is_file():
        out.probe = _read_csv(rd.probe_csv, _PROBE_COLUMNS)
    else:
        out.missing.append("probe.csv is missing: no sensitivity heatmap (run `qsched probe`)")
    if rd.trials_csv.is_file():
        out.trials = _read_csv(rd.trials_csv, _TRIALS_COLUMNS)
    else:
        out.missing.append(
            "trials.csv is missing: no Pareto plot and no comparison with uniform schedules (run `qsched search`)"
        )
    if rd.pareto_csv.is_file():
        out.pareto = _read_csv(rd.pareto_csv, _TRIALS_COLUMNS)
    elif out.trials is not None:
        out.missing.append("pareto.csv is missing: the Pareto front is recomputed from trials.csv")
    else:
        out.missing.append("pareto.csv is missing: no table of Pareto points")
    if rd.images_index.is_file():
        out.images = _read_csv(rd.images_index, _IMAGES_COLUMNS)
        absent = [str(f) for f in out.images["file"] if not (rd.images_dir / str(f)).is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            out.missing.append(f"images/ lacks {len(absent)} file(s) listed in images/index.csv: {shown}")
    else:
        out.missing.append("images/index.csv is missing: no image grid")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The report model


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


@dataclass(frozen=True)
class GateSpec:
    """`--fail-if-worse METRIC:TOLERANCE`, parsed."""

    metric: str
    tolerance: float

    @property
    def higher_is_better(self) -> bool:
        return METRIC_HIGHER_IS_BETTER[self.metric]


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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


def _float(x: Any) -> float:
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _int_or_none(x: Any) -> int | None:
    f = _float(x)
    return None if math.isnan(f) else int(f)


def _as_bool(x: Any) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("true", "1", "yes")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return False
    return bool(x)


def _split(schedule: Any) -> list[str]:
    return [s.strip() for s in str(schedule).split(",") if s.strip()]


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
    if results.probe is not None:
        seen.update(str(p) for p in results.probe["precision"].dropna())
    for frame in (results.trials, results.pareto):
        if frame is not None:
            for s in frame["schedule"].dropna():
                seen.update(_split(s))
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


def _complete(frame: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    rows = frame
    if "state" in rows.columns:
        rows = rows[rows["state"].astype(str).str.upper() == "COMPLETE"]
    if metric is not None and "metric" in rows.columns:
        rows = rows[rows["metric"].astype(str) == metric]
    rows = rows.assign(
        cost=pd.to_numeric(rows["cost"], errors="coerce"), value=pd.to_numeric(rows["value"], errors="coerce")
    )
    return rows.dropna(subset=["cost", "value"])


def _uniform_points(trials: pd.DataFrame, metric: str | None, steps: int | None) -> list[UniformPoint]:
    points: dict[str, UniformPoint] = {}
    for _, row in _complete(trials, metric).iterrows():
        levels = _split(row["schedule"])
        if not levels or len(set(levels)) != 1 or (steps is not None and len(levels) != steps):
            continue
        p = UniformPoint(
            level=levels[0],
            schedule=",".join(levels),
            trial=_int_or_none(row.get("trial")),
            cost=float(row["cost"]),
            value=float(row["value"]),
            ci_low=_float(row.get("ci_low")),
            ci_high=_float(row.get("ci_high")),
            n=_int_or_none(row.get("n")),
        )
        # A schedule evaluated twice (a cache hit, a retry) is shown once: the latest trial wins.
        points[p.level] = p
    return sorted(points.values(), key=lambda p: (p.cost, p.level))


def _pareto_front(points: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """The non-dominated rows over (lower cost, better value)."""
    ordered = points.sort_values(["cost", "value"], ascending=[True, not higher_is_better])
    keep, best = [], None
    for idx, row in ordered.iterrows():
        if best is None or better(row["value"], best, higher_is_better):
            keep.append(idx)
            best = row["value"]
    return ordered.loc[keep]


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
        hib = METRIC_HIGHER_IS_BETTER.get(metric or "", False)
        if metric and metric not in METRIC_HIGHER_IS_BETTER:
            warnings.append(f"metric {metric!r} has no known direction; assumed lower is better")

    steps = len(schedule["levels"]) if schedule is not None else None
    uniforms = _uniform_points(results.trials, metric, steps) if results.trials is not None else []
    best_uniform = cheapest_uniform = None
    if uniforms:
        cheapest_uniform = min(uniforms, key=lambda p: (p.cost, p.level))
        cost = _float(schedule["cost"].get(schedule["budget"].get("cost_model"))) if schedule is not None else math.nan
        if not math.isnan(cost):
            affordable = [p for p in uniforms if p.cost <= cost + _COST_EPS]
            if affordable:
                best_uniform = max(affordable, key=lambda p: (p.value if hib else -p.value, -p.cost))

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
        front = _complete(results.pareto, metric)
    elif results.trials is not None:
        front = _pareto_front(_complete(results.trials, metric), hib)
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
        report.warnings.extend(_baseline_warnings(results, baseline))
    if gate is not None:
        report.gate = check_gate(results, baseline, gate)
    return report


# ----------------------------------------------------------------------------------------------------------------
# The regression gate


def parse_fail_if_worse(spec: str) -> GateSpec:
    """Parses `METRIC:TOLERANCE` (e.g. `lpips:0.01`).

    Raises:
        `QschedError`: not of that form, an unknown metric, or a tolerance that is not a number >= 0.
    """
    allowed = ", ".join(sorted(METRIC_HIGHER_IS_BETTER))
    metric, sep, tol = str(spec).partition(":")
    metric = metric.strip().lower()
    if not sep or not metric or not tol.strip():
        raise QschedError(
            f"--fail-if-worse {spec!r} is not METRIC:TOLERANCE; METRIC is one of {allowed} and TOLERANCE a number "
            f">= 0; e.g. --fail-if-worse lpips:0.01"
        )
    if metric not in METRIC_HIGHER_IS_BETTER:
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
            rows = _complete(results.trials, metric)
            rows = rows[rows["schedule"].map(lambda s: ",".join(_split(s))) == chosen]
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
    if cost > base_cost + _COST_EPS:
        problems.append(f"{cost_model} cost {cost:.4g} is higher than the baseline's {base_cost:.4g}")
    if problems:
        reason = "gate failed: " + "; ".join(problems)
    else:
        reason = (
            f"gate passed: {spec.metric} {value:.4g} vs baseline {base_value:.4g} (tolerance {spec.tolerance:g}, "
            f"{direction} is better); {cost_model} cost {cost:.4g} vs baseline {base_cost:.4g}"
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
    )


def _baseline_warnings(results: Results, baseline: Results) -> list[str]:
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


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API, no pyplot: no global state, no display backend)


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


def _png(fig) -> bytes:
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=_FIGURE_DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _metric_label(metric: str | None, hib: bool | None) -> str:
    if not metric:
        return "quality"
    if hib is None:
        return metric
    return f"{metric} ({'higher' if hib else 'lower'} is better)"


def _schedule_png(report: Report) -> bytes | None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    s = report.schedule
    if s is None:
        return None
    levels, timesteps = s["levels"], s.get("timesteps") or []
    fig = Figure(figsize=(max(4.0, 1.1 * len(levels)), 1.5))
    ax = fig.add_axes([0, 0.3, 1, 0.7])
    for i, lvl in enumerate(levels):
        colour = report.colours.get(lvl, "#999999")
        ax.add_patch(Rectangle((i + 0.03, 0), 0.94, 1, color=colour))
        t = f"\nt={timesteps[i]}" if i < len(timesteps) else ""
        ax.text(i + 0.5, 0.5, f"{lvl}{t}", ha="center", va="center", color=_text_colour(colour), fontsize=10)
    ax.set_xlim(0, len(levels))
    ax.set_ylim(0, 1)
    ax.axis("off")
    handles = [Patch(color=report.colours[lvl], label=lvl) for lvl in report.levels]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    return _png(fig)


def _heatmap_png(report: Report) -> bytes | None:
    from matplotlib.figure import Figure

    probe, metric = report.results.probe, report.heatmap_metric
    if probe is None or metric is None:
        return None
    rows = probe[(probe["metric"].astype(str) == metric)].copy()
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce")
    steps = rows[rows["kind"] == "step"].copy()
    steps["step"] = pd.to_numeric(steps["step"], errors="coerce").astype("Int64")
    grid = steps.pivot_table(index="step", columns="precision", values="value", aggfunc="mean")
    cols = [lvl for lvl in report.levels if lvl in grid.columns] + [c for c in grid.columns if c not in report.levels]
    grid = grid[cols]
    labels = []
    timesteps = {}
    if "timestep" in steps.columns:
        for st, t in zip(steps["step"], pd.to_numeric(steps["timestep"], errors="coerce")):
            if not pd.isna(t):
                timesteps[int(st)] = int(t)
    for st in grid.index:
        labels.append(f"step {st}" + (f" (t={timesteps[int(st)]})" if int(st) in timesteps else ""))
    uniform = rows[rows["kind"] == "uniform"].groupby("precision")["value"].mean()
    if len(uniform):
        grid.loc["uniform"] = [uniform.get(c, np.nan) for c in grid.columns]
        labels.append("all steps")
    data = grid.to_numpy(dtype=float)
    hib = METRIC_HIGHER_IS_BETTER.get(metric, False)
    n_rows, n_cols = data.shape
    fig = Figure(figsize=(1.3 + 1.15 * n_cols, 0.9 + 0.5 * n_rows))
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    # Worse is always darker, whichever way the metric points.
    from matplotlib import colormaps

    cmap = colormaps["OrRd_r" if hib else "OrRd"].with_extremes(bad="#eeeeee")
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmax = vmin + 1e-9
    masked = np.ma.masked_invalid(data)
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    norm = im.norm
    for r in range(n_rows):
        for c in range(n_cols):
            v = data[r, c]
            if np.isnan(v):
                ax.text(c, r, "—", ha="center", va="center", color="#888", fontsize=9)
                continue
            rgba = im.cmap(norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(c, r, _fmt(v, 3), ha="center", va="center", fontsize=9, color="#111" if lum > 0.55 else "#fff")
    if len(uniform):
        ax.axhline(n_rows - 1.5, color="white", linewidth=3)
    ax.set_xticks(range(n_cols), [str(c) for c in grid.columns])
    ax.set_yticks(range(n_rows), labels)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(_metric_label(metric, hib))
    cb.outline.set_visible(False)
    return _png(fig)


def _pareto_png(report: Report) -> bytes | None:
    from matplotlib.figure import Figure

    trials = report.results.trials
    if trials is None and report.front is None:
        return None
    metric, hib = report.quality_metric, report.higher_is_better
    fig = Figure(figsize=(8.5, 5.0))
    ax = fig.add_subplot()
    if trials is not None:
        done = _complete(trials, metric)
        ax.scatter(
            done["cost"], done["value"], s=16, color="#9aa5b1", alpha=0.45, linewidths=0, label=f"trials ({len(done)})"
        )
    if report.front is not None and len(report.front):
        f = report.front.sort_values("cost")
        yerr = None
        if {"ci_low", "ci_high"} <= set(f.columns):
            lo = (f["value"] - pd.to_numeric(f["ci_low"], errors="coerce")).clip(lower=0).fillna(0)
            hi = (pd.to_numeric(f["ci_high"], errors="coerce") - f["value"]).clip(lower=0).fillna(0)
            yerr = np.vstack([lo.to_numpy(), hi.to_numpy()])
        ax.errorbar(
            f["cost"],
            f["value"],
            yerr=yerr,
            color="#1f4e8c",
            marker="o",
            markersize=5,
            linewidth=1.6,
            drawstyle="steps-post",
            capsize=2,
            elinewidth=0.8,
            label="Pareto front",
        )
    for p in report.uniforms:
        colour = report.colours.get(p.level, "#555")
        ax.scatter([p.cost], [p.value], marker="D", s=60, color=colour, edgecolors="#222", linewidths=0.8, zorder=4)
        ax.annotate(
            f"uniform {p.level}",
            (p.cost, p.value),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=8.5,
            color="#333",
        )
    if report.uniforms:
        ax.scatter([], [], marker="D", s=40, color="#ddd", edgecolors="#222", label="uniform schedules")
    s = report.schedule
    if s is not None:
        budget = _float(s["budget"].get("fraction"))
        if not math.isnan(budget):
            ax.axvline(budget, color="#c0392b", linestyle="--", linewidth=1.2, label=f"budget {budget:g}")
        cost = report.schedule_cost
        value = _float(s["quality"].get("value"))
        if cost is not None and not math.isnan(cost) and not math.isnan(value):
            ax.scatter(
                [cost],
                [value],
                marker="*",
                s=260,
                color="#f1c40f",
                edgecolors="#222",
                linewidths=0.9,
                zorder=5,
                label="chosen schedule",
            )
    cm = report.cost_model
    ref = report.reference or "reference"
    ax.set_xlabel(f"cost{f' ({cm})' if cm else ''}, fraction of all-{ref}")
    ax.set_ylabel(_metric_label(metric, hib))
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(frameon=False, fontsize=9, loc="best")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces of text


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
    fits = cost is not None and not math.isnan(cost) and cost <= _float(budget.get("fraction")) + _COST_EPS
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
        what = "noise floor (reference vs its re-run)" if metric in PAIRED_METRICS else f"reference ({ref}) itself"
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
        value = _float(q.get("value"))
        diff = value - bu.value
        verdict = "better" if better(value, bu.value, hib) else ("equal" if diff == 0 else "worse")
        overlap = ""
        if not any(math.isnan(x) for x in (_float(q.get("ci_low")), _float(q.get("ci_high")), bu.ci_low, bu.ci_high)):
            disjoint = _float(q["ci_high"]) < bu.ci_low or bu.ci_high < _float(q["ci_low"])
            overlap = "; CIs disjoint" if disjoint else "; CIs overlap"
        facts.append(
            (
                "vs best uniform at ≤ cost",
                f"{verdict}: {'+' if diff >= 0 else '−'}{_fmt(abs(diff))} {metric}",
                f"uniform {bu.level} (cost {_fmt(bu.cost, 3)}): {_ci(bu.value, bu.ci_low, bu.ci_high, bu.n)}{overlap}",
            )
        )
    elif report.results.trials is not None:
        facts.append(
            ("vs best uniform at ≤ cost", "none", "no uniform schedule at or below this cost is in trials.csv")
        )
    coefficients = _coefficients_fact(s)
    if coefficients is not None:
        facts.append(coefficients)
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


def _coefficients_fact(schedule: dict) -> tuple[str, str, str] | None:
    """The schedule's Q-Sched coefficients, and what `search --with-coefficients` measured with and without them."""
    from qsched_search.coefficients import Coefficients

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
    levels = _split(sched)
    short = levels[0] if levels and len(set(levels)) == 1 else ""
    return {
        "reference": f"Reference{f' ({short})' if short else ''}",
        "schedule": "Chosen schedule",
        "best_uniform": f"Best uniform at ≤ cost{f' ({short})' if short else ''}",
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
            "schedule": ",".join(_split(r["schedule"])),
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


# ----------------------------------------------------------------------------------------------------------------
# HTML


_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff; --accent:#1f4e8c; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1100px; margin:0 auto; padding:28px 24px 48px; }
h1 { font-size:26px; margin:0 0 2px; letter-spacing:-0.01em; }
h2 { font-size:19px; margin:0 0 6px; }
code, .mono { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:0.92em; }
.sub { color:var(--muted); margin:0 0 18px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px 22px; margin:0 0 18px;
  box-shadow:0 1px 2px rgba(16,24,40,.04); }
.note { color:var(--muted); margin:4px 0 12px; font-size:14px; }
.banner { border-radius:10px; padding:12px 16px; margin:0 0 14px; font-weight:600; }
.pass { background:#e6f4ea; color:#1e6b34; border:1px solid #b7dfc2; }
.fail { background:#fdecea; color:#a32117; border:1px solid #f5c2bd; }
.missing, .warn { border-radius:10px; padding:10px 16px; margin:0 0 14px; font-size:14px; }
.missing { background:#fff8e1; color:#7a5b00; border:1px solid #f3dc95; }
.missing ul, .warn ul { margin:4px 0 0; padding-left:20px; }
.warn { background:#fff4ed; color:#8a3b12; border:1px solid #f7c9a9; }
.strip { display:flex; gap:4px; margin:10px 0 8px; }
.cell { flex:1 1 0; min-width:56px; border-radius:6px; padding:8px 4px; text-align:center; }
.cell .lvl { font-weight:700; font-size:15px; display:block; }
.cell .t { font-size:12px; opacity:.85; }
.legend { display:flex; flex-wrap:wrap; gap:14px; font-size:13px; color:var(--muted); margin:0 0 16px; }
.legend span.sw { display:inline-block; width:12px; height:12px; border-radius:3px; margin-right:5px; vertical-align:-1px; }
.stats { display:grid; grid-template-columns:repeat(auto-fit, minmax(230px, 1fr)); gap:12px; }
.stat { border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.stat .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.stat .v { font-size:18px; font-weight:650; margin:2px 0; }
.stat .d { color:var(--muted); font-size:13px; }
nav { margin:0 0 18px; font-size:14px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; }
figure { margin:0; }
figure img.plot { max-width:100%; height:auto; display:block; margin:6px auto 0; }
table { border-collapse:collapse; width:100%; font-size:13.5px; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12.5px; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.sched { white-space:nowrap; }
tr.chosen td { background:#fff9db; }
.badge { display:inline-block; background:#f1c40f; color:#3d2e00; border-radius:9px; padding:0 7px; font-size:11px;
  font-weight:700; margin-left:4px; vertical-align:1px; }
.mini { display:inline-flex; gap:2px; }
.mini i { display:inline-block; width:14px; height:14px; border-radius:3px; }
.grid td { text-align:center; }
.grid img { width:128px; height:auto; border-radius:4px; border:1px solid var(--line); background:#000; }
.grid img.px { image-rendering:pixelated; }
.grid img:not(.px) { width:200px; }
.grid .m { font-size:12px; color:var(--muted); }
.grid td.rowh { text-align:left; font-size:13px; max-width:180px; }
dl { display:grid; grid-template-columns:180px 1fr; gap:4px 16px; margin:0; font-size:14px; }
dt { color:var(--muted); }
dd { margin:0; word-break:break-word; }
.placeholder { color:var(--muted); font-style:italic; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img_tag(data: bytes, alt: str, cls: str = "plot", scale: float = 1.0) -> str:
    """An embedded PNG; `scale` < 1 shows a high-dpi figure at its intended size instead of blowing it up."""
    size = ""
    if scale != 1.0 and data[12:16] == b"IHDR":
        width = int.from_bytes(data[16:20], "big")
        size = f' style="width:{round(width * scale)}px"'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}"{size} src="data:image/png;base64,{b64}">'


def _mini_schedule(report: Report, schedule: str) -> str:
    cells = "".join(
        f'<i title="step {i}: {_e(lvl)}" style="background:{report.colours.get(lvl, "#999")}"></i>'
        for i, lvl in enumerate(_split(schedule))
    )
    return f'<span class="mini">{cells}</span> <span class="mono">{_e(schedule)}</span>'


def _small_image(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.width < 128
    except Exception:  # an unreadable PNG still embeds; only the scaling hint is lost
        return False


def render_html(report: Report) -> str:
    """One self-contained HTML page: inline CSS, every image base64-embedded, no external URL."""
    s = report.schedule
    rd = ResultsDir(report.results.root)
    parts: list[str] = []
    model = (s or {}).get("model", {}).get("id") or (report.results.manifest or {}).get("model") or "unknown model"
    created = (s or {}).get("provenance", {}).get("created") or (report.results.manifest or {}).get("created") or ""
    parts.append(f"<header><h1>Precision schedule for <code>{_e(model)}</code></h1>")
    parts.append(
        f'<p class="sub">{_e(report.results.root)}{" · " + _e(created) if created else ""} · qsched {_e(__version__)}</p></header>'
    )

    if report.gate is not None:
        cls = "pass" if report.gate.passed else "fail"
        parts.append(
            f'<div class="banner {cls}" id="gate">{_e(report.gate.reason)} (baseline: {_e(report.gate.baseline_dir)})</div>'
        )

    # Headline
    parts.append('<section class="card" id="headline"><h2>Chosen schedule</h2>')
    if s is None:
        parts.append(
            '<p class="placeholder">No schedule.json: run <code>qsched search</code> to choose a schedule.</p>'
        )
    else:
        ts = s.get("timesteps") or []
        parts.append(
            f'<p class="note">One cell per denoising step, in the order they run ({len(s["levels"])} steps); '
            f"reference level <code>{_e(report.reference)}</code>.</p>"
        )
        cells = []
        for i, lvl in enumerate(s["levels"]):
            colour = report.colours.get(lvl, "#999999")
            t = f" · t={ts[i]}" if i < len(ts) else ""
            cells.append(
                f'<div class="cell" style="background:{colour};color:{_text_colour(colour)}" title="step {i}{_e(t)}: {_e(lvl)}">'
                f'<span class="lvl">{_e(lvl)}</span><span class="t">step {i}{_e(t)}</span></div>'
            )
        parts.append(f'<div class="strip">{"".join(cells)}</div>')
        legend = "".join(
            f'<span><span class="sw" style="background:{report.colours[lvl]}"></span>{_e(lvl)}'
            f"{' (reference)' if lvl == report.reference else ''}</span>"
            for lvl in report.levels
        )
        parts.append(f'<div class="legend">{legend}</div>')
        stats = "".join(
            f'<div class="stat"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="d">{_e(d)}</div></div>'
            for k, v, d in _headline_facts(report)
        )
        parts.append(f'<div class="stats">{stats}</div>')
    parts.append("</section>")

    # After the headline, which stays first; a report with gaps still leads with what it has.
    if report.missing:
        items = "".join(f"<li>{_e(line)}</li>" for line in report.missing)
        parts.append(f'<div class="missing" id="missing"><strong>Missing files</strong><ul>{items}</ul></div>')
    if report.warnings:
        items = "".join(f"<li>{_e(line)}</li>" for line in report.warnings)
        parts.append(f'<div class="warn" id="warnings"><strong>Warnings</strong><ul>{items}</ul></div>')
    parts.append(
        '<nav><a href="#sensitivity">Sensitivity</a><a href="#pareto">Pareto</a><a href="#samples">Samples</a>'
        '<a href="#points">Pareto points</a><a href="#provenance">Provenance</a></nav>'
    )

    # Sensitivity
    parts.append('<section class="card" id="sensitivity"><h2>Step sensitivity</h2>')
    heat = _heatmap_png(report)
    if heat is None:
        parts.append('<p class="placeholder">No probe.csv with step rows: run <code>qsched probe</code>.</p>')
    else:
        m = report.heatmap_metric
        parts.append(
            f'<p class="note">{_e(m)} of the output when only that step runs at that precision and every other step at '
            f"the reference; the last row runs all steps at it. Darker is worse.</p>"
        )
        parts.append(f"<figure>{_img_tag(heat, f'sensitivity heatmap ({m})', scale=_FIGURE_SCALE)}</figure>")
    parts.append("</section>")

    # Pareto
    parts.append('<section class="card" id="pareto"><h2>Cost vs quality</h2>')
    pareto = _pareto_png(report)
    if pareto is None:
        parts.append('<p class="placeholder">No trials.csv: run <code>qsched search</code>.</p>')
    else:
        parts.append(
            '<p class="note">Every completed trial in grey, the Pareto front in blue (with CIs), uniform schedules as '
            "diamonds, the chosen schedule as a star, the budget dashed.</p>"
        )
        parts.append(f"<figure>{_img_tag(pareto, 'Pareto plot', scale=_FIGURE_SCALE)}</figure>")
        fail = _failures(report)
        if fail:
            parts.append(f'<p class="note">{_e(fail)}</p>')
    parts.append("</section>")

    # Samples
    parts.append('<section class="card" id="samples"><h2>Samples</h2>')
    labels, rows = _image_grid(report)
    if not rows:
        parts.append('<p class="placeholder">No images/index.csv: the search writes sample images there.</p>')
    else:
        parts.append(
            '<p class="note">The same prompt and seed in every column; metric values are against the reference.</p>'
        )
        head = "".join(f"<th>{_e(_column_title(report, lbl, rows))}</th>" for lbl in labels)
        body = []
        for r in rows:
            tds = [
                f'<td class="rowh"><strong>sample {_e(r["sample"])}</strong><br>'
                f'{_e(r["prompt"]) if not pd.isna(r["prompt"]) else ""}<br><span class="m">seed {_e(r["seed"])}</span></td>'
            ]
            for lbl in labels:
                cell = r["cells"].get(lbl)
                if cell is None:
                    tds.append("<td>—</td>")
                    continue
                path = rd.images_dir / str(cell["file"])
                if path.is_file():
                    img = _img_tag(path.read_bytes(), f"{lbl} sample {r['sample']}", "px" if _small_image(path) else "")
                else:
                    img = f'<span class="placeholder">missing {_e(cell["file"])}</span>'
                metrics = " · ".join(f"{_e(k)} {_e(v)}" for k, v in _image_metrics(cell))
                tds.append(f'<td>{img}<div class="m">{metrics}</div></td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        parts.append(
            f'<table class="grid"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        )
    parts.append("</section>")

    # Pareto points
    parts.append('<section class="card" id="points"><h2>Pareto points</h2>')
    front = _front_rows(report)
    if front is None:
        parts.append('<p class="placeholder">No pareto.csv or trials.csv.</p>')
    else:
        headers, rows = front
        note = "Non-dominated schedules over (cost, quality), cheapest first; the chosen one is highlighted."
        if report.front_recomputed:
            note += " Recomputed from trials.csv (pareto.csv is missing)."
        parts.append(f'<p class="note">{_e(note)}</p>')
        text_cols = {"schedule", "source", "within budget"}
        head = "".join(f"<th{'' if h in text_cols else ' class=num'}>{_e(h)}</th>" for h in headers)
        body = []
        for is_chosen, cells in rows:
            tds = []
            for h in headers:
                if h == "schedule":
                    badge = ' <span class="badge">chosen</span>' if is_chosen else ""
                    tds.append(f'<td class="sched">{_mini_schedule(report, cells[h])}{badge}</td>')
                else:
                    tds.append(f"<td{'' if h in text_cols else ' class=num'}>{_e(cells[h])}</td>")
            body.append(f"<tr{' class=chosen' if is_chosen else ''}>" + "".join(tds) + "</tr>")
        parts.append(f'<table class="points"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    parts.append("</section>")

    # Provenance
    parts.append('<section class="card" id="provenance"><h2>Provenance</h2><dl>')
    for k, v in _provenance(report):
        parts.append(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>")
    parts.append("</dl></section>")

    title = f"qsched report · {model}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(parts)
        + "\n</main></body></html>\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, assets_dir: str) -> tuple[str, dict[str, bytes]]:
    """Markdown text plus the PNGs it links, keyed by their path relative to the markdown file.

    Args:
        report (`Report`): from `build_report`.
        assets_dir (`str`): the folder, relative to the markdown file, that the PNGs go to (e.g. `report_files`).
    """
    s = report.schedule
    rd = ResultsDir(report.results.root)
    assets: dict[str, bytes] = {}
    out: list[str] = []

    def asset(name: str, data: bytes) -> str:
        rel = f"{assets_dir}/{name}"
        assets[rel] = data
        return rel

    model = (s or {}).get("model", {}).get("id") or (report.results.manifest or {}).get("model") or "unknown model"
    out.append(f"# Precision schedule for `{model}`\n")
    out.append(f"_{report.results.root} · qsched {__version__}_\n")
    if report.gate is not None:
        out.append(
            f"> **{'PASS' if report.gate.passed else 'FAIL'}** {report.gate.reason} (baseline: {report.gate.baseline_dir})\n"
        )
    if report.missing:
        out.append("**Missing files**\n")
        out.extend(f"- {line}" for line in report.missing)
        out.append("")
    if report.warnings:
        out.append("**Warnings**\n")
        out.extend(f"- {line}" for line in report.warnings)
        out.append("")

    out.append("## Chosen schedule\n")
    if s is None:
        out.append("_No schedule.json: run `qsched search` to choose a schedule._\n")
    else:
        strip = _schedule_png(report)
        if strip is not None:
            out.append(f"![chosen schedule]({asset('schedule.png', strip)})\n")
        ts = s.get("timesteps") or []
        out.append("| step | " + " | ".join(str(i) for i in range(len(s["levels"]))) + " |")
        out.append("|---|" + "---|" * len(s["levels"]))
        if ts:
            out.append("| timestep | " + " | ".join(str(t) for t in ts) + " |")
        out.append("| level | " + " | ".join(f"**{_md(lvl)}**" for lvl in s["levels"]) + " |\n")
        out.append("| | |\n|---|---|")
        out.extend(f"| **{_md(k)}** | {_md(v)} — {_md(d)} |" for k, v, d in _headline_facts(report))
        out.append("")

    out.append("## Step sensitivity\n")
    heat = _heatmap_png(report)
    if heat is None:
        out.append("_No probe.csv with step rows: run `qsched probe`._\n")
    else:
        out.append(
            f"{report.heatmap_metric} of the output when only that step runs at that precision and every other step "
            f"at the reference; the last row runs all steps at it. Darker is worse.\n"
        )
        out.append(f"![sensitivity heatmap]({asset('sensitivity.png', heat)})\n")

    out.append("## Cost vs quality\n")
    pareto = _pareto_png(report)
    if pareto is None:
        out.append("_No trials.csv: run `qsched search`._\n")
    else:
        out.append(f"![Pareto plot]({asset('pareto.png', pareto)})\n")
        fail = _failures(report)
        if fail:
            out.append(f"{fail}\n")

    out.append("## Samples\n")
    labels, rows = _image_grid(report)
    if not rows:
        out.append("_No images/index.csv: the search writes sample images there._\n")
    else:
        out.append("| sample | " + " | ".join(_md(_column_title(report, lbl, rows)) for lbl in labels) + " |")
        out.append("|---|" + "---|" * len(labels))
        for r in rows:
            tds = [
                f"**{_md(r['sample'])}** {_md(r['prompt']) if not pd.isna(r['prompt']) else ''} (seed {_md(r['seed'])})"
            ]
            for lbl in labels:
                cell = r["cells"].get(lbl)
                if cell is None:
                    tds.append("—")
                    continue
                path = rd.images_dir / str(cell["file"])
                metrics = ", ".join(f"{k} {v}" for k, v in _image_metrics(cell))
                if path.is_file():
                    rel = asset(f"images/{r['sample']}_{lbl}{path.suffix or '.png'}", path.read_bytes())
                    tds.append(f"![{lbl}]({rel})<br>{_md(metrics)}")
                else:
                    tds.append(f"missing {_md(cell['file'])}<br>{_md(metrics)}")
            out.append("| " + " | ".join(tds) + " |")
        out.append("")

    out.append("## Pareto points\n")
    front = _front_rows(report)
    if front is None:
        out.append("_No pareto.csv or trials.csv._\n")
    else:
        headers, rows = front
        out.append("Non-dominated schedules over (cost, quality), cheapest first; the chosen one in bold.\n")
        if report.front_recomputed:
            out.append("_Recomputed from trials.csv (pareto.csv is missing)._\n")
        out.append("| " + " | ".join(_md(h) for h in headers) + " |")
        out.append("|" + "".join("---|" if h in ("schedule", "source", "within budget") else "--:|" for h in headers))
        for is_chosen, cells in rows:
            texts = [f"`{cells[h]}`" if h == "schedule" else _md(cells[h]) for h in headers]
            if is_chosen:
                texts = [f"**{t}**" for t in texts]
            out.append("| " + " | ".join(texts) + " |")
        out.append("")

    out.append("## Provenance\n")
    out.extend(f"- **{_md(k)}**: {_md(v)}" for k, v in _provenance(report))
    out.append("")
    return "\n".join(out), assets


# ----------------------------------------------------------------------------------------------------------------
# JSON


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


# ----------------------------------------------------------------------------------------------------------------
# Writing


def write_report(report: Report, out: str | Path, fmt: str = "html") -> Path:
    """Renders `report` in `fmt` and writes it atomically to `out`; Markdown's PNGs go to `<out stem>_files/`.

    Returns:
        `Path`: `out`.
    """
    if fmt not in FORMATS:
        raise QschedError(f"format {fmt!r} is not one of {', '.join(FORMATS)}; pick one, e.g. --format html")
    out = Path(out)
    if fmt == "html":
        io.write_text(out, render_html(report))
    elif fmt == "json":
        io.write_json(out, render_json(report))
    else:
        text, assets = render_markdown(report, f"{out.stem}_files")
        # Images first, so the markdown never links a PNG that is not there yet.
        for rel, data in assets.items():
            io.write_bytes(out.parent / rel, data)
        io.write_text(out, text)
    return out


@dataclass(frozen=True)
class ReportOutcome:
    """What `make_report` wrote and found."""

    path: Path
    report: Report

    @property
    def missing(self) -> list[str]:
        return self.report.missing

    @property
    def gate(self) -> GateResult | None:
        return self.report.gate


def make_report(
    results_dir: str | Path,
    fmt: str = "html",
    *,
    out: str | Path | None = None,
    baseline_dir: str | Path | None = None,
    fail_if_worse: str | None = None,
) -> ReportOutcome:
    """Everything `qsched report` does: load, compare, gate, render, write.

    Args:
        results_dir (`str` or `Path`): the results folder.
        fmt (`str`, *optional*): `html`, `md` or `json`; defaults to `html`.
        out (`str` or `Path`, *optional*): defaults to `ResultsDir(results_dir).report(fmt)`.
        baseline_dir (`str` or `Path`, *optional*): a results folder to compare with; defaults to `None`.
        fail_if_worse (`str`, *optional*): `METRIC:TOLERANCE`, needs `baseline_dir`; defaults to `None`.

    Returns:
        `ReportOutcome`: the written path and the report; `outcome.gate.passed` is the gate's verdict.
    """
    if fmt not in FORMATS:
        raise QschedError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}; pick one, e.g. --format html")
    gate = parse_fail_if_worse(fail_if_worse) if fail_if_worse is not None else None
    if gate is not None and baseline_dir is None:
        raise QschedError(
            f"--fail-if-worse {fail_if_worse} needs --baseline OTHER_RESULTS_DIR to compare with; pass the baseline "
            f"results folder too"
        )
    results = load_results(results_dir)
    baseline = None
    if baseline_dir is not None:
        baseline = load_results(baseline_dir, argument="--baseline")
    report = build_report(results, baseline=baseline, gate=gate)
    path = write_report(report, out if out is not None else ResultsDir(results.root).report(fmt), fmt)
    return ReportOutcome(path=path, report=report)
