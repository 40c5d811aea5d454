"""Searches the per-step precision schedule with the best measured quality within a cost budget (an Optuna study)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from qsched_search._version import __version__
from qsched_search.distributed import (HEARTBEAT_SECONDS, ResumingBruteForceSampler, StudyWorker, check_heartbeat,
                                       engine_kwargs, heartbeat_kwargs, rdb_storage, waiting_params)
from qsched_search.errors import QschedError
from qsched_search.io import save_figure, write_csv
from qsched_search.paths import ResultsDir
from qsched_search.probe import PROBE_COLUMNS
from qsched_search.schedule import BUDGET_EPS, COST_MODELS, Quality, Schedule, cost_of, save_schedule

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TRIALS",
    "SAMPLERS",
    "SAMPLER_FACTORIES",
    "SOURCES",
    "TRIALS_COLUMNS",
    "AdditiveModel",
    "CostTable",
    "ScheduleSearch",
    "SearchOutcome",
    "SearchResult",
    "SearchSettings",
    "additive_front",
    "additive_model",
    "best_uniform_at_most",
    "choose_schedule",
    "dp_schedule",
    "greedy_schedule",
    "load_latency_profile",
    "open_search_session",
    "open_storage",
    "pareto_front",
    "plot_history",
    "plot_pareto",
    "resolve_sampler",
    "run_search",
    "schedule_key",
    "sqlite_url",
    "uniform_rows",
    "warm_start_schedules",
    "write_images",
]

SAMPLERS = ("auto", "tpe", "nsga2", "exhaustive", "random")
SOURCES = ("uniform", "probe-greedy", "probe-dp", "tpe", "nsga2", "exhaustive", "random", "cache")
TRIALS_COLUMNS = ["trial", "schedule", "source", "state", "fail_reason", "cost", "cost_bops", "cost_memory",
                  "cost_latency", "feasible", "metric", "value", "ci_low", "ci_high", "n"]
# New evaluations per run when --trials is not given (the exhaustive sampler evaluates the whole space instead).
# With the probe's 16 cells reused, 24 more make 40 of the default 256-schedule space (~15%), where results/bench
# shows >= 99% of the exhaustive front's hypervolume and the exact optimum at budget 0.5.
DEFAULT_TRIALS = 24
# Probe-DP warm-start points: the predicted optimum at the budget plus points spread over the predicted front.
DP_POINTS = 8
# Samples per schedule in the report's images.
IMAGE_SAMPLES = 8
# A sampler that proposes only already-evaluated schedules this many times in a row has converged: stop.
MAX_REPEATS = 60
_INTERRUPTED = "interrupted: the process stopped during this trial; it is queued again"
# Optuna >= 5 sets constraints on the trial and deprecates samplers' constraints_func; older versions need it.
_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


def schedule_key(levels: Sequence[str]) -> str:
    """The cache key of a schedule: its levels comma-joined (the `schedule` column of trials.csv)."""
    return ",".join(levels)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ================================================================================================ costs


@dataclass(frozen=True)
class CostTable:
    """Each level's cost relative to the reference level (which costs 1) under every cost model.

    Args:
        tables (`Mapping[str, Mapping[str, float] | None]`): cost model -> level -> relative cost; `latency` is
            None without a measured profile.
    """

    tables: Mapping[str, Mapping[str, float] | None]

    @classmethod
    def from_bank(cls, bank, latency: Mapping[str, float] | None = None) -> "CostTable":
        """`bops` and `memory` from `PrecisionBank.level_costs()`; `latency` from `load_latency_profile`."""
        per_level = bank.level_costs()
        return cls({
            "bops": {lv: c["bops"] for lv, c in per_level.items()},
            "memory": {lv: c["memory"] for lv, c in per_level.items()},
            "latency": dict(latency) if latency is not None else None,
        })

    def model(self, name: str) -> Mapping[str, float]:
        if name not in COST_MODELS:
            raise QschedError(f"--cost {name!r} is not a cost model; allowed: {', '.join(COST_MODELS)}")
        table = self.tables.get(name)
        if table is None:
            raise QschedError(f"--cost {name} needs a latency profile: pass --profile FILE, a CSV with columns level and "
                              "ms_per_step (measure one with `qsched profile` on the target GPU), or use --cost bops|memory")
        return table

    def cost(self, levels: Sequence[str], model: str) -> float:
        return cost_of(levels, self.model(model))

    def costs(self, levels: Sequence[str]) -> dict[str, float | None]:
        return {m: (None if self.tables.get(m) is None else cost_of(levels, self.tables[m])) for m in COST_MODELS}

    def to_dict(self) -> dict:
        return {m: (None if t is None else dict(t)) for m, t in self.tables.items()}


def load_latency_profile(path: str | Path, levels: Sequence[str], reference: str) -> dict[str, float]:
    """Reads a latency profile CSV (`level`, `ms_per_step`, more columns allowed) into costs relative to the reference.

    Several rows of one level are averaged. A level slower than the reference is allowed (it happens on real
    kernels, e.g. int4 without compile) but logged, since a search will then avoid it for a reason worth knowing.
    """
    path = Path(path)
    if not path.is_file():
        raise QschedError(f"--profile {str(path)!r} not found; pass a CSV with columns level, ms_per_step "
                          "(measure one with `qsched profile` on the target GPU)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QschedError(f"--profile {str(path)!r} is not a readable CSV ({type(exc).__name__}); "
                          "expected columns level, ms_per_step") from None
    absent = [c for c in ("level", "ms_per_step") if c not in frame.columns]
    if absent:
        raise QschedError(f"--profile {str(path)!r} lacks column(s) {', '.join(absent)} (it has {', '.join(map(str, frame.columns))}); "
                          "expected at least level, ms_per_step")
    ms = pd.to_numeric(frame["ms_per_step"], errors="coerce").groupby(frame["level"].astype(str)).mean()
    missing = [lv for lv in dict.fromkeys([reference, *levels]) if lv not in ms.index]
    if missing:
        raise QschedError(f"--profile {str(path)!r} has no row for level(s) {', '.join(missing)} (it has {', '.join(ms.index)}); "
                          "profile every level you search over, the reference included")
    bad = [lv for lv in dict.fromkeys([reference, *levels]) if not (ms[lv] > 0 and math.isfinite(ms[lv]))]
    if bad:
        raise QschedError(f"--profile {str(path)!r}: ms_per_step of {bad[0]!r} is {ms[bad[0]]!r}; allowed: a positive number")
    out = {lv: float(ms[lv] / ms[reference]) for lv in dict.fromkeys([reference, *levels])}
    slower = [lv for lv, c in out.items() if c > 1.0]
    if slower:
        logger.warning("latency profile %s: %s slower than the reference %s; the search will avoid them",
                       path, ", ".join(f"{lv} ({out[lv]:.2f}x)" for lv in slower), reference)
    return out


# ================================================================================================ warm start


@dataclass(frozen=True)
class AdditiveModel:
    """The probe's prediction: a schedule's harm is the sum over steps of the harm of that step alone at its level.

    Harm is the probe's `delta` turned so that larger is worse (`-delta` for a higher-is-better metric); the
    reference level's harm is 0 and a probe cell that failed (or is missing) has infinite harm.
    """

    harm: Mapping[tuple[int, str], float]
    steps: int
    levels: tuple[str, ...]  # every level the schedule may use, the reference first
    reference: str

    def step_harm(self, step: int, level: str) -> float:
        if level == self.reference:
            return 0.0
        return self.harm.get((step, level), math.inf)

    def predict(self, levels: Sequence[str]) -> float:
        return sum(self.step_harm(i, lv) for i, lv in enumerate(levels))


def additive_model(probe: pd.DataFrame, metric: str, higher_is_better: bool, steps: int, levels: Sequence[str],
                   reference: str) -> AdditiveModel | None:
    """Builds the additive prediction from a probe table (probe.csv); None when the table does not fit the search.

    Args:
        probe (`pd.DataFrame`): the probe table (columns of `qsched_search.probe.PROBE_COLUMNS`).
        metric (`str`): the search objective; the probe must have rows for it.
        higher_is_better (`bool`): the metric's direction.
        steps (`int`): the search's steps; the probe must cover the same steps.
        levels (`Sequence[str]`): the levels the search may use, the reference included.
        reference (`str`): the reference level.
    """
    absent = [c for c in ("kind", "step", "precision", "metric", "delta") if c not in probe.columns]
    if absent:
        logger.warning("probe table lacks column(s) %s; no probe warm start", ", ".join(absent))
        return None
    rows = probe[(probe["kind"] == "step") & (probe["metric"] == metric)]
    if rows.empty:
        logger.warning("probe table has no per-step rows for metric %r; no probe warm start (probe with --metrics %s)", metric, metric)
        return None
    probed_steps = sorted(int(s) for s in rows["step"].dropna().unique())
    if probed_steps != list(range(steps)):
        logger.warning("probe table covers steps %s but the search has %d steps; no probe warm start (re-run the probe with --steps %d)",
                       probed_steps, steps, steps)
        return None
    sign = -1.0 if higher_is_better else 1.0
    harm: dict[tuple[int, str], float] = {}
    for row in rows.itertuples(index=False):
        if row.precision not in levels or row.precision == reference:
            continue
        failed = "fail_reason" in rows.columns and isinstance(row.fail_reason, str) and bool(row.fail_reason)
        delta = float(row.delta) if row.delta is not None and not pd.isna(row.delta) else math.nan
        harm[(int(row.step), str(row.precision))] = math.inf if failed or math.isnan(delta) else sign * delta
    unprobed = [lv for lv in levels if lv != reference and not any(k[1] == lv for k in harm)]
    if unprobed:
        logger.warning("probe table has no rows for %s; the probe warm start avoids them", ", ".join(unprobed))
    return AdditiveModel(harm=harm, steps=steps, levels=tuple(dict.fromkeys([reference, *levels])), reference=reference)


@dataclass(frozen=True)
class Prediction:
    levels: tuple[str, ...]
    harm: float
    cost: float


def additive_front(model: AdditiveModel, level_costs: Mapping[str, float]) -> list[Prediction]:
    """The exact Pareto front of (predicted harm, cost) over all schedules, by dynamic programming over steps.

    Harm and cost are both sums over steps, so a prefix dominated by another prefix of the same length can only
    lead to dominated schedules: keeping the non-dominated prefixes after every step is exact (a multiple-choice
    knapsack solved for every budget at once). The states stay few: at most one per distinct prefix cost.

    Returns:
        `list[Prediction]`: non-dominated schedules sorted by cost (ascending), harm descending along the list.
    """
    states: list[tuple[float, float, tuple[str, ...]]] = [(0.0, 0.0, ())]
    for step in range(model.steps):
        grown = []
        for cost, harm, prefix in states:
            for level in model.levels:
                h = model.step_harm(step, level)
                if math.isfinite(h):
                    grown.append((cost + float(level_costs[level]), harm + h, prefix + (level,)))
        states = _pareto_states(grown)
    return [Prediction(levels, harm, cost / model.steps) for cost, harm, levels in states]


def _pareto_states(states: list[tuple[float, float, tuple[str, ...]]]) -> list[tuple[float, float, tuple[str, ...]]]:
    # Sort by cost, then harm; keep a state only if it is strictly less harmful than every cheaper one.
    states.sort(key=lambda s: (round(s[0], 12), s[1], s[2]))
    out, best = [], math.inf
    for state in states:
        if state[1] < best - 1e-15:
            out.append(state)
            best = state[1]
    return out


def dp_schedule(model: AdditiveModel, level_costs: Mapping[str, float], budget: float) -> tuple[str, ...] | None:
    """The schedule with the least predicted harm whose cost is within `budget` (ties: the cheaper); None if none."""
    feasible = [p for p in additive_front(model, level_costs) if p.cost <= budget + BUDGET_EPS]
    return min(feasible, key=lambda p: (p.harm, p.cost)).levels if feasible else None


def greedy_schedule(model: AdditiveModel, level_costs: Mapping[str, float], budget: float) -> tuple[str, ...] | None:
    """The probe-greedy schedule: from all-reference, lower the step whose harm per cost saved is least until
    within budget, then spend what is left of the budget on the upgrades that remove the most harm."""
    levels = [model.reference] * model.steps
    cost = lambda lv: cost_of(lv, level_costs)  # noqa: E731
    while cost(levels) > budget + BUDGET_EPS:
        moves = []
        for step, current in enumerate(levels):
            for level in model.levels:
                saved = float(level_costs[current]) - float(level_costs[level])
                added = model.step_harm(step, level) - model.step_harm(step, current)
                if saved > 0 and math.isfinite(added):
                    moves.append((added / saved, -saved, step, level))
        if not moves:
            return None
        _, _, step, level = min(moves)
        levels[step] = level
    while True:
        moves = []
        for step, current in enumerate(levels):
            for level in model.levels:
                gain = model.step_harm(step, current) - model.step_harm(step, level)
                trial = levels[:step] + [level] + levels[step + 1:]
                if gain > 0 and cost(trial) <= budget + BUDGET_EPS:
                    moves.append((-gain, step, level))
        if not moves:
            return tuple(levels)
        _, step, level = min(moves)
        levels[step] = level


def warm_start_schedules(levels: Sequence[str], reference: str, steps: int, level_costs: Mapping[str, float],
                         budget: float, model: AdditiveModel | None = None,
                         dp_points: int = DP_POINTS) -> list[tuple[tuple[str, ...], str]]:
    """The schedules a search starts from, each with its source, without duplicates.

    Uniform schedules (cheapest first, so that a feasible one is measured early), then from the probe: the
    exact additive optimum at the budget and `dp_points - 1` more points spread evenly over the predicted front
    within the budget ("probe-dp"), and the greedy schedule ("probe-greedy").
    """
    out: dict[tuple[str, ...], str] = {}
    for level in sorted(dict.fromkeys([reference, *levels]), key=lambda lv: (float(level_costs[lv]), lv)):
        out.setdefault((level,) * steps, "uniform")
    if model is not None:
        front = [p for p in additive_front(model, level_costs) if p.cost <= budget + BUDGET_EPS]
        if front:
            best = min(front, key=lambda p: (p.harm, p.cost))
            out.setdefault(best.levels, "probe-dp")
            picks = np.linspace(0, len(front) - 1, num=min(max(dp_points, 1), len(front))).round().astype(int)
            for i in sorted(set(picks.tolist()), reverse=True):
                if len([s for s in out.values() if s == "probe-dp"]) >= dp_points:
                    break
                out.setdefault(front[i].levels, "probe-dp")
        greedy = greedy_schedule(model, level_costs, budget)
        if greedy is not None:
            out.setdefault(greedy, "probe-greedy")
    return list(out.items())


# ================================================================================================ samplers


def _quiet(factory: Callable[..., optuna.samplers.BaseSampler]) -> Callable[..., optuna.samplers.BaseSampler]:
    def build(*args, **kwargs):
        with warnings.catch_warnings():
            # Brute force and multivariate TPE are "experimental" in Optuna; the warning says nothing to a user.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return factory(*args, **kwargs)

    return build


def _constraints_kwargs(constraints_func) -> dict:
    return {} if _HAS_SET_CONSTRAINT or constraints_func is None else {"constraints_func": constraints_func}


# name -> factory(seed, trials, constraints_func). The lookup table is the single source of truth for --sampler.
SAMPLER_FACTORIES: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    # Multivariate TPE models the steps jointly; warm-start trials count towards its startup, so it models early.
    "tpe": _quiet(lambda seed, trials, cf=None: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=10, **_constraints_kwargs(cf))),
    # A population of 50 (the default) would spend a whole short run on its random first generation.
    "nsga2": _quiet(lambda seed, trials, cf=None: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=int(min(50, max(8, trials // 4))), **_constraints_kwargs(cf))),
    "random": _quiet(lambda seed, trials, cf=None: optuna.samplers.RandomSampler(seed=seed)),
    # avoid_premature_stop: a schedule RUNNING on a worker that died is not "done"; the others wait and take it over.
    "exhaustive": _quiet(lambda seed, trials, cf=None: ResumingBruteForceSampler(seed=seed, avoid_premature_stop=True)),
}


def resolve_sampler(name: str, space_size: int, trials: int | None) -> str:
    """The sampler `--sampler` names; `auto` is `exhaustive` when the new evaluations allowed cover the whole space
    (then nothing beats measuring everything), else `tpe` (see results/bench for the comparison)."""
    if name not in SAMPLERS:
        raise QschedError(f"--sampler {name!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    if name != "auto":
        return name
    return "exhaustive" if space_size <= (trials if trials is not None else DEFAULT_TRIALS) else "tpe"


# ================================================================================================ storage


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


# ================================================================================================ the search


class TrialFailed(Exception):
    """A schedule whose evaluation failed (unusable images, NaN metric, an error); the trial is recorded as FAIL."""


def evaluation_record(evaluation) -> dict:
    """What the cache keeps of an `Evaluation`: JSON-able, stored in the trial's user attributes."""
    return {
        "estimates": {name: [_num(e.value), _num(e.ci_low), _num(e.ci_high), int(e.n)] for name, e in evaluation.estimates.items()},
        "timesteps": [int(t) for t in (evaluation.timesteps or [])],
        "unhealthy_images": int(getattr(evaluation, "unhealthy_images", 0) or 0),
        "fail_reason": evaluation.fail_reason,
    }


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass
class SearchOutcome:
    """What `ScheduleSearch.run` leaves: the study, its trials as a table, and what this run did."""

    study: optuna.Study
    trials: pd.DataFrame
    sampler: str
    new_evaluations: int
    stopped_because: str


