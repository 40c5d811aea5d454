"""`qsched calibrate`: learn Q-Sched coefficients for a quantized schedule on calibration prompts and seeds."""

from __future__ import annotations

import time
from dataclasses import replace
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qsched_search.cli._common import (BackendChoice, BackendOpt, BatchOpt, CompileOpt, CudaGraphsOpt, DeviceOpt, DtypeOpt,
                                       FamilyOpt, MenuOpt, ModelOpt, PromptsOpt, ReferenceOpt, VerboseOpt, WeightsOpt,
                                       console, lora_lines, parse_loras, user_errors)
from qsched_search.errors import QschedError


class Loss(str, Enum):
    jaq = "jaq"
    reference = "reference"


class Param(str, Enum):
    ramp = "ramp"
    per_step = "per-step"


class Sampler(str, Enum):
    tpe = "tpe"
    grid = "grid"
    random = "random"


@user_errors
def calibrate(
    model: ModelOpt = "",
    family: FamilyOpt = "",
    steps: Annotated[int, typer.Option("--steps", "-s", help="Denoising steps; the schedule's if --schedule is given.")] = 0,
    precision: Annotated[str, typer.Option("--precision", help="Run every step at this level (uniform quantization).")] = "",
    schedule: Annotated[str, typer.Option("--schedule", help="A schedule.json (from `qsched search`) to calibrate.")] = "",
    calib_prompts: Annotated[int, typer.Option("--calib-prompts", help="How many prompts of the pool to calibrate on "
                                               "(the first K of --prompts, or of the family's defaults); 0: all.")] = 0,
    prompts: PromptsOpt = "",
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration samples per trial (prompts cycle; "
                                               "sample j uses seed + 1,000,000 + j).")] = 200,
    loss: Annotated[Loss, typer.Option("--loss", help="jaq: reference-free alignment + quality; reference: LPIPS to "
                                       "the full-precision images (runs full precision once).")] = Loss.jaq,
    param: Annotated[Param, typer.Option("--param", help="ramp: the published two scalars m, s; per-step: free "
                                         "values, two per step.")] = Param.ramp,
    trials: Annotated[int, typer.Option("--trials", "-t", help="Sampler evaluations after the identity baseline.")] = 40,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="tpe (Optuna), random, or grid (the published search; "
                                             "--grid-points per axis).")] = Sampler.tpe,
    grid_points: Annotated[int, typer.Option("--grid-points", help="Values per axis for --sampler grid.")] = 10,
    value_range: Annotated[str, typer.Option("--range", help="low,high of every factor.")] = "0.8,1.2",
    k: Annotated[float, typer.Option("--k", help="JAQ quality weight; 1 (judge) or 2 (CLIP, the paper's) if < 0.")] = -1.0,
    clip_model: Annotated[str, typer.Option("--clip-model", help="Local CLIP folder (model + processor) for --loss "
                                            "jaq on families other than the embedded one.")] = "",
    seed: Annotated[int, typer.Option("--seed", help="Base seed: calibration sample j uses seed + 1,000,000 + j; "
                                      "also the sampler's seed.")] = 0,
    reference: ReferenceOpt = "fp32",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 64,
    menu: MenuOpt = "",
    weights_dir: WeightsOpt = "",
    backend: BackendOpt = BackendChoice.auto,
    compile: CompileOpt = None,
    cuda_graphs: CudaGraphsOpt = False,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="A LoRA to fuse before quantizing (PATH_OR_ID[:SCALE], repeatable); with --schedule, the LoRAs it records if omitted.", show_default=False)] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Results folder.")] = "results/calibrate",
    verbose: VerboseOpt = False,
):
    """Learn per-step coefficients that rescale the denoiser output and the sample before each scheduler step.

    Writes OUT/coefficients.json (the `coefficients` section), OUT/schedule.json (the schedule with that section:
    `qsched generate --schedule OUT/schedule.json` applies both), OUT/calibration_trials.csv and OUT/manifest.json.
    """
    from qsched_search.results.io import write_csv, write_json
    from qsched_search.results.layout import ResultsDir
    from qsched_search.results.provenance import device_name, update_manifest
    from qsched_search.results.schedule import load_schedule, save_schedule
    from qsched_search.search.calibrate import (CalibrationSettings, build_objective, calibrate as run_calibration,
                                                schedule_with_coefficients)
    from qsched_search.session import RunSettings, open_session, read_prompts

    started = time.time()
    if bool(precision) == bool(schedule):
        raise QschedError("give exactly one of --precision LEVEL (every step at LEVEL) or --schedule FILE "
                          f"(got {'both' if precision else 'neither'})")
    try:
        low, high = (float(v) for v in value_range.split(","))
    except ValueError:
        raise QschedError(f"--range {value_range!r} is invalid; allowed: two numbers low,high such as 0.8,1.2") from None
    loaded = None
    if schedule:
        loaded = load_schedule(schedule)
        if steps and steps != loaded.steps:
            raise QschedError(f"--steps {steps} differs from the schedule's {loaded.steps} steps; leave --steps out")
        steps, levels = loaded.steps, tuple(loaded.levels)
        reference = loaded.reference
    else:
        if steps < 1:
            raise QschedError(f"--steps must be at least 1, got {steps}; pass --steps N with --precision")
        levels = (precision,) * steps
    # Checked before the model loads: a bad option fails in a second, not after a minute of loading.
    calib = CalibrationSettings(loss=loss.value, param=param.value, trials=trials, sampler=sampler.value,
                                low=low, high=high, grid_points=grid_points, k=None if k < 0 else k,
                                samples=calib_samples, seed=seed, clip_model=clip_model or None)
    from qsched_search.pipeline.lora import LoraSpec, lora_mismatch

    recorded = tuple(LoraSpec(a["id"], a["scale"]) for a in ((loaded.loras if loaded else None) or {}).get("adapters", []))
    pool_given = read_prompts(prompts)
    settings = RunSettings(model=model or (loaded.model_id if loaded else "embedded"), steps=steps,
                           precisions=tuple(sorted(set(levels) - {reference})), reference=reference, samples=64,
                           prompts=pool_given,
                           seed=seed, device=device, dtype=dtype, batch_size=batch_size, menu=menu or None,
                           weights_dir=weights_dir or None, family=family or None, backend=backend.value,
                           compile=compile.value if compile else (loaded.execution.get("compile") if loaded else None),
                           cuda_graphs=cuda_graphs, loras=parse_loras(lora) if lora else recorded)
    layers = None
    if loaded is not None:
        layers = {lv: loaded.quantized_layers(lv) for lv in set(levels) if loaded.quantized_layers(lv) is not None} or None
    session = open_session(settings, metrics=False, menu=loaded.menu() if loaded else None, layers=layers)
    try:
        for line in lora_lines(session.model.loras):
            console.print(line, highlight=False)
        if loaded is not None:
            fused = session.model.loras.fused if session.model.loras is not None else None
            mismatch = lora_mismatch(loaded.loras, session.model.denoiser, fused, session.model.family.denoiser)
            if mismatch:
                console.print(f"[yellow]warning:[/] {mismatch}", highlight=False)
        pool = list(pool_given or session.model.family.default_prompts)
        if not pool:
            raise QschedError(f"model family {session.model.family.family!r} has no default prompts; pass the "
                              "calibration prompt pool with --prompts 'a,b' or @FILE")
        if calib_prompts < 0 or calib_prompts > len(pool):
            raise QschedError(f"--calib-prompts {calib_prompts} is outside 0..{len(pool)} (the pool has {len(pool)} prompts)")
        chosen = tuple(pool[: calib_prompts or len(pool)])
        calib = replace(calib, prompts=chosen)
        objective = build_objective(calib.loss, session.model.family.family, k=calib.k, clip_model=calib.clip_model,
                                    device=device, weights_dir=weights_dir or None)
        console.print(f"calibrating {calib.param} coefficients of {','.join(levels)} with {objective.name} on "
                      f"{calib.samples} samples of {len(chosen)} prompts ({', '.join(chosen[:5])}{'...' if len(chosen) > 5 else ''})")
        columns = [TextColumn("[bold]calibrate[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("", total=calib.evaluations)
            result = run_calibration(
                session.runner, levels, calib, objective, eval_seeds=session.eval_set.seeds,
                on_trial=lambda row: progress.update(task, advance=1, description=f"best {row['best_so_far']:.4f}"))
        results = ResultsDir(out)
        write_json(results.coefficients, result.coefficients.to_dict())
        write_csv(results.calibration_trials_csv, result.trials)
        sched = schedule_with_coefficients(result, session, loaded)
        save_schedule(sched, results.schedule)
        update_manifest(results.manifest, "calibrate", {
            **session.describe(), "levels_calibrated": list(levels), "device": device_name(device),
            "calibration": result.coefficients.calibration, "lora_effects": session.lora_record(),
            "seconds": round(time.time() - started, 1)})
    finally:
        session.close()
    console.print(f"{result.coefficients.describe()}: {objective.name} {result.best['value']:.4f} vs "
                  f"{result.baseline['value']:.4f} without coefficients ({result.evaluations} evaluations)")
    console.print(f"wrote {results.coefficients}, {results.schedule}, {results.calibration_trials_csv} in "
                  f"{time.time() - started:.0f} s")
