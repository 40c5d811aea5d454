"""Learns Q-Sched coefficients for a quantized schedule: an Optuna study over (m, s) or per-step factors on calibration samples."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd

from qsched_search._version import __version__
from qsched_search.errors import QschedError
from qsched_search.eval.health import health_failure
from qsched_search.pipeline.coefficients import apply_coefficients
from qsched_search.pipeline.rollout import EvalSet, RolloutResult, Runner
from qsched_search.results.coefficients import Coefficients
from qsched_search.search.objectives import (LOSSES, OBJECTIVES, ClipJaq, JudgeJaq, Objective, ReferenceLpips,  # noqa: F401
                                             build_objective, register_objective)

__all__ = [
    "CALIBRATION_SEED_OFFSET",
    "DEFAULT_RANGE",
    "LOSSES",
    "OBJECTIVES",
    "PARAMS",
    "SAMPLERS",
    "CalibrationResult",
    "CalibrationSettings",
    "ClipJaq",
    "JudgeJaq",
    "Objective",
    "ReferenceLpips",
    "build_objective",
    "calibration_set",
    "calibrate",
    "coefficients_from_params",
    "evaluations_to_reach",
    "register_objective",
    "schedule_with_coefficients",
]

logger = logging.getLogger(__name__)

# Calibration sample k uses seed + CALIBRATION_SEED_OFFSET + k; evaluation sample k uses seed + k (make_eval_set),
# so the two never share a seed for fewer than a million evaluation samples.
CALIBRATION_SEED_OFFSET = 10**6
DEFAULT_RANGE = (0.8, 1.2)  # the published search range of m and s
PARAMS = ("ramp", "per-step")
SAMPLERS = ("tpe", "grid", "random")


# ================================================================================================ settings


@dataclass(frozen=True)
class CalibrationSettings:
    """How coefficients are learned. Everything here decides the result.

    Args:
        loss (`str`, defaults to `"jaq"`): `jaq` (reference-free) or `reference` (LPIPS to full precision).
        param (`str`, defaults to `"ramp"`): `ramp` (the published two scalars m, s) or `per-step` (2 x steps values).
        trials (`int`, defaults to 40): sampler evaluations, after the identity baseline (which is always measured).
        sampler (`str`, defaults to `"tpe"`): `tpe` (Optuna TPE, multivariate), `random`, or `grid` (the published
            search: `grid_points` values per axis over the range; ramp only; `trials` is then the grid's size).
        low (`float`), high (`float`): the range of every factor; defaults to the published [0.8, 1.2].
        grid_points (`int`, defaults to 10): values per axis for `grid`.
        k (`float`, *optional*): the JAQ quality weight; 1 for the judge, 2 (the paper's) for CLIP if None.
        prompts (`tuple[str]`): the calibration prompts, cycled over the samples (required by `calibrate`).
        samples (`int`, defaults to 200): calibration samples per trial.
        seed (`int`, defaults to 0): calibration sample j uses seed + CALIBRATION_SEED_OFFSET + j; the sampler's seed.
        clip_model (`str`, *optional*): a local CLIP folder, for `jaq` on families other than the embedded one.
    """

    loss: str = "jaq"
    param: str = "ramp"
    trials: int = 40
    sampler: str = "tpe"
    low: float = DEFAULT_RANGE[0]
    high: float = DEFAULT_RANGE[1]
    grid_points: int = 10
    k: float | None = None
    prompts: tuple[str, ...] = ()
    samples: int = 200
    seed: int = 0
    clip_model: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.loss not in LOSSES:
            raise QschedError(f"--loss {self.loss!r} is unknown; allowed: {', '.join(LOSSES)}")
        if self.param not in PARAMS:
            raise QschedError(f"--param {self.param!r} is unknown; allowed: {', '.join(PARAMS)}")
        if self.sampler not in SAMPLERS:
            raise QschedError(f"--sampler {self.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        if self.sampler == "grid" and self.param != "ramp":
            raise QschedError("--sampler grid searches the published two-scalar ramp only; use --param ramp, or "
                              "--sampler tpe for per-step values")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 0:
            raise QschedError(f"--trials {self.trials!r} is invalid; allowed: 0 or more evaluations")
        if not (0 < self.low < self.high) or not math.isfinite(self.high):
            raise QschedError(f"--range {self.low:g},{self.high:g} is invalid; allowed: 0 < low < high, e.g. 0.8,1.2")
        if self.grid_points < 2:
            raise QschedError(f"--grid-points {self.grid_points} is too few; allowed: 2 or more values per axis")
        if self.samples < 2:
            raise QschedError(f"--calib-samples {self.samples} is too few; allowed: 2 or more calibration samples")
        if self.k is not None and not (math.isfinite(self.k) and self.k >= 0):
            raise QschedError(f"--k {self.k!r} is invalid; allowed: a number >= 0 (the weight of the quality term)")

    @property
    def evaluations(self) -> int:
        """Calibration runs this asks for, the identity baseline included."""
        return 1 + (self.grid_points**2 if self.sampler == "grid" else self.trials)


def calibration_set(prompts: Sequence[str], samples: int, seed: int) -> EvalSet:
    """`samples` calibration samples cycling through `prompts`; sample j seeded with seed + CALIBRATION_SEED_OFFSET + j."""
    if not prompts:
        raise QschedError("no calibration prompts given")
    base = seed + CALIBRATION_SEED_OFFSET
    return EvalSet(tuple(prompts[j % len(prompts)] for j in range(samples)), tuple(base + j for j in range(samples)))


def coefficients_from_params(params: Mapping[str, float], param: str, steps: int) -> Coefficients:
    """Optuna parameters -> coefficients: `m`, `s` for a ramp; `m_i`, `s_i` (i < steps) for per-step values."""
    if param == "ramp":
        return Coefficients.from_ramp(params["m"], params["s"], steps)
    return Coefficients.per_step([params[f"m_{i}"] for i in range(steps)], [params[f"s_{i}"] for i in range(steps)])


# ================================================================================================ the study


@dataclass
class CalibrationResult:
    """What `calibrate` found. `coefficients` is the identity when no trial beat it on the calibration objective."""

    coefficients: Coefficients
    best: dict  # the objective's parts at the chosen coefficients
    baseline: dict  # the objective's parts at the identity (the stock sampler)
    trials: pd.DataFrame
    evaluations: int
    seconds: float
    settings: CalibrationSettings
    objective: dict
    levels: tuple[str, ...]
    timesteps: list[int]

    @property
    def gain(self) -> float:
        """Objective value gained over the identity on the calibration samples (>= 0 by construction)."""
        return float(self.best["value"] - self.baseline["value"])


class _TrialFailed(Exception):
    pass


def calibrate(runner: Runner, levels: Sequence[str], settings: CalibrationSettings, objective: Objective, *,
              reference_levels: Sequence[str] | None = None, eval_seeds: Sequence[int] = (),
              on_trial: Callable[[dict], None] | None = None) -> CalibrationResult:
    """Learns coefficients for `levels` (one per step) on calibration samples.

    Every trial runs the same calibration prompts and seeds (common random numbers), so trials differ only by their
    coefficients. The identity is measured first, outside the sampler's budget, and kept if nothing beats it.

    Args:
        runner (`Runner`): the model, its bank and steps; a runner over the calibration samples is made from it
            (the runner itself and its evaluation set are left as they are).
        levels (`Sequence[str]`): the precision schedule, one level per step.
        settings (`CalibrationSettings`): loss, parametrisation, sampler, trials, prompts, seeds.
        objective (`Objective`): from `build_objective`.
        reference_levels (`Sequence[str]`, *optional*): the full-precision schedule, for objectives that need it;
            all steps at the bank's reference if None.
        eval_seeds (`Sequence[int]`): seeds the results will be evaluated on; a calibration seed among them is an error.
        on_trial (`Callable[[dict], None]`, *optional*): called with each trials.csv row (progress bars).

    Returns:
        `CalibrationResult`.
    """
    started = time.perf_counter()
    if not settings.prompts:
        raise QschedError("no calibration prompts; pass --prompts (the calibration prompt pool) and --calib-prompts K")
    levels = tuple(levels)
    steps = runner.steps
    if len(levels) != steps:
        raise QschedError(f"schedule has {len(levels)} levels for {steps} steps; give one level per step")
    calib = calibration_set(settings.prompts, settings.samples, settings.seed)
    shared = sorted(set(calib.seeds) & set(eval_seeds))
    if shared:
        raise QschedError(f"calibration seeds {shared[:3]}... are also evaluation seeds; calibration sample j uses "
                          f"seed + {CALIBRATION_SEED_OFFSET} + j: evaluate with fewer than {CALIBRATION_SEED_OFFSET} "
                          "samples or another --seed")
    crunner = Runner(runner.model, runner.bank, steps, calib, runner.batch_size, runner.call_kwargs)
    reference = None
    if objective.needs_reference:
        ref_levels = tuple(reference_levels or (runner.bank.reference,) * steps)
        reference = crunner.run(ref_levels)
        if any(p is not None for p in reference.problems):
            raise QschedError("the full-precision calibration run made unusable images; check the model and prompts")

    timesteps: list[int] = []

    def evaluate(coeffs: Coefficients) -> dict:
        with apply_coefficients(runner.model.pipe, coeffs):
            result = crunner.run(levels)
        timesteps[:] = result.timesteps
        return _score(objective, result, calib, reference)

    rows: list[dict] = []
    baseline = evaluate(Coefficients.identity(steps))
    if baseline.get("fail_reason"):
        raise QschedError(f"the quantized schedule {','.join(levels)} without coefficients already fails on the "
                          f"calibration samples ({baseline['fail_reason']}); coefficients cannot be calibrated from it")
    best_value = baseline["value"]
    identity_params = ({"m": 1.0, "s": 1.0} if settings.param == "ramp"
                       else {**{f"m_{i}": 1.0 for i in range(steps)}, **{f"s_{i}": 1.0 for i in range(steps)}})
    rows.append(_row(0, "identity", identity_params, baseline, best_value))
    if on_trial:
        on_trial(rows[-1])

    def objective_fn(trial: optuna.Trial) -> float:
        nonlocal best_value
        params = _suggest(trial, settings, steps)
        t0 = time.perf_counter()
        try:
            parts = evaluate(coefficients_from_params(params, settings.param, steps))
        except QschedError:
            raise
        except Exception as exc:  # a numeric error of one setting must not end the study
            parts = {"value": math.nan, "fail_reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        parts["seconds"] = round(time.perf_counter() - t0, 3)
        if not parts.get("fail_reason"):
            best_value = max(best_value, parts["value"])
        rows.append(_row(len(rows), settings.sampler, params, parts, best_value))
        if on_trial:
            on_trial(rows[-1])
        if parts.get("fail_reason"):
            raise _TrialFailed(parts["fail_reason"])
        return parts["value"]

    n_trials = settings.grid_points**2 if settings.sampler == "grid" else settings.trials
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would bury the progress bar
    try:
        if n_trials:
            _run_study(objective_fn, settings, steps, n_trials, identity_params, baseline["value"])
    finally:
        optuna.logging.set_verbosity(verbosity)
    trials = pd.DataFrame(rows)
    ok = trials[trials.fail_reason.isna()] if "fail_reason" in trials else trials
    best_row = ok.loc[ok.value.idxmax()]
    if best_row.source == "identity":
        chosen = Coefficients.identity(steps)
    else:
        chosen = coefficients_from_params({k: best_row[k] for k in identity_params}, settings.param, steps)
    best = {k: _plain(best_row[k]) for k in best_row.index if k in baseline or k == "value"}
    result_objective = objective.describe()
    calibration = {
        "loss": settings.loss,
        "objective": result_objective,
        "param": settings.param,
        "sampler": settings.sampler,
        "trials": int(len(trials) - 1),
        "evaluations": int(len(trials)),
        "range": [settings.low, settings.high],
        "grid_points": settings.grid_points if settings.sampler == "grid" else None,
        "levels": list(levels),
        "prompts": sorted(set(calib.prompts)),
        "samples": len(calib),
        "seeds": {"first": calib.seeds[0], "last": calib.seeds[-1], "rule": f"seed + {CALIBRATION_SEED_OFFSET} + j"},
        "calibration_sha256": calib.sha256(),
        "value": float(best["value"]),
        "identity_value": float(baseline["value"]),
        "full_precision_inference": objective.needs_reference,
        "tool_version": __version__,
    }
    return CalibrationResult(coefficients=chosen.with_calibration(calibration), best=best,
                             baseline={k: _plain(v) for k, v in baseline.items()}, trials=trials,
                             evaluations=int(len(trials)), seconds=time.perf_counter() - started,
                             settings=settings, objective=result_objective, levels=levels, timesteps=list(timesteps))


def _run_study(objective_fn, settings: CalibrationSettings, steps: int, n_trials: int, identity_params: dict,
               identity_value: float) -> None:
    study = optuna.create_study(direction="maximize", sampler=_sampler(settings, steps))
    if settings.sampler == "tpe" and settings.low <= 1.0 <= settings.high:
        # The identity is already measured: tell TPE, so that its model starts from the stock sampler.
        dist = optuna.distributions.FloatDistribution(settings.low, settings.high)
        study.add_trial(optuna.trial.create_trial(params=identity_params, value=identity_value,
                                                  distributions={k: dist for k in identity_params}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective_fn, n_trials=n_trials, catch=(_TrialFailed,), gc_after_trial=False)


def _score(objective: Objective, result: RolloutResult, calib: EvalSet, reference: RolloutResult | None) -> dict:
    healthy = result.healthy
    bad = int((~healthy).sum())
    failure = health_failure(result.problems)
    if failure is not None:
        return {"value": math.nan, "unhealthy": bad, "fail_reason": failure}
    prompts = [p for p, ok in zip(calib.prompts, healthy.tolist()) if ok]
    parts = objective.score(result.images[healthy], prompts, None if reference is None else reference.images[healthy])
    if not math.isfinite(parts["value"]):
        return {**parts, "value": math.nan, "unhealthy": bad, "fail_reason": "objective is NaN or infinite"}
    return {**parts, "unhealthy": bad}


def _suggest(trial: optuna.Trial, settings: CalibrationSettings, steps: int) -> dict[str, float]:
    lo, hi = settings.low, settings.high
    if settings.param == "ramp":
        return {"m": trial.suggest_float("m", lo, hi), "s": trial.suggest_float("s", lo, hi)}
    out = {f"m_{i}": trial.suggest_float(f"m_{i}", lo, hi) for i in range(steps)}
    out.update({f"s_{i}": trial.suggest_float(f"s_{i}", lo, hi) for i in range(steps)})
    return out


def _sampler(settings: CalibrationSettings, steps: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if settings.sampler == "grid":
            axis = [float(v) for v in np.linspace(settings.low, settings.high, settings.grid_points)]
            return optuna.samplers.GridSampler({"m": axis, "s": axis}, seed=settings.seed)
        if settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=settings.seed)
        # A handful of random points first, then TPE over the joint space (the factors interact).
        startup = min(10, max(4, settings.trials // 4))
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, n_startup_trials=startup)


def _row(number: int, source: str, params: Mapping[str, float], parts: Mapping[str, Any], best: float) -> dict:
    return {"trial": number, "source": source, **{k: float(v) for k, v in params.items()},
            **{k: v for k, v in parts.items() if k != "fail_reason"}, "best_so_far": best,
            "fail_reason": parts.get("fail_reason")}


def _plain(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def schedule_with_coefficients(result: CalibrationResult, session, schedule=None):
    """The schedule.json that carries the learned coefficients.

    Args:
        result (`CalibrationResult`): from `calibrate`.
        session (`Session`): the session it ran in (model, bank, menu).
        schedule (`Schedule`, *optional*): the calibrated schedule (`--schedule`); its fields are kept and its
            `coefficients` section set. Without one (`--precision`), a uniform schedule is built: budget 1 (no
            search), its bops and memory cost, and as `quality` the calibration objective on the calibration samples.

    Returns:
        `Schedule`: validated; write it with `save_schedule`.
    """
    from qsched_search.results.provenance import command_line, device_name, now, versions
    from qsched_search.results.schedule import Quality, Schedule, cost_of

    section = result.coefficients.to_dict()
    if schedule is not None:
        obj = schedule.to_dict()
        if "coefficients" in obj:
            logger.warning("the schedule already had coefficients (%s); they are replaced",
                           Coefficients.from_dict(obj["coefficients"]).describe())
        obj["coefficients"] = section
        return Schedule.from_dict(obj, source="calibrated schedule")
    per_level = session.bank.level_costs()
    cost = {m: cost_of(result.levels, {lv: c[m] for lv, c in per_level.items()}) for m in ("bops", "memory")}
    calib = result.coefficients.calibration
    described = session.describe()
    return Schedule(
        levels=result.levels, steps=len(result.levels), timesteps=tuple(result.timesteps),
        reference=session.bank.reference, model_id=session.model.model_id,
        weights_sha256=session.model.weights_sha256(), budget=1.0, cost_model="bops",
        cost={**cost, "latency": None},
        quality=Quality(metric=f"calibration:{result.objective['name']}", value=float(result.best["value"]),
                        ci_low=None, ci_high=None, n=int(calib["samples"]), higher_is_better=True),
        provenance={"tool_version": __version__, "seed": int(result.settings.seed),
                    "prompts_sha256": calib["calibration_sha256"], "command": command_line(), "created": now(),
                    "versions": versions(), "device": device_name(str(session.settings.device))},
        extras={"menu": session.menu.to_dict(), "exclude": described["exclude"], "coefficients": section,
                "execution": {**described["execution"], "device": device_name(str(session.settings.device))},
                "search": {"method": "none: every step at one level (qsched calibrate --precision)"},
                **({"loras": session.lora_record()} if session.lora_record() else {})},
    )


def evaluations_to_reach(trials: pd.DataFrame, target: float) -> int | None:
    """How many evaluations (the identity baseline counted) a study took until its best reached `target`; None if never."""
    hit = trials.index[trials.best_so_far >= target - 1e-12]
    return None if len(hit) == 0 else int(trials.loc[hit[0], "trial"]) + 1

