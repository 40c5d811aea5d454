"""Per-step sensitivity probes: swap one step to a lower precision, keep the rest at reference, measure the damage."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from qsched_search.evaluate import Evaluation, ScheduleEvaluator
from qsched_search.io import write_csv, write_text
from qsched_search.paths import ResultsDir

logger = logging.getLogger(__name__)

PROBE_COLUMNS = ["kind", "step", "timestep", "precision", "metric", "value", "ci_low", "ci_high", "n", "delta",
                 "unhealthy_images", "fail_reason"]


@dataclass(frozen=True)
class Cell:
    """One probe run: `kind` is "reference" (a re-run of the reference: the noise floor), "step" or "uniform"."""

    kind: str
    precision: str
    step: int | None = None

    def levels(self, reference: str, steps: int) -> tuple[str, ...]:
        if self.kind == "uniform":
            return (self.precision,) * steps
        if self.kind == "step":
            return tuple(self.precision if i == self.step else reference for i in range(steps))
        return (reference,) * steps

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.precision}:{'' if self.step is None else self.step}"


def probe_cells(levels: Sequence[str], reference: str, steps: int) -> list[Cell]:
    """The noise floor first, then every (step, level) swap, then each uniform schedule."""
    cells = [Cell("reference", reference)]
    cells += [Cell("step", level, step) for level in levels for step in range(steps)]
    cells += [Cell("uniform", level) for level in levels]
    return cells


class CellStore:
    """Finished cells, one JSON line each, tagged with a fingerprint of everything that decides their values.

    A probe killed midway restarts where it stopped; a probe with other settings ignores the old lines.
    """

    def __init__(self, results: ResultsDir, fingerprint: str):
        self.path = results.probe_cells
        self.fingerprint = fingerprint
        self.done: dict[str, dict] = {}
        if self.path.is_file():
            text, cut = self.path.read_text(), False
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    cut = True  # a line cut by a kill: that cell runs again
                    continue
                if record.get("fingerprint") == fingerprint:
                    self.done[record["cell"]] = record
            if not self.done:
                self.path.unlink()
            elif cut or not text.endswith("\n"):  # drop the cut line, so the next record starts a line of its own
                write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.done.values()))

    def add(self, cell: Cell, evaluation: Evaluation) -> dict:
        record = {
            "fingerprint": self.fingerprint,
            "cell": cell.key,
            "timesteps": evaluation.timesteps,
            "unhealthy_images": evaluation.unhealthy_images,
            "fail_reason": evaluation.fail_reason,
            "estimates": {k: [e.value, e.ci_low, e.ci_high, e.n] for k, e in evaluation.estimates.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one whole line per finished cell; a kill can cut only the last one
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[cell.key] = record
        return record


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_probe(
    evaluator: ScheduleEvaluator,
    levels: Sequence[str],
    results: ResultsDir,
    settings: dict,
    on_cell: Callable[[Cell], None] | None = None,
) -> pd.DataFrame:
    """Runs every probe cell not already finished and returns the tidy table (also written to probe.csv).

    Args:
        evaluator (`ScheduleEvaluator`): runs and scores schedules against the all-reference run.
        levels (`Sequence[str]`): the lower precisions to probe.
        results (`ResultsDir`): where probe_cells.jsonl and probe.csv go.
        settings (`dict`): everything that decides the numbers (model hash, steps, eval set, metrics, menu...);
            finished cells are reused only under the same settings.
        on_cell (`Callable`, *optional*): called after each cell, for progress bars.
    """
    runner = evaluator.runner
    reference, steps = runner.bank.reference, runner.steps
    store = CellStore(results, fingerprint(settings))
    cells = probe_cells(levels, reference, steps)
    for cell in cells:
        if cell.key not in store.done:
            store.add(cell, evaluator.evaluate(cell.levels(reference, steps)))
        if on_cell:
            on_cell(cell)
    frame = probe_table(cells, store.done)
    write_csv(results.probe_csv, frame)
    return frame


def probe_table(cells: list[Cell], records: dict[str, dict]) -> pd.DataFrame:
    """Tidy rows (cell x metric); `delta` is the value minus the noise-floor row's value of the same metric."""
    floor = records[cells[0].key]["estimates"]
    timesteps = records[cells[0].key]["timesteps"]
    rows = []
    for cell in cells:
        record = records[cell.key]
        metric_names = floor.keys() if record["fail_reason"] else record["estimates"].keys()
        for metric in metric_names:
            value, lo, hi, n = record["estimates"].get(metric, [math.nan, math.nan, math.nan, 0])
            rows.append({
                "kind": cell.kind,
                "step": cell.step,
                "timestep": timesteps[cell.step] if cell.step is not None else None,
                "precision": cell.precision,
                "metric": metric,
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n": n,
                "delta": value - floor[metric][0],
                "unhealthy_images": record["unhealthy_images"],
                "fail_reason": record["fail_reason"] or "",
            })
    frame = pd.DataFrame(rows, columns=PROBE_COLUMNS)
    frame["step"] = frame["step"].astype("Int64")
    frame["timestep"] = frame["timestep"].astype("Int64")
    return frame


def heatmap(frame: pd.DataFrame, metric: str, higher_is_better: bool, path, title: str = "") -> None:
    """Step x precision heatmap of the metric's change from the noise floor, uniform schedules as the last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qsched_search.io import save_figure

    data = frame[frame.metric == metric]
    levels = list(dict.fromkeys(data[data.kind != "reference"].precision))
    steps = sorted(int(s) for s in data[data.kind == "step"].step.dropna().unique())
    grid = np.full((len(steps) + 1, len(levels)), np.nan)
    labels = []
    for r, step in enumerate(steps):
        t = data[(data.kind == "step") & (data.step == step)].timestep.iloc[0]
        labels.append(f"step {step} (t={t})")
        for c, level in enumerate(levels):
            cell = data[(data.kind == "step") & (data.step == step) & (data.precision == level)]
            grid[r, c] = cell.delta.iloc[0] if len(cell) else np.nan
    labels.append("all steps")
    for c, level in enumerate(levels):
        cell = data[(data.kind == "uniform") & (data.precision == level)]
        grid[-1, c] = cell.delta.iloc[0] if len(cell) else np.nan
    damage = -grid if higher_is_better else grid  # colour by harm: darker is worse either way
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(levels), 1.2 + 0.55 * len(labels)))
    im = ax.imshow(damage, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_yticks(range(len(labels)), labels)
    ax.axhline(len(steps) - 0.5, color="white", linewidth=3)
    finite = damage[np.isfinite(damage)]
    mid = (finite.max() + finite.min()) / 2 if finite.size else 0
    for (r, c), v in np.ndenumerate(grid):
        text = "failed" if np.isnan(v) else f"{v:+.3g}"
        ax.text(c, r, text, ha="center", va="center", fontsize=9,
                color="white" if np.isfinite(damage[r, c]) and damage[r, c] > mid else "black")
    fig.colorbar(im, ax=ax, label=f"{'drop' if higher_is_better else 'rise'} in {metric} vs reference")
    ax.set_title(title or f"Per-step sensitivity ({metric})", fontsize=10)
    fig.tight_layout()
    save_figure(path, fig, dpi=130)
    plt.close(fig)
