"""What every command shares: one-line errors, the console, options that mean the same everywhere."""

from __future__ import annotations

import enum
import errno
import functools
from typing import Annotated, Optional

import typer
from rich.console import Console

from qsched_search.errors import QschedError
from qsched_search.logs import quiet_libraries

console = Console(stderr=True)
USER_ERROR = 2  # bad input or a missing resource; 1 is kept for "ran fine, but the gate failed"
IO_ERROR = 74  # sysexits' EX_IOERR: a write failed (disk full...); the input was fine and the run can resume


def fail(message: str, code: int = USER_ERROR) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn):
    """Turns a QschedError into a one-line message and exit code 2, and Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_libraries(verbose=bool(kwargs.pop("verbose", False)))
        try:
            return fn(*args, **kwargs)
        except QschedError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            console.print("interrupted: finished work is saved; run the same command again to resume")
            raise typer.Exit(130) from None
        except OSError as exc:  # disk full, a folder gone or read-only mid-run: the atomic writes left no partial file
            where = f" {str(exc.filename)!r}" if exc.filename else ""
            raise fail(f"file system error on{where}: {exc.strerror or exc} (errno {errno.errorcode.get(exc.errno, exc.errno)}); "
                       "free space or pass another --out, then run the same command again to resume", IO_ERROR) from None

    return wrapper


def reuse_line(stats: dict) -> str:
    """One line on trajectory prefix reuse: denoiser calls run, reused, and what a run without reuse makes."""
    run, total = stats["denoiser_calls_run"], stats["denoiser_calls_without_reuse"]
    saved = f" ({total / run:.2f}x fewer)" if run else ""
    return f"denoiser calls: {run} run, {stats['denoiser_calls_served']} answered from shared prefixes, {total} without reuse{saved}"


def split_list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def parse_loras(values) -> tuple:
    """`--lora` values (PATH_OR_ID[:SCALE], repeatable) as LoraSpecs; a malformed one is a one-line error."""
    from qsched_search.pipeline.lora import LoraSpec

    return tuple(LoraSpec.parse(v) for v in values or ())


def lora_lines(lora_set) -> list[str]:
    """One line per fused LoRA: what it matched and how far its reference images moved from the base model's."""
    if lora_set is None:
        return []
    lines = []
    for lora in lora_set.loras:
        matched = ", ".join(f"{c} {n}" for c, n in lora.matched.items())
        line = f"LoRA {lora.describe()}: {matched} modules"
        effect = lora.effect
        if effect is not None:
            psnr = "identical" if effect["psnr_db"] == float("inf") else f"PSNR {effect['psnr_db']:.1f} dB"
            line += (f"; its reference images differ from the base model's by {effect['mean_abs_diff']:.4f} mean "
                     f"|pixel difference| ({psnr}; noise floor {effect['noise_floor_mean_abs_diff']:.2g}) on "
                     f"{effect['samples']} samples")
        lines.append(line)
    return lines


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'embedded' (the shipped Fashion-MNIST LCM), a local diffusers pipeline folder, or a hub id.")]
FamilyOpt = Annotated[str, typer.Option("--family", help="Model family (a file in configs/families, e.g. sdxl-turbo); detected from the pipeline if omitted.")]
StepsOpt = Annotated[int, typer.Option("--steps", "-s", help="Denoising steps.")]
PrecisionsOpt = Annotated[str, typer.Option("--precisions", "-p", help=(
    "Comma-separated lower levels from the menu (see `qsched precisions`); if omitted, w8a8,w4a8,w4a4 on the "
    "simulation and fp8,w8a8,w4a16 on the real kernels (w4a16 only for a bfloat16 pipeline)."))]
ReferenceOpt = Annotated[str, typer.Option("--reference", help="The pipeline's own level, that every delta is measured against.")]
SamplesOpt = Annotated[int, typer.Option("--samples", "-n", help="Samples per schedule (prompts cycle; sample k uses seed+k).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Base seed.")]
PromptsOpt = Annotated[str, typer.Option("--prompts", help="Comma-separated prompts or @FILE (one per line); the family's defaults if omitted.")]
MetricsOpt = Annotated[str, typer.Option("--metrics", help="Comma-separated metrics; the family's defaults if omitted.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda[:N]; nothing is moved implicitly.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="The pipeline's own dtype: float32, bfloat16 or float16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per pipeline call.")]
PrefixCacheOpt = Annotated[Optional[float], typer.Option("--prefix-cache-mb", help=(
    "Memory for reused denoising prefixes, in MiB (schedules sharing their first steps' levels skip those denoiser "
    "calls, with the same images bit for bit); 0 turns reuse off; default: 128 steps' outputs of the evaluation set."))]
MenuOpt = Annotated[str, typer.Option("--menu", help="Precision menu YAML; configs/precisions.yaml if omitted.")]
class BackendChoice(str, enum.Enum):
    auto = "auto"
    sim = "sim"
    torchao = "torchao"


class CompileChoice(str, enum.Enum):
    full = "full"
    regional = "regional"
    none = "none"


BackendOpt = Annotated[BackendChoice, typer.Option("--backend", help="sim: simulated rounding (any device); torchao: real kernels (CUDA); auto: torchao on a CUDA device, else sim.")]
CompileOpt = Annotated[Optional[CompileChoice], typer.Option("--compile", help="The real-kernel bank's torch.compile scope (it also decides which layers quantize, in both backends); the model's repeated blocks if it declares them, else the whole model.", show_default=False)]
CudaGraphsOpt = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay each level as one captured CUDA graph (--backend torchao): no host overhead per step.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="A LoRA fused into the pipeline before it is quantized: a .safetensors file, a folder holding pytorch_lora_weights.safetensors, or a hub id, with an optional :SCALE (default 1). Repeat for several (fused in order). Each must change the model's reference images.", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show library warnings and debug logs.")]
WeightsOpt = Annotated[str, typer.Option("--weights-dir", envvar="QSCHED_WEIGHTS_DIR", help="Folder of metric weights (see `qsched weights`).")]
LayersOpt = Annotated[bool, typer.Option("--layers", help="Also probe each layer group alone at each step (see `qsched precisions --groups`).")]
GroupingOpt = Annotated[str, typer.Option("--grouping", help="The layer grouping: a name from the family's layer_groups (its default if omitted) or a YAML file of {name, layers} entries.")]
