"""Installs Q-Sched coefficients on a diffusers scheduler: rescale the denoiser output and the sample before each step."""

from __future__ import annotations

import functools
from typing import Mapping

import torch

from qsched_search.errors import QschedError
from qsched_search.results.coefficients import Coefficients

__all__ = ["AppliedCoefficients", "apply_coefficients", "installed_coefficients"]

# Schedulers whose step() upcasts the sample to float32 first (and casts the result back to the model's dtype).
_UPCASTING = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")

class AppliedCoefficients:
    """Scales the two tensor inputs of a scheduler instance's `step()`; what `apply_coefficients` returns.

    Installs instance attributes `step` and `set_timesteps` that shadow the class's methods (no diffusers file is
    copied or changed); `remove()` deletes them, so the scheduler is its stock self again. Also a context manager.

    The step index is the scheduler's own `step_index` (diffusers' LCM, TCD, Euler, Euler ancestral and flow-match
    Euler keep one; it starts at `begin_index` for img2img), else the number of `step()` calls since the last
    `set_timesteps`. The wrapper carries the stock `step`'s signature (`functools.wraps`), so pipelines that look
    for `generator` or `eta` in it still pass them. For schedulers that upcast the sample to float32 inside `step()`
    (Euler, Euler ancestral, flow-match Euler) a 16-bit sample is upcast before it is scaled, as in the published
    patches; a factor of exactly 1 is not applied at all.
    """

    def __init__(self, scheduler, coefficients: Coefficients):
        if not isinstance(coefficients, Coefficients):
            raise QschedError(f"coefficients must be a Coefficients, got {type(coefficients).__name__}; build one with "
                              "Coefficients.from_ramp(m, s, steps) or Coefficients.from_dict(...)")
        if not callable(getattr(scheduler, "step", None)) or not callable(getattr(scheduler, "set_timesteps", None)):
            raise QschedError(f"{type(scheduler).__name__} has no step()/set_timesteps(); pass a diffusers scheduler "
                              "or a pipeline that has one as .scheduler")
        if "step" in vars(scheduler):
            raise QschedError(f"{type(scheduler).__name__} already has coefficients (or another wrapper) installed on "
                              "step(); call .remove() on the first before installing others")
        order = getattr(type(scheduler), "order", 1)
        if order != 1:
            raise QschedError(f"{type(scheduler).__name__} has order {order}: its step() runs {order} times per "
                              "denoising step, so per-step coefficients are ambiguous; use a first-order scheduler "
                              "(LCM, TCD, Euler, Euler ancestral, flow-match Euler, DDIM)")
        self.scheduler = scheduler
        self.coefficients = coefficients
        self.calls = 0  # step() calls since the last set_timesteps
        self.seen: list[int] = []  # step indices scaled since the last set_timesteps: proof of what ran
        self._stock_step = scheduler.step
        self._stock_set_timesteps = scheduler.set_timesteps
        self._own_index = hasattr(type(scheduler), "step_index") and hasattr(scheduler, "_init_step_index")
        self._upcasts = any(c.__name__ in _UPCASTING for c in type(scheduler).__mro__)

        @functools.wraps(self._stock_step)
        def step(model_output, timestep, sample, *args, **kwargs):
            index = self._index(timestep)
            m, s = self.coefficients.at(index)
            if m != 1.0:
                model_output = model_output * m
            if s != 1.0:
                if self._upcasts and sample.dtype in (torch.float16, torch.bfloat16):
                    # The published patches scale after these schedulers' own float32 upcast: no 16-bit rounding.
                    sample = sample.float()
                sample = sample * s
            self.calls += 1
            self.seen.append(index)
            return self._stock_step(model_output, timestep, sample, *args, **kwargs)

        @functools.wraps(self._stock_set_timesteps)
        def set_timesteps(*args, **kwargs):
            self.calls = 0
            self.seen = []
            out = self._stock_set_timesteps(*args, **kwargs)
            n = getattr(scheduler, "num_inference_steps", None)
            if isinstance(n, int) and n != self.coefficients.steps:
                raise QschedError(f"the pipeline runs {n} denoising steps but the coefficients were made for "
                                  f"{self.coefficients.steps}; run with num_inference_steps={self.coefficients.steps} "
                                  "or calibrate for this step count")
            return out

        step.coefficients = coefficients  # read by `installed_coefficients`
        scheduler.step = step
        scheduler.set_timesteps = set_timesteps

    def _index(self, timestep) -> int:
        if self._own_index:
            if self.scheduler.step_index is None:
                # What the stock step() does first; it then finds the index set and leaves it.
                self.scheduler._init_step_index(timestep)
            return int(self.scheduler.step_index)
        return self.calls

    @property
    def installed(self) -> bool:
        return vars(self.scheduler).get("step") is not None and self.scheduler.step.__wrapped__ is self._stock_step

    def remove(self) -> None:
        """Restores the scheduler's stock `step` and `set_timesteps`; safe to call twice."""
        for name in ("step", "set_timesteps"):
            vars(self.scheduler).pop(name, None)

    def __enter__(self) -> "AppliedCoefficients":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def installed_coefficients(scheduler) -> Coefficients | None:
    """The coefficients installed on `scheduler` by `apply_coefficients`, or None."""
    return getattr(vars(scheduler).get("step"), "coefficients", None)


def apply_coefficients(pipe_or_scheduler, coefficients: Coefficients | Mapping | None) -> AppliedCoefficients | None:
    """Installs Q-Sched coefficients on a pipeline's scheduler (or a scheduler) in place.

    Example:
        pipe = StableDiffusionPipeline.from_pretrained("qsched_search/models/fmnist-lcm")
        with apply_coefficients(pipe, Coefficients.from_ramp(0.95, 1.02, steps=4)):
            images = pipe(["sneaker"], num_inference_steps=4, guidance_scale=0.0, height=32, width=32).images

    Args:
        pipe_or_scheduler: a diffusers pipeline (its `.scheduler` is wrapped) or a scheduler.
        coefficients (`Coefficients`, `dict` or None): the coefficients, or their JSON section; None installs
            nothing (and returns None). Factors equal to 1 are skipped, so identity coefficients give the stock
            sampler bit for bit.

    Returns:
        `AppliedCoefficients` or None: call `.remove()` (or use it as a context manager) to restore the scheduler.
    """
    if coefficients is None:
        return None
    if isinstance(coefficients, Mapping):
        coefficients = Coefficients.from_dict(coefficients)
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    return AppliedCoefficients(scheduler, coefficients)
