"""`qsched search`: the per-step precision schedule with the best measured quality within a cost budget."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qsched_search.cli._common import (BackendChoice, BackendOpt, BatchOpt, CompileOpt, CudaGraphsOpt, DeviceOpt,
                                       DtypeOpt, FamilyOpt, GroupingOpt, LoraOpt, MenuOpt, ModelOpt, PrecisionsOpt, PrefixCacheOpt,
                                       PromptsOpt, ReferenceOpt, SamplesOpt, SeedOpt, StepsOpt, VerboseOpt, WeightsOpt,
                                       console, lora_lines, parse_loras, reuse_line, split_list, user_errors)
from qsched_search.errors import QschedError
from qsched_search.results.assignment import brief_key
from qsched_search.results.compare import budget_sentence
from qsched_search.results.io import check_writable
from qsched_search.results.layout import ResultsDir
from qsched_search.session import RunSettings, read_prompts


class CostModel(str, enum.Enum):
    bops = "bops"
    memory = "memory"
    latency = "latency"


class CoefficientLoss(str, enum.Enum):
    auto = "auto"
    jaq = "jaq"
    reference = "reference"


class SamplerName(str, enum.Enum):
    auto = "auto"
    tpe = "tpe"
    nsga2 = "nsga2"
    exhaustive = "exhaustive"
    random = "random"


@user_errors
def search(
    model: ModelOpt = "embedded",
    family: FamilyOpt = "",
    steps: StepsOpt = 4,
    budget: Annotated[Optional[float], typer.Option("--budget", "-b", help="Cost budget: a fraction in (0, 1] of running every step at the reference level; the model family's default if omitted (0.5; 0.67 for the embedded model).", show_default=False)] = None,
    precisions: PrecisionsOpt = "",
    reference: ReferenceOpt = "fp32",
    cost: Annotated[CostModel, typer.Option("--cost", help="Cost model: bops (bit-operations), memory (weight bytes) or latency (measured here with --backend torchao on a GPU, or read from --profile).")] = CostModel.bops,
    objective: Annotated[str, typer.Option("--objective", help="The metric to optimise; the model family's first metric (lpips for the embedded model) if omitted.")] = "",
    trials: Annotated[Optional[int], typer.Option("--trials", "-t", help="New schedule evaluations on top of those already done (default: 24; exhaustive: the whole space).", show_default=False)] = None,
    sampler: Annotated[SamplerName, typer.Option("--sampler", help="auto: exhaustive when --trials covers the whole space, else tpe.")] = SamplerName.auto,
    storage: Annotated[str, typer.Option("--storage", help="Optuna database URL; sqlite:///OUT/study.db if omitted. One worker per SQLite file.")] = "",
    study: Annotated[str, typer.Option("--study", help="Study name; derived from the settings if omitted, so the same command resumes.")] = "",
    profile: Annotated[str, typer.Option("--profile", help="Latency profile CSV (columns level, ms_per_step) for --cost latency.")] = "",
    probe_table: Annotated[str, typer.Option("--probe", help="Probe table for the warm start; OUT/probe.csv if omitted.")] = "",
    images: Annotated[int, typer.Option("--images", help="Samples per schedule written to OUT/images for the report (0: none).")] = 8,
    samples: SamplesOpt = 64,
    seed: SeedOpt = 0,
    prompts: PromptsOpt = "",
    metrics: Annotated[str, typer.Option("--metrics", help="Extra metrics measured for every schedule besides --objective (kept in the study, not in trials.csv).")] = "",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 64,
    menu: MenuOpt = "",
    weights_dir: WeightsOpt = "",
    backend: BackendOpt = BackendChoice.auto,
    compile: CompileOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    prefix_cache_mb: PrefixCacheOpt = None,
    lora: LoraOpt = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Results folder (the probe's, to reuse its table).")] = "results/probe",
    workers: Annotated[int, typer.Option("--workers", "-w", help="Local worker processes sharing the study (each measures --trials new schedules); this one then writes the results.")] = 1,
    heartbeat: Annotated[int, typer.Option("--heartbeat", help="Seconds between a running trial's heartbeats in the study database; a trial silent for 10 of them is a dead worker's and runs again.")] = 60,
    with_coefficients: Annotated[bool, typer.Option("--with-coefficients", help="Then calibrate Q-Sched coefficients "
                                                    "for the best Pareto schedules within the budget and measure each "
                                                    "with and without them (OUT/pareto_coefficients.csv).")] = False,
    coefficients_loss: Annotated[CoefficientLoss, typer.Option("--coefficients-loss", help="auto: reference (LPIPS to "
                                                               "full precision) for a paired objective, else jaq.")] = CoefficientLoss.auto,
    coefficients_trials: Annotated[int, typer.Option("--coefficients-trials", help="Calibration trials per schedule.")] = 12,
    coefficients_samples: Annotated[int, typer.Option("--coefficients-samples", help="Calibration samples per trial "
                                                      "(seeds disjoint from the evaluation's).")] = 32,
    coefficients_candidates: Annotated[int, typer.Option("--coefficients-candidates", help="Pareto schedules within "
                                                         "the budget to calibrate, the best first.")] = 3,
    layers: Annotated[bool, typer.Option("--layers", help="Then search per-step x per-layer schedules: layer groups "
                                         "at their own level in each step, warm-started from OUT/probe_layers.csv "
                                         "(`qsched probe --layers`); the chosen schedule may carry overrides.")] = False,
    layer_trials: Annotated[int, typer.Option("--layer-trials", help="With --layers: evaluations of the per-layer "
                                              "stage (kept ones included, so the same command resumes).")] = 24,
    grouping: GroupingOpt = "",
    verbose: VerboseOpt = False,
):
    """Search the precision of each denoising step: best measured quality within the cost budget.

    An Optuna study over (quality, cost) with the budget as a constraint, warm-started from uniform schedules and
    the probe table (greedy and an exact dynamic programme on the per-step deltas). Every schedule is measured by
    running it on the probe's prompts and seeds; none is measured twice. Writes OUT/schedule.json, trials.csv,
    pareto.csv, pareto.png, history.png, images/ and manifest.json; the study lives in OUT/study.db, so running the
    same command again resumes it. With --with-coefficients, each of the best Pareto schedules also gets Q-Sched
    coefficients (`qsched calibrate`'s two levers) and is measured with and without them; schedule.json carries
    the chosen schedule's coefficients when they measured better. Every comparison of two schedules is paired
    (the same prompts and seeds): a difference with its 95% bootstrap interval. With --lora, the LoRAs are fused
    into the model first (each must change its reference images) and schedule.json records them. With --layers,
    a per-layer stage follows: every (step, layer group) gets a level, starting from the step x group probe's
    additive prediction (OUT/probe_layers.csv) and climbing from the best measured schedule; schedule.json then
    carries per-step overrides and a paired comparison with the best per-step schedule.

    Example: qsched search --steps 4 --budget 0.67 --out results/demo   (after `qsched probe --out results/demo`)
    Per layer: qsched probe --layers --out R && qsched search --layers --budget 0.666 --out R
    """
    import optuna

    from qsched_search.quant.backends import default_precisions
    from qsched_search.search.joint import JointSettings
    from qsched_search.search.stage import SearchSettings, check_cost_source, open_search_session, run_search
    from qsched_search.search.workers import start_local_workers

    started = time.time()
    # Checked before the model loads: bad input fails in a second, not after it.
    search_settings = SearchSettings(budget=budget, cost_model=cost.value, objective=objective or None, trials=trials,
                                     sampler=sampler.value, storage=storage or None, study=study or None,
                                     profile=profile or None, probe=probe_table or None, images=images,
                                     heartbeat=heartbeat, layers=layers, layer_trials=layer_trials,
                                     grouping=grouping or None)
    joint = (JointSettings(loss=coefficients_loss.value, trials=coefficients_trials, samples=coefficients_samples,
                           candidates=coefficients_candidates) if with_coefficients else None)
    levels = split_list(precisions) or default_precisions(backend.value, device, dtype, menu or None)
    settings = RunSettings(model=model, steps=steps, precisions=levels, reference=reference,
                           samples=samples, seed=seed, prompts=read_prompts(prompts), metrics=split_list(metrics),
                           device=device, dtype=dtype, batch_size=batch_size, menu=menu or None,
                           weights_dir=weights_dir or None, family=family or None, backend=backend.value,
                           compile=compile.value if compile else None, cuda_graphs=cuda_graphs, loras=parse_loras(lora))
    check_cost_source(search_settings, settings.backend)
    if layers and with_coefficients:
        raise QschedError("--layers with --with-coefficients is not supported: calibrate the coefficients of the "
                          "per-layer schedule with `qsched calibrate`, or search the two in separate runs")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported in trials.csv and below
    results = ResultsDir(out)
    check_writable(results.root, "--out")
    if workers < 1:
        raise QschedError(f"--workers {workers} is below 1; allowed: 1 (this process) or more local processes")
    if workers > 1:  # they measure; this process then writes the results of the whole study, measuring nothing
        with Progress(TextColumn("[bold]search[/] {task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task(f"{workers} workers", total=None)
            url = start_local_workers(settings, search_settings, results, workers,
                                      on_poll=lambda running: progress.update(
                                          task, description=f"{running} of {workers} workers running "
                                                            f"(logs: {results.root}/workers/*/log.txt)"),
                                      on_status=lambda msg: progress.console.print(msg, highlight=False))
        search_settings = replace(search_settings, storage=url, trials=0)
    session = open_search_session(settings, search_settings.objective, prefix_cache_mb=prefix_cache_mb)
    try:
        for line in lora_lines(session.model.loras):
            console.print(line, highlight=False)
        columns = [TextColumn("[bold]search[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("loading", total=None)

            def on_trial(row: dict, search_) -> None:
                value = "failed" if row["state"] == "FAIL" else f"{row['value']:.4g}"
                progress.update(task, total=search_.trials, completed=search_.new_evaluations,
                                description=f"{row['source']:<12} {brief_key(row['schedule'])} {value}")

            result = run_search(session, search_settings, results, on_trial=on_trial,
                                on_status=lambda msg: progress.console.print(msg, highlight=False), joint=joint)
    finally:
        session.close()
    _print_summary(result)
    if result.coefficients_front is not None:
        _print_coefficients(result)
    console.print(reuse_line(result.manifest["prefix_reuse"]), highlight=False)
    stage = result.manifest.get("layers")
    if stage:
        console.print(f"per-layer stage: {stage['trials']} evaluations ({stage['new_evaluations']} new) over "
                      f"{stage['groups']} groups ({stage['grouping']}); stopped: {stage['stopped_because']}", highlight=False)
    console.print(f"stopped: {result.stopped_because}; {result.new_evaluations} new evaluations, "
                  f"{len(result.trials)} trials in study {result.study_name} ({result.storage})", highlight=False)
    console.print(f"wrote {', '.join(str(f) for f in result.files)} in {time.time() - started:.0f} s", highlight=False)


def _fmt_ci(row) -> str:
    lo, hi = row.get("ci_low"), row.get("ci_high")
    ci = "" if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)) else f" [{float(lo):.4g}, {float(hi):.4g}]"
    return f"{float(row['value']):.4g}{ci}"


def _print_summary(result) -> None:
    q = result.schedule.quality
    table = Table(title=f"{q.metric} ({'higher' if q.higher_is_better else 'lower'} is better, 95% CI) and "
                        f"{result.schedule.cost_model} cost; budget {result.schedule.budget:g}")
    for col in ("", "schedule", "cost", q.metric, "n"):
        table.add_column(col, justify="right" if col in ("cost", "n") else "left")
    rows = [("chosen", result.chosen), ("best per-step at <= cost", result.best_per_step),
            ("best uniform at <= cost", result.best_uniform),
            ("cheapest uniform", result.cheapest_uniform), ("reference", result.reference_row)]
    for label, row in rows:
        if row is None:
            continue
        table.add_row(label, brief_key(row["schedule"]), f"{float(row['cost']):.4g}", _fmt_ci(row), str(row["n"]))
    console.print(table)
    console.print(budget_sentence(result.schedule.to_dict()), highlight=False)
    c = result.schedule.extras.get("comparison_per_step")
    if c:
        console.print(f"per-layer overrides vs the best per-step schedule ({brief_key(c['baseline'])}): paired difference "
                      f"{c['difference']:+.3g}, 95% CI [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}] over {c['n']} samples: "
                      f"{c['verdict']}", highlight=False)


def _print_coefficients(result) -> None:
    front = result.coefficients_front
    table = Table(title="Pareto schedules within the budget, without and with calibrated coefficients (95% CI)")
    for col in ("schedule", "cost", "without", "with", "coefficients"):
        table.add_column(col, justify="right" if col == "cost" else "left")
    for row in front.to_dict("records"):
        with_ = (f"failed: {row['fail_reason']}" if isinstance(row.get("fail_reason"), str) and row["fail_reason"]
                 else _fmt_ci({"value": row["value_with"], "ci_low": row["ci_low_with"], "ci_high": row["ci_high_with"]}))
        table.add_row(row["schedule"], f"{row['cost']:.4g}", _fmt_ci(row), with_, str(row.get("coefficients") or ""))
    console.print(table)
    verdict = ("schedule.json carries the chosen schedule's coefficients: they measured better" if result.coefficients_applied
               else "schedule.json has no coefficients: they did not measure better for the chosen schedule")
    console.print(verdict, highlight=False)
