"""Which level runs at each denoiser call: one rule, installed as one named diffusers hook on the denoiser.

The rule: a call belongs to the step whose timestep it is called with, looked up in the scheduler's own
`timesteps` for this run (nearest, within the rounding a 16-bit pipeline applies to it), and runs that step's
assignment: its level, with its per-layer overrides if it has any (resolved once per schedule to module names,
`qsched_search.quant.groups.resolve_step`). So both halves of a classifier-free-guidance batch, or two separate
guidance calls, run at one assignment, and any scheduler works (it need not keep a step index). The search's
rollout and `apply_schedule` both install this hook, so a deployment switches exactly where the search measured.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook

from qsched_search.errors import QschedError
from qsched_search.quant.bank import Bank
from qsched_search.quant.groups import LayerAssignment, LayerGroups, resolve_step
from qsched_search.results.assignment import StepAssignment, as_steps

__all__ = ["HOOK_NAME", "CachingScheduleHook", "ScheduleHook", "install_schedule", "remove_schedule", "resolve_schedule",
           "step_of"]

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


def resolve_schedule(bank: Bank, levels: Sequence[str | StepAssignment],
                     groups: LayerGroups | None = None) -> tuple[LayerAssignment, ...]:
    """Each step's bank assignment: its level, and its overrides resolved to the bank's switchable layers."""
    steps = as_steps(levels)
    switchable = bank.switchable_layers if any(s.overrides for s in steps) else []
    out = tuple(resolve_step(s, switchable, groups) for s in steps)
    for a in out:
        bank.check_assignment(a)
    return out


class ScheduleHook(ModelHook):
    """Sets the bank's assignment before every denoiser call from the step the call belongs to.

    Args:
        bank (`Bank`): the denoiser's precision bank.
        pipe: the pipeline (its current `scheduler` is read at every call).
        levels (`Sequence[str | StepAssignment]`): one level (or step with overrides) per step; settable between
            runs (`hook.levels = ...`).
        timestep_scale (`float`, defaults to 1): the denoiser is called with scheduler timestep / this (FLUX: 1000).
        groups (`LayerGroups`, *optional*): the layer groups the steps' overrides name.
    """

    def __init__(self, bank: Bank, pipe, levels: Sequence[str | StepAssignment], timestep_scale: float = 1.0,
                 groups: LayerGroups | None = None):
        super().__init__()
        self.bank, self.pipe, self.timestep_scale, self.groups = bank, pipe, float(timestep_scale), groups
        self.levels = levels
        self.steps_seen: list[int] = []  # the step of every call since the last reset: proof of what ran where
        self.timesteps_seen: dict[int, int] = {}

    @property
    def levels(self) -> tuple[str | StepAssignment, ...]:
        return self._levels

    @levels.setter
    def levels(self, value: Sequence[str | StepAssignment]) -> None:
        self._levels = tuple(value)
        self.assignments = resolve_schedule(self.bank, self._levels, self.groups)

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
        self.bank.set_assignment(self.assignments[step])
        self.steps_seen.append(step)
        self.timesteps_seen.setdefault(step, int(timesteps[step]))
        return args, kwargs


class CachingScheduleHook(ScheduleHook):
    """A `ScheduleHook` that answers a call from a `PrefixCache` when a schedule with the same assignments so far
    (levels and per-layer overrides of steps 0..i) made it.

    `batch` (which samples this pipeline call runs) and `context` (anything else that shapes the trajectory, such as
    the scheduler's coefficients) are set by the rollout before each call; `use_cache=False` runs every call (the
    noise floor must be a real re-run). The last step's outputs are not kept: no other schedule has that prefix.
    """

    def __init__(self, bank: Bank, pipe, levels: Sequence[str | StepAssignment], timestep_scale: float, cache,
                 groups: LayerGroups | None = None):
        super().__init__(bank, pipe, levels, timestep_scale, groups)
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
        # The resolved assignments: two steps naming the same layers at the same levels (by group or by pattern)
        # make the same outputs; a step's overrides are part of its key.
        key = (self.batch, self.context, self.assignments[: step + 1], self._call)
        if keep:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.cache.calls_run += 1
        if keep:
            self.cache.put(key, output)
        return output


def install_schedule(bank: Bank, pipe, levels: Sequence[str | StepAssignment], timestep_scale: float = 1.0,
                     cache=None, groups: LayerGroups | None = None) -> ScheduleHook:
    """Registers a `ScheduleHook` on the bank's denoiser (after the bank's own hook, so it runs first); with a
    `PrefixCache`, one that reuses the outputs of shared prefixes (`CachingScheduleHook`). `groups` are the layer
    groups the steps' overrides name."""
    steps = as_steps(levels)
    bank.check([lv for s in steps for lv in s.levels])
    registry = HookRegistry.check_if_exists_or_initialize(bank.denoiser)
    if registry.get_hook(HOOK_NAME) is not None:
        raise QschedError("this denoiser already follows a schedule; call .remove() on the first before applying another")
    hook = (ScheduleHook(bank, pipe, levels, timestep_scale, groups) if cache is None
            else CachingScheduleHook(bank, pipe, levels, timestep_scale, cache, groups))
    registry.register_hook(hook, HOOK_NAME)
    return hook


def remove_schedule(denoiser) -> None:
    """Removes the schedule hook, if any."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
