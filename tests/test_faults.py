"""The fault table (tests/faults.py): each bad input or injected fault ends as the README's fault table says."""

from __future__ import annotations

import pytest

from tests.faults import FAULTS, run_baseline, run_fault


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_baseline(root / "baseline")
    return root


# Rows that load the model and search are a few seconds each on two cores: marked slow (make test still runs them).
ROWS = [pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.kind in ("numeric", "interrupt") or f.resume else [])
        for f in FAULTS]


@pytest.mark.parametrize("fault", ROWS)
def test_fault(fault, folders):
    outcome = run_fault(fault, folders / fault.name.replace(" ", "-"))
    assert outcome["exit_code"] == fault.code, outcome["output"]
    assert not outcome["traceback"], outcome["output"]
    if fault.message:
        assert outcome["error_lines"] == 1 and fault.message in outcome["error_line"], outcome["output"]
    else:
        assert outcome["error_lines"] == 0, outcome["output"]
    assert outcome["leftover_tmp"] == [] and outcome["half_written"] == []
    if fault.kind == "numeric":  # the schedule is recorded as failed, with its reason, and the search went on
        assert outcome["failed_trials"] == len(fault.failed_trials), outcome["output"]
        assert all("unusable" in r for r in outcome["fail_reasons"]), outcome["fail_reasons"]
        assert outcome["trials_lost"] == 0
    if fault.resume:
        assert outcome["resumed"] == "ok"
        assert outcome["trials_lost"] == 0 and outcome["evaluated_twice"] == 0


def test_every_kind_of_fault_is_in_the_table():
    kinds = {f.kind for f in FAULTS}
    assert kinds == {"bad-input", "corrupt-file", "numeric", "io", "interrupt"}
    assert len({f.name for f in FAULTS}) == len(FAULTS)


_KILLED_WRITER = """
import sys, time
from qsched_search.results.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_temporary_left_by_a_killed_write_is_cleared_by_the_next_run(tmp_path):
    """SIGKILL in mid-write leaves only a temporary beside the results; the next command's output check removes
    it, and keeps the temporary of a write still in progress."""
    import subprocess
    import sys

    from qsched_search.results.io import atomic_path, check_writable

    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "images" / "00.png")],
                              stdout=subprocess.PIPE, text=True)
    left = writer.stdout.readline().strip()
    writer.kill()
    writer.wait(timeout=30)
    assert left.endswith(".tmp") and (tmp_path / "images" / left.rsplit("/", 1)[-1]).exists()
    assert not (tmp_path / "images" / "00.png").exists()
    with atomic_path(tmp_path / "trials.csv") as live:
        live.write_text("in progress")
        check_writable(tmp_path)
        assert live.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["images", "trials.csv"]


@pytest.mark.slow
def test_bad_inputs_print_one_line_through_the_real_entry_point(tmp_path):
    """The table's bad-input rows through `python -m qsched_search` in fresh processes: exactly one line on stderr,
    the row's message in it, no library warning before it, and the row's exit code."""
    import subprocess
    import sys

    rows = [f for f in FAULTS if f.kind == "bad-input" and f.inject is None]
    assert len(rows) >= 8
    procs = []
    for k, fault in enumerate(rows):
        args = [*fault.args, "--out", str(tmp_path / str(k))]
        procs.append((fault, subprocess.Popen([sys.executable, "-m", "qsched_search", *args], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)))
    for fault, proc in procs:
        out, err = proc.communicate(timeout=600)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == fault.code, (fault.name, err)
        assert len(lines) == 1 and lines[0].startswith("error:") and fault.message in lines[0], (fault.name, err)
