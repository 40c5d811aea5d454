"""The samplers `--sampler` names, one factory each, and the brute force that waits for queued trials."""

from __future__ import annotations

import warnings
from typing import Callable

import optuna
from optuna.trial import TrialState

from qsched_search.errors import QschedError

__all__ = ["DEFAULT_TRIALS", "SAMPLERS", "SAMPLER_FACTORIES", "ResumingBruteForceSampler", "resolve_sampler"]

SAMPLERS = ("auto", "tpe", "nsga2", "exhaustive", "random")
# New evaluations per run when --trials is not given (the exhaustive sampler evaluates the whole space instead).
# With the probe's 16 cells reused, 24 more make 40 of the default 256-schedule space (~15%), where results/bench
# shows >= 99% of the exhaustive front's hypervolume and the exact optimum at budget 0.5.
DEFAULT_TRIALS = 24
# Optuna >= 5 sets constraints on the trial and deprecates samplers' constraints_func; older versions need it.
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


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


def _quiet(factory: Callable[..., optuna.samplers.BaseSampler]) -> Callable[..., optuna.samplers.BaseSampler]:
    def build(*args, **kwargs):
        with warnings.catch_warnings():
            # Brute force and multivariate TPE are "experimental" in Optuna; the warning says nothing to a user.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return factory(*args, **kwargs)

    return build


def _constraints_kwargs(constraints_func) -> dict:
    return {} if HAS_SET_CONSTRAINT or constraints_func is None else {"constraints_func": constraints_func}


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
