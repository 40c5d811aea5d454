"""Scores a schedule: run it on the evaluation set and measure each metric against the all-reference run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from qsched_search.errors import QschedError
from qsched_search.rollout import RolloutResult, Runner

# More unhealthy images than this fraction fail the whole evaluation instead of being left out of the averages.
MAX_UNHEALTHY_FRACTION = 0.1


@dataclass
class Evaluation:
    """What one schedule scored. `estimates` is empty when the evaluation failed (see `fail_reason`)."""

    levels: tuple[str, ...]
    timesteps: list[int]
    estimates: dict = field(default_factory=dict)  # metric name -> metrics.Estimate
    unhealthy_images: int = 0
    fail_reason: str | None = None
    images: torch.Tensor | None = None

    @property
    def failed(self) -> bool:
        return self.fail_reason is not None


class ScheduleEvaluator:
    """Runs schedules and scores them; the all-reference images are made once and reused as the paired baseline.

    Args:
        runner (`Runner`): the model, bank, steps and evaluation set.
        metrics (`list[Metric]`): from `qsched_search.metrics.build_metrics`.
        keep_images (`bool`, defaults to False): keep each evaluation's images (for image grids).
    """

    def __init__(self, runner: Runner, metrics: Sequence, keep_images: bool = False):
        self.runner = runner
        self.metrics = list(metrics)
        self.keep_images = keep_images
        self.reference_levels = (runner.bank.reference,) * runner.steps
        self._reference: RolloutResult | None = None

    @property
    def reference(self) -> RolloutResult:
        if self._reference is None:
            ref = self.runner.run(self.reference_levels)
            bad = [p for p in ref.problems if p is not None]
            if bad:
                raise QschedError(f"the reference run itself made {len(bad)} unusable images ({', '.join(sorted(set(bad)))}); "
                                  "check the model, its dtype and the prompts before probing")
            self._reference = ref
        return self._reference

    @property
    def timesteps(self) -> list[int]:
        return self.reference.timesteps

    def evaluate(self, levels: Sequence[str]) -> Evaluation:
        levels = tuple(levels)
        reference = self.reference
        result = self.runner.run(levels)
        return self.score(levels, result, reference)

    def score(self, levels: tuple[str, ...], result: RolloutResult, reference: RolloutResult) -> Evaluation:
        healthy = result.healthy
        unhealthy = int((~healthy).sum())
        evaluation = Evaluation(levels=levels, timesteps=result.timesteps, unhealthy_images=unhealthy,
                                images=result.images if self.keep_images else None)
        if unhealthy > MAX_UNHEALTHY_FRACTION * len(healthy):
            kinds = sorted({p for p in result.problems if p})
            evaluation.fail_reason = f"{unhealthy}/{len(healthy)} images unusable ({', '.join(kinds)})"
            return evaluation
        prompts = [p for p, ok in zip(self.runner.eval_set.prompts, healthy.tolist()) if ok]
        images, ref_images = result.images[healthy], reference.images[healthy]
        for metric in self.metrics:
            evaluation.estimates[metric.name] = metric.score(images, ref_images if metric.paired else None, prompts)
        return evaluation
