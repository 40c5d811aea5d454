"""Comparing two schedules on one metric: which value is better, and a paired difference with its 95% interval."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qsched_search.results.metric_facts import facts
from qsched_search.results.records import Measurement

__all__ = ["PairedDifference", "better", "budget_sentence", "compare_paired", "paired_difference"]

CONFIDENCE = 0.95
BOOTSTRAP_ROUNDS = 2000


def better(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether value `a` is strictly better than `b`."""
    return a > b if higher_is_better else a < b


@dataclass(frozen=True)
class PairedDifference:
    """`a - b` of two schedules measured on the same samples, with a 95% paired bootstrap interval.

    `verdict` reads the interval in the metric's direction: "better" (a beats b: the interval excludes 0 on the good
    side), "worse", or "not resolved" (the interval contains 0, or there are too few samples for one).
    """

    difference: float
    ci_low: float
    ci_high: float
    n: int
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return "not resolved"
        if self.ci_low > 0 or self.ci_high < 0:
            a_higher = self.ci_low > 0
            return "better" if a_higher == self.higher_is_better else "worse"
        return "not resolved"

    def relative_to(self, b_value: float) -> float:
        """The difference as a fraction of `b`'s value (e.g. -0.5: half of b's LPIPS)."""
        return self.difference / b_value if b_value else math.nan

    def describe(self, digits: int = 3) -> str:
        return (f"{self.difference:+.{digits}g} [{self.ci_low:+.{digits}g}, {self.ci_high:+.{digits}g}] "
                f"(paired, n={self.n}): {self.verdict}")

    def to_dict(self) -> dict:
        return {"difference": self.difference, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "verdict": self.verdict, "method": f"paired bootstrap of the mean difference, {BOOTSTRAP_ROUNDS} "
                                                   f"rounds, percentile {int(CONFIDENCE * 100)}% interval, seed 0"}


def paired_difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool, *,
                      rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> PairedDifference:
    """The mean of `a[k] - b[k]` over the samples both schedules ran, with a seeded percentile bootstrap interval.

    Args:
        a, b (`Sequence[float]`): per-sample values of one metric for two schedules, sample k on the same prompt and
            seed in both (non-finite pairs are left out).
        higher_is_better (`bool`): the metric's direction, for the verdict.
        rounds (`int`, defaults to 2000), seed (`int`, defaults to 0): the bootstrap.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs one value per sample in both, got {x.shape} and {y.shape}")
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    n = len(d)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, higher_is_better)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n, higher_is_better)
    rng = np.random.default_rng(seed)
    draws = d[rng.integers(0, n, size=(rounds, n))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return PairedDifference(mean, float(low), float(high), n, higher_is_better)


def compare_paired(a: Measurement | None, b: Measurement | None, metric: str, baseline: str) -> dict | None:
    """schedule.json's `comparison`: `a - b` on `metric`, paired by sample, with its bootstrap interval and verdict;
    None when either lacks per-sample values of the metric (a distribution metric such as FID)."""
    if a is None or b is None or metric not in a.estimates or metric not in b.estimates:
        return None
    ea, eb = a.estimates[metric], b.estimates[metric]
    if ea.per_image is None or eb.per_image is None or len(ea.per_image) != len(eb.per_image):
        return None
    diff = paired_difference(ea.per_image, eb.per_image, facts(metric).higher_is_better)
    return {"baseline": baseline, "metric": metric, "baseline_value": eb.value, **diff.to_dict()}


_COST_WORDS = {"bops": "bit-operations", "memory": "weight memory", "latency": "step latency"}


def budget_sentence(schedule: dict) -> str:
    """One sentence of what a schedule.json's budget bought, read from its paired comparison with the best uniform
    level of equal or lower cost, e.g. "at 66.8% of fp32's bit-operations: lpips 0.0059, 77% below the best uniform
    level (w4a8, 0.025); paired difference -0.019, 95% CI [-0.024, -0.015] over 64 samples: better"."""
    model = schedule["budget"]["cost_model"]
    spent = f"at {schedule['cost'][model]:.1%} of {schedule['reference']}'s {_COST_WORDS.get(model, model)}"
    q = schedule["quality"]
    own = f"{q['metric']} {q['value']:.3g}"
    c = schedule.get("comparison")
    if not c and len(set(schedule["levels"])) == 1:
        return f"{spent}: {own}; the best schedule within the budget is uniform {schedule['levels'][0]}"
    if not c:
        return f"{spent}: {own} (no uniform level of equal or lower cost measured on the same samples to compare with)"
    base = c["baseline"].split(",")[0]
    b = c.get("baseline_value")
    rel = c["difference"] / b if b else math.nan
    where = f"{abs(rel):.0%} {'below' if rel < 0 else 'above'} " if math.isfinite(rel) else "against "
    return (f"{spent}: {own}, {where}the best uniform level ({base}, {b:.3g}); paired difference "
            f"{c['difference']:+.3g}, 95% CI [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}] over {c['n']} samples: "
            f"{c['verdict']}")

