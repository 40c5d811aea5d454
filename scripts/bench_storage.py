"""Several processes on one machine, one study: SQLite with `BEGIN IMMEDIATE` against Optuna's JournalStorage.

Optuna's FAQ recommends `JournalStorage(JournalFileBackend(path))` for several processes on one machine; the project
uses SQLite (RDB storage) with every transaction taking the write lock at its start (`search/storage.py`), because
Optuna pops a queued trial by reading it WAITING and then setting it RUNNING under `SELECT ... FOR UPDATE`, which
SQLite ignores. This runs the stress of `tests/test_distributed.py` on each storage: 4 processes pop 60 queued
trials, repeated; a trial popped twice is a schedule measured twice. It also records whether each storage offers the
heartbeat that a killed worker's trial needs to be retried (Optuna's `BaseHeartbeat`).

    python scripts/bench_storage.py --out results/bench/storage
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search.results.io import write_csv, write_json  # noqa: E402
from qsched_search.results.provenance import command_line, now, versions  # noqa: E402
from qsched_search.search.storage import open_storage  # noqa: E402

# One popper process: opens the storage as the project (or Optuna's FAQ) does and pops every queued trial it can.
POPPER = """
import sys
import optuna
sys.path.insert(0, sys.argv[3])
from qsched_search.search.storage import open_storage
kind, where = sys.argv[1], sys.argv[2]
if kind == "journal":
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(where))
elif kind == "sqlite-plain":
    storage = optuna.storages.RDBStorage(where, engine_kwargs={"connect_args": {"timeout": 60}})
else:
    storage = open_storage(where)[0]
study = optuna.load_study(study_name="queue", storage=storage)
popped = []
while (trial_id := study._pop_waiting_trial_id()) is not None:
    popped.append(str(trial_id))
print(" ".join(popped))
"""


def make_storage(kind: str, folder: Path):
    if kind == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        where = str(folder / "journal.log")
        return JournalStorage(JournalFileBackend(where)), where
    where = f"sqlite:///{folder / 'queue.db'}"
    return open_storage(where)[0], where


def one_round(kind: str, processes: int, trials: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        storage, where = make_storage("journal" if kind == "journal" else "sqlite", Path(tmp))
        study = optuna.create_study(study_name="queue", storage=storage)
        for x in range(trials):
            study.enqueue_trial({"x": x})
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", POPPER, kind, where, str(REPO)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(processes)]
        popped = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(err[-1000:])
            popped += out.split()
        seconds = time.perf_counter() - started
    counts = Counter(popped)
    return {"storage": kind, "processes": processes, "queued": trials, "popped": len(popped),
            "popped_twice": sum(1 for c in counts.values() if c > 1), "missing": trials - len(counts),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "storage")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    for kind in ("sqlite-begin-immediate", "sqlite-plain", "journal"):
        for k in range(args.rounds):
            rows.append({"round": k, **one_round(kind, args.processes, args.trials)})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    write_csv(args.out / "storage.csv", frame)
    from optuna.storages import JournalStorage, RDBStorage

    # A storage with a heartbeat records one per running trial; Optuna's stale-trial retry needs it.
    write_json(args.out / "summary.json", {
        "command": command_line(), "created": now(), "versions": versions(),
        "heartbeat_supported": {"sqlite (RDBStorage)": callable(getattr(RDBStorage, "record_heartbeat", None)),
                                "journal (JournalStorage)": callable(getattr(JournalStorage, "record_heartbeat", None))},
        "by_storage": {kind: {"rounds": int(len(g)), "popped_twice": int(g.popped_twice.sum()),
                              "missing": int(g.missing.sum()), "seconds_mean": round(float(g.seconds.mean()), 2)}
                       for kind, g in frame.groupby("storage")}})


if __name__ == "__main__":
    main()
