"""Runs a pipeline with a per-step precision schedule on a fixed set of prompts and seeds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from qsched_search.errors import QschedError
from qsched_search.eval.health import image_problems
from qsched_search.pipeline.loading import LoadedModel
from qsched_search.pipeline.coefficients import installed_coefficients
from qsched_search.pipeline.prefix_cache import PrefixCache
from qsched_search.pipeline.switching import install_schedule, remove_schedule
from qsched_search.quant.bank import Bank

__all__ = ["EvalSet", "RolloutResult", "Runner", "capture_denoiser_call", "make_eval_set", "run_pipeline"]


@dataclass(frozen=True)
class EvalSet:
    """The samples every schedule is judged on: one prompt and one seed per sample, the same for every schedule."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]

    def __post_init__(self):
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise QschedError(f"an evaluation set needs one seed per prompt and at least one sample; got {len(self.prompts)} prompts, {len(self.seeds)} seeds")

    def __len__(self) -> int:
        return len(self.prompts)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.prompts, self.seeds]).encode()).hexdigest()


def make_eval_set(prompts: Sequence[str], samples: int, seed: int) -> EvalSet:
    """`samples` samples cycling through `prompts`, sample k seeded with `seed + k`."""
    if samples < 1:
        raise QschedError(f"--samples must be at least 1, got {samples}")
    if not prompts:
        raise QschedError("no prompts: pass --prompts 'a,b' or a prompts file")
    return EvalSet(tuple(prompts[k % len(prompts)] for k in range(samples)), tuple(seed + k for k in range(samples)))


@dataclass
class RolloutResult:
    images: torch.Tensor  # (N, C, H, W) float32 on the CPU, in [0, 1]
    timesteps: list[int]
    problems: list[str | None] = field(default_factory=list)  # one per image: None, "nan", "blank" or "noise"

    @property
    def healthy(self) -> torch.Tensor:
        return torch.tensor([p is None for p in self.problems])