class ScheduleSearch:
    """A multi-objective Optuna study over per-step levels: (quality, cost), with the budget as a constraint.

    Every evaluated schedule is cached by its levels in the trial's user attributes, so a schedule proposed again
    (in this run, after a restart, or in another study with the same evaluation settings in the same storage) is
    never run again; it is recorded as a trial with source "cache".

    Args:
        evaluate (`Callable[[tuple[str, ...]], Evaluation]`): runs and scores a schedule
            (`ScheduleEvaluator.evaluate`); returns an object with `estimates`, `fail_reason`, `timesteps`.
        choices (`Sequence[str]`): the levels a step may take, the reference included.
        reference (`str`): the reference level.
        steps (`int`): denoising steps.
        metric (`str`): the objective metric (a key of `Evaluation.estimates`).
        higher_is_better (`bool`): the metric's direction (maximised or minimised).
        costs (`CostTable`): level costs under every cost model.
        cost_model (`str`, defaults to `"bops"`): the cost the budget is in.
        budget (`float`, defaults to 0.5): a fraction in (0, 1] of the all-reference cost.
        storage (`str`, `BaseStorage` or None): a database URL, a storage object, or None for in-memory.
        study_name (`str`, *optional*): defaults to one derived from `fingerprint`.
        sampler (`str`, defaults to `"auto"`): one of `SAMPLERS`.
        trials (`int`, *optional*): new evaluations per `run()`; defaults to the whole space for `exhaustive`,
            else `DEFAULT_TRIALS`.
        seed (`int`, defaults to 0): the sampler's seed.
        fingerprint (`dict`, *optional*): everything that decides an evaluation's numbers (model hash, eval set,
            metric...). Studies in the same storage with the same fingerprint share their cache.
        warm_start (`Iterable[tuple[tuple[str, ...], str]]`, *optional*): (levels, source) enqueued first.
        known (`Mapping[str, dict]`, *optional*): schedule key -> evaluation record measured elsewhere with the
            same settings (the probe's cells); added to the study as cached trials.
    """

    def __init__(self, evaluate: Callable, *, choices: Sequence[str], reference: str, steps: int, metric: str,
                 higher_is_better: bool, costs: CostTable, cost_model: str = "bops", budget: float = 0.5,
                 storage: str | optuna.storages.BaseStorage | None = None, study_name: str | None = None,
                 sampler: str = "auto", trials: int | None = None, seed: int = 0, fingerprint: dict | None = None,
                 warm_start: Iterable[tuple[tuple[str, ...], str]] = (), known: Mapping[str, dict] | None = None,
                 heartbeat: int = HEARTBEAT_SECONDS):
        if not 0 < budget <= 1:
            raise QschedError(f"--budget {budget:g} is outside (0, 1]; allowed: a fraction of the all-reference cost, e.g. 0.5")
        if trials is not None and trials < 0:
            raise QschedError(f"--trials {trials} is negative; allowed: 0 or more new evaluations")
        self.evaluate = evaluate
        self.choices = tuple(dict.fromkeys([reference, *choices]))
        self.reference, self.steps, self.metric, self.higher_is_better = reference, steps, metric, higher_is_better
        self.costs, self.cost_model, self.budget = costs, cost_model, float(budget)
        self.level_costs = costs.model(cost_model)
        missing = [lv for lv in self.choices if lv not in self.level_costs]
        if missing:
            raise QschedError(f"level(s) {', '.join(missing)} have no {cost_model} cost; costs are known for {', '.join(self.level_costs)}")
        cheapest = min(float(self.level_costs[lv]) for lv in self.choices)
        if cheapest > self.budget + BUDGET_EPS:
            raise QschedError(f"--budget {budget:g} is below the cheapest schedule's {cost_model} cost {cheapest:.4g} "
                              f"(every step at {min(self.choices, key=lambda lv: self.level_costs[lv])}); "
                              f"raise --budget to at least {math.ceil(cheapest * 1000) / 1000:g} or add a cheaper level")
        self.space_size = len(self.choices) ** steps
        self.sampler_name = resolve_sampler(sampler, self.space_size, trials)
        self.trials = trials if trials is not None else (self.space_size if self.sampler_name == "exhaustive" else DEFAULT_TRIALS)
        self.seed = seed
        self.eval_fingerprint = _fingerprint({**(fingerprint or {}), "metric": metric, "steps": steps, "reference": reference})
        # The sampler and --trials are left out: a study may be resumed with more trials or another sampler.
        self.study_fingerprint = _fingerprint({"eval": self.eval_fingerprint, "choices": self.choices, "cost_model": cost_model,
                                               "costs": dict(self.level_costs), "budget": self.budget})
        self.study_name = study_name or f"qsched-{self.study_fingerprint}"
        self.storage, self.storage_description, self.single_worker = open_storage(storage, heartbeat=heartbeat)
        self.worker = StudyWorker(self.storage, isinstance(self.storage, optuna.storages.InMemoryStorage), self._usable)
        self.warm_start = list(warm_start)
        self.known = dict(known or {})
        self.distributions = {f"step_{i}": CategoricalDistribution(self.choices) for i in range(steps)}
        self._cache: dict[str, dict] = {}
        self.new_evaluations = 0
        self._repeats = 0
        self._stopped_because = ""
        self._on_trial: Callable | None = None

    # ------------------------------------------------------------------------------------------- public

    def run(self, on_trial: Callable[[dict, "ScheduleSearch"], None] | None = None) -> SearchOutcome:
        """Resumes or starts the study and evaluates up to `trials` new schedules.

        Args:
            on_trial (`Callable`, *optional*): called after every trial with its trials.csv row and the search
                (for progress bars: `search.new_evaluations` of `search.trials`).
        """
        self._on_trial = on_trial
        study = self.open_study()
        self._recover(study)
        self._load_cache(study)
        self._import_known(study)
        self._enqueue_warm_start(study)
        self.new_evaluations, self._repeats = 0, 0
        self._stopped_because = "no new evaluations asked (--trials 0)"
        if self.trials > 0 and not self._space_done():
            self._stopped_because = ""
            with warnings.catch_warnings(), self.worker.alive():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", FutureWarning)
                study.optimize(self._objective, n_trials=self.trials * 20 + len(self.warm_start) + 100,
                               catch=(TrialFailed,), callbacks=[self._after_trial], gc_after_trial=False)
            self._cache.update(self.worker.evaluated(study))  # other workers' results, for the pick and the tables
            if not self._stopped_because:
                self._stopped_because = "the sampler stopped (every schedule was proposed)"
        elif self._space_done():
            self._stopped_because = f"all {self.space_size} schedules are already evaluated"
        return SearchOutcome(study, self.trials_frame(study), self.sampler_name, self.new_evaluations, self._stopped_because)

    def open_study(self) -> optuna.Study:
        sampler = SAMPLER_FACTORIES[self.sampler_name](self.seed, self.trials, None if _HAS_SET_CONSTRAINT else self._constraint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(storage=self.storage, study_name=self.study_name, sampler=sampler,
                                        directions=["maximize" if self.higher_is_better else "minimize", "minimize"],
                                        load_if_exists=True)
        found = study.user_attrs.get("fingerprint")
        if found is None:
            study.set_user_attr("fingerprint", self.study_fingerprint)
            study.set_user_attr("eval_fingerprint", self.eval_fingerprint)
            study.set_user_attr("settings", {"metric": self.metric, "higher_is_better": self.higher_is_better,
                                             "choices": list(self.choices), "steps": self.steps, "cost_model": self.cost_model,
                                             "budget": self.budget, "tool_version": __version__})
        elif found != self.study_fingerprint:
            made = study.user_attrs.get("settings", {})
            raise QschedError(f"--study {self.study_name!r} in {self.storage_description} was made with other settings "
                              f"({', '.join(f'{k}={v}' for k, v in made.items() if k != 'tool_version')}); pass another --study "
                              "name, or leave --study out to get one derived from the settings")
        return study

    # ------------------------------------------------------------------------------------------- the objective

    def _objective(self, trial: optuna.Trial) -> tuple[float, float]:
        levels = tuple(trial.suggest_categorical(name, self.choices) for name in self.distributions)
        key = schedule_key(levels)
        costs = self.costs.costs(levels)
        cost = costs[self.cost_model]
        proposed_by = trial.user_attrs.get("source") or self.sampler_name
        trial.set_user_attr("schedule", key)
        for model, value in costs.items():
            trial.set_user_attr(f"cost_{model}", value)
        trial.set_user_attr("cost", cost)
        trial.set_user_attr("feasible", bool(cost <= self.budget + BUDGET_EPS))
        if _HAS_SET_CONSTRAINT:
            trial.set_constraint("budget", cost - self.budget)
        record = self._cache.get(key)
        if record is None:  # measured, or being measured, by another worker sharing the study?
            record = self.worker.answer(study=trial.study, trial=trial, key=key)
            if record is not None:
                self._cache[key] = record
        if record is not None:
            self._repeats += 1
            trial.set_user_attr("source", "cache")
            trial.set_user_attr("proposed_by", proposed_by)
            trial.set_user_attr("origin", record.get("origin", ""))
        else:
            self._repeats = 0
            trial.set_user_attr("source", proposed_by)
            self.new_evaluations += 1
            started = time.perf_counter()
            try:
                evaluation = self.evaluate(levels)
            except (QschedError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # a kernel or numeric error of one schedule must not end the search
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                trial.set_user_attr("fail_reason", reason)
                raise TrialFailed(reason) from exc
            record = evaluation_record(evaluation)
            record["seconds"] = round(time.perf_counter() - started, 3)
            estimate = record["estimates"].get(self.metric)
            if not record["fail_reason"] and (estimate is None or estimate[0] is None):
                record["fail_reason"] = f"metric {self.metric} is {'missing' if estimate is None else 'NaN or infinite'}"
            record["origin"] = f"{self.study_name} trial {trial.number}"
            self._cache[key] = record
        trial.set_user_attr("evaluation", record)
        if record["fail_reason"]:
            trial.set_user_attr("fail_reason", record["fail_reason"])
            raise TrialFailed(record["fail_reason"])
        return float(record["estimates"][self.metric][0]), float(cost)

    def _constraint(self, trial: FrozenTrial) -> tuple[float]:
        """The budget as a constraint (<= 0 is feasible), for Optuna versions without `Trial.set_constraint`."""
        return (float(trial.user_attrs.get("cost", math.inf)) - self.budget,)

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.worker.single_process:
            self._cache.update(self.worker.evaluated(study))
        if self._on_trial is not None:
            self._on_trial(self._row(trial), self)
        if self.new_evaluations >= self.trials:
            self._stopped_because = f"{self.new_evaluations} new evaluations done (--trials {self.trials})"
        elif self._space_done() and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            # A queued trial (a dead worker's, retried) is answered from the cache at once; stopping before it
            # would leave it queued in the study.
            self._stopped_because = f"all {self.space_size} schedules are evaluated"
        elif self._repeats >= MAX_REPEATS:
            self._stopped_because = (f"the sampler proposed only evaluated schedules {MAX_REPEATS} times in a row "
                                     "(converged); raise --trials with another --sampler to explore further")
        if self._stopped_because:
            study.stop()

    def _space_done(self) -> bool:
        return len(self._cache) >= self.space_size

    # ------------------------------------------------------------------------------------------- resume and cache

    def _recover(self, study: optuna.Study) -> None:
        """Fails trials a killed run left RUNNING (when no other worker is live) and queues them, and any trial that
        crashed before it was evaluated, again."""
        storage = study._storage
        if self.worker.alone():  # else the heartbeat finds the dead workers' trials (distributed.StudyWorker)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                storage.set_trial_user_attr(t._trial_id, "fail_reason", _INTERRUPTED)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        # The latest trial of each schedule decides: a schedule whose latest trial failed before it was evaluated
        # (killed, crashed) runs once more; one that was retried already has a later trial.
        latest: dict[str, FrozenTrial] = {}
        for t in study.get_trials(deepcopy=False):
            if len(t.params) == self.steps:
                latest[self._key_of_params(t.params)] = t
        waiting = {self._key_of_params(waiting_params(t)) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        for key, t in latest.items():
            if t.state == TrialState.FAIL and "evaluation" not in t.user_attrs and key not in waiting:
                source = t.user_attrs.get("proposed_by") or t.user_attrs.get("source") or self.sampler_name
                study.enqueue_trial(dict(t.params), user_attrs={"source": source})

    def _load_cache(self, study: optuna.Study) -> None:
        """Every evaluated schedule of this study, and of sibling studies in the same storage with the same
        evaluation fingerprint (another budget, cost model or sampler), by schedule key."""
        self._cache = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            record = t.user_attrs.get("evaluation")
            if record is not None and self._usable(record):
                self._cache.setdefault(t.user_attrs["schedule"], record)
        self._siblings: dict[str, dict] = {}
        for other in self.storage.get_all_studies():
            if other.study_name == self.study_name or other.user_attrs.get("eval_fingerprint") != self.eval_fingerprint:
                continue
            for t in self.storage.get_all_trials(other._study_id, deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
                record = t.user_attrs.get("evaluation")
                key = t.user_attrs.get("schedule")
                if record is not None and key and self._usable(record) and len(key.split(",")) == self.steps:
                    self._siblings.setdefault(key, record)

    def _usable(self, record: dict) -> bool:
        return bool(record.get("fail_reason")) or self.metric in record.get("estimates", {})

    def _import_known(self, study: optuna.Study) -> None:
        """Adds schedules measured elsewhere (sibling studies, the probe) to the study as cached trials, so the
        sampler learns from them at no cost."""
        added = []
        for key, record in [*self._siblings.items(), *self.known.items()]:
            levels = tuple(key.split(","))
            if key in self._cache or len(levels) != self.steps or not set(levels) <= set(self.choices):
                continue
            if not self._usable(record):
                continue
            costs = self.costs.costs(levels)
            cost = costs[self.cost_model]
            failed = bool(record.get("fail_reason"))
            attrs = {"schedule": key, "source": "cache", "origin": record.get("origin", "imported"), "evaluation": record,
                     "cost": cost, "feasible": bool(cost <= self.budget + BUDGET_EPS),
                     **{f"cost_{m}": v for m, v in costs.items()}}
            if failed:
                attrs["fail_reason"] = record["fail_reason"]
            kwargs = dict(state=TrialState.FAIL if failed else TrialState.COMPLETE,
                          values=None if failed else [float(record["estimates"][self.metric][0]), float(cost)],
                          params={f"step_{i}": lv for i, lv in enumerate(levels)}, distributions=self.distributions,
                          user_attrs=attrs)
            if _HAS_SET_CONSTRAINT:
                kwargs["constraints"] = {"budget": cost - self.budget}
            else:
                kwargs["system_attrs"] = {"constraints": (cost - self.budget,)}
            added.append(create_trial(**kwargs))
            self._cache[key] = record
        if added:
            study.add_trials(added)

    def _enqueue_warm_start(self, study: optuna.Study) -> None:
        waiting = {self._key_of_params(waiting_params(t)) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        for levels, source in self.warm_start:
            key = schedule_key(levels)
            if key in self._cache or key in waiting or len(levels) != self.steps:
                continue
            study.enqueue_trial({f"step_{i}": lv for i, lv in enumerate(levels)}, user_attrs={"source": source})
            waiting.add(key)

    def _key_of_params(self, params: Mapping[str, str]) -> str:
        return schedule_key([params.get(f"step_{i}", "?") for i in range(self.steps)])

    # ------------------------------------------------------------------------------------------- tables

    def _row(self, t: FrozenTrial) -> dict:
        a = t.user_attrs
        record = a.get("evaluation") or {}
        estimate = (record.get("estimates") or {}).get(self.metric) if t.state == TrialState.COMPLETE else None
        value, lo, hi, n = estimate if estimate else (None, None, None, None)
        latency = a.get("cost_latency")
        return {
            "trial": t.number,
            "schedule": a.get("schedule") or self._key_of_params(t.params),
            "source": a.get("source", ""),
            "state": t.state.name,
            "fail_reason": a.get("fail_reason") or "",
            "cost": a.get("cost"),
            "cost_bops": a.get("cost_bops"),
            "cost_memory": a.get("cost_memory"),
            "cost_latency": "" if latency is None else latency,
            "feasible": bool(a.get("feasible", False)),
            "metric": self.metric,
            "value": value,
            "ci_low": lo,
            "ci_high": hi,
            "n": n,
        }

    def trials_frame(self, study: optuna.Study) -> pd.DataFrame:
        """trials.csv: every finished trial (COMPLETE or FAIL), in trial order."""
        rows = [self._row(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))]
        frame = pd.DataFrame(rows, columns=TRIALS_COLUMNS)
        frame["n"] = frame["n"].astype("Int64")
        return frame


# ================================================================================================ the front and the pick


def _completed(trials: pd.DataFrame) -> pd.DataFrame:
    done = trials[trials["state"] == "COMPLETE"].copy()
    done["value"] = pd.to_numeric(done["value"], errors="coerce")
    done["cost"] = pd.to_numeric(done["cost"], errors="coerce")
    # A schedule measured twice (a cache hit) is one point: its first trial stands for it.
    return done.dropna(subset=["value", "cost"]).drop_duplicates("schedule", keep="first")


def pareto_front(trials: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """pareto.csv: the completed schedules no other completed schedule beats on both cost and quality.

    Computed here over all completed trials, not taken from `study.best_trials`, which mixes in the constraint
    and is empty when nothing is feasible.
    """
    done = _completed(trials)
    ordered = done.sort_values(["cost", "value", "trial"], ascending=[True, not higher_is_better, True])
    keep, best = [], None
    for idx, row in ordered.iterrows():
        if best is None or (row["value"] > best if higher_is_better else row["value"] < best):
            keep.append(idx)
            best = row["value"]
    front = ordered.loc[keep].copy()
    front["on_front"] = True
    return front.reset_index(drop=True)


def choose_schedule(trials: pd.DataFrame, budget: float, higher_is_better: bool) -> pd.Series | None:
    """The completed schedule with the best quality whose cost is within budget (ties: the cheaper, then the
    earlier trial); None if no schedule within budget completed."""
    done = _completed(trials)
    feasible = done[done["cost"] <= budget + BUDGET_EPS]
    if feasible.empty:
        return None
    ordered = feasible.sort_values(["value", "cost", "trial"], ascending=[not higher_is_better, True, True])
    return ordered.iloc[0]


def uniform_rows(trials: pd.DataFrame, steps: int) -> pd.DataFrame:
    """Completed uniform schedules (every step at one level), with a `level` column, cheapest first."""
    done = _completed(trials)
    parts = done["schedule"].str.split(",")
    uniform = done[parts.map(lambda p: len(p) == steps and len(set(p)) == 1)].copy()
    uniform["level"] = uniform["schedule"].str.split(",").str[0]
    return uniform.sort_values(["cost", "trial"])


def best_uniform_at_most(trials: pd.DataFrame, steps: int, cost: float, higher_is_better: bool) -> pd.Series | None:
    """The best uniform schedule costing at most `cost`."""
    uniform = uniform_rows(trials, steps)
    uniform = uniform[uniform["cost"] <= cost + BUDGET_EPS]
    if uniform.empty:
        return None
    return uniform.sort_values(["value", "cost"], ascending=[not higher_is_better, True]).iloc[0]


# ================================================================================================ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(trials: pd.DataFrame, front: pd.DataFrame, chosen: pd.Series | None, budget: float, cost_model: str,
                metric: str, higher_is_better: bool, steps: int, path: str | Path, title: str = "") -> None:
    """pareto.png: every completed schedule, the Pareto front with its CIs, uniform schedules, the budget line
    and the chosen schedule."""
    plt = _pyplot()
    done = _completed(trials)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    feasible = done["cost"] <= budget + BUDGET_EPS
    ax.scatter(done.loc[feasible, "cost"], done.loc[feasible, "value"], s=14, color="#7a9cc6", alpha=0.7,
               label="evaluated, within budget", zorder=2)
    ax.scatter(done.loc[~feasible, "cost"], done.loc[~feasible, "value"], s=14, color="#bbbbbb", alpha=0.8,
               label="evaluated, over budget", zorder=2)
    if not front.empty:
        f = front.sort_values("cost")
        lo = pd.to_numeric(f["ci_low"], errors="coerce")
        hi = pd.to_numeric(f["ci_high"], errors="coerce")
        yerr = np.vstack([(f["value"] - lo).clip(lower=0).fillna(0), (hi - f["value"]).clip(lower=0).fillna(0)])
        ax.errorbar(f["cost"], f["value"], yerr=yerr, fmt="none", ecolor="#1f3b73", alpha=0.5, capsize=2, zorder=3)
        ax.step(f["cost"], f["value"], where="post", color="#1f3b73", linewidth=1.4, label="Pareto front (95% CI)", zorder=3)
        ax.scatter(f["cost"], f["value"], s=22, color="#1f3b73", zorder=4)
    uniform = uniform_rows(trials, steps)
    if not uniform.empty:
        ax.scatter(uniform["cost"], uniform["value"], marker="D", s=46, facecolor="white", edgecolor="#d95f02",
                   linewidth=1.6, label="uniform schedules", zorder=5)
        for _, row in uniform.iterrows():
            ax.annotate(f"all {row['level']}", (row["cost"], row["value"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8, color="#d95f02")
    ax.axvline(budget, color="#c0392b", linestyle="--", linewidth=1.2, label=f"budget {budget:g}")
    if chosen is not None:
        ax.scatter([chosen["cost"]], [chosen["value"]], marker="*", s=220, color="#2ca02c", edgecolor="black",
                   linewidth=0.6, label="chosen schedule", zorder=6)
    costs = done["cost"][done["cost"] > 0]
    if len(costs) and costs.max() / costs.min() > 20:
        ax.set_xscale("log")  # quantized levels cost a few percent of the reference: a log axis separates them
    ax.set_xlabel(f"cost ({cost_model}, fraction of all-reference)")
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"Schedules found: {metric} vs {cost_model} cost", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(path, fig, dpi=130)
    plt.close(fig)


def plot_history(trials: pd.DataFrame, budget: float, metric: str, higher_is_better: bool, path: str | Path,
                 title: str = "") -> None:
    """history.png: each trial's quality in order, and the best quality within budget so far."""
    plt = _pyplot()
    frame = trials.copy()
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["cost"] = pd.to_numeric(frame["cost"], errors="coerce")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    done = frame[frame["state"] == "COMPLETE"]
    feasible = done["cost"] <= budget + BUDGET_EPS
    cached = done["source"] == "cache"
    ax.scatter(done.loc[feasible & ~cached, "trial"], done.loc[feasible & ~cached, "value"], s=14, color="#1f77b4",
               label="within budget")
    ax.scatter(done.loc[~feasible & ~cached, "trial"], done.loc[~feasible & ~cached, "value"], s=14, color="#bbbbbb",
               label="over budget")
    if cached.any():
        ax.scatter(done.loc[cached, "trial"], done.loc[cached, "value"], s=10, marker="x", color="#999999",
                   label="cached (not re-run)")
    failed = frame[frame["state"] == "FAIL"]
    if not failed.empty and done["value"].notna().any():
        top = done["value"].max() if not higher_is_better else done["value"].min()
        ax.scatter(failed["trial"], [top] * len(failed), marker="v", color="#d62728", s=24, label="failed")
    best, curve = None, []
    for _, row in frame.iterrows():
        if row["state"] == "COMPLETE" and row["cost"] <= budget + BUDGET_EPS and not math.isnan(row["value"]):
            if best is None or (row["value"] > best if higher_is_better else row["value"] < best):
                best = row["value"]
        curve.append(np.nan if best is None else best)
    ax.step(frame["trial"], curve, where="post", color="#2ca02c", linewidth=1.8, label="best within budget")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or "Search history", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(path, fig, dpi=130)
    plt.close(fig)


# ================================================================================================ the stage


@dataclass(frozen=True)
class SearchSettings:
    """What `qsched search` adds to the shared `RunSettings`.

    Args:
        budget (`float`, defaults to 0.5): a fraction in (0, 1] of the all-reference cost.
        cost_model (`str`, defaults to `"bops"`): `bops`, `memory` or `latency` (needs `profile`).
        objective (`str`, *optional*): the metric to optimise; the family's first metric if None.
        trials (`int`, *optional*): new evaluations this run; see `ScheduleSearch`.
        sampler (`str`, defaults to `"auto"`): one of `SAMPLERS`.
        storage (`str`, *optional*): an Optuna database URL; `sqlite:///OUT/study.db` if None.
        study (`str`, *optional*): the study name; derived from the settings if None.
        profile (`str`, *optional*): a latency profile CSV (`level`, `ms_per_step`).
        probe (`str`, *optional*): the probe table to warm-start from; `OUT/probe.csv` if None.
        images (`int`, defaults to 8): samples per schedule written to `OUT/images/` (0: none).
        heartbeat (`int`, defaults to 60): seconds between the heartbeats of a running trial in a database storage;
            a trial silent for ten of them belongs to a dead worker and is queued again.
    """

    budget: float = 0.5
    cost_model: str = "bops"
    objective: str | None = None
    trials: int | None = None
    sampler: str = "auto"
    storage: str | None = None
    study: str | None = None
    profile: str | None = None
    probe: str | None = None
    images: int = IMAGE_SAMPLES
    heartbeat: int = HEARTBEAT_SECONDS

    def __post_init__(self):
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise QschedError(f"--budget {self.budget!r} is outside (0, 1]; allowed: a fraction of the all-reference cost "
                              "greater than 0 and at most 1, e.g. 0.5")
        if self.cost_model not in COST_MODELS:
            raise QschedError(f"--cost {self.cost_model!r} is not a cost model; allowed: {', '.join(COST_MODELS)}")
        if self.cost_model == "latency" and not self.profile:
            raise QschedError("--cost latency needs a latency profile: pass --profile FILE, a CSV with columns level and "
                              "ms_per_step (measure one with `qsched profile` on the target GPU), or use --cost bops|memory")
        if self.sampler not in SAMPLERS:
            raise QschedError(f"--sampler {self.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        if self.trials is not None and self.trials < 0:
            raise QschedError(f"--trials {self.trials} is negative; allowed: 0 or more new evaluations")
        if self.images < 0:
            raise QschedError(f"--images {self.images} is negative; allowed: 0 (none) or more samples per schedule")
        check_heartbeat(self.heartbeat)


@dataclass
class SearchResult:
    """What `run_search` produced; every file is already written."""

    schedule: Schedule
    trials: pd.DataFrame
    front: pd.DataFrame
    chosen: pd.Series
    best_uniform: pd.Series | None
    cheapest_uniform: pd.Series | None
    reference_row: pd.Series | None
    sampler: str
    study_name: str
    storage: str
    new_evaluations: int
    stopped_because: str
    warm_start: list
    files: list[Path] = field(default_factory=list)


# Settings that decide an evaluation's numbers; a probe made with the same ones measured the same schedules.
_EVAL_KEYS = ("model_id", "weights_sha256", "steps", "samples", "seed", "prompts_sha256", "reference", "dtype",
              "device", "batch_size", "call_kwargs", "exclude")


def _eval_settings(described: Mapping[str, Any], metric, levels: Sequence[str]) -> dict:
    return {**{k: described.get(k) for k in _EVAL_KEYS}, "metric": metric.name,
            "metric_preprocessing": getattr(metric, "preprocessing", ""),
            "levels": {lv: described.get("levels", {}).get(lv) for lv in levels}}


def _probe_records(probe: pd.DataFrame, probe_stage: Mapping | None, described: Mapping, metric: str, steps: int,
                   reference: str, levels: Sequence[str]) -> tuple[dict[str, dict], str]:
    """The probe's cells as cached evaluations, when the probe measured with the same settings; else ({}, why not)."""
    if not probe_stage:
        return {}, "no manifest.json with a probe stage beside the probe table"
    for key in _EVAL_KEYS:
        if key in ("exclude",) and key not in probe_stage:
            continue
        theirs, ours = probe_stage.get(key), described.get(key)
        if key == "device":  # manifests write "cpu (x86_64, 2 threads)"; the setting is "cpu"
            theirs, ours = str(theirs).split(" (")[0], str(ours).split(" (")[0]
        if theirs != ours:
            return {}, f"the probe ran with {key}={theirs!r}, the search with {ours!r}"
    for lv in levels:
        theirs = (probe_stage.get("levels") or {}).get(lv)
        if theirs is not None and theirs != described.get("levels", {}).get(lv):
            return {}, f"level {lv} was defined differently when probing"
    rows = probe[probe["metric"] == metric]
    records: dict[str, dict] = {}
    for row in rows.itertuples(index=False):
        if row.kind == "reference":
            levels_ = (reference,) * steps
        elif row.kind == "uniform":
            levels_ = (row.precision,) * steps
        elif row.kind == "step" and not pd.isna(row.step):
            levels_ = tuple(row.precision if i == int(row.step) else reference for i in range(steps))
        else:
            continue
        if row.precision not in levels and row.kind != "reference":
            continue
        failed = isinstance(row.fail_reason, str) and row.fail_reason
        records[schedule_key(levels_)] = {
            "estimates": {} if failed else {metric: [_num(row.value), _num(row.ci_low), _num(row.ci_high), int(row.n)]},
            "timesteps": [],
            "unhealthy_images": int(row.unhealthy_images) if not pd.isna(row.unhealthy_images) else 0,
            "fail_reason": row.fail_reason if failed else None,
            "origin": "probe",
        }
    return records, ""


def _read_probe(path: Path) -> tuple[pd.DataFrame | None, dict | None]:
    if not path.is_file():
        return None, None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QschedError(f"probe table {str(path)!r} is not a readable CSV ({type(exc).__name__}); re-run `qsched probe`") from None
    absent = [c for c in PROBE_COLUMNS if c not in frame.columns]
    if absent:
        raise QschedError(f"probe table {str(path)!r} lacks column(s) {', '.join(absent)}; re-run `qsched probe` with this version")
    manifest_path = path.parent / "manifest.json"
    stage = None
    if manifest_path.is_file():
        try:
            stage = json.loads(manifest_path.read_text()).get("stages", {}).get("probe")
        except (json.JSONDecodeError, AttributeError):
            stage = None
    return frame, stage


def open_search_session(settings, objective: str | None = None):
    """Opens a session whose metrics are the objective (the family's first metric if None) and `settings.metrics`.

    Only the metrics asked for are built, so a search does not pay for the family's slower default metrics.

    Args:
        settings (`RunSettings`): the shared settings; `metrics` are extra metrics measured for every schedule.
        objective (`str`, *optional*): the metric to optimise.

    Returns:
        `Session`: close it with `session.close()`.
    """
    from qsched_search.metrics import build_metrics
    from qsched_search.session import open_session

    session = open_session(replace(settings, metrics=()), metrics=False)
    try:
        extra = list(settings.metrics)
        objective = objective or (extra[0] if extra else session.model.family.metrics[0])
        names = list(dict.fromkeys([objective, *extra]))
        session.evaluator.metrics = build_metrics(names, device=settings.device, weights_dir=settings.weights_dir)
    except BaseException:
        session.close()
        raise
    session.metric_names = names
    session.settings = replace(settings, metrics=tuple(names))
    return session


def run_search(session, settings: SearchSettings, results: ResultsDir,
               on_trial: Callable[[dict, ScheduleSearch], None] | None = None,
               on_status: Callable[[str], None] | None = None) -> SearchResult:
    """Runs `qsched search`: the study, then schedule.json, trials.csv, pareto.csv, the plots, images and manifest.

    Args:
        session (`Session`): from `qsched_search.session.open_session`, with the objective among its metrics.
        settings (`SearchSettings`): budget, cost model, sampler, storage...
        results (`ResultsDir`): the output folder.
        on_trial (`Callable`, *optional*): called after each trial (progress bars).
        on_status (`Callable[[str], None]`, *optional*): called with one-line status messages.

    Returns:
        `SearchResult`: the chosen schedule and the tables.
    """
    from qsched_search.provenance import command_line, device_name, now, update_manifest, versions

    status = on_status or (lambda msg: logger.info(msg))
    started = time.time()
    evaluator, bank = session.evaluator, session.bank
    metrics = {m.name: m for m in evaluator.metrics}
    objective = settings.objective or session.metric_names[0]
    if objective not in metrics:
        raise QschedError(f"--objective {objective!r} is not among the session's metrics ({', '.join(metrics) or 'none'}); "
                          "open the session with it in RunSettings.metrics")
    metric = metrics[objective]
    reference, steps = bank.reference, session.runner.steps
    choices = tuple(dict.fromkeys([reference, *session.settings.precisions]))
    timesteps = evaluator.timesteps  # runs the all-reference schedule once: the baseline and the cost footprint
    latency = load_latency_profile(settings.profile, choices, reference) if settings.profile else None
    costs = CostTable.from_bank(bank, latency)
    level_costs = costs.model(settings.cost_model)

    described = session.describe()
    probe_path = Path(settings.probe) if settings.probe else results.probe_csv
    probe, probe_stage = _read_probe(probe_path)
    model = known = None
    if probe is None:
        status(f"no probe table at {probe_path}: warm start from uniform schedules only (run `qsched probe --out {results.root}` first)")
    else:
        model = additive_model(probe, objective, metric.higher_is_better, steps, choices, reference)
        known, why_not = _probe_records(probe, probe_stage, described, objective, steps, reference, choices)
        if why_not:
            status(f"probe cells not reused as measurements ({why_not}); they still guide the warm start")
            if probe_stage and probe_stage.get("prompts_sha256") != described.get("prompts_sha256"):
                logger.warning("the probe used other prompts or seeds than this search; its deltas may mislead the warm start")
    warm = warm_start_schedules(choices, reference, steps, level_costs, settings.budget, model)

    search = ScheduleSearch(
        evaluator.evaluate, choices=choices, reference=reference, steps=steps, metric=objective,
        higher_is_better=metric.higher_is_better, costs=costs, cost_model=settings.cost_model, budget=settings.budget,
        storage=settings.storage or sqlite_url(results.study_db), study_name=settings.study, sampler=settings.sampler,
        trials=settings.trials, seed=session.settings.seed, fingerprint=_eval_settings(described, metric, choices),
        warm_start=warm, known=known, heartbeat=settings.heartbeat,
    )
    status(f"study {search.study_name} in {search.storage_description}: sampler {search.sampler_name}, "
           f"{search.space_size} schedules, up to {search.trials} new evaluations")
    outcome = search.run(on_trial=on_trial)
    trials = outcome.trials
    front = pareto_front(trials, metric.higher_is_better)
    write_csv(results.trials_csv, trials)
    write_csv(results.pareto_csv, front)
    chosen = choose_schedule(trials, settings.budget, metric.higher_is_better)
    uniform = uniform_rows(trials, steps)
    title = f"{session.model.model_id}, {steps} steps, budget {settings.budget:g} ({settings.cost_model})"
    plot_pareto(trials, front, chosen, settings.budget, settings.cost_model, objective, metric.higher_is_better, steps,
                results.pareto_png, title=title)
    plot_history(trials, settings.budget, objective, metric.higher_is_better, results.history_png, title=title)
    if chosen is None:
        failed = trials[(trials["state"] == "FAIL") & trials["feasible"].astype(bool)]
        reasons = "; ".join(sorted(set(failed["fail_reason"].astype(str))))[:200]
        raise QschedError(f"no schedule within --budget {settings.budget:g} completed ({len(failed)} within budget failed"
                          f"{': ' + reasons if reasons else ''}); raise --trials or --budget, or check the failures in {results.trials_csv}")

    levels = tuple(chosen["schedule"].split(","))
    record = search._cache.get(chosen["schedule"], {})
    est = record["estimates"][objective]
    schedule = Schedule(
        levels=levels, steps=steps, timesteps=tuple(int(t) for t in timesteps), reference=reference,
        model_id=session.model.model_id, weights_sha256=described["weights_sha256"], budget=float(settings.budget),
        cost_model=settings.cost_model, cost=costs.costs(levels),
        quality=Quality(objective, float(est[0]), est[1], est[2], int(est[3]), bool(metric.higher_is_better)),
        provenance={"tool_version": __version__, "seed": int(session.settings.seed),
                    "prompts_sha256": described["prompts_sha256"], "command": command_line(), "created": now(),
                    "versions": versions(), "device": device_name(session.settings.device)},
        extras={
            "menu": {"levels": {lv: described["levels"][lv] for lv in choices if lv in described.get("levels", {})},
                     "layer_types": list(session.menu.layer_types), "extra_exclude": list(session.menu.extra_exclude)},
            "exclude": list(described.get("exclude", [])),
            "search": {"sampler": outcome.sampler, "study": search.study_name, "trials": int(len(trials)),
                       "evaluated_schedules": int(len(search._cache)), "space_size": int(search.space_size),
                       "samples": int(session.settings.samples), "prompts": sorted(set(session.eval_set.prompts))},
        },
    )
    save_schedule(schedule, results.schedule)
    best_uniform = best_uniform_at_most(trials, steps, float(chosen["cost"]), metric.higher_is_better)
    cheapest_uniform = uniform.iloc[0] if not uniform.empty else None
    ref_rows = uniform[uniform["level"] == reference]
    reference_row = ref_rows.iloc[0] if not ref_rows.empty else None
    files = [results.schedule, results.trials_csv, results.pareto_csv, results.pareto_png, results.history_png]
    if settings.images > 0:
        status(f"writing images of {settings.images} samples to {results.images_dir}")
        labelled = [("reference", (reference,) * steps), ("schedule", levels)]
        if best_uniform is not None:
            labelled.append(("best_uniform", tuple(best_uniform["schedule"].split(","))))
        if cheapest_uniform is not None:
            labelled.append(("cheapest_uniform", tuple(cheapest_uniform["schedule"].split(","))))
        write_images(session, labelled, results, settings.images, metrics.get("lpips"))
        files.append(results.images_index)
    update_manifest(results.manifest, "search", {
        **described, "model": session.model.model_id, "device": device_name(session.settings.device),
        "timesteps": [int(t) for t in timesteps], "objective": objective, "higher_is_better": bool(metric.higher_is_better),
        "budget": settings.budget, "cost_model": settings.cost_model, "level_costs": costs.to_dict(),
        "latency_profile": settings.profile, "sampler": outcome.sampler, "study": search.study_name,
        "storage": search.storage_description, "space_size": search.space_size, "new_evaluations": outcome.new_evaluations,
        "trials": int(len(trials)), "stopped_because": outcome.stopped_because,
        "warm_start": [{"schedule": schedule_key(lv), "source": src} for lv, src in warm],
        "probe": str(probe_path) if probe is not None else None, "probe_cells_reused": len(known or {}),
        "schedule": list(levels), "quality": schedule.quality.to_dict(), "cost": schedule.cost,
        "seconds": round(time.time() - started, 1),
    })
    files.append(results.manifest)
    return SearchResult(schedule=schedule, trials=trials, front=front, chosen=chosen, best_uniform=best_uniform,
                        cheapest_uniform=cheapest_uniform, reference_row=reference_row, sampler=outcome.sampler,
                        study_name=search.study_name, storage=search.storage_description,
                        new_evaluations=outcome.new_evaluations, stopped_because=outcome.stopped_because, warm_start=warm,
                        files=files)


def write_images(session, labelled: Sequence[tuple[str, tuple[str, ...]]], results: ResultsDir, samples: int,
                 lpips_metric=None) -> pd.DataFrame:
    """Runs each labelled schedule on the first `samples` samples and writes PNGs and `images/index.csv`.

    Args:
        session (`Session`): the search's session (same model, bank, prompts and seeds).
        labelled (`Sequence[tuple[str, tuple[str, ...]]]`): (label, levels): reference, schedule, best_uniform,
            cheapest_uniform.
        results (`ResultsDir`): where `images/` goes.
        samples (`int`): how many of the evaluation set's first samples.
        lpips_metric (*optional*): a metric with `per_image(images, reference)`; the `lpips` column is empty without.
    """
    from qsched_search.images import save_png
    from qsched_search.rollout import EvalSet, Runner

    eval_set = session.eval_set
    n = min(samples, len(eval_set))
    subset = EvalSet(eval_set.prompts[:n], eval_set.seeds[:n])
    runner = Runner(session.model, session.bank, session.runner.steps, subset, session.runner.batch_size,
                    session.runner.call_kwargs)
    reference_levels = (session.bank.reference,) * session.runner.steps
    runs: dict[tuple[str, ...], Any] = {}
    for _, levels in [("reference", reference_levels), *labelled]:
        if levels not in runs:
            runs[levels] = runner.run(levels).images
    reference = runs[reference_levels]
    if lpips_metric is None:
        try:
            from qsched_search.metrics import build_metrics

            lpips_metric = build_metrics(["lpips"], device=session.settings.device, weights_dir=session.settings.weights_dir)[0]
        except Exception as exc:  # missing weights: the images are still worth writing
            logger.warning("no per-image lpips in images/index.csv (%s)", str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            lpips_metric = None
    rows = []
    for label, levels in labelled:
        images = runs[levels]
        per_image = [None] * n
        if lpips_metric is not None and hasattr(lpips_metric, "per_image"):
            per_image = [float(v) for v in lpips_metric.per_image(images, reference)]
        for k in range(n):
            file = f"{label}/{k:02d}.png"
            save_png(images[k], results.images_dir / file)
            rows.append({"label": label, "schedule": schedule_key(levels), "sample": k, "prompt": subset.prompts[k],
                         "seed": subset.seeds[k], "file": file, "lpips": per_image[k]})
    frame = pd.DataFrame(rows, columns=["label", "schedule", "sample", "prompt", "seed", "file", "lpips"])
    write_csv(results.images_index, frame)
    return frame
