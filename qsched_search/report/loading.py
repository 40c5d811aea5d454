"""Reads one results folder for the report: every file that is there, a line for every file that is not."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qsched_search.errors import QschedError
from qsched_search.results.layout import ResultsDir
from qsched_search.results.schedule import Schedule

__all__ = ["Results", "load_results"]


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


# Columns the readers need; extra columns are kept and ignored.
_PROBE_COLUMNS = ("kind", "step", "precision", "metric", "value", "delta")
_TRIALS_COLUMNS = ("trial", "schedule", "state", "cost", "value")
_IMAGES_COLUMNS = ("label", "sample", "file")


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
        Schedule.from_dict(out.schedule, source=str(rd.schedule))  # the schema and the cross-field rules, once
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
