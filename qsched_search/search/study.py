"""The study loop: a multi-objective Optuna study over per-step levels, where no schedule is measured twice."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from qsched_search._version import __version__
from qsched_search.errors import QschedError
from qsched_search.quant.costs import CostTable
from qsched_search.results.provenance import fingerprint as settings_fingerprint
from qsched_search.results.records import Measurement, finite_or_none
from qsched_search.results.tables import BUDGET_EPS, TRIALS_COLUMNS, schedule_key
from qsched_search.search.samplers import DEFAULT_TRIALS, HAS_SET_CONSTRAINT, SAMPLER_FACTORIES, resolve_sampler
from qsched_search.search.storage import HEARTBEAT_SECONDS, open_storage
from qsched_search.search.workers import StudyWorker, waiting_params

logger = logging.getLogger(__name__)

__all__ = ["SOURCES", "ScheduleSearch", "SearchOutcome", "TrialFailed", "failure_reason", "measurement_of"]

SOURCES = ("uniform", "probe-greedy", "probe-dp", "tpe", "nsga2", "exhaustive", "random", "cache")
# A sampler that proposes only already-evaluated schedules this many times in a row has converged: stop.
MAX_REPEATS = 60
_INTERRUPTED = "interrupted: the process stopped during this trial; it is queued again"


# ================================================================================================ the search


class TrialFailed(Exception):
    """A schedule whose evaluation failed (unusable images, NaN metric, an error); the trial is recorded as FAIL."""


def failure_reason(exc: BaseException) -> str:
    """A failed evaluation's reason for trials.csv: the exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def measurement_of(result) -> Measurement:
    """The `Measurement` an evaluate callable returned (an `Evaluation` carries one)."""
    return result if isinstance(result, Measurement) else result.measurement


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
            (`ScheduleEvaluator.evaluate`); returns an `Evaluation` or a `Measurement`.
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
        known (`Mapping[str, Measurement]`, *optional*): schedule key -> measurement made elsewhere with the same
            settings (the probe's cells); added to the study as cached trials.
    """

    def __init__(self, evaluate: Callable, *, choices: Sequence[str], reference: str, steps: int, metric: str,
                 higher_is_better: bool, costs: CostTable, cost_model: str = "bops", budget: float = 0.5,
                 storage: str | optuna.storages.BaseStorage | None = None, study_name: str | None = None,
                 sampler: str = "auto", trials: int | None = None, seed: int = 0, fingerprint: dict | None = None,
                 warm_start: Iterable[tuple[tuple[str, ...], str]] = (), known: Mapping[str, Measurement] | None = None,
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
        self.eval_fingerprint = settings_fingerprint({**(fingerprint or {}), "metric": metric, "steps": steps, "reference": reference})
        # The sampler and --trials are left out: a study may be resumed with more trials or another sampler.
        self.study_fingerprint = settings_fingerprint({"eval": self.eval_fingerprint, "choices": self.choices, "cost_model": cost_model,
                                               "costs": dict(self.level_costs), "budget": self.budget})
        self.study_name = study_name or f"qsched-{self.study_fingerprint}"
        self.storage, self.storage_description, self.single_worker = open_storage(storage, heartbeat=heartbeat)
        self.worker = StudyWorker(self.storage, isinstance(self.storage, optuna.storages.InMemoryStorage), self._usable)
        self.warm_start = list(warm_start)
        self.known = {k: m.to_dict() for k, m in (known or {}).items()}
        self.distributions = {f"step_{i}": CategoricalDistribution(self.choices) for i in range(steps)}
        self._cache: dict[str, dict] = {}
        self.new_evaluations = 0
        self._repeats = 0
        self._stopped_because = ""
        self._on_trial: Callable | None = None

    # ------------------------------------------------------------------------------------------- public

    def evaluated(self) -> dict[str, Measurement]:
        """Every schedule measured in this study and those it shares measurements with, by schedule key (after
        `run()`: this worker's, other workers' and the imported ones)."""
        return {key: Measurement.from_dict(record) for key, record in self._cache.items()}

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
        sampler = SAMPLER_FACTORIES[self.sampler_name](self.seed, self.trials, None if HAS_SET_CONSTRAINT else self._constraint)
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
        if HAS_SET_CONSTRAINT:
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
                reason = failure_reason(exc)
                trial.set_user_attr("fail_reason", reason)
                raise TrialFailed(reason) from exc
            record = measurement_of(evaluation).to_dict()
            record["seconds"] = round(time.perf_counter() - started, 3)
            estimate = record["estimates"].get(self.metric)
            if not record["fail_reason"] and (estimate is None or finite_or_none(estimate[0]) is None):
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
        if self.worker.alone():  # else the heartbeat finds the dead workers' trials (workers.StudyWorker)
            study_id = self.storage.get_study_id_from_name(self.study_name)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                self.storage.set_trial_user_attr(trial_id, "fail_reason", _INTERRUPTED)
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
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
            sibling = optuna.load_study(study_name=other.study_name, storage=self.storage)
            for t in sibling.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
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
            if not failed and finite_or_none(record["estimates"][self.metric][0]) is None:
                # As a measurement in this study would be: a NaN or infinite objective fails the trial.
                record = {**record, "fail_reason": f"metric {self.metric} is NaN or infinite"}
                failed = True
            attrs = {"schedule": key, "source": "cache", "origin": record.get("origin", "imported"), "evaluation": record,
                     "cost": cost, "feasible": bool(cost <= self.budget + BUDGET_EPS),
                     **{f"cost_{m}": v for m, v in costs.items()}}
            if failed:
                attrs["fail_reason"] = record["fail_reason"]
            kwargs = dict(state=TrialState.FAIL if failed else TrialState.COMPLETE,
                          values=None if failed else [float(record["estimates"][self.metric][0]), float(cost)],
                          params={f"step_{i}": lv for i, lv in enumerate(levels)}, distributions=self.distributions,
                          user_attrs=attrs)
            if HAS_SET_CONSTRAINT:
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
