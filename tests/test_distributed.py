"""Several workers on one study in a real PostgreSQL server: one is killed mid-trial, nothing is lost or run twice."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter

import optuna
import pytest

from tests.pg_server import PostgresServer, find_bin_dir
from tests.reliability import SPACE, front, run_search, start_search

optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql (make system-deps as root)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


def _victim_trial(storage, study: str, pid: int) -> int | None:
    """The number of a trial the worker `pid` is measuring right now, if any."""
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the study is not made yet
        return None
    me = f"{socket.gethostname()}:{pid}"
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("worker") == me and t.user_attrs.get("claim"):
            return t.number
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_workers_on_postgres_one_killed_mid_trial(postgres, tmp_path):
    reference = run_search("--out", str(tmp_path / "single"))
    assert reference.returncode == 0, reference.stdout + reference.stderr

    study, url = "pg-three-workers", postgres.url
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True, "pool_size": 1})  # one per process
    args = ["--storage", url, "--study", study, "--heartbeat", "1"]
    workers = [start_search(*args, "--out", str(tmp_path / f"w{k}"), log=tmp_path / f"w{k}.log") for k in range(3)]
    victim, killed = workers[0], None
    try:
        deadline = time.time() + 240
        while killed is None and time.time() < deadline and victim.poll() is None:
            killed = _victim_trial(storage, study, victim.pid)
            if killed is None:
                time.sleep(0.05)
        assert killed is not None, "worker 0 never ran a trial: " + (tmp_path / "w0.log").read_text()[-2000:]
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        for k, w in enumerate(workers[1:], start=1):
            assert w.wait(timeout=400) == 0, (tmp_path / f"w{k}.log").read_text()[-3000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()

    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    states = Counter(t.state.name for t in trials)
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states
    # The killed trial was failed by the heartbeat check and retried through Optuna's callback.
    dead = next(t for t in trials if t.number == killed)
    assert dead.state == optuna.trial.TrialState.FAIL and "evaluation" not in dead.user_attrs
    assert any(t.system_attrs.get("failed_trial") == killed for t in trials), "the dead worker's trial was not retried"
    # No schedule lost, none measured twice: each of the 9 has exactly one trial that measured it.
    measured = Counter(t.user_attrs["schedule"] for t in trials
                       if "evaluation" in t.user_attrs and t.user_attrs.get("source") != "cache")
    assert len(measured) == SPACE and set(measured.values()) == {1}, measured
    assert len({t.number for t in trials}) == len(trials)
    # Both survivors wrote the whole study's front, and it is the single worker's.
    expected = front(tmp_path / "single" / "pareto.csv")
    for k in (1, 2):
        assert front(tmp_path / f"w{k}" / "pareto.csv") == expected
