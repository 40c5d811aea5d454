"""One process's part in a shared study, and local worker processes started from Python (`qsched search --workers`).

Optuna's own machinery (RDB storage, heartbeat, stale-trial failing, the retry callback) does the sharing; this
module adds what Optuna leaves to the objective: answering a schedule that another worker is measuring, or has
measured, from that worker's result instead of running it again. Importable without torch.
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

__all__ = ["StudyWorker", "last_line", "run_workers", "start_local_workers", "waiting_params", "worker_id"]

# How often a worker waiting on another worker's identical schedule looks again.
POLL_SECONDS = 0.5


def worker_id() -> str:
    """`host:pid` of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
        for t in study.get_trials(deepcopy=False, states=states):
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
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            record, key = t.user_attrs.get("evaluation"), t.user_attrs.get("schedule")
            if record is not None and key and self.usable(record):
                out.setdefault(key, record)
        return out


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


def waiting_params(trial) -> dict:
    """The parameters a WAITING trial will run with: its own (a retried trial) or those it was enqueued with."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


# ================================================================================================ local workers


def start_local_workers(run_settings, search_settings, results, workers: int,
                        on_poll: Callable[[int], None] | None = None,
                        on_status: Callable[[str], None] | None = None) -> str:
    """Runs `workers` local processes that measure schedules of one study, and waits for them.

    Each worker (`python -m qsched_search.search.worker SETTINGS.json`) writes its own files and log to
    `OUT/workers/N/` and no images; the caller then writes the results of the whole study to OUT with
    `run_search(..., trials=0)`. Startable from Python as from the CLI.

    Args:
        run_settings (`RunSettings`), search_settings (`SearchSettings`): what every worker runs.
        results (`ResultsDir`): the output folder.
        workers (`int`): how many processes.
        on_poll (`Callable[[int], None]`, *optional*): called every second with the number still running.
        on_status (`Callable[[str], None]`, *optional*): one-line messages (a failed worker's last line).

    Returns:
        `str`: the study's storage URL.
    """
    import dataclasses
    import json
    import sys

    from qsched_search.errors import QschedError
    from qsched_search.search.storage import open_storage, sqlite_url

    url = search_settings.storage or sqlite_url(results.study_db)
    open_storage(url)  # the tables are made once, here, and a bad URL fails here rather than in K workers
    probe = search_settings.probe or (str(results.probe_csv) if results.probe_csv.is_file() else None)
    folders = [results.worker(k) for k in range(workers)]
    argvs = []
    for folder in folders:
        folder.root.mkdir(parents=True, exist_ok=True)
        spec = folder.root / "settings.json"
        spec.write_text(json.dumps({
            "run": dataclasses.asdict(run_settings),
            "search": {**dataclasses.asdict(search_settings), "storage": url, "images": 0, "probe": probe},
            "out": str(folder.root)}, default=list))
        argvs.append([str(spec)])
    logs = [folder.log for folder in folders]
    codes = run_workers([sys.executable, "-m", "qsched_search.search.worker"], argvs, logs,
                        on_poll=None if on_poll is None else (lambda c: on_poll(sum(x is None for x in c))))
    failed = [(k, c) for k, c in enumerate(codes) if c != 0]
    for k, code in failed:
        if on_status is not None:
            on_status(f"worker {k} exited with code {code}: {last_line(logs[k]) or 'no output'} ({logs[k]})")
    if len(failed) == workers:
        reason = last_line(logs[failed[0][0]]).removeprefix("error:").strip()
        raise QschedError(f"all {workers} workers failed ({reason or f'exit code {failed[0][1]}'}); see "
                          f"{results.root / 'workers'}/*/log.txt")
    return url
