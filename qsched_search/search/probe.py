"""Sensitivity probes: swap one step (or one layer group at one step) to a lower precision, keep the rest at
reference, measure the damage.

The step probe (`run_probe`) runs every (step, level) cell; the layer probe (`run_layer_probe`, `qsched probe
--layers`) every (step, group, level) cell: that group alone at the level in that step, every other layer and step at
the reference. Both keep finished cells in a JSON-lines file as they finish, so a killed probe resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from qsched_search.results.io import write_csv, write_text
from qsched_search.results.layout import ResultsDir
from qsched_search.results.provenance import fingerprint, update_manifest
from qsched_search.results.records import Measurement
from qsched_search.errors import QschedError
from qsched_search.results.assignment import Override, StepAssignment
from qsched_search.results.tables import PROBE_COLUMNS, PROBE_LAYER_COLUMNS, schedule_key

logger = logging.getLogger(__name__)

__all__ = ["Cell", "CellStore", "ProbeResult", "layer_probe_cells", "probe_cells", "probe_measurements", "probe_table",
           "run_layer_probe", "run_probe", "write_layer_probe", "write_probe"]


@dataclass(frozen=True)
class Cell:
    """One probe run: `kind` is "reference" (a re-run of the reference: the noise floor), "step", "uniform", or
    "group" (layer group `group` at `precision` in step `step`, everything else at the reference)."""

    kind: str
    precision: str
    step: int | None = None
    group: str | None = None

    def levels(self, reference: str, steps: int) -> tuple:
        if self.kind == "uniform":
            return (self.precision,) * steps
        if self.kind == "step":
            return tuple(self.precision if i == self.step else reference for i in range(steps))
        if self.kind == "group":
            own = StepAssignment(reference, (Override(self.precision, group=self.group),))
            return tuple(own if i == self.step else reference for i in range(steps))
        return (reference,) * steps

    @property
    def key(self) -> str:
        base = f"{self.kind}:{self.precision}:{'' if self.step is None else self.step}"
        return base if self.group is None else f"{base}:{self.group}"

    @classmethod
    def from_key(cls, key: str) -> "Cell":
        kind, precision, step, *group = key.split(":", 3)
        return cls(kind, precision, int(step) if step else None, group[0] if group else None)


def probe_cells(levels: Sequence[str], reference: str, steps: int) -> list[Cell]:
    """The noise floor first, then every (step, level) swap step by step, then each uniform schedule.

    Step by step, so that the reference prefix a cell shares with the all-reference run is still cached when it
    runs; the uniform schedules come after the step-0 cells whose first step they share.
    """
    cells = [Cell("reference", reference)]
    cells += [Cell("step", level, step) for step in range(steps) for level in levels]
    cells += [Cell("uniform", level) for level in levels]
    return cells


def layer_probe_cells(levels: Sequence[str], reference: str, steps: int, groups: Sequence[str]) -> list[Cell]:
    """The noise floor first, then every (step, group, level) cell step by step (steps before a cell's step run at
    the reference, so the reference run's cached outputs answer them)."""
    cells = [Cell("reference", reference)]
    cells += [Cell("group", level, step, group) for step in range(steps) for group in groups for level in levels]
    return cells


class CellStore:
    """Finished cells, one JSON line each, tagged with a fingerprint of everything that decides their values.

    A probe killed midway restarts where it stopped; a probe with other settings ignores the old lines.
    """

    def __init__(self, path: Path, fingerprint: str, tidy: bool = True):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[str, Measurement] = {}
        if self.path.is_file():
            text, cut, kept = self.path.read_text(), False, []
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    cut = True  # a line cut by a kill: that cell runs again
                    continue
                if record.get("fingerprint") == fingerprint:
                    self.done[record["cell"]] = Measurement.from_dict(record)
                    kept.append(line)
            if not tidy:
                pass
            elif not self.done:
                self.path.unlink()
            elif cut or not text.endswith("\n"):  # drop the cut line, so the next record starts a line of its own
                write_text(self.path, "".join(line + "\n" for line in kept))

    def add(self, cell: Cell | str, measurement: Measurement) -> None:
        """Keeps a finished cell (or any run named by a string key, such as a schedule's)."""
        key = cell if isinstance(cell, str) else cell.key
        record = {"fingerprint": self.fingerprint, "cell": key, **measurement.to_dict()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one whole line per finished cell; a kill can cut only the last one
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = measurement


@dataclass
class ProbeResult:
    """What `run_probe` measured: the cells, their measurements and the tidy table."""

    cells: list[Cell]
    measurements: dict[str, Measurement]
    table: pd.DataFrame
    fingerprint: str
    seconds: float = 0.0
    reused: int = 0
    fields: dict = field(default_factory=dict)


def run_probe(evaluator, levels: Sequence[str], results: ResultsDir, settings: Mapping,
              on_cell: Callable[[Cell], None] | None = None) -> ProbeResult:
    """Runs every probe cell not already finished (kept in `results.probe_cells` as they finish).

    Args:
        evaluator (`ScheduleEvaluator`): runs and scores schedules against the all-reference run.
        levels (`Sequence[str]`): the lower precisions to probe.
        results (`ResultsDir`): where probe_cells.jsonl is kept.
        settings (`Mapping`): everything that decides the numbers (model hash, steps, eval set, metrics, menu...);
            finished cells are reused only under the same settings.
        on_cell (`Callable`, *optional*): called after each cell, for progress bars.

    Returns:
        `ProbeResult`; write its files with `write_probe`.
    """
    started = time.time()
    runner = evaluator.runner
    reference, steps = runner.bank.reference, runner.steps
    key = fingerprint(dict(settings))
    store = CellStore(results.probe_cells, key)
    reused = len(store.done)
    cells = probe_cells(levels, reference, steps)
    _run_cells(evaluator, cells, store, on_cell)
    measurements = {cell.key: store.done[cell.key] for cell in cells}
    result = ProbeResult(cells, measurements, probe_table(cells, measurements), key, time.time() - started, reused)
    result.fields["prefix_reuse"] = runner.cache.stats()
    return result


def _run_cells(evaluator, cells: Sequence[Cell], store: CellStore, on_cell: Callable[[Cell], None] | None) -> None:
    """Measures each cell `store` has not finished and adds it there as it finishes."""
    reference, steps = evaluator.runner.bank.reference, evaluator.runner.steps
    for cell in cells:
        if cell.key not in store.done:
            # The noise floor is a real re-run of the reference: never answered from the prefix cache.
            evaluation = evaluator.evaluate(cell.levels(reference, steps), use_cache=cell.kind != "reference")
            store.add(cell, evaluation.measurement)
        if on_cell:
            on_cell(cell)


def run_layer_probe(evaluator, levels: Sequence[str], groups, results: ResultsDir, settings: Mapping,
                    samples: int | None = None, on_cell: Callable[[Cell], None] | None = None) -> ProbeResult:
    """Runs every step x group cell not already finished (kept in `results.probe_layer_cells` as they finish).

    Args:
        evaluator (`ScheduleEvaluator`): the step probe's evaluator (its model, bank, runner and metrics).
        levels (`Sequence[str]`): the levels each group is probed at.
        groups (`LayerGroups`): the layer groups (`qsched_search.quant.groups.bank_groups`).
        results (`ResultsDir`): where probe_layer_cells.jsonl is kept.
        settings (`Mapping`): everything that decides the numbers; the groups, levels and samples are added.
        samples (`int`, *optional*): run the group cells on the first `samples` samples of the evaluation set
            (fewer than the step cells, to save time; `fields["samples"]` and every row's `n` say so), with a noise
            floor of their own on those samples. None: the step cells' samples.
        on_cell (`Callable`, *optional*): called after each cell.

    Returns:
        `ProbeResult` whose table has `PROBE_LAYER_COLUMNS`; write it with `write_layer_probe`.
    """
    from qsched_search.eval.evaluate import ScheduleEvaluator
    from qsched_search.pipeline.rollout import EvalSet, Runner

    started = time.time()
    runner = evaluator.runner
    reference, steps = runner.bank.reference, runner.steps
    total = len(runner.eval_set)
    if samples is not None and not 1 <= samples <= total:
        raise QschedError(f"--layer-samples {samples} is outside 1..{total} (the step probe's --samples); pass at most {total}")
    if samples is None or samples == total:
        sub = evaluator
    else:
        subset = EvalSet(runner.eval_set.prompts[:samples], runner.eval_set.seeds[:samples])
        sub = ScheduleEvaluator(Runner(runner.model, runner.bank, steps, subset, runner.batch_size, runner.call_kwargs),
                                evaluator.metrics)
    previous = sub.runner.groups
    sub.runner.groups = groups
    # Not the levels: cells are keyed by level, so a later run with more levels keeps the finished ones.
    key = fingerprint({**dict(settings), "layer_samples": len(sub.runner.eval_set), "groups": groups.to_dict()})
    store = CellStore(results.probe_layer_cells, key)
    reused = len(store.done)
    cells = layer_probe_cells(levels, reference, steps, groups.names)
    try:
        _run_cells(sub, cells, store, on_cell)
    finally:
        sub.runner.groups = previous
    measurements = {cell.key: store.done[cell.key] for cell in cells}
    table = probe_table(cells, measurements, PROBE_LAYER_COLUMNS)
    table["layers"] = table["group"].map(lambda g: len(groups.groups[g]) if isinstance(g, str) and g in groups.groups else pd.NA)
    table["layers"] = table["layers"].astype("Int64")
    result = ProbeResult(cells, measurements, table, key, time.time() - started, reused)
    result.fields.update({"grouping": groups.name, "groups": len(groups.groups), "layer_levels": list(levels),
                          "samples": len(sub.runner.eval_set), "step_samples": total,
                          "fewer_samples_than_step_cells": len(sub.runner.eval_set) < total,
                          "prefix_reuse": sub.runner.cache.stats()})
    return result


def write_layer_probe(result: ProbeResult, results: ResultsDir, metric, fields: Mapping, title: str = "") -> list[Path]:
    """probe_layers.csv, one step x group heatmap per level (of `metric`, when given) and the manifest's
    `probe_layers` stage."""
    from qsched_search.plots import plot_layer_heatmap

    write_csv(results.probe_layers_csv, result.table)
    files = [results.probe_layers_csv]
    if metric is not None:
        for level in result.fields["layer_levels"]:
            path = results.probe_layers_heatmap(level)
            plot_layer_heatmap(result.table, metric.name, metric.higher_is_better, level, path, title=title)
            files.append(path)
    update_manifest(results.manifest, "probe_layers", {**fields, **result.fields, "fingerprint": result.fingerprint,
                                                       "cells_reused": result.reused, "seconds": round(result.seconds, 1)})
    files.append(results.manifest)
    return files


def write_probe(result: ProbeResult, results: ResultsDir, metric, fields: Mapping, title: str = "") -> list[Path]:
    """probe.csv, probe_heatmap.png (of `metric`, when given) and the manifest's probe stage, written once each."""
    from qsched_search.plots import plot_probe_heatmap

    write_csv(results.probe_csv, result.table)
    files = [results.probe_csv]
    if metric is not None:
        plot_probe_heatmap(result.table, metric.name, metric.higher_is_better, results.probe_heatmap, title=title)
        files.append(results.probe_heatmap)
    update_manifest(results.manifest, "probe", {**fields, **result.fields, "fingerprint": result.fingerprint,
                                                "cells_reused": result.reused, "seconds": round(result.seconds, 1)})
    files.append(results.manifest)
    return files


def probe_table(cells: list[Cell], measurements: Mapping[str, Measurement],
                columns: Sequence[str] = PROBE_COLUMNS) -> pd.DataFrame:
    """Tidy rows (cell x metric); `delta` is the value minus the noise-floor row's value of the same metric (the
    first cell is the noise floor)."""
    floor = measurements[cells[0].key]
    rows = []
    for cell in cells:
        m = measurements[cell.key]
        for metric in (floor.estimates if m.failed else m.estimates):
            est = m.estimates.get(metric)
            value, lo, hi, n = (est.value, est.ci_low, est.ci_high, est.n) if est else (math.nan, math.nan, math.nan, 0)
            rows.append({
                "kind": cell.kind,
                "step": cell.step,
                "group": cell.group,
                "timestep": floor.timesteps[cell.step] if cell.step is not None else None,
                "precision": cell.precision,
                "metric": metric,
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n": n,
                "delta": value - floor.estimates[metric].value,
                "unhealthy_images": m.unhealthy_images,
                "fail_reason": m.fail_reason or "",
            })
    frame = pd.DataFrame(rows, columns=list(columns))
    frame["step"] = frame["step"].astype("Int64")
    frame["timestep"] = frame["timestep"].astype("Int64")
    return frame


def probe_measurements(results: ResultsDir, fingerprint_: str, reference: str, steps: int,
                       layers: bool = False) -> dict[str, Measurement]:
    """The finished cells of the probe with `fingerprint_` in `results`, by schedule key (the noise-floor cell stands
    for the all-reference schedule), each with origin "probe" unless it records another; `layers`: the layer
    probe's cells (probe_layer_cells.jsonl)."""
    path = results.probe_layer_cells if layers else results.probe_cells
    if not path.is_file():
        return {}
    return {schedule_key(Cell.from_key(key).levels(reference, steps)): replace(m, origin=m.origin or "probe")
            for key, m in CellStore(path, fingerprint_, tidy=False).done.items()}
