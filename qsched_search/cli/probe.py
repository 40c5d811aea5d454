"""`qsched probe`: per-step sensitivity of a model to each lower precision."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qsched_search.cli._common import (BackendChoice, BackendOpt, BatchOpt, CompileOpt, CudaGraphsOpt, DeviceOpt, DtypeOpt, FamilyOpt,
                                       LoraOpt, MenuOpt, MetricsOpt, ModelOpt, PrecisionsOpt, PromptsOpt, ReferenceOpt,
                                       SamplesOpt, SeedOpt, StepsOpt, VerboseOpt, WeightsOpt, console, lora_lines,
                                       parse_loras, reuse_line, split_list, user_errors)
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
    lora: LoraOpt = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Results folder.")] = "results/probe",
    verbose: VerboseOpt = False,
):
    """Run the sampler with one step at a lower precision (the others at reference), for every step and level.

    Writes OUT/probe.csv (step, timestep, precision, metric, value, 95% CI, n, delta from the noise floor),
    OUT/probe_heatmap.png and OUT/manifest.json. Finished cells are kept in OUT/probe_cells.jsonl: a killed
    probe restarts where it stopped. On a CUDA device the levels run on torchao's real kernels (--backend auto);
    on a CPU they are simulated, rounding as those kernels do. With --lora, each LoRA is fused into the model first
    and must change its reference images; the probe then measures the fine-tuned model.

    Example: qsched probe --steps 4 --precisions w8a8,w4a8,w4a4 --samples 64 --out results/demo
    """
    from qsched_search.search.probe import probe_cells, run_probe, write_probe

    started = time.time()
    from qsched_search.quant.backends import default_precisions

    levels = split_list(precisions) or default_precisions(backend.value, device, dtype, menu or None)
    settings = RunSettings(model=model, steps=steps, precisions=levels, reference=reference,
                           samples=samples, seed=seed, prompts=read_prompts(prompts), metrics=split_list(metrics),
                           device=device, dtype=dtype, batch_size=batch_size, menu=menu or None,
                           weights_dir=weights_dir or None, family=family or None, backend=backend.value,
                           compile=compile.value if compile else None, cuda_graphs=cuda_graphs, loras=parse_loras(lora))
    results = ResultsDir(out)
    check_writable(results.root, "--out")
    session = open_session(settings)
    try:
        for line in lora_lines(session.model.loras):
            console.print(line, highlight=False)
        described = session.describe()
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
    finally:
        session.close()
    if primary is not None:
        _print_summary(frame, primary.name)
    console.print(reuse_line(result.fields["prefix_reuse"]), highlight=False)
    console.print(f"wrote {', '.join(map(str, files))} in {time.time() - started:.0f} s", highlight=False)


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
