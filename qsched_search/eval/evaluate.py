"""Scores a schedule: run it on the evaluation set and measure each metric against the all-reference run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from qsched_search.errors import QschedError
from qsched_search.eval.health import health_failure
from qsched_search.pipeline.rollout import RolloutResult, Runner
from qsched_search.results.records import Estimate, Measurement

__all__ = ["Evaluation", "ScheduleEvaluator"]


@dataclass
class Evaluation:
    """What one schedule scored: its `Measurement` (estimates empty when it failed), and its images if kept."""

    levels: tuple[str, ...]
    measurement: Measurement = field(default_factory=Measurement)
    images: torch.Tensor | None = None

    @property
    def estimates(self) -> dict[str, Estimate]:
        return dict(self.measurement.estimates)

    @property
    def timesteps(self) -> list[int]:
        return list(self.measurement.timesteps)

    @property
    def fail_reason(self) -> str | None:
        return self.measurement.fail_reason

    @property
    def unhealthy_images(self) -> int:
        return self.measurement.unhealthy_images

    @property
    def failed(self) -> bool:
        return self.measurement.failed


class ScheduleEvaluator:
    """Runs schedules and scores them; the all-reference images are made once and reused as the paired baseline.

    Args:
        runner (`Runner`): the model, bank, steps and evaluation set.
        metrics (`list[Metric]`): from `qsched_search.eval.metrics.build_metrics`.
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

    def evaluate(self, levels: Sequence[str], use_cache: bool = True) -> Evaluation:
        """Runs `levels` and scores them; `use_cache=False` runs every denoiser call (see `Runner.run`)."""
        levels = tuple(levels)
        reference = self.reference
        started = time.perf_counter()
        result = self.runner.run(levels, use_cache=use_cache)
        evaluation = self.score(levels, result, reference)
        evaluation.measurement = replace(evaluation.measurement, seconds=time.perf_counter() - started)
        return evaluation

    def score(self, levels: tuple[str, ...], result: RolloutResult, reference: RolloutResult) -> Evaluation:
        """Scores a run's images against the reference run's (same prompts and seeds)."""
        healthy = result.healthy
        unhealthy = int((~healthy).sum())
        images = result.images if self.keep_images else None
        failure = health_failure(result.problems)
        if failure is not None:
            return Evaluation(levels, Measurement(timesteps=tuple(result.timesteps), unhealthy_images=unhealthy,
                                                  fail_reason=failure), images)
        prompts = [p for p, ok in zip(self.runner.eval_set.prompts, healthy.tolist()) if ok]
        kept, ref_images = result.images[healthy], reference.images[healthy]
        estimates = {}
        for metric in self.metrics:
            est = metric.score(kept, ref_images if metric.paired else None, prompts)
            estimates[metric.name] = _aligned(est, healthy.tolist())
        return Evaluation(levels, Measurement(estimates=estimates, timesteps=tuple(result.timesteps),
                                              unhealthy_images=unhealthy), images)


def _aligned(est: Estimate, healthy: list[bool]) -> Estimate:
    """Per-image values placed at their sample's position (NaN for images left out), so that two schedules' values
    pair by sample even when different images were unusable."""
    if est.per_image is None or all(healthy):
        return est
    values = iter(est.per_image)
    full = tuple(next(values) if ok else math.nan for ok in healthy)
    return Estimate(est.value, est.ci_low, est.ci_high, est.n, full)
