"""`qsched export`: writes a schedule in a format other stacks read (diffusers' and vLLM-Omni's step policy)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from qsched_search.cli._common import VerboseOpt, console, user_errors
from qsched_search.errors import QschedError


class ExportFormat(str, enum.Enum):
    diffusers_step_policy = "diffusers-step-policy"


@user_errors
def export(
    schedule: Annotated[Path, typer.Argument(metavar="SCHEDULE", help="A schedule.json (or the results folder holding it).", show_default=False)],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="A ModelOpt FP8 checkpoint folder or its transformer config.json (updated in place), or a new .json file (the fragment to merge in).", show_default=False)],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="diffusers-step-policy: quantization_config.runtime.diffusion_step_policy, as diffusers and vLLM-Omni read it.")] = ExportFormat.diffusers_step_policy,
    verbose: VerboseOpt = False,
):
    """Write SCHEDULE's per-step levels as a step policy in OUT and read it back to check it.

    diffusers-step-policy expresses two levels, float8_e4m3fn W8A8 (native) and float8_e4m3fn weights with 16-bit
    activations (a16), with the a16 steps first and last; any other level or pattern is refused with one line.

    Example: qsched export --format diffusers-step-policy results/demo/schedule.json ckpt/transformer/config.json
    """
    from qsched_search.quant.levels import load_menu
    from qsched_search.results.schedule import load_schedule
    from qsched_search.results.step_policy import export_step_policy, policy_modes, read_step_policy, schedule_modes

    loaded = load_schedule(schedule)
    menu = loaded.menu() or load_menu()
    path = export_step_policy(loaded.levels, menu, out)
    policy = read_step_policy(path)
    modes = policy_modes(policy, loaded.steps)
    if modes != schedule_modes(loaded.levels, menu):  # a failed read-back means the file says something else
        raise QschedError(f"{path} reads back as {modes}, not the schedule's {list(loaded.levels)}; the file was changed while written")
    console.print(f"wrote diffusion_step_policy to {path}: first {policy['first_steps']['count']} and last "
                  f"{policy['last_steps']['count']} steps a16, the others native; at {loaded.steps} steps: "
                  f"{', '.join(modes)} ({', '.join(loaded.levels)})", highlight=False, soft_wrap=True)
