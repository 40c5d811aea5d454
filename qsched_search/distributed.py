"""Shares one Optuna study between worker processes: heartbeats, a dead worker's trial retried, no schedule run twice.

Everything here is Optuna's own machinery (RDB storage, heartbeat, stale-trial failing, the retry callback); this
module only configures it and adds the one thing Optuna leaves to the objective: answering a schedule that another
worker is measuring, or has measured, from that worker's result instead of running it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import optuna
from optuna.trial import TrialState

from qsched_search.errors import QschedError

__all__ = ["GRACE_FACTOR", "HEARTBEAT_SECONDS", "MAX_RETRY", "ResumingBruteForceSampler", "StudyWorker", "check_heartbeat", "engine_kwargs",
           "heartbeat_kwargs", "last_line", "rdb_storage", "retry_callback", "run_workers", "waiting_params", "worker_argv", "worker_id"]

# Optuna's heartbeat: a worker writes one every HEARTBEAT_SECONDS while a trial runs; a RUNNING trial whose last
# heartbeat is older than GRACE_FACTOR times that belongs to a dead worker and is failed and queued again.
# Ten beats of slack: a GIL-holding pause (a compile, a long checkpoint load) must not look like a death.
HEARTBEAT_SECONDS = 60
GRACE_FACTOR = 10
# A schedule whose worker dies this many times in a row is left failed (it is probably what kills the worker).
MAX_RETRY = 3
# How often a worker waiting on another worker's identical schedule looks again.
POLL_SECONDS = 0.5


def worker_id() -> str:
    """`host:pid` of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine settings: SQLite waits for the writer's lock; a server drops dead pooled connections
    (`pool_pre_ping`) and keeps the pool small (one storage object per process, so N workers hold few connections)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}


def retry_callback(max_retry: int = MAX_RETRY):
    """Optuna's callback that queues a stale (dead worker's) trial again with the same parameters."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(max_retry=max_retry)


def check_heartbeat(heartbeat) -> None:
    """Raises a one-line `QschedError` unless `heartbeat` is a whole number of seconds >= 1."""
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
        raise QschedError(f"--heartbeat {heartbeat!r} is not a positive whole number of seconds; allowed: 1 or more, "
                          f"e.g. {HEARTBEAT_SECONDS} (a dead worker's trial is retried after {GRACE_FACTOR}x that)")


def heartbeat_kwargs(heartbeat: int = HEARTBEAT_SECONDS) -> dict:
    """`RDBStorage` keyword arguments for the heartbeat, the grace period and the retry of stale trials.

    Args:
        heartbeat (`int`, defaults to `HEARTBEAT_SECONDS`): seconds between heartbeats; a trial is stale after
            `GRACE_FACTOR` times that without one.
    """
    check_heartbeat(heartbeat)
    callback = retry_callback()
    name = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
            else "failed_trial_callback")
    return {"heartbeat_interval": heartbeat, "grace_period": heartbeat * GRACE_FACTOR, name: callback}


def _lock_path(storage: optuna.storages.BaseStorage) -> Path | None:
    url = str(getattr(storage, "url", ""))
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url[len("sqlite:///"):]).with_suffix(".workers.lock")


class StudyWorker:
    """One process's part in a shared study.

    On a local SQLite file the live workers hold a shared `flock` on `STUDY.workers.lock`; a worker that can take
    it exclusively is alone, so any trial still RUNNING was left by a killed process and is failed at once (no
    heartbeat wait). Elsewhere (a database server, workers on several machines) only the heartbeat decides.

    Args:
        storage (`BaseStorage`): the study's storage.
        single_process (`bool`): True for an in-memory storage (nobody else can see it).
        usable (`Callable[[dict], bool]`): whether a stored evaluation record answers this search's metric.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, single_process: bool, usable: Callable[[dict], bool]):
        self.storage = storage
        self.single_process = single_process
        self.usable = usable
        self.lock_path = _lock_path(storage)
        self.id = worker_id()

    def alone(self) -> bool:
        """True when no other live process works on this study (checked through the lock file); never True for a
        server storage, where other machines cannot be seen."""
        if self.single_process:
            return True
        if self.lock_path is None:
            return False
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """Holds the shared lock while this worker runs trials (the kernel drops it if the process is killed)."""
        if self.lock_path is None:
            yield
            return
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def answer(self, study: optuna.Study, trial: optuna.Trial, key: str) -> dict | None:
        """The stored evaluation of schedule `key` if a finished trial of any worker has one; waits while another
        RUNNING trial measures the same schedule. None: this trial should measure it.

        Two steps, so that no schedule is measured twice even when two workers start it at once: a trial records
        its `claim` on the schedule, and measures only if no RUNNING trial of the same claim is measuring or has a
        lower number; it then sets `measuring` and looks once more, backing off (and waiting) if a lower-numbered
        claimant appeared meanwhile. The lowest claimant never backs off, so one always measures; a claimant that
        dies is failed by Optuna's stale-trial check after the grace period, and a waiter takes over.
        """
        if self.single_process:
            return None
        trial.set_user_attr("claim", key)
        trial.set_user_attr("worker", self.id)
        while True:
            record, lower, measuring = self._others(study, trial, key)
            if record is not None:
                return record
            if not lower and not measuring:
                trial.set_user_attr("measuring", True)
                record, lower, _ = self._others(study, trial, key)
                if record is None and not lower:
                    return None
                trial.set_user_attr("measuring", False)
                if record is not None:
                    return record
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            time.sleep(POLL_SECONDS)

    def _others(self, study: optuna.Study, trial: optuna.Trial, key: str) -> tuple[dict | None, bool, bool]:
        """(a finished trial's usable evaluation of `key`, whether a lower-numbered RUNNING trial claims `key`,
        whether another RUNNING trial is measuring `key`)."""
        lower = measuring = False
        states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False, states=states):
            attrs = t.user_attrs
            if t.number == trial.number or (attrs.get("schedule") != key and attrs.get("claim") != key):
                continue
            record = attrs.get("evaluation")
            if t.state.is_finished() and record is not None and self.usable(record):
                return record, False, False
            if t.state == TrialState.RUNNING and attrs.get("claim") == key:
                lower = lower or t.number < trial.number
                measuring = measuring or bool(attrs.get("measuring"))
        return None, lower, measuring

    def evaluated(self, study: optuna.Study) -> dict[str, dict]:
        """Schedule key -> evaluation record of every finished trial in the study (all workers')."""
        out: dict[str, dict] = {}
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            record, key = t.user_attrs.get("evaluation"), t.user_attrs.get("schedule")
            if record is not None and key and self.usable(record):
                out.setdefault(key, record)
        return out


