"""`qsched search` SIGKILLed at random moments and run again always ends with the uninterrupted run's front."""

from __future__ import annotations

import time

import pytest

from tests.reliability import front, kill_and_rerun, measured_once, run_search

ONE_STEP = ["--steps", "1"]  # 3 schedules: each run is mostly start-up, so the kills land in every phase


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_front(tmp_path):
    started = time.time()
    reference = run_search(*ONE_STEP, "--out", str(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    duration = time.time() - started
    expected = front(tmp_path / "uninterrupted" / "pareto.csv")
    assert measured_once(tmp_path / "uninterrupted" / "trials.csv") == (3, 0)

    outcome = kill_and_rerun(tmp_path / "killed", ONE_STEP, kills=3, seed=8, window=(0.3 * duration, duration))
    assert outcome["final_exit"] == 0, outcome["final_output"]
    assert outcome["front"] == expected
    assert (outcome["measured"], outcome["measured_twice"]) == (3, 0)
    assert outcome["unreadable"] == []
    assert sum(e["outcome"] == "killed" for e in outcome["kills"]) >= 1, outcome["kills"]
