"""Names every file a run writes, so that probe, search, calibrate, report and tests agree on one layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ResultsDir"]


@dataclass(frozen=True)
class ResultsDir:
    """The files of one results folder. Every command reads and writes through these names."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # probe
    @property
    def probe_csv(self) -> Path:
        return self.root / "probe.csv"

    @property
    def probe_heatmap(self) -> Path:
        return self.root / "probe_heatmap.png"

    @property
    def probe_cells(self) -> Path:
        """Finished probe cells, one JSON line each, so a killed probe resumes."""
        return self.root / "probe_cells.jsonl"

    @property
    def probe_layers_csv(self) -> Path:
        """The step x layer-group probe (`qsched probe --layers`)."""
        return self.root / "probe_layers.csv"

    @property
    def probe_layer_cells(self) -> Path:
        """Finished step x group cells, one JSON line each, so a killed layer probe resumes."""
        return self.root / "probe_layer_cells.jsonl"

    @property
    def layer_trials(self) -> Path:
        """Schedules the per-layer stage of `qsched search --layers` measured, one JSON line each (it resumes)."""
        return self.root / "layer_trials.jsonl"

    def probe_layers_heatmap(self, level: str) -> Path:
        """The step x group heatmap of one level."""
        return self.root / f"probe_layers_heatmap_{level}.png"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    # search
    @property
    def schedule(self) -> Path:
        return self.root / "schedule.json"

    @property
    def trials_csv(self) -> Path:
        return self.root / "trials.csv"

    @property
    def pareto_csv(self) -> Path:
        return self.root / "pareto.csv"

    @property
    def pareto_coefficients_csv(self) -> Path:
        return self.root / "pareto_coefficients.csv"

    @property
    def pareto_png(self) -> Path:
        return self.root / "pareto.png"

    @property
    def history_png(self) -> Path:
        return self.root / "history.png"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def images_dir(self) -> Path:
        """Sample images of the reference, the chosen schedule and uniform baselines, with `index.csv`."""
        return self.root / "images"

    @property
    def images_index(self) -> Path:
        return self.images_dir / "index.csv"

    def worker(self, k: int) -> "ResultsDir":
        """The folder of local worker `k` of `qsched search --workers` (its own files and log)."""
        return ResultsDir(self.root / "workers" / str(k))

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    # calibrate
    @property
    def coefficients(self) -> Path:
        return self.root / "coefficients.json"

    @property
    def calibration_trials_csv(self) -> Path:
        return self.root / "calibration_trials.csv"

    # report
    def report(self, fmt: str) -> Path:
        return self.root / f"report.{fmt}"
