"""`qsched probe`: per-step sensitivity of a model to each lower precision."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qsched_search.cli._common import (BackendChoice, BackendOpt, BatchOpt, CompileOpt, CudaGraphsOpt, DeviceOpt, DtypeOpt, FamilyOpt,
                                       GroupingOpt, LayersOpt, LoraOpt, MenuOpt, MetricsOpt, ModelOpt, PrecisionsOpt,
                                       PrefixCacheOpt, PromptsOpt, ReferenceOpt, SamplesOpt, SeedOpt, StepsOpt, VerboseOpt,
                                       WeightsOpt, console, lora_lines, parse_loras, reuse_line, split_list, user_errors)
from qsched_search.errors import QschedError
from qsched_search.quant.groups import bank_groups
from qsched_search.results.io import check_writable
from qsched_search.results.layout import ResultsDir
from qsched_search.results.provenance import device_name
from qsched_search.session import RunSettings, open_session, read_prompts


@user_errors
def probe(
    model: ModelOpt = "embedded",
    family: FamilyOpt = "",
    steps: StepsOpt = 4,
    precisions: PrecisionsOpt = "",
    reference: ReferenceOpt = "fp32",
    samples: SamplesOpt = 64,
    seed: SeedOpt = 0,
    prompts: PromptsOpt = "",
    metrics: MetricsOpt = "",
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
    out: Annotated[str, typer.Option("--out", "-o", help="Results folder.")] = "results/probe",
    layers: LayersOpt = False,
    grouping: GroupingOpt = "",
    layer_samples: Annotated[int, typer.Option("--layer-samples", help="With --layers: samples per group cell (the "
                                               "first N of --samples; fewer saves time and is recorded); all if 0.")] = 0,
    layer_precisions: Annotated[str, typer.Option("--layer-precisions", help="With --layers: the levels each group is "
                                                  "probed at (comma-separated); --precisions if omitted.")] = "",
    verbose: VerboseOpt = False,
):
    """Run the sampler with one step at a lower precision (the others at reference), for every step and level.

    Writes OUT/probe.csv (step, timestep, precision, metric, value, 95% CI, n, delta from the noise floor),
    OUT/probe_heatmap.png and OUT/manifest.json. Finished cells are kept in OUT/probe_cells.jsonl: a killed
    probe restarts where it stopped. On a CUDA device the levels run on torchao's real kernels (--backend auto);
    on a CPU they are simulated, rounding as those kernels do. With --lora, each LoRA is fused into the model first
    and must change its reference images; the probe then measures the fine-tuned model.

    With --layers, also every layer group alone at each level in each step (everything else at the reference):
    OUT/probe_layers.csv and one OUT/probe_layers_heatmap_LEVEL.png per level, kept in OUT/probe_layer_cells.jsonl
    as they finish.

    Example: qsched probe --steps 4 --precisions w8a8,w4a8,w4a4 --samples 64 --out results/demo
    """
    from qsched_search.quant.backends import default_precisions
    from qsched_search.search.probe import probe_cells, run_probe, write_probe

    started = time.time()
    levels = split_list(precisions) or default_precisions(backend.value, device, dtype, menu or None)
    settings = RunSettings(model=model, steps=steps, precisions=levels, reference=reference,
                           samples=samples, seed=seed, prompts=read_prompts(prompts), metrics=split_list(metrics),
                           device=device, dtype=dtype, batch_size=batch_size, menu=menu or None,
                           weights_dir=weights_dir or None, family=family or None, backend=backend.value,
                           compile=compile.value if compile else None, cuda_graphs=cuda_graphs, loras=parse_loras(lora))
    results = ResultsDir(out)
    check_writable(results.root, "--out")
    layer_levels = split_list(layer_precisions) or settings.precisions
    unknown = [lv for lv in layer_levels if lv not in settings.precisions]
    if layers and unknown:
        raise QschedError(f"--layer-precisions {','.join(layer_levels)} has {unknown[0]!r}, which is not in --precisions "
                          f"{','.join(settings.precisions)}; pass levels of --precisions")
    if layers and not 0 <= layer_samples <= samples:
        raise QschedError(f"--layer-samples {layer_samples} is outside 1..{samples} (the step probe's --samples); pass at "
                          f"most {samples}, or 0 for all")
    session = open_session(settings, prefix_cache_mb=prefix_cache_mb)
    try:
        for line in lora_lines(session.model.loras):
            console.print(line, highlight=False)
        described = session.describe()
        groups = bank_groups(session.bank, session.model.family, grouping or None) if layers else None  # fail early
        cells = probe_cells(settings.precisions, reference, steps)
        columns = [TextColumn("[bold]probe[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("", total=len(cells))
            result = run_probe(session.evaluator, settings.precisions, results, described,
                               on_cell=lambda cell: progress.update(task, advance=1, description=cell.key))
        primary = session.evaluator.metrics[0] if session.evaluator.metrics else None
        files = write_probe(result, results, primary, {
            **described, "model": session.model.model_id, "prompts": sorted(set(session.eval_set.prompts)),
            "device": device_name(device), "timesteps": session.evaluator.timesteps,
            "bank_memory": session.bank.memory(), "level_costs": session.bank.level_costs(),
            "lora_effects": session.lora_record()},
            title=f"{session.model.model_id}: change in {primary.name if primary else ''} when one step runs at a lower precision")
        frame = result.table
        if layers:
            files += _probe_layers(session, settings, results, described, primary, groups, layer_samples or None,
                                   layer_levels)
    finally:
        session.close()
    if primary is not None:
        _print_summary(frame, primary.name)
    console.print(reuse_line(result.fields["prefix_reuse"]), highlight=False)
    console.print(f"wrote {', '.join(map(str, files))} in {time.time() - started:.0f} s", highlight=False)


def _probe_layers(session, settings, results, described, primary, groups, samples, levels) -> list:
    from qsched_search.search.probe import layer_probe_cells, run_layer_probe, write_layer_probe

    cells = layer_probe_cells(levels, settings.reference, settings.steps, groups.names)
    columns = [TextColumn("[bold]probe --layers[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=len(cells))
        result = run_layer_probe(session.evaluator, levels, groups, results, described, samples,
                                 on_cell=lambda cell: progress.update(task, advance=1, description=cell.key[:60]))
    fewer = result.fields["fewer_samples_than_step_cells"]
    files = write_layer_probe(result, results, primary, {"model": session.model.model_id, "groups_detail": groups.to_dict()},
                              title=f"{session.model.model_id}: change in {primary.name if primary else ''} when one layer "
                                    f"group runs at a lower precision in one step"
                                    + (f" ({result.fields['samples']} of {result.fields['step_samples']} samples)" if fewer else ""))
    console.print(f"layer probe: {len(groups.groups)} groups ({groups.name}) x {settings.steps} steps x {len(levels)} "
                  f"levels on {result.fields['samples']} samples"
                  + (f" (fewer than the step cells' {result.fields['step_samples']})" if fewer else ""), highlight=False)
    if primary is not None:
        rows = result.table[(result.table.kind == "group") & (result.table.metric == primary.name)]
        worst = rows.sort_values("delta", ascending=primary.higher_is_better).head(5)
        for r in worst.itertuples(index=False):
            console.print(f"  most sensitive: step {r.step} {r.group} at {r.precision}: {r.delta:+.4g}", highlight=False)
    return files


def _print_summary(frame, metric: str) -> None:
    data = frame[frame.metric == metric]
    levels = list(dict.fromkeys(data[data.kind != "reference"].precision))
    table = Table(title=f"change in {metric} vs reference (noise floor {data[data.kind == 'reference'].value.iloc[0]:.3g})")
    table.add_column("step")
    for level in levels:
        table.add_column(level, justify="right")
    for step in sorted(data[data.kind == "step"].step.dropna().unique()):
        row = data[(data.kind == "step") & (data.step == step)]
        table.add_row(f"{step} (t={row.timestep.iloc[0]})", *[_fmt(row[row.precision == lv]) for lv in levels])
    uniform = data[data.kind == "uniform"]
    table.add_row("all", *[_fmt(uniform[uniform.precision == lv]) for lv in levels])
    console.print(table)


def _fmt(rows) -> str:
    if rows.empty or rows.fail_reason.iloc[0]:
        return "failed"
    return f"{rows.delta.iloc[0]:+.4f}"
