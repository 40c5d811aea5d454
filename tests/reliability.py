"""What the reliability tests and scripts/bench_reliability.py share: a tiny real search, run as a process, and its front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# The embedded model, 2 steps x {fp32, w8a8, w4a4} = 9 schedules, 2 samples, SSIM (no metric weights needed). The
# budget leaves room for mixed schedules: with only its Linear layers quantized, w4a4 costs ~0.66 of fp32.
TINY = ["--steps", "2", "--precisions", "w8a8,w4a4", "--samples", "2", "--objective", "ssim", "--images", "0",
        "--sampler", "exhaustive", "--budget", "0.9"]
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


def measured_once(trials_csv: Path) -> tuple[int, int]:
    """(schedules measured, schedules measured more than once) in a trials.csv: a trial measured its schedule
    when it completed or failed with a reason (a trial cut off by a kill or Ctrl-C measured nothing)."""
    trials = pd.read_csv(trials_csv)
    reason = trials["fail_reason"].astype(object).fillna("").astype(str)  # an all-empty column reads as float
    ran = (trials["state"] == "COMPLETE") | (reason.ne("") & ~reason.str.startswith("interrupted"))
    measured = trials[(trials["source"] != "cache") & ran]["schedule"]
    return int(measured.nunique()), int(measured.duplicated().sum())


def kill_and_rerun(folder: Path, args: list[str], kills: int, seed: int, window: tuple[float, float],
                   timeout: float = 600) -> dict:
    """Starts `qsched search ARGS --out FOLDER`, SIGKILLs it at a random moment in `window` seconds, `kills` times
    (seeded), then runs it to the end; returns the outcomes and the final folder's front.

    Returns:
        `dict`: `kills` (list of {"at_s", "outcome"}: "killed" or "finished first"), `final_exit`, `front`,
        `measured`, `measured_twice`, `leftover_tmp` (temporary files a kill left beside the results; the
        results themselves are always whole), `unreadable` (result CSVs that do not parse: must stay empty).
    """
    import random
    import signal
    import time

    rng = random.Random(seed)
    events = []
    for k in range(kills):
        at = rng.uniform(*window)
        proc = start_search(*args, "--out", str(folder), log=folder.parent / f"{folder.name}-kill{k}.log")
        started = time.time()
        try:
            proc.wait(timeout=at)
            events.append({"at_s": round(at, 2), "outcome": "finished first", "exit": proc.returncode})
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            events.append({"at_s": round(time.time() - started, 2), "outcome": "killed", "exit": proc.returncode})
    final = run_search(*args, "--out", str(folder), timeout=timeout)
    unreadable = []
    for csv in folder.glob("*.csv"):
        try:
            pd.read_csv(csv)
        except Exception:
            unreadable.append(csv.name)
    measured, twice = measured_once(folder / "trials.csv") if final.returncode == 0 else (0, 0)
    return {"kills": events, "final_exit": final.returncode, "final_output": (final.stdout + final.stderr)[-2000:],
            "front": front(folder / "pareto.csv") if final.returncode == 0 else None, "measured": measured,
            "measured_twice": twice, "leftover_tmp": leftovers(folder), "unreadable": unreadable}


def running_trial(storage, study: str, pid: int) -> int | None:
    """The number of the trial that worker process `pid` is measuring right now, if any."""
    import socket

    import optuna

    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the study is not made yet
        return None
    me = f"{socket.gethostname()}:{pid}"
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("worker") == me and t.user_attrs.get("claim"):
            return t.number
    return None
