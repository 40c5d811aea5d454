"""What the reliability tests and scripts/bench_reliability.py share: a tiny real search, run as a process, and its front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# The embedded model, 2 steps x {fp32, w8a8, w4a4} = 9 schedules, 2 samples, SSIM (no metric weights needed).
TINY = ["--steps", "2", "--precisions", "w8a8,w4a4", "--samples", "2", "--objective", "ssim", "--images", "0",
        "--sampler", "exhaustive"]
SPACE = 9


def env() -> dict:
    """One thread per process (several run at once on two cores) and this checkout first on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def search_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qsched_search", "search", *TINY, *args]


def run_search(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(search_command(*args), env=env(), capture_output=True, text=True, timeout=timeout)


def start_search(*args: str, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen(search_command(*args), env=env(), stdout=handle, stderr=subprocess.STDOUT)


def front(pareto_csv: Path) -> list[tuple[str, float, float]]:
    """(schedule, cost, value) of a pareto.csv, by cost: what "the same Pareto front" compares."""
    frame = pd.read_csv(pareto_csv).sort_values(["cost", "schedule"])
    return [(s, round(float(c), 9), round(float(v), 6)) for s, c, v in zip(frame["schedule"], frame["cost"], frame["value"])]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an interrupted atomic write (io.atomic_path names them .NAME.*.tmp)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*.tmp"))
