"""Which level runs at each denoiser call: one rule, installed as one named diffusers hook on the denoiser.

The rule: a call belongs to the step whose timestep it is called with, looked up in the scheduler's own
`timesteps` for this run (nearest, within the rounding a 16-bit pipeline applies to it). So both halves of a
classifier-free-guidance batch, or two separate guidance calls, run at one level, and any scheduler works (it need
not keep a step index). The search's rollout and `apply_schedule` both install this hook, so a deployment switches
exactly where the search measured.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook

from qsched_search.errors import QschedError
from qsched_search.quant.bank import Bank

__all__ = ["HOOK_NAME", "CachingScheduleHook", "ScheduleHook", "install_schedule", "remove_schedule", "step_of"]

HOOK_NAME = "qsched.schedule"


def _call_timestep(args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise QschedError("the denoiser was called without a timestep; a schedule needs one to pick the level")
    return float(torch.as_tensor(t).flatten()[0])


def step_of(timestep: float, timesteps: Sequence[float]) -> int | None:
    """The index of the step run at `timestep` among the run's `timesteps`; None if it is none of them.

    A bf16 pipeline rounds the timestep to 8 bits of mantissa, so the nearest within that rounding counts.
    """
    if not len(timesteps):
        return None
    distances = [abs(float(s) - timestep) for s in timesteps]
    i = min(range(len(distances)), key=distances.__getitem__)
    return i if distances[i] <= 1 + 0.005 * abs(timestep) else None


class ScheduleHook(ModelHook):
    """Sets the bank's level before every denoiser call from the step the call belongs to.

    Args:
        bank (`Bank`): the denoiser's precision bank.
        pipe: the pipeline (its current `scheduler` is read at every call).
        levels (`Sequence[str]`): one level per step; settable between runs (`hook.levels = ...`).
        timestep_scale (`float`, defaults to 1): the denoiser is called with scheduler timestep / this (FLUX: 1000).
    """

    def __init__(self, bank: Bank, pipe, levels: Sequence[str], timestep_scale: float = 1.0):
        super().__init__()
        self.bank, self.pipe, self.timestep_scale = bank, pipe, float(timestep_scale)
        self.levels = tuple(levels)
        self.steps_seen: list[int] = []  # the step of every call since the last reset: proof of what ran where
        self.timesteps_seen: dict[int, int] = {}

    def reset(self) -> None:
        self.steps_seen, self.timesteps_seen = [], {}

    def pre_forward(self, module, *args, **kwargs):
        t = _call_timestep(args, kwargs) * self.timestep_scale
        found = getattr(self.pipe.scheduler, "timesteps", None)
        timesteps = [] if found is None else [float(s) for s in torch.as_tensor(found).tolist()]
        if len(timesteps) != len(self.levels):
            raise QschedError(f"the pipeline runs {len(timesteps)} denoising steps but the schedule has "
                              f"{len(self.levels)}; run it with num_inference_steps={len(self.levels)}")
        step = step_of(t, timesteps)
        if step is None:
            raise QschedError(f"denoiser called at timestep {t:g}, which is none of this run's timesteps "
                              f"{[round(s) for s in timesteps]}; a schedule picks levels only for its own steps")
        self.bank.set_level(self.levels[step])
        self.steps_seen.append(step)
        self.timesteps_seen.setdefault(step, int(timesteps[step]))
        return args, kwargs


class CachingScheduleHook(ScheduleHook):
    """A `ScheduleHook` that answers a call from a `PrefixCache` when a schedule with the same levels so far made it.

    `batch` (which samples this pipeline call runs) and `context` (anything else that shapes the trajectory, such as
    the scheduler's coefficients) are set by the rollout before each call; `use_cache=False` runs every call (the
    noise floor must be a real re-run). The last step's outputs are not kept: no other schedule has that prefix.
    """

    def __init__(self, bank: Bank, pipe, levels: Sequence[str], timestep_scale: float, cache):
        super().__init__(bank, pipe, levels, timestep_scale)
        self.cache = cache
        self.batch: object = None
        self.context: object = None
        self.use_cache = True
        self._step, self._call = -1, 0

    def reset(self) -> None:
        super().reset()
        self._step, self._call = -1, 0

    def new_forward(self, module, *args, **kwargs):
        step = self.steps_seen[-1]  # pre_forward ran first and found the call's step
        self._call = self._call + 1 if step == self._step else 0
        self._step = step
        keep = self.use_cache and step < len(self.levels) - 1
        key = (self.batch, self.context, tuple(self.levels[: step + 1]), self._call)
        if keep:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.cache.calls_run += 1
        if keep:
            self.cache.put(key, output)
        return output


def install_schedule(bank: Bank, pipe, levels: Sequence[str], timestep_scale: float = 1.0,
                     cache=None) -> ScheduleHook:
    """Registers a `ScheduleHook` on the bank's denoiser (after the bank's own hook, so it runs first); with a
    `PrefixCache`, one that reuses the outputs of shared prefixes (`CachingScheduleHook`)."""
    bank.check(levels)
    registry = HookRegistry.check_if_exists_or_initialize(bank.denoiser)
    if registry.get_hook(HOOK_NAME) is not None:
        raise QschedError("this denoiser already follows a schedule; call .remove() on the first before applying another")
    hook = (ScheduleHook(bank, pipe, levels, timestep_scale) if cache is None
            else CachingScheduleHook(bank, pipe, levels, timestep_scale, cache))
    registry.register_hook(hook, HOOK_NAME)
    return hook


def remove_schedule(denoiser) -> None:
    """Removes the schedule hook, if any."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
