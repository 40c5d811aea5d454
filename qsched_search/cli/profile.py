"""`qsched profile`: each precision level's denoiser step latency and memory on this device, as a profile CSV."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from qsched_search.cli._common import (BackendChoice, BackendOpt, CompileOpt, CudaGraphsOpt, DeviceOpt, LoraOpt, MenuOpt,
                                       ModelOpt, PrecisionsOpt, ReferenceOpt, VerboseOpt, console, parse_loras, split_list,
                                       user_errors)


@user_errors
def profile(
    model: ModelOpt = "embedded",
    precisions: PrecisionsOpt = "fp8,w8a8",
    reference: ReferenceOpt = "fp32",
    batch: Annotated[int, typer.Option("--batch", help="Images per denoiser call.")] = 1,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Image size in pixels; the family's default if omitted.", show_default=False)] = None,
    device: DeviceOpt = "cuda",
    dtype: Annotated[str, typer.Option("--dtype", help="The pipeline's own dtype (the reference level runs in it).")] = "bfloat16",
    backend: BackendOpt = BackendChoice.auto,
    compile: CompileOpt = None,
    compile_mode: Annotated[str, typer.Option("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs).")] = "",
    cuda_graphs: CudaGraphsOpt = False,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls per level after compiling.")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed calls per level; the CSV has their median and spread.")] = 20,
    family: Annotated[str, typer.Option("--family", help="Model family (a file in configs/families); detected if omitted.")] = "",
    menu: MenuOpt = "",
    lora: LoraOpt = None,
    out: Annotated[str, typer.Option("--out", "-o", help="The profile CSV to write.")] = "results/profile/latency.csv",
    verbose: VerboseOpt = False,
):
    """Measure each level's denoiser step latency (CUDA events, median of --repeats after warm-up) and memory.

    Writes a CSV with columns level, ms_per_step (median), ms_p10, ms_p90, batch, resolution, device, compile_s and
    memory columns; `qsched search --cost latency --profile FILE` reads it. Run it on the GPU you will deploy on.
    """
    from qsched_search.quant.latency import PROFILE_COLUMNS, ProfileSettings, profile_model, write_csv

    settings = ProfileSettings(model=model, precisions=split_list(precisions), reference=reference, batch=batch,
                               resolution=resolution, device=device, dtype=dtype, backend=backend.value,
                               compile=compile.value if compile else None, compile_mode=compile_mode or None, cuda_graphs=cuda_graphs, warmup=warmup,
                               repeats=repeats, family=family or None, menu=menu or None, loras=parse_loras(lora))
    rows = profile_model(settings, on_status=lambda msg: console.print(msg, highlight=False))
    path = write_csv(rows, out, PROFILE_COLUMNS)
    table = Table(title=f"step latency on {rows[0]['device']} (batch {batch}, {rows[0]['resolution']} px, {rows[0]['backend']})")
    for col in ("level", "ms/step (median)", "p10-p90", "vs reference", "compile s", "kernel"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["level"], f"{row['ms_per_step']:.3f}", f"{row['ms_p10']:.3f}-{row['ms_p90']:.3f}",
                      f"{row['relative_to_reference']:.3f}", f"{row['compile_s']:.1f}", str(row["kernel"]))
    Console().print(table)
    console.print(f"wrote {path}", highlight=False)
