"""`qsched search` as a library call: the study, the pick and its paired comparison, then every file written once."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from qsched_search._version import __version__
from qsched_search.errors import QschedError
from qsched_search.quant.costs import CostTable, load_latency_profile, override_latency_unknown
from qsched_search.results.assignment import has_overrides, parse_schedule_key, step_levels
from qsched_search.results.compare import compare_paired
from qsched_search.results.io import write_csv
from qsched_search.results.layout import ResultsDir
from qsched_search.results.provenance import command_line, device_name, now, update_manifest, versions
from qsched_search.results.records import Measurement
from qsched_search.results.schedule import COST_MODELS, Quality, Schedule, save_schedule
from qsched_search.results.tables import (TRIALS_COLUMNS, best_per_step_at_most, best_uniform_at_most, choose_schedule,
                                          pareto_front, schedule_key, split_schedule, uniform_rows)
from qsched_search.search.priors import additive_model, warm_start_schedules
from qsched_search.search.samplers import SAMPLERS
from qsched_search.search.storage import HEARTBEAT_SECONDS, check_heartbeat, sqlite_url
from qsched_search.search.study import ScheduleSearch

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SAMPLES", "SearchResult", "SearchSettings", "check_cost_source", "measure_latency", "open_search_session",
           "run_search", "write_search"]

# Samples per schedule in the report's images.
IMAGE_SAMPLES = 8
# Evaluations of the per-layer stage of `qsched search --layers`.
LAYER_TRIALS = 24
# Settings that decide an evaluation's numbers; a probe made with the same ones measured the same schedules.
EVAL_KEYS = ("model_id", "weights_sha256", "steps", "samples", "seed", "prompts_sha256", "reference", "dtype",
             "device", "batch_size", "call_kwargs", "exclude", "backend", "execution")
# The LoRAs fused into the model (id, file sha256, scale): in a fingerprint only when there are some, so studies of a
# model without LoRAs keep the names earlier versions gave them.
LORA_KEY = "loras"


@dataclass(frozen=True)
class SearchSettings:
    """What `qsched search` adds to the shared `RunSettings`.

    Args:
        budget (`float`, *optional*): a fraction in (0, 1] of the all-reference cost; the model family's
            `default_budget` if None (0.5; 0.67 for the embedded model, whose quantizable layers are a third of it).
        cost_model (`str`, defaults to `"bops"`): `bops`, `memory` or `latency` (a `profile`, or, on the torchao
            backend, measured in this process).
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
        layers (`bool`, defaults to False): then search per-step x per-layer schedules (layer groups of the
            family at their own levels in each step), warm-started from `OUT/probe_layers.csv`.
        layer_trials (`int`, defaults to 24): evaluations of the per-layer stage (kept ones included).
        grouping (`str`, *optional*): the layer grouping (the family's default if None, or a YAML file).
    """

    budget: float | None = None
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
    layers: bool = False
    layer_trials: int = LAYER_TRIALS
    grouping: str | None = None

    def __post_init__(self):
        if self.budget is not None and (not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1):
            raise QschedError(f"--budget {self.budget!r} is outside (0, 1]; allowed: a fraction of the all-reference cost "
                              "greater than 0 and at most 1, e.g. 0.5")
        if self.cost_model not in COST_MODELS:
            raise QschedError(f"--cost {self.cost_model!r} is not a cost model; allowed: {', '.join(COST_MODELS)}")
        if self.sampler not in SAMPLERS:
            raise QschedError(f"--sampler {self.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        if self.trials is not None and self.trials < 0:
            raise QschedError(f"--trials {self.trials} is negative; allowed: 0 or more new evaluations")
        if self.images < 0:
            raise QschedError(f"--images {self.images} is negative; allowed: 0 (none) or more samples per schedule")
        check_heartbeat(self.heartbeat)
        if self.layer_trials < 0:
            raise QschedError(f"--layer-trials {self.layer_trials} is negative; allowed: 0 or more per-layer evaluations")
        if self.layers and self.cost_model == "latency":
            raise override_latency_unknown("--layers with --cost latency")


@dataclass
class SearchResult:
    """What `run_search` produced; `write_search` writes it."""

    schedule: Schedule
    trials: pd.DataFrame
    front: pd.DataFrame
    chosen: pd.Series
    best_uniform: pd.Series | None
    cheapest_uniform: pd.Series | None
    reference_row: pd.Series | None
    comparison: dict | None
    sampler: str
    study_name: str
    storage: str
    new_evaluations: int
    stopped_because: str
    warm_start: list
    manifest: dict
    measured: dict = field(default_factory=dict)  # schedule key -> Measurement, every schedule the study knows
    best_per_step: pd.Series | None = None  # with --layers: the best schedule without overrides at <= chosen cost
    images: list = field(default_factory=list)  # (label, levels, images tensor, per-image lpips or None)
    image_set: Any = None
    coefficients_front: pd.DataFrame | None = None
    coefficients_applied: bool = False
    files: list[Path] = field(default_factory=list)


def check_cost_source(settings: SearchSettings, backend: str) -> None:
    """A one-line error, before anything loads, when `--cost latency` has neither a profile nor real kernels to
    measure on (`backend` is the resolved `sim` or `torchao`)."""
    if settings.cost_model == "latency" and not settings.profile and backend != "torchao":
        raise QschedError("--cost latency needs real kernels: pass --backend torchao --device cuda (each level's "
                          "step latency is then measured in this process), or --profile FILE from `qsched profile`")


def open_search_session(settings, objective: str | None = None, prefix_cache_mb: float | None = None):
    """Opens a session whose metrics are the objective (the family's first metric if None) and `settings.metrics`.

    Only the metrics asked for are built, so a search does not pay for the family's slower default metrics.

    Args:
        settings (`RunSettings`): the shared settings; `metrics` are extra metrics measured for every schedule.
        objective (`str`, *optional*): the metric to optimise.
        prefix_cache_mb (`float`, *optional*): see `open_session`.

    Returns:
        `Session`: close it with `session.close()`.
    """
    from qsched_search.eval.metrics import build_metrics
    from qsched_search.session import open_session

    session = open_session(replace(settings, metrics=()), metrics=False, prefix_cache_mb=prefix_cache_mb)
    try:
        extra = list(settings.metrics)
        objective = objective or (extra[0] if extra else session.model.family.metrics[0])
        names = list(dict.fromkeys([objective, *extra]))
        session.evaluator.metrics = build_metrics(names, device=settings.device, weights_dir=settings.weights_dir)
    except BaseException:
        session.close()
        raise
    session.metric_names = names
    session.settings = replace(session.settings, metrics=tuple(names))
    return session


def measure_latency(session, levels: Sequence[str], repeats: int = 20, warmup: int = 3,
                    on_status: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Each level's milliseconds per denoiser call on this session's bank, for `--cost latency` without a profile.

    The bank's first call of each level (its compile and CUDA-graph capture) is timed apart and not counted.

    Returns:
        `dict[str, dict]`: level -> `ms_per_step`, `compile_s` and the profile row's other columns.
    """
    from qsched_search.quant.latency import profile_bank

    args, kwargs = session.calibration
    if hasattr(session.bank, "warm_up"):
        (on_status or logger.info)(f"compiling {len(levels)} levels for the latency measurement")
        session.bank.warm_up(*args, shape_key="search", levels=list(levels), **kwargs)
    rows = profile_bank(session.bank, args, kwargs, session.settings.device, list(levels), warmup=warmup,
                        repeats=repeats, shape_key="search")
    return {row["level"]: row for row in rows}


def _probe_measurements(results: ResultsDir, probe_path: Path, described: Mapping, metric: str, steps: int,
                        reference: str, levels: Sequence[str]) -> tuple[dict[str, Measurement], str]:
    """The probe's cells as measurements, when the probe measured with the same settings; else ({}, why not)."""
    import json

    from qsched_search.search.probe import probe_measurements

    manifest = probe_path.parent / "manifest.json"
    try:
        stage = json.loads(manifest.read_text()).get("stages", {}).get("probe") if manifest.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        stage = None
    if not stage or "fingerprint" not in stage:
        return {}, "no manifest.json with a probe stage beside the probe table"
    for key in (*EVAL_KEYS, LORA_KEY):
        theirs, ours = stage.get(key), described.get(key)
        if key == "device":  # manifests write "cpu (x86_64, 2 threads)"; the setting is "cpu"
            theirs, ours = str(theirs).split(" (")[0], str(ours).split(" (")[0]
        if theirs != ours:
            return {}, f"the probe ran with {key}={str(theirs)[:60]!r}, the search with {str(ours)[:60]!r}"
    for lv in levels:
        theirs = (stage.get("levels") or {}).get(lv)
        if theirs is not None and theirs != described.get("levels", {}).get(lv):
            return {}, f"level {lv} was defined differently when probing"
    found = probe_measurements(ResultsDir(probe_path.parent), stage["fingerprint"], reference, steps)
    usable = {k: m for k, m in found.items() if m.has(metric) and set(split_schedule(k)) <= set(levels)}
    return usable, ""


def _read_probe(path: Path, what: str = "probe table", rerun: str = "qsched probe",
                columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    """A probe CSV, None when absent; a one-line error when unreadable or (with `columns`, PROBE_COLUMNS by default)
    lacking a column."""
    from qsched_search.results.tables import PROBE_COLUMNS

    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QschedError(f"{what} {str(path)!r} is not a readable CSV ({type(exc).__name__}); re-run `{rerun}`") from None
    absent = [c for c in (PROBE_COLUMNS if columns is None else columns) if c not in frame.columns]
    if absent:
        raise QschedError(f"{what} {str(path)!r} lacks column(s) {', '.join(absent)}; re-run `{rerun}` with this version")
    return frame


def run_search(session, settings: SearchSettings, results: ResultsDir,
               on_trial: Callable[[dict, ScheduleSearch], None] | None = None,
               on_status: Callable[[str], None] | None = None, joint=None) -> SearchResult:
    """Runs `qsched search` (the study, the pick, optionally the coefficients) and writes every file once.

    Args:
        session (`Session`): from `open_search_session`, with the objective among its metrics.
        settings (`SearchSettings`): budget, cost model, sampler, storage...
        results (`ResultsDir`): the output folder (the study lives there unless `settings.storage` says otherwise).
        on_trial (`Callable`, *optional*): called after each trial (progress bars).
        on_status (`Callable[[str], None]`, *optional*): called with one-line status messages.
        joint (`JointSettings`, *optional*): also calibrate Q-Sched coefficients for the best Pareto schedules
            (`qsched_search.search.joint`) before anything is written.

    Returns:
        `SearchResult`, its files in `files`.
    """
    status = on_status or logger.info
    started = time.time()
    if settings.budget is None:
        settings = replace(settings, budget=session.model.family.default_budget)
    evaluator, bank = session.evaluator, session.bank
    metrics = {m.name: m for m in evaluator.metrics}
    objective = settings.objective or session.metric_names[0]
    if objective not in metrics:
        raise QschedError(f"--objective {objective!r} is not among the session's metrics ({', '.join(metrics) or 'none'}); "
                          "open the session with it in RunSettings.metrics")
    metric = metrics[objective]
    reference, steps = bank.reference, session.runner.steps
    choices = tuple(dict.fromkeys([reference, *session.settings.precisions]))
    timesteps = evaluator.timesteps  # runs the all-reference schedule once: the paired baseline
    latency_rows: dict[str, dict] = {}
    if settings.profile:
        latency = load_latency_profile(settings.profile, choices, reference)
    elif settings.cost_model == "latency":
        check_cost_source(settings, bank.backend)
        latency_rows = measure_latency(session, choices, on_status=status)
        ref_ms = latency_rows[reference]["ms_per_step"]
        latency = {lv: row["ms_per_step"] / ref_ms for lv, row in latency_rows.items()}
    else:
        latency = None
    groups = None
    if settings.layers:
        from qsched_search.quant.groups import bank_groups

        groups = bank_groups(bank, session.model.family, settings.grouping)
        session.runner.groups = groups
    costs = CostTable.from_bank(bank, latency, groups)
    level_costs = costs.model(settings.cost_model)

    described = session.describe()
    probe_path = Path(settings.probe) if settings.probe else results.probe_csv
    probe = _read_probe(probe_path)
    model = None
    known: dict[str, Measurement] = {}
    if probe is None:
        status(f"no probe table at {probe_path}: warm start from uniform schedules only (run `qsched probe --out {results.root}` first)")
    else:
        model = additive_model(probe, objective, metric.higher_is_better, steps, choices, reference)
        known, why_not = _probe_measurements(results, probe_path, described, objective, steps, reference, choices)
        if why_not:
            status(f"probe cells not reused as measurements ({why_not}); they still guide the warm start")
    warm = warm_start_schedules(choices, reference, steps, level_costs, settings.budget, model)

    fingerprint = {**{k: described.get(k) for k in EVAL_KEYS}, "metric": metric.name,
                   "metric_preprocessing": getattr(metric, "preprocessing", ""),
                   "levels": {lv: described.get("levels", {}).get(lv) for lv in choices}}
    if described.get(LORA_KEY):
        fingerprint[LORA_KEY] = described[LORA_KEY]
    search = ScheduleSearch(
        evaluator.evaluate, choices=choices, reference=reference, steps=steps, metric=objective,
        higher_is_better=metric.higher_is_better, costs=costs, cost_model=settings.cost_model, budget=settings.budget,
        storage=settings.storage or sqlite_url(results.study_db), study_name=settings.study, sampler=settings.sampler,
        trials=settings.trials, seed=session.settings.seed, fingerprint=fingerprint, warm_start=warm, known=known,
        heartbeat=settings.heartbeat,
    )
    status(f"study {search.study_name} in {search.storage_description}: sampler {search.sampler_name}, "
           f"{search.space_size} schedules, up to {search.trials} new evaluations")
    outcome = search.run(on_trial=on_trial)
    trials = outcome.trials
    measured = search.evaluated()
    layer_stage = None
    if groups is not None:
        layer_stage = _search_layers(session, settings, results, ResultsDir(probe_path.parent), groups, costs, model,
                                     measured, fingerprint, metric, objective, status, on_trial)
        trials = _with_layer_rows(trials, layer_stage.trials)
        measured.update(layer_stage.measured)
    front = pareto_front(trials, metric.higher_is_better)
    chosen = choose_schedule(trials, settings.budget, metric.higher_is_better)
    if chosen is None:
        failed = trials[(trials["state"] == "FAIL") & trials["feasible"].astype(bool)]
        reasons = "; ".join(sorted(set(failed["fail_reason"].astype(str))))[:200]
        raise QschedError(f"no schedule within --budget {settings.budget:g} completed ({len(failed)} within budget failed"
                          f"{': ' + reasons if reasons else ''}); raise --trials or --budget, or check the failures in {results.trials_csv}")

    chosen_steps = parse_schedule_key(chosen["schedule"])
    levels = step_levels(chosen_steps)
    est = measured[chosen["schedule"]].estimates[objective]
    best_uniform = best_uniform_at_most(trials, float(chosen["cost"]), metric.higher_is_better, steps)
    uniform = uniform_rows(trials, steps)
    cheapest_uniform = uniform.iloc[0] if not uniform.empty else None
    ref_rows = uniform[uniform["level"] == reference]
    reference_row = ref_rows.iloc[0] if not ref_rows.empty else None
    comparison = None
    if best_uniform is not None and best_uniform["schedule"] != chosen["schedule"]:
        comparison = compare_paired(measured.get(chosen["schedule"]), measured.get(best_uniform["schedule"]), objective,
                                    best_uniform["schedule"])
    best_per_step = comparison_per_step = None
    if groups is not None:
        best_per_step = best_per_step_at_most(trials, float(chosen["cost"]), metric.higher_is_better, steps)
        if best_per_step is not None and best_per_step["schedule"] != chosen["schedule"]:
            comparison_per_step = compare_paired(measured.get(chosen["schedule"]), measured.get(best_per_step["schedule"]),
                                                 objective, best_per_step["schedule"])

    execution = {**bank.describe(), "device": device_name(session.settings.device),
                 "cuda_graphs": bool(session.settings.cuda_graphs)}
    for lv, info in execution["levels"].items():
        row = latency_rows.get(lv)
        info["ms_per_step"] = None if row is None else float(row["ms_per_step"])
    execution["levels"] = {lv: execution["levels"][lv] for lv in choices}
    schedule = Schedule(
        levels=levels, steps=steps, timesteps=tuple(int(t) for t in timesteps), reference=reference,
        model_id=session.model.model_id, weights_sha256=described["weights_sha256"], budget=float(settings.budget),
        cost_model=settings.cost_model, cost=costs.costs(chosen_steps),
        overrides=tuple(step.overrides for step in chosen_steps),
        quality=Quality(objective, float(est.value), _opt(est.ci_low), _opt(est.ci_high), int(est.n),
                        bool(metric.higher_is_better), est.per_image),
        provenance={"tool_version": __version__, "seed": int(session.settings.seed),
                    "prompts_sha256": described["prompts_sha256"], "command": command_line(), "created": now(),
                    "versions": versions(), "device": device_name(session.settings.device)},
        extras={
            "menu": {**session.menu.to_dict(), "levels": {lv: described["levels"][lv] for lv in choices}},
            "exclude": list(described.get("exclude", [])),
            "execution": execution,
            "search": {"sampler": outcome.sampler, "study": search.study_name, "trials": int(len(trials)),
                       "evaluated_schedules": int(len(measured)), "space_size": int(search.space_size),
                       "samples": int(session.settings.samples), "prompts": sorted(set(session.eval_set.prompts))},
            **({"comparison": comparison} if comparison else {}),
            **({"comparison_per_step": comparison_per_step} if comparison_per_step else {}),
            **({"layer_groups": groups.to_dict()} if groups is not None and has_overrides(chosen_steps) else {}),
            **({"loras": session.lora_record()} if session.lora_record() else {}),
        },
    )
    result = SearchResult(
        schedule=schedule, trials=trials, front=front, chosen=chosen, best_uniform=best_uniform,
        cheapest_uniform=cheapest_uniform, reference_row=reference_row, comparison=comparison, sampler=outcome.sampler,
        study_name=search.study_name, storage=search.storage_description, new_evaluations=outcome.new_evaluations,
        stopped_because=outcome.stopped_because, warm_start=warm, manifest={}, measured=measured,
        best_per_step=best_per_step)
    if joint is not None:
        from qsched_search.search.joint import calibrate_front

        joint_result = calibrate_front(session, result, joint, on_status=status)
        result.schedule = joint_result.schedule
        result.coefficients_front = joint_result.front
        result.coefficients_applied = joint_result.applied
        result.comparison = result.schedule.extras.get("comparison")
    if settings.images > 0:
        status(f"running {settings.images} samples of the pictured schedules for {results.images_dir}")
        labelled = [("reference", (reference,) * steps), ("schedule", chosen_steps)]
        if best_per_step is not None and best_per_step["schedule"] != chosen["schedule"]:
            labelled.append(("best_per_step", tuple(split_schedule(best_per_step["schedule"]))))
        if best_uniform is not None:
            labelled.append(("best_uniform", tuple(split_schedule(best_uniform["schedule"]))))
        if cheapest_uniform is not None:
            labelled.append(("cheapest_uniform", tuple(split_schedule(cheapest_uniform["schedule"]))))
        result.image_set, result.images = run_images(session, labelled, settings.images, metrics.get("lpips"),
                                                     coefficients=result.schedule.coefficients)
    result.manifest = {
        **described, "model": session.model.model_id, "device": device_name(session.settings.device),
        "timesteps": [int(t) for t in timesteps], "objective": objective, "higher_is_better": bool(metric.higher_is_better),
        "budget": settings.budget, "cost_model": settings.cost_model, "level_costs": costs.to_dict(),
        "latency_profile": settings.profile, "latency_measured": latency_rows or None, "sampler": outcome.sampler,
        "study": search.study_name, "storage": search.storage_description, "space_size": search.space_size,
        "new_evaluations": outcome.new_evaluations, "trials": int(len(trials)), "stopped_because": outcome.stopped_because,
        "warm_start": [{"schedule": schedule_key(lv), "source": src} for lv, src in warm],
        "probe": str(probe_path) if probe is not None else None, "probe_cells_reused": len(known),
        "schedule": list(result.schedule.levels), "quality": result.schedule.quality.to_dict(),
        "cost": result.schedule.cost, "comparison": comparison, "prefix_reuse": session.runner.cache.stats(),
        "lora_effects": session.lora_record(),
        "layers": None if layer_stage is None else {
            "grouping": groups.name, "groups": len(groups.groups), "prior": layer_stage.prior_origin,
            "layer_probe": layer_stage.probe_path, "trials": int(len(layer_stage.trials)),
            "new_evaluations": layer_stage.new_evaluations, "stopped_because": layer_stage.stopped_because,
            "best_per_step": None if best_per_step is None else str(best_per_step["schedule"]),
            "comparison_per_step": comparison_per_step},
        "seconds": round(time.time() - started, 1),
    }
    result.files = write_search(result, results, title=f"{session.model.model_id}, {steps} steps, budget "
                                                         f"{settings.budget:g} ({settings.cost_model})")
    return result


@dataclass
class _LayerStage:
    trials: pd.DataFrame
    measured: dict
    new_evaluations: int
    stopped_because: str
    prior_origin: dict
    probe_path: str | None


def _search_layers(session, settings: SearchSettings, results: ResultsDir, probed: ResultsDir, groups, costs: CostTable,
                   step_model, measured: Mapping[str, Measurement], fingerprint: Mapping, metric, objective: str,
                   status: Callable[[str], None], on_trial) -> _LayerStage:
    """The per-layer stage: the layer prior from the probe tables (probe_layers.csv beside the step probe's), then
    `LayerSearch` from the per-step study's measurements (kept in OUT/layer_trials.jsonl: the command resumes)."""
    from qsched_search.results.provenance import fingerprint as settings_fingerprint
    from qsched_search.search.layer_search import LayerSearch, item_costs, layer_prior

    if step_model is None:
        raise QschedError(f"--layers needs the step probe of the same steps and levels to warm-start from: run "
                          f"`qsched probe --layers --out {results.root}` first (or pass --probe FILE)")
    layer_probe = _read_probe(probed.probe_layers_csv, "layer probe table", "qsched probe --layers", columns=())
    if layer_probe is None:
        status(f"no layer probe at {probed.probe_layers_csv}: the per-layer prior shares each step's harm by "
               f"multiply-accumulates (run `qsched probe --layers --out {probed.root}` for a measured one)")
    layer_costs = session.bank.layer_costs()
    levels = step_model.levels
    prior = layer_prior(step_model, layer_probe, objective, metric.higher_is_better, groups, layer_costs)
    raw = layer_prior(step_model, layer_probe, objective, metric.higher_is_better, groups, layer_costs, calibrate=False)
    key = settings_fingerprint({**fingerprint, "groups": groups.to_dict(), "stage": "layers"})
    search = LayerSearch(session.evaluator.evaluate, prior=prior, raw_prior=raw,
                         costs=item_costs(groups, layer_costs, levels, settings.cost_model), schedule_costs=costs.costs,
                         metric=objective, higher_is_better=metric.higher_is_better, budget=settings.budget,
                         trials=settings.layer_trials, groups=groups, store=results.layer_trials, fingerprint=key,
                         start=measured, cost_model=settings.cost_model)
    status(f"per-layer stage: {len(groups.groups)} groups ({groups.name}) x {session.runner.steps} steps x "
           f"{len(levels)} levels, up to {settings.layer_trials} evaluations")
    progress = SimpleNamespace(trials=settings.layer_trials, new_evaluations=0)

    def step(row: dict) -> None:
        progress.new_evaluations += 1
        if on_trial is not None:
            on_trial(row, progress)

    outcome = search.run(on_trial=step)
    return _LayerStage(outcome.trials, outcome.measured, outcome.new_evaluations, outcome.stopped_because,
                       dict(prior.origin), str(probed.probe_layers_csv) if layer_probe is not None else None)


def _with_layer_rows(trials: pd.DataFrame, layer_rows: pd.DataFrame) -> pd.DataFrame:
    """trials.csv: the study's trials, then the per-layer stage's, numbered on from the study's."""
    if layer_rows.empty:
        return trials
    rows = layer_rows.reindex(columns=TRIALS_COLUMNS).copy()
    first = int(trials["trial"].max()) + 1 if not trials.empty else 0
    rows["trial"] = range(first, first + len(rows))
    frame = pd.concat([trials, rows], ignore_index=True)
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    return frame


def write_search(result: SearchResult, results: ResultsDir, title: str = "") -> list[Path]:
    """Writes a search's files, each once and consistent with the others: schedule.json, trials.csv, pareto.csv,
    pareto.png, history.png, images/, pareto_coefficients.csv and manifest.json (last)."""
    from qsched_search.plots import plot_history, plot_pareto

    schedule = result.schedule
    q = schedule.quality
    write_csv(results.trials_csv, result.trials)
    write_csv(results.pareto_csv, result.front)
    plot_pareto(result.trials, result.front, schedule.budget, schedule.cost_model, q.metric, q.higher_is_better,
                schedule.steps, chosen=(float(result.chosen["cost"]), float(result.chosen["value"])),
                path=results.pareto_png, title=title, reference=schedule.reference)
    plot_history(result.trials, schedule.budget, q.metric, q.higher_is_better, results.history_png, title=title)
    files = [results.schedule, results.trials_csv, results.pareto_csv, results.pareto_png, results.history_png]
    if result.coefficients_front is not None:
        write_csv(results.pareto_coefficients_csv, result.coefficients_front)
        files.append(results.pareto_coefficients_csv)
    if result.images:
        write_images(result, results)
        files.append(results.images_index)
    save_schedule(schedule, results.schedule)
    update_manifest(results.manifest, "search", result.manifest)
    files.append(results.manifest)
    return files


def run_images(session, labelled: Sequence[tuple[str, tuple[str, ...]]], samples: int, lpips_metric=None,
               coefficients=None) -> tuple[Any, list]:
    """Runs each labelled schedule on the first `samples` samples (the chosen one with its coefficients, if any).

    Returns:
        `(eval_set, [(label, levels, images, per-image lpips or None)])`.
    """
    from qsched_search.pipeline.coefficients import apply_coefficients
    from qsched_search.pipeline.rollout import EvalSet, Runner

    eval_set = session.eval_set
    n = min(samples, len(eval_set))
    subset = EvalSet(eval_set.prompts[:n], eval_set.seeds[:n])
    runner = Runner(session.model, session.bank, session.runner.steps, subset, session.runner.batch_size,
                    session.runner.call_kwargs, groups=session.runner.groups)
    runs: dict[tuple, Any] = {}

    def images_of(levels, coeffs):
        key = (tuple(levels), coeffs is not None)
        if key not in runs:
            applied = apply_coefficients(session.model.pipe, coeffs)
            try:
                runs[key] = runner.run(levels).images
            finally:
                if applied is not None:
                    applied.remove()
        return runs[key]

    reference = images_of((session.bank.reference,) * session.runner.steps, None)
    if lpips_metric is None:
        try:
            from qsched_search.eval.metrics import build_metrics

            lpips_metric = build_metrics(["lpips"], device=session.settings.device, weights_dir=session.settings.weights_dir)[0]
        except Exception as exc:  # missing weights: the images are still worth writing
            logger.warning("no per-image lpips in images/index.csv (%s)", str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            lpips_metric = None
    out = []
    for label, levels in labelled:
        images = images_of(levels, coefficients if label == "schedule" else None)
        per_image = None
        if lpips_metric is not None and hasattr(lpips_metric, "per_image"):
            per_image = [float(v) for v in lpips_metric.per_image(images, reference)]
        out.append((label, levels, images, per_image))
    return subset, out


def write_images(result: SearchResult, results: ResultsDir) -> pd.DataFrame:
    """images/LABEL/NN.png and images/index.csv from `result.images`."""
    from qsched_search.results.images import save_png

    subset = result.image_set
    rows = []
    for label, levels, images, per_image in result.images:
        for k in range(len(images)):
            file = f"{label}/{k:02d}.png"
            save_png(images[k], results.images_dir / file)
            rows.append({"label": label, "schedule": schedule_key(levels), "sample": k, "prompt": subset.prompts[k],
                         "seed": subset.seeds[k], "file": file, "lpips": None if per_image is None else per_image[k]})
    frame = pd.DataFrame(rows, columns=["label", "schedule", "sample", "prompt", "seed", "file", "lpips"])
    write_csv(results.images_index, frame)
    return frame


def _opt(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
