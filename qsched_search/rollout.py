"""Runs a pipeline with a per-step precision schedule on a fixed set of prompts and seeds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from qsched_search.bank import PrecisionBank
from qsched_search.errors import QschedError
from qsched_search.models import LoadedModel


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


def image_problems(images: torch.Tensor) -> list[str | None]:
    """Flags images that must never be averaged into a metric: NaN/Inf, blank, or pure noise.

    Noise is told by the correlation of horizontally neighbouring pixels: near 1 for images, near 0 for i.i.d. noise.
    """
    out: list[str | None] = []
    for img in images.float():
        if not torch.isfinite(img).all():
            out.append("nan")
            continue
        if img.std() < 1e-3:
            out.append("blank")
            continue
        a, b = img[..., :, 1:].flatten(), img[..., :, :-1].flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        out.append("noise" if corr < 0.1 else None)
    return out


class Runner:
    """Runs one model with its precision bank on one evaluation set; prompt embeddings are computed once.

    Args:
        model (`LoadedModel`): the pipeline.
        bank (`PrecisionBank`): installed into the pipeline's denoiser.
        steps (`int`): denoising steps.
        eval_set (`EvalSet`): prompts and seeds.
        batch_size (`int`, defaults to 64): samples per pipeline call.
        call_kwargs (`dict`, *optional*): extra pipeline arguments (guidance_scale, height, width...); the
            family's `call_defaults` fill what is not given.
    """

    def __init__(self, model: LoadedModel, bank: PrecisionBank, steps: int, eval_set: EvalSet,
                 batch_size: int = 64, call_kwargs: dict | None = None):
        if steps < 1:
            raise QschedError(f"--steps must be at least 1, got {steps}")
        self.model, self.bank, self.steps, self.eval_set = model, bank, steps, eval_set
        self.batch_size = max(1, batch_size)
        self.call_kwargs = {**model.family.call_defaults, **(call_kwargs or {})}
        self._embeds: dict[str, dict] = {}

    def run(self, levels: Sequence[str]) -> RolloutResult:
        """Runs every sample with `levels[i]` active during denoising step i; the bank is reset to the reference after."""
        levels = list(levels)
        if len(levels) != self.steps:
            raise QschedError(f"schedule has {len(levels)} levels for {self.steps} steps; give one level per step")
        self.bank.check(levels)
        images, timesteps = [], []
        try:
            for start in range(0, len(self.eval_set), self.batch_size):
                batch_images, timesteps = self._run_batch(levels, start)
                images.append(batch_images)
        finally:
            self.bank.set_level(self.bank.reference)
        images = torch.cat(images)
        return RolloutResult(images=images, timesteps=timesteps, problems=image_problems(images))

    def _run_batch(self, levels: list[str], start: int) -> tuple[torch.Tensor, list[int]]:
        pipe = self.model.pipe
        prompts = self.eval_set.prompts[start : start + self.batch_size]
        seeds = self.eval_set.seeds[start : start + self.batch_size]
        # One generator per sample: a sample's noise does not depend on the batch it runs in.
        generators = [torch.Generator(device=self.model.device).manual_seed(s) for s in seeds]
        timesteps: list[int] = []

        def switch(pipe_, i, t, kwargs):
            timesteps.append(int(t))
            if i + 1 < len(levels):
                self.bank.set_level(levels[i + 1])
            return kwargs

        self.bank.set_level(levels[0])
        output = pipe(
            **self._prompt_kwargs(prompts),
            num_inference_steps=self.steps,
            generator=generators,
            output_type="pt",
            callback_on_step_end=switch,
            **self.call_kwargs,
        )
        if len(timesteps) != self.steps:
            raise QschedError(f"the pipeline ran {len(timesteps)} denoising steps where {self.steps} were asked; "
                              "its scheduler does not honour num_inference_steps exactly")
        return output.images.float().cpu(), timesteps

    def _prompt_kwargs(self, prompts: Sequence[str]) -> dict:
        """Cached prompt embeddings where the pipeline can take them; plain prompts otherwise."""
        pipe = self.model.pipe
        from diffusers import StableDiffusionPipeline

        if not isinstance(pipe, StableDiffusionPipeline):
            return {"prompt": list(prompts)}
        guidance = self.call_kwargs.get("guidance_scale", 7.5)
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        for p in set(prompts) - set(self._embeds):
            with torch.no_grad():
                cond, uncond = pipe.encode_prompt(p, self.model.device, 1, cfg)
            self._embeds[p] = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        out = {"prompt_embeds": torch.cat([self._embeds[p]["prompt_embeds"] for p in prompts])}
        if cfg:
            out["negative_prompt_embeds"] = torch.cat([self._embeds[p]["negative_prompt_embeds"] for p in prompts])
        return out
