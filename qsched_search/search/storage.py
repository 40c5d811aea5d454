"""The study's storage: None (a SQLite file), a database URL or a storage object, with Optuna's heartbeat and retry.

Importable without torch, so processes that only touch the study start fast.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import optuna

from qsched_search.errors import QschedError

__all__ = ["GRACE_FACTOR", "HEARTBEAT_SECONDS", "MAX_RETRY", "check_heartbeat", "engine_kwargs", "heartbeat_kwargs",
           "open_storage", "rdb_storage", "redact", "retry_callback", "sqlite_url"]

# heartbeat is older than GRACE_FACTOR times that belongs to a dead worker and is failed and queued again.
# Ten beats of slack: a GIL-holding pause (a compile, a long checkpoint load) must not look like a death.
HEARTBEAT_SECONDS = 60
GRACE_FACTOR = 10
# A schedule whose worker dies this many times in a row is left failed (it is probably what kills the worker).
MAX_RETRY = 3


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


def redact(url: str) -> str:
    """A storage URL without its password, for manifests and messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def sqlite_url(path: str | Path) -> str:
    """`sqlite:///ABSOLUTE_PATH` for a study file; makes its folder."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(storage: str | optuna.storages.BaseStorage | None, default: str | Path | None = None,
                 heartbeat: int = HEARTBEAT_SECONDS) -> tuple[optuna.storages.BaseStorage, str, bool]:
    """Builds the study's storage from None (SQLite file `default`), a database URL, or a storage object.

    Database storages get Optuna's heartbeat (`heartbeat` seconds) and retry of a dead worker's trial, so that
    several processes can share the study (`qsched_search.distributed`).

    Returns:
        `(storage, description, single_worker)`: `single_worker` is True for SQLite and in-memory storages (one
        machine); whether another live process shares the study is `distributed.StudyWorker.alone()`'s question.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        single = isinstance(storage, optuna.storages.InMemoryStorage) or "sqlite" in str(getattr(storage, "url", ""))
        return storage, type(storage).__name__, single
    if storage is None:
        if default is None:
            return optuna.storages.InMemoryStorage(), "in-memory", True
        storage = sqlite_url(default)
    url = str(storage)
    single = url.startswith("sqlite")
    extra = heartbeat_kwargs(heartbeat)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            rdb = rdb_storage(url, engine_kwargs=engine_kwargs(url), **extra)
    except Exception as exc:  # SQLAlchemy raises ArgumentError, OperationalError, ModuleNotFoundError for drivers...
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise QschedError(f"--storage {redact(url)!r} could not be opened ({type(exc).__name__}: {reason}); pass a database "
                          "URL Optuna accepts, e.g. sqlite:///results/study.db or postgresql://user@host/db") from None
    if single:
        _fast_sqlite(rdb)
    return rdb, redact(url), single


def _fast_sqlite(rdb: optuna.storages.RDBStorage) -> None:
    """Write-ahead logging without an fsync per commit, and every transaction taking the write lock at its start.

    The fsync: Optuna commits ~20 times per trial, which costs ~0.3 s per trial with SQLite's defaults; a committed
    trial still survives the process being killed (not a power cut). The lock: Optuna pops a queued trial by reading
    it WAITING and then setting it RUNNING under `SELECT ... FOR UPDATE`, which SQLite ignores, so two processes
    could both pop the same trial and run it twice (optuna/optuna#4002). `BEGIN IMMEDIATE` (SQLAlchemy's recipe for
    pysqlite transactions) makes that read-then-write one step.
    """
    from sqlalchemy import event

    def on_connect(connection, _record):
        connection.isolation_level = None  # the driver's own implicit BEGIN off: on_begin below issues it
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    def on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(rdb.engine, "connect", on_connect)
    event.listen(rdb.engine, "begin", on_begin)
    rdb.engine.dispose()  # the connection made while creating the tables predates the listeners
