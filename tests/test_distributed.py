"""Several workers on one study in a real PostgreSQL server: one is killed mid-trial, nothing is lost or run twice."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import optuna
import pytest

from tests.helpers import REPO
from tests.pg_server import PostgresServer, find_bin_dir
from tests.reliability import SPACE, TINY, env, front, measured_once, run_search, running_trial, start_search

optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql (make system-deps as root)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


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
            killed = running_trial(storage, study, victim.pid)
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


_WORKER = """
import sys
sys.path.insert(0, {repo!r})
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
from tests.helpers import FakeEvaluator, make_search
fake = FakeEvaluator(delay=float(sys.argv[3]), log=sys.argv[2])
make_search(fake.evaluate, steps=2, sampler=sys.argv[4], trials=int(sys.argv[5]), storage=sys.argv[1],
            warm_start=[(("w8a8",) * 2, "uniform"), (("w4a4",) * 2, "uniform")]).run()
"""


@pytest.mark.parametrize("sampler, trials", [("exhaustive", 16), ("random", 8)])
def test_workers_on_one_sqlite_study_measure_each_schedule_once(tmp_path, sampler, trials):
    """Three processes draw from one study at once (the random sampler proposes repeats on purpose): every
    schedule is measured by exactly one of them; the others reuse or wait for its result."""
    import subprocess
    import sys

    storage, log = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "evaluations.log"
    script = _WORKER.format(repo=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, storage, str(log), "0.05", sampler, str(trials)],
                              stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    measured = Counter(log.read_text().splitlines())
    assert set(measured.values()) == {1}, [k for k, v in measured.items() if v > 1]
    if sampler == "exhaustive":
        assert len(measured) == 16
    study = optuna.load_study(study_name=optuna.get_all_study_summaries(storage)[0].study_name, storage=storage)
    states = Counter(t.state.name for t in study.trials)
    assert states["RUNNING"] == 0
    workers = {t.user_attrs.get("worker") for t in study.trials if t.user_attrs.get("source") != "cache"}
    assert len(workers - {None}) >= 2, "the work was not shared"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_workers_share_one_study_and_the_caller_writes_its_results(tmp_path):
    """`qsched search --workers 2`: two `python -m qsched_search.search.worker SETTINGS.json` processes measure the
    study, each schedule once, from settings files that hold exactly the command's settings; the command then writes
    the results of the whole study, measuring nothing itself."""
    import json
    import subprocess
    import sys

    from qsched_search.results.layout import ResultsDir
    from qsched_search.search.stage import SearchSettings
    from qsched_search.session import RunSettings

    out = ResultsDir(tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "qsched_search", "search", *TINY, "--workers", "2", "--out", str(out.root)],
                          env=env(), capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "0 new evaluations" in done.stdout + done.stderr  # the caller only wrote the files
    for k in range(2):
        worker = out.worker(k)
        spec = json.loads((worker.root / "settings.json").read_text())
        run = spec["run"]
        settings = RunSettings(**{**run, **{key: tuple(run[key]) for key in ("precisions", "prompts", "metrics")}})
        assert settings.steps == 2 and settings.precisions == ("w8a8", "w4a4") and settings.samples == 2
        assert settings.backend == "sim" and settings.metrics == ()
        search = SearchSettings(**spec["search"])
        assert search.objective == "ssim" and search.budget == 0.9 and search.sampler == "exhaustive"
        assert search.images == 0 and search.storage == f"sqlite:///{out.study_db.resolve()}"
        assert spec["out"] == str(worker.root)
        assert "worker done" in worker.log.read_text()
    assert measured_once(out.trials_csv) == (SPACE, 0)
    reference = run_search("--out", str(tmp_path / "single"))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert front(out.pareto_csv) == front(tmp_path / "single" / "pareto.csv")
    assert out.schedule.is_file()


_POPPER = """
import sys
import optuna
from qsched_search.search.storage import open_storage
storage, _, _ = open_storage(sys.argv[1])
study = optuna.load_study(study_name="queue", storage=storage)
popped = []
while (trial_id := study._pop_waiting_trial_id()) is not None:
    popped.append(str(trial_id))
print(" ".join(popped))
"""


def test_a_queued_trial_on_sqlite_is_popped_by_one_process_only(tmp_path):
    """SQLite ignores Optuna's `SELECT ... FOR UPDATE`; the storage's transactions must make the pop atomic, or two
    workers run one enqueued schedule twice."""
    import subprocess
    import sys

    from qsched_search.search.storage import open_storage

    url = f"sqlite:///{tmp_path / 'queue.db'}"
    study = optuna.create_study(study_name="queue", storage=open_storage(url)[0])
    for x in range(60):
        study.enqueue_trial({"x": x})
    procs = [subprocess.Popen([sys.executable, "-c", _POPPER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    popped = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        popped += out.split()
    assert len(popped) == 60 and len(set(popped)) == 60, Counter(popped).most_common(3)