class Runner:
    """Runs one model with its precision bank on one evaluation set, batch by batch, as plain pipeline calls.

    Each run installs the schedule hook (`qsched_search.pipeline.switching`) for its levels, the same one
    `apply_schedule` installs, and removes it after. Denoiser outputs of schedule prefixes are kept in a
    `PrefixCache` (`qsched_search.pipeline.prefix_cache`), so a schedule that shares its first steps' levels with one
    run before skips those steps' denoiser calls, with the same images bit for bit.

    Args:
        model (`LoadedModel`): the pipeline.
        bank (`Bank`): installed into the pipeline's denoiser.
        steps (`int`): denoising steps.
        eval_set (`EvalSet`): prompts and seeds.
        batch_size (`int`, defaults to 64): samples per pipeline call.
        call_kwargs (`dict`, *optional*): extra pipeline arguments (guidance_scale, height, width...); the
            family's `call_defaults` fill what is not given.
        prefix_cache (`PrefixCache`, *optional*): where prefix outputs are kept; a new one sized automatically if
            None; `PrefixCache(0)` turns reuse off.
        groups (`LayerGroups`, *optional*): the layer groups that steps' per-layer overrides name (settable:
            `runner.groups = bank_groups(...)`).
    """

    def __init__(self, model: LoadedModel, bank: Bank, steps: int, eval_set: EvalSet,
                 batch_size: int = 64, call_kwargs: dict | None = None, prefix_cache: PrefixCache | None = None,
                 groups=None):
        if steps < 1:
            raise QschedError(f"--steps must be at least 1, got {steps}")
        self.model, self.bank, self.steps, self.eval_set = model, bank, steps, eval_set
        self.batch_size = max(1, batch_size)
        self.call_kwargs = {**model.family.call_defaults, **(call_kwargs or {})}
        self.cache = PrefixCache() if prefix_cache is None else prefix_cache
        self.groups = groups

    def run(self, levels: Sequence, use_cache: bool = True) -> RolloutResult:
        """Runs every sample with `levels[i]` active during denoising step i; the bank is reset to the reference after.

        Args:
            levels (`Sequence[str | StepAssignment]`): one level per step, or a step with per-layer overrides.
            use_cache (`bool`, defaults to True): answer shared prefixes from the cache; False runs every call (a
                re-run that must measure run-to-run differences, such as the noise floor).
        """
        levels = list(levels)
        if len(levels) != self.steps:
            raise QschedError(f"schedule has {len(levels)} levels for {self.steps} steps; give one level per step")
        hook = install_schedule(self.bank, self.model.pipe, levels, self.model.family.timestep_scale, cache=self.cache,
                                groups=self.groups)
        hook.use_cache = use_cache
        coefficients = installed_coefficients(self.model.pipe.scheduler)
        hook.context = None if coefficients is None else (coefficients.model_coeff, coefficients.sample_coeff)
        before = self.cache.bytes
        images = []
        try:
            for start in range(0, len(self.eval_set), self.batch_size):
                hook.batch = start
                images.append(self._run_batch(start))
                if sorted(hook.timesteps_seen) != list(range(self.steps)):
                    raise QschedError(f"the pipeline ran denoising steps {sorted(hook.timesteps_seen)} where {self.steps} "
                                      "were asked; its scheduler does not honour num_inference_steps exactly")
        finally:
            remove_schedule(self.bank.denoiser)
            self.bank.set_level(self.bank.reference)
        if use_cache and self.steps > 1:
            self.cache.size_from((self.cache.bytes - before) // (self.steps - 1))
        images = torch.cat(images)
        timesteps = [hook.timesteps_seen[i] for i in range(self.steps)]
        return RolloutResult(images=images, timesteps=timesteps, problems=image_problems(images))

    def _run_batch(self, start: int) -> torch.Tensor:
        return _call_pipeline(self.model, self.steps, self.eval_set.prompts[start : start + self.batch_size],
                              self.eval_set.seeds[start : start + self.batch_size], self.call_kwargs)


def _call_pipeline(model: LoadedModel, steps: int, prompts, seeds, call_kwargs: dict) -> torch.Tensor:
    # One generator per sample: a sample's noise does not depend on the batch it runs in.
    generators = [torch.Generator(device=model.device).manual_seed(s) for s in seeds]
    with torch.no_grad():
        # A plain call with the prompts (no cached embeddings), so that the same call on a stock pipeline with
        # `apply_schedule` makes the same images.
        output = model.pipe(prompt=list(prompts), num_inference_steps=steps, generator=generators, output_type="pt",
                            **call_kwargs)
    return output.images.float().cpu()


def run_pipeline(model: LoadedModel, steps: int, eval_set: EvalSet, batch_size: int = 64,
                 call_kwargs: dict | None = None) -> torch.Tensor:
    """The pipeline's own images of `eval_set` (no bank, no schedule), made as `Runner` makes them: (N, C, H, W) in
    [0, 1] on the CPU."""
    kwargs = {**model.family.call_defaults, **(call_kwargs or {})}
    batch_size = max(1, batch_size)
    return torch.cat([_call_pipeline(model, steps, eval_set.prompts[i : i + batch_size],
                                     eval_set.seeds[i : i + batch_size], kwargs)
                      for i in range(0, len(eval_set), batch_size)])


def capture_denoiser_call(pipe, denoiser, call_kwargs: dict) -> tuple[tuple, dict]:
    """Runs the pipeline until its first denoiser call and returns that call's `(args, kwargs)`.

    This is how a bank gets one call of the right shapes (its row and MAC counts), and a profile its inputs, for any
    family without knowing its conditioning layout.
    """
    captured: list = []

    def hook(module, args, kwargs):
        if not captured:
            captured.append((args, dict(kwargs)))
        raise _Captured

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            pipe(**call_kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise QschedError(f"the pipeline {type(pipe).__name__} never called its denoiser; check the pipeline and its --family")
    return captured[0]


class _Captured(Exception):
    """Stops the pipeline once the denoiser's inputs are captured."""
