"""Applies a saved precision schedule (and its coefficients) to a diffusers pipeline, so that a plain call follows it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qsched_search.bank import PrecisionBank
from qsched_search.coefficients import AppliedCoefficients, apply_coefficients
from qsched_search.errors import QschedError
from qsched_search.families import Family, detect_family, load_family
from qsched_search.precisions import Menu, load_menu


@dataclass
class AppliedSchedule:
    """The handle `apply_schedule` returns: what it installed and a way to take it out again."""

    bank: PrecisionBank
    levels: tuple[str, ...]
    timesteps: tuple[int, ...]
    _hook: object
    coefficients: AppliedCoefficients | None = None

    def remove(self) -> None:
        """Restores the pipeline's original layers and scheduler."""
        self._hook.remove()
        self.bank.remove()
        if self.coefficients is not None:
            self.coefficients.remove()


def _timestep_of(args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise QschedError("the denoiser was called without a timestep; apply_schedule needs one to pick the level")
    t = torch.as_tensor(t)
    return float(t.flatten()[0])


def apply_schedule(pipe, schedule, menu: Menu | str | Path | None = None, family: Family | str | None = None,
                   coefficients: bool = True) -> AppliedSchedule:
    """Installs a precision bank into `pipe`'s denoiser that picks each call's level from the schedule.

    If the schedule has a `coefficients` section (from `qsched calibrate` or `qsched search --with-coefficients`),
    its factors are installed on `pipe.scheduler` too, so the call runs the calibrated sampler.

    The level is chosen by the timestep the denoiser is called with, so both halves of a classifier-free-guidance
    batch (or two separate CFG calls) run at the same level, and a call at a timestep the schedule was not made for
    fails loudly instead of running at a wrong precision.

    Example:
        pipe = StableDiffusionPipeline.from_pretrained("qsched_search/models/fmnist-lcm")
        apply_schedule(pipe, "results/demo/schedule.json")
        images = pipe(["sneaker"], num_inference_steps=4, guidance_scale=0.0, height=32, width=32).images

    Args:
        pipe: a diffusers pipeline whose family is listed in configs/families.
        schedule (`str`, `Path` or `Schedule`): a schedule.json path or a loaded schedule.
        menu (*optional*): the precision menu; the one recorded in the schedule (else configs/precisions.yaml) if
            omitted.
        family (*optional*): the model family; detected from the pipeline class if omitted.
        coefficients (`bool`, defaults to True): apply the schedule's coefficients section, if it has one.

    Returns:
        `AppliedSchedule`: call `.remove()` to restore the pipeline.
    """
    from qsched_search.schedule import Schedule, load_schedule

    if not isinstance(schedule, Schedule):
        schedule = load_schedule(schedule)
    if not isinstance(menu, Menu):
        menu = load_menu(menu) if menu else (schedule.menu() or load_menu())
    if isinstance(family, str):
        family = load_family(family)
    family = family or detect_family(pipe)
    levels, timesteps = tuple(schedule.levels), tuple(int(t) for t in schedule.timesteps)
    bank = PrecisionBank(family.denoiser_of(pipe), menu, sorted(set(levels)), schedule.reference, list(family.exclude))
    by_timestep = dict(zip(timesteps, levels))
    scale = family.timestep_scale  # FLUX calls its transformer with timestep / 1000

    def select_level(module, args, kwargs):
        t = _timestep_of(args, kwargs) * scale
        # The schedule holds int(t) of the scheduler's float timesteps, and a bf16 pipeline rounds t to 8 bits of
        # mantissa: the nearest schedule timestep within that rounding is the step's.
        nearest = min(timesteps, key=lambda s: abs(s - t))
        level = by_timestep[nearest] if abs(nearest - t) <= 1 + 0.005 * abs(t) else None
        if level is None:
            raise QschedError(f"denoiser called at timestep {t:g}, but the schedule covers {list(timesteps)}; "
                              f"run the pipeline with num_inference_steps={len(levels)} as the schedule was made")
        bank.set_level(level)

    # Registered first among pre-hooks, so the bank's per-level call counter sees the level chosen here.
    hook = bank.denoiser.register_forward_pre_hook(select_level, with_kwargs=True, prepend=True)
    try:
        applied = apply_coefficients(pipe, schedule.coefficients) if coefficients else None
    except BaseException:
        hook.remove()
        bank.remove()
        raise
    return AppliedSchedule(bank=bank, levels=levels, timesteps=timesteps, _hook=hook, coefficients=applied)
