"""Applies a saved schedule to a stock diffusers pipeline, so that a plain `pipe(...)` call follows it, fast.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16).to("cuda")
    apply_schedule(pipe, "schedule.json", backend="torchao", cuda_graphs=True)
    image = pipe("a cat", num_inference_steps=4, guidance_scale=0.0).images[0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qsched_search.pipeline.coefficients import AppliedCoefficients, apply_coefficients
from qsched_search.pipeline.families import Family, detect_family, load_family
from qsched_search.pipeline.lora import FusedLoras, fuse_loaded_loras, lora_mismatch
from qsched_search.pipeline.switching import ScheduleHook, install_schedule, remove_schedule
from qsched_search.quant.backends import build_bank, resolve_backend
from qsched_search.quant.bank import Bank
from qsched_search.quant.groups import LayerGroups, bank_groups
from qsched_search.quant.levels import Menu, load_menu
from qsched_search.results.assignment import StepAssignment

logger = logging.getLogger(__name__)

__all__ = ["AppliedSchedule", "apply_schedule", "schedule_groups"]


@dataclass
class AppliedSchedule:
    """The handle `apply_schedule` returns: what it installed and a way to take it out again."""

    bank: Bank
    levels: tuple[str, ...]
    timesteps: tuple[int, ...]
    hook: ScheduleHook
    coefficients: AppliedCoefficients | None = None
    steps: tuple[StepAssignment, ...] = ()  # each step's level with its per-layer overrides
    groups: LayerGroups | None = None
    loras: FusedLoras | None = None  # the pipeline's own LoRA adapters, fused so that the bank sees their weights

    def remove(self) -> None:
        """Restores the pipeline's denoiser and scheduler (and unfuses LoRA adapters it fused)."""
        remove_schedule(self.bank.denoiser)
        self.bank.remove()
        if self.coefficients is not None:
            self.coefficients.remove()
        if self.loras is not None:
            self.loras.remove()


def apply_schedule(pipe, schedule, menu: Menu | str | Path | None = None, family: Family | str | None = None,
                   coefficients: bool = True, backend: str = "auto", cuda_graphs: bool = False,
                   compile: str | None = None, grouping: str | None = None) -> AppliedSchedule:
    """Installs the schedule's precision bank in `pipe`'s denoiser, and a hook that picks each call's level.

    The level of a call is that of the step whose timestep it is called with (`qsched_search.pipeline.switching`:
    the rule the search's rollout uses), so both halves of a classifier-free-guidance batch run at one level, and a
    run with another number of steps fails loudly instead of running at a wrong precision. A schedule that records
    which layers each level quantized (schema 2) gets exactly those layers, so the images equal the search's for the
    same backend, device, prompts and seeds. Per-layer overrides (schema 3) name layer groups as the file recorded
    them (`layer_groups`), else the family's (`grouping`); on the real-kernel bank each step with overrides runs a
    compiled copy of its own, built here (`handle.bank.memory()["assignment_copies"]`). Its `coefficients` section,
    if any, is installed on `pipe.scheduler`.

    LoRAs the pipeline holds (loaded with `pipe.load_lora_weights`, active adapters at their `set_adapters` weights)
    are fused into its weights before the bank is built, the order that works with quantized layers; `.remove()`
    unfuses them. When they are not the LoRAs the schedule was measured with (or the schedule had some and the
    pipeline has none), one warning line says so: a LoRA changes which steps tolerate low precision.

    Args:
        pipe: a diffusers pipeline of a family in configs/families.
        schedule (`str`, `Path` or `Schedule`): a schedule.json path or a loaded schedule.
        menu (*optional*): the precision menu; the one recorded in the schedule (else the packaged menu) if omitted.
        family (*optional*): the model family; detected from the pipeline if omitted.
        coefficients (`bool`, defaults to True): apply the schedule's coefficients section, if it has one.
        backend (`str`, defaults to `"auto"`): `torchao` (real kernels: the fast path; CUDA), `sim` (simulated
            rounding, any device), or `auto` (torchao when the denoiser is on a CUDA device).
        cuda_graphs (`bool`, defaults to False): replay each level as one CUDA graph (torchao): no host overhead.
        compile (`str`, *optional*): the real-kernel bank's compile scope; the schedule's if it records one.
        grouping (`str`, *optional*): the family's grouping the overrides name, when the schedule does not record
            its groups; the family's default if None.

    Returns:
        `AppliedSchedule`: call `.remove()` to restore the pipeline.
    """
    from qsched_search.results.schedule import Schedule, load_schedule

    if not isinstance(schedule, Schedule):
        schedule = load_schedule(schedule)
    if not isinstance(menu, Menu):
        menu = load_menu(menu) if menu else (schedule.menu() or load_menu())
    if isinstance(family, str):
        family = load_family(family)
    family = family or detect_family(pipe)
    denoiser = family.denoiser_of(pipe)
    device = str(next(denoiser.parameters()).device)
    chosen = resolve_backend(backend, device)
    measured_on = schedule.backend
    if measured_on is not None and measured_on != chosen:
        logger.warning("the schedule's quality was measured on backend %s and it now runs on %s: expect other "
                       "images than the search measured", measured_on, chosen)
    levels = tuple(schedule.levels)
    steps = schedule.step_assignments
    needed = list(schedule.all_levels)
    layers = {lv: schedule.quantized_layers(lv) for lv in needed if schedule.quantized_layers(lv) is not None}
    loras = fuse_loaded_loras(pipe, family.denoiser)  # before the bank: it quantizes the fused weights
    bank = groups = None
    try:
        mismatch = lora_mismatch(schedule.loras, denoiser, loras, family.denoiser)
        if mismatch:
            logger.warning(mismatch)
        bank = build_bank(chosen, denoiser, menu, needed, schedule.reference, list(family.exclude),
                          compile=compile or schedule.execution.get("compile"), cuda_graphs=cuda_graphs,
                          layers=layers or None)
        groups = schedule_groups(schedule, bank, family, grouping)
        hook = install_schedule(bank, pipe, steps, family.timestep_scale, groups=groups)
        bank.prepare(hook.assignments)
        applied = apply_coefficients(pipe, schedule.coefficients) if coefficients else None
    except BaseException:
        remove_schedule(denoiser)
        if bank is not None:
            bank.remove()
        if loras is not None:
            loras.remove()
        raise
    return AppliedSchedule(bank=bank, levels=levels, timesteps=tuple(schedule.timesteps), hook=hook,
                           coefficients=applied, steps=steps, groups=groups, loras=loras)


def schedule_groups(schedule, bank: Bank, family: Family, grouping: str | None = None) -> LayerGroups | None:
    """The layer groups a schedule's overrides name, on `bank`'s denoiser: as the file recorded them (the module
    names the search measured), else the family's grouping, checked against the overrides; None when no override
    names a group."""
    if not any(s.groups for s in schedule.step_assignments):
        return None
    recorded = schedule.extras.get("layer_groups")
    if recorded:
        return LayerGroups.from_dict(recorded, bank.switchable_layers)
    groups = bank_groups(bank, family, grouping)
    schedule.validate_groups(groups.names, f"grouping {groups.name!r} of model family {family.family!r}")
    return groups