# ================================================================================================ --workers K


def worker_argv(params: dict, options: dict[str, str], overrides: dict) -> list[str]:
    """The command line of one worker: this command's options with `overrides` (name -> value) applied.

    Args:
        params (`dict`): the parsed parameters (name -> value), e.g. `click.Context.params`.
        options (`dict[str, str]`): parameter name -> its option string (`"budget"` -> `"--budget"`).
        overrides (`dict`): values that differ for the worker (`out`, `storage`, `images`...); None drops the option.
    """
    argv = []
    for name, value in {**params, **overrides}.items():
        if value is None or name not in options:
            continue
        if isinstance(value, bool):  # a flag: present or absent, never followed by a value
            argv += [options[name]] if value else []
            continue
        argv += [options[name], str(getattr(value, "value", value))]
    return argv


def run_workers(command: list[str], argvs: list[list[str]], logs: list[Path],
                on_poll: Callable[[list[int | None]], None] | None = None, poll: float = 1.0) -> list[int]:
    """Starts one process per argument list, each logging to its file, and waits for all of them.

    A Ctrl-C reaches the workers too (same process group); they stop cleanly and the interrupt is re-raised here
    once they have.

    Args:
        command (`list[str]`): the program, e.g. `[sys.executable, "-m", "qsched_search", "search"]`.
        argvs (`list[list[str]]`): one argument list per worker.
        logs (`list[Path]`): one log file per worker (stdout and stderr).
        on_poll (`Callable`, *optional*): called every `poll` seconds with each worker's exit code (None: running).

    Returns:
        `list[int]`: each worker's exit code (negative: killed by that signal).
    """
    import subprocess

    procs = []
    try:
        for argv, log in zip(argvs, logs):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as handle:
                procs.append(subprocess.Popen([*command, *argv], stdout=handle, stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs):
            if on_poll is not None:
                on_poll([p.poll() for p in procs])
            time.sleep(poll)
    except KeyboardInterrupt:
        for p in procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=60)
        raise
    return [p.returncode for p in procs]


def last_line(path: Path) -> str:
    """The last non-empty line of a worker's log (its one-line error, when it failed)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ================================================================================================ the exhaustive sampler


def waiting_params(trial) -> dict:
    """The parameters a WAITING trial will run with: its own (a retried trial) or those it was enqueued with."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


class ResumingBruteForceSampler(optuna.samplers.BruteForceSampler):
    """Optuna's brute force, except that it does not stop the study while trials are queued.

    Brute force counts a FAIL trial as done and stops once every combination has a finished trial; a trial cut off
    by a kill or Ctrl-C is FAIL too, and its schedule is queued again (by the resume, or Optuna's retry of a stale
    trial), so stopping then would leave that schedule unmeasured.
    """

    def after_trial(self, study, trial, state, values) -> None:
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        super().after_trial(study, trial, state, values)


def rdb_storage(url: str, attempts: int = 5, **kwargs) -> optuna.storages.RDBStorage:
    """`optuna.storages.RDBStorage(url, **kwargs)`, tried again when workers starting at once on a new database
    race to create its tables (the loser sees a unique-constraint error, and the tables made by the winner)."""
    import random

    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")
