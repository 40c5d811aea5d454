"""`qsched generate`: run a pipeline with a saved schedule and write its images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

from qsched_search.cli._common import (BackendChoice, BackendOpt, BatchOpt, CudaGraphsOpt, DeviceOpt, DtypeOpt, FamilyOpt,
                                       PromptsOpt, VerboseOpt, WeightsOpt, console, lora_lines, parse_loras, user_errors)
from qsched_search.pipeline.apply import schedule_groups
from qsched_search.pipeline.lora import LoraSpec, lora_mismatch
from qsched_search.pipeline.coefficients import apply_coefficients
from qsched_search.results.images import save_png
from qsched_search.results.io import write_csv
from qsched_search.results.schedule import load_schedule
from qsched_search.results.tables import schedule_key
from qsched_search.session import RunSettings, open_session, read_prompts


@user_errors
def generate(
    schedule: Annotated[Path, typer.Option("--schedule", help="A schedule.json written by `qsched search`.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The pipeline; the schedule's own model id if omitted.")] = "",
    family: FamilyOpt = "",
    prompts: PromptsOpt = "",
    samples: Annotated[int, typer.Option("--samples", "-n", help="Images to make (prompts cycle; image k uses seed+k).")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; the schedule's search seed if omitted.")] = -1,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 64,
    weights_dir: WeightsOpt = "",
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs and index.csv.")] = "results/generate",
    no_coefficients: Annotated[bool, typer.Option("--no-coefficients", help="Ignore the schedule's coefficients "
                                                  "section (run the stock scheduler).")] = False,
    backend: BackendOpt = BackendChoice.auto,
    cuda_graphs: CudaGraphsOpt = False,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="A LoRA to fuse before quantizing (PATH_OR_ID[:SCALE], repeatable); the LoRAs the schedule records if omitted.", show_default=False)] = None,
    verbose: VerboseOpt = False,
):
    """Run the pipeline with the schedule's level at each step and write OUT/NN.png and OUT/index.csv.

    A schedule with a `coefficients` section (from `qsched calibrate` or `qsched search --with-coefficients`) also
    rescales the denoiser output and the sample before each scheduler step, unless --no-coefficients is given.
    With the schedule's seed and prompts, on the backend and device it was measured on, the images equal the
    search's images/schedule/ files bit for bit (each level quantizes the layers the schedule records). The LoRAs
    the schedule was measured with are fused first unless --lora names others (a one-line warning says so).
    """
    loaded = load_schedule(schedule)
    coefficients = None if no_coefficients else loaded.coefficients
    recorded = tuple(LoraSpec(a["id"], a["scale"]) for a in (loaded.loras or {}).get("adapters", []))
    menu = loaded.menu()
    settings = RunSettings(model=model or loaded.model_id, steps=loaded.steps, precisions=tuple(sorted(set(loaded.all_levels))),
                           reference=loaded.reference, samples=samples,
                           seed=seed if seed >= 0 else int(loaded.provenance.get("seed", 0)),
                           prompts=read_prompts(prompts), device=device, dtype=dtype, batch_size=batch_size,
                           weights_dir=weights_dir or None, family=family or None, backend=backend.value,
                           compile=loaded.execution.get("compile"), cuda_graphs=cuda_graphs,
                           loras=parse_loras(lora) if lora else recorded)
    if loaded.backend is not None and loaded.backend != settings.backend:
        console.print(f"[yellow]warning:[/] the schedule was measured on backend {loaded.backend}; this run uses "
                      f"{settings.backend}, so its images differ from the search's", highlight=False)
    layers = {lv: loaded.quantized_layers(lv) for lv in set(loaded.all_levels) if loaded.quantized_layers(lv) is not None}
    session = open_session(settings, metrics=False, menu=menu, layers=layers or None)
    try:
        for line in lora_lines(session.model.loras):
            console.print(line, highlight=False)
        fused = session.model.loras.fused if session.model.loras is not None else None
        mismatch = lora_mismatch(loaded.loras, session.model.denoiser, fused, session.model.family.denoiser)
        if mismatch:
            console.print(f"[yellow]warning:[/] {mismatch}", highlight=False)
        elif session.model.weights_sha256() != loaded.weights_sha256:
            console.print(f"[yellow]warning:[/] {settings.model!r} has other weights than the schedule was searched on")
        session.runner.groups = schedule_groups(loaded, session.bank, session.model.family)
        applied = apply_coefficients(session.model.pipe, coefficients)
        try:
            result = session.runner.run(loaded.step_assignments)
        finally:
            if applied is not None:
                applied.remove()
        if loaded.has_overrides:
            memory = session.bank.memory()
            mixed = sum(1 for s in loaded.step_assignments if s.overrides)
            console.print(f"per-layer overrides in {mixed} of {loaded.steps} steps: {memory['assignment_copies']} extra "
                          f"compiled copies on backend {session.bank.backend} "
                          f"({memory['assignment_extra_bytes'] / 2**20:.2f} MiB beyond the level copies)", highlight=False)
    finally:
        session.close()
    rows = []
    for k, image in enumerate(result.images):
        file = f"{k:02d}.png"
        save_png(image, Path(out) / file)
        rows.append({"sample": k, "prompt": session.eval_set.prompts[k], "seed": session.eval_set.seeds[k], "file": file,
                     "schedule": schedule_key(loaded.step_assignments),
                     "coefficients": coefficients.describe() if coefficients else "none",
                     "problem": result.problems[k] or ""})
    write_csv(Path(out) / "index.csv", pd.DataFrame(rows))
    bad = sum(p is not None for p in result.problems)
    if bad:
        console.print(f"[yellow]warning:[/] {bad} of {len(rows)} images are unusable (NaN, blank or noise); see index.csv")
    with_coeffs = f"; coefficients {coefficients.describe()}" if coefficients else ""
    console.print(f"wrote {len(rows)} images to {out}/ (schedule {schedule_key(loaded.step_assignments)}{with_coeffs})")
