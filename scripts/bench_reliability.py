"""Reliability numbers: every row of the fault table injected, and `qsched search` SIGKILLed at random moments.

Writes results/reliability/faults.csv (one row per injected fault: exit code, the one-line error, files left,
trials lost or measured twice), kills.csv (each SIGKILL: when, and what it hit), summary.json (counts per kind of
fault, totals, command, device, date, versions) and README.md. Runs on CPU in a few minutes:

    python scripts/bench_reliability.py                       # 8 seeded kills of a 2-step, 9-schedule search
    python scripts/bench_reliability.py --kills 3 --seed 1    # fewer kills, another seed
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from qsched_search.results.io import write_csv, write_json, write_text  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, now, versions  # noqa: E402
from tests.faults import FAULTS, run_baseline, run_fault  # noqa: E402
from tests.reliability import SPACE, TINY, front, kill_and_rerun, measured_once, run_search  # noqa: E402

FAULT_COLUMNS = ["name", "kind", "command", "injected", "exit_code", "expected_code", "error_line", "traceback",
                 "leftover_tmp", "half_written", "failed_trials", "trials_lost", "evaluated_twice", "resumed", "passed"]


def fault_rows(root: Path) -> pd.DataFrame:
    """Runs every row of the fault table (tests/faults.py) and says whether it ended as it must."""
    run_baseline(root / "baseline")
    rows = []
    for fault in FAULTS:
        o = run_fault(fault, root / fault.name.replace(" ", "-"))
        one_line = (o["error_lines"] == 1 and fault.message in o["error_line"]) if fault.message else o["error_lines"] == 0
        passed = (o["exit_code"] == fault.code and one_line and not o["traceback"] and not o["leftover_tmp"]
                  and not o["half_written"] and o["trials_lost"] == 0 and o["evaluated_twice"] == 0
                  and (not fault.resume or o["resumed"] == "ok")
                  and (fault.kind != "numeric" or o["failed_trials"] == len(fault.failed_trials)))
        rows.append({**{k: o[k] for k in FAULT_COLUMNS if k in o}, "leftover_tmp": len(o["leftover_tmp"]),
                     "half_written": len(o["half_written"]), "passed": bool(passed)})
        print(f"{'ok  ' if passed else 'FAIL'} {fault.kind:<12} {fault.name:<34} exit {o['exit_code']}", flush=True)
    return pd.DataFrame(rows, columns=FAULT_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/reliability", help="Results folder.")
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs of one search, each at a random moment.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out = Path(args.out)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="qsched-reliability-") as tmp:
        tmp = Path(tmp)
        faults = fault_rows(tmp / "faults")
        write_csv(out / "faults.csv", faults)

        t0 = time.time()
        reference = run_search("--out", str(tmp / "uninterrupted"))
        if reference.returncode != 0:
            raise SystemExit(f"the uninterrupted search failed: {reference.stderr[-500:]}")
        duration = time.time() - t0
        expected = front(tmp / "uninterrupted" / "pareto.csv")
        killed = kill_and_rerun(tmp / "killed", [], kills=args.kills, seed=args.seed, window=(0.1 * duration, duration))
    kills = pd.DataFrame([{"kill": k, **e} for k, e in enumerate(killed["kills"])], columns=["kill", "at_s", "outcome", "exit"])
    write_csv(out / "kills.csv", kills)

    per_kind = faults.groupby("kind").agg(faults=("name", "size"), injected=("injected", "sum"), passed=("passed", "sum"),
                                          trials_lost=("trials_lost", "sum")).reset_index()
    same_front = killed["front"] == expected
    summary = {
        "command": command_line(), "created": now(), "device": device_name("cpu"), "versions": versions(),
        "seconds": round(time.time() - started, 1),
        "faults": {"rows": int(len(faults)), "injected": int(faults["injected"].sum()), "passed": int(faults["passed"].sum()),
                   "trials_lost": int(faults["trials_lost"].sum()), "evaluated_twice": int(faults["evaluated_twice"].sum()),
                   "leftover_tmp": int(faults["leftover_tmp"].sum()), "half_written": int(faults["half_written"].sum()),
                   "per_kind": per_kind.to_dict(orient="records")},
        "sigkill": {"search": " ".join(["qsched", "search", *TINY]), "space": SPACE, "seed": args.seed,
                    "uninterrupted_seconds": round(duration, 1), "kills": int(len(kills)),
                    "outcomes": dict(Counter(kills["outcome"])), "final_exit": killed["final_exit"],
                    "same_front_as_uninterrupted": bool(same_front), "schedules_measured": killed["measured"],
                    "measured_twice": killed["measured_twice"], "trials_lost": SPACE - killed["measured"],
                    "unreadable_result_files": killed["unreadable"], "leftover_tmp_files": len(killed["leftover_tmp"])},
    }
    write_json(out / "summary.json", summary)
    lines = [
        "# Reliability", "",
        f"`{summary['command']}` on {summary['device']}, {summary['created']} ({summary['seconds']} s).", "",
        "## Fault table (every row of tests/faults.py injected once)", "",
        "| kind | rows | faults injected | ended as required | trials lost |", "|---|---|---|---|---|",
        *[f"| {r['kind']} | {r['faults']} | {r['injected']} | {r['passed']} | {r['trials_lost']} |" for r in summary["faults"]["per_kind"]],
        f"| **all** | {summary['faults']['rows']} | {summary['faults']['injected']} | {summary['faults']['passed']} | "
        f"{summary['faults']['trials_lost']} |", "",
        "Per row (exit code, error line, files left): `faults.csv`.", "",
        "## SIGKILL at random moments, then the same command again", "",
        f"`{summary['sigkill']['search']}` ({SPACE} schedules; uninterrupted: {summary['sigkill']['uninterrupted_seconds']} s), "
        f"killed {summary['sigkill']['kills']} times at seeded random moments (seed {args.seed}; `kills.csv`): "
        f"{', '.join(f'{v} {k}' for k, v in summary['sigkill']['outcomes'].items())}. The run after the last kill exited "
        f"{killed['final_exit']}; its Pareto front {'equals' if same_front else 'DIFFERS FROM'} the uninterrupted run's; "
        f"{killed['measured']} of {SPACE} schedules measured, {killed['measured_twice']} measured twice, "
        f"{len(killed['unreadable'])} unreadable result files.", "",
    ]
    write_text(out / "README.md", "\n".join(lines))
    print(f"wrote {out}/faults.csv, kills.csv, summary.json, README.md in {summary['seconds']} s")
    if not (faults["passed"].all() and same_front):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
