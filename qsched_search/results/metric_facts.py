"""What every metric is, for the files and the report: which way is better, and what it compares.

The single source of a metric's direction and pairing; `qsched_search.eval` gives its metric classes these facts
when they are registered, and the report and the gate read them here without loading a network.
"""

from __future__ import annotations

from dataclasses import dataclass

from qsched_search.errors import QschedError

__all__ = ["MetricFacts", "METRICS", "facts", "register_facts"]


@dataclass(frozen=True)
class MetricFacts:
    """Args:
        name (`str`): the metric's name in files and on the command line.
        higher_is_better (`bool`): the direction.
        paired (`bool`): each image is compared with the reference image of the same prompt and seed; the probe's
            reference row of such a metric is the noise floor (the reference against a re-run of itself).
        per_image (`bool`): the value is a mean of per-image values, so two schedules measured on the same samples
            can be compared sample by sample (a paired difference); distribution metrics (FID) are not.
    """

    name: str
    higher_is_better: bool
    paired: bool
    per_image: bool


METRICS: dict[str, MetricFacts] = {
    f.name: f
    for f in (
        MetricFacts("lpips", higher_is_better=False, paired=True, per_image=True),
        MetricFacts("psnr", higher_is_better=True, paired=True, per_image=True),
        MetricFacts("ssim", higher_is_better=True, paired=True, per_image=True),
        MetricFacts("judge_acc", higher_is_better=True, paired=False, per_image=True),
        MetricFacts("judge_fd", higher_is_better=False, paired=False, per_image=False),
        MetricFacts("fid", higher_is_better=False, paired=False, per_image=False),
    )
}


def facts(name: str) -> MetricFacts:
    """The facts of metric `name`; a miss names the metric and lists the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise QschedError(f"metric {name!r} is unknown; known metrics: {', '.join(sorted(METRICS))}") from None


def register_facts(new: MetricFacts) -> MetricFacts:
    """Adds a metric's facts (for a metric class registered outside this package); the same facts twice are fine."""
    old = METRICS.get(new.name)
    if old is not None and old != new:
        raise QschedError(f"metric {new.name!r} is already known as {old}; register it once, with the same facts")
    METRICS[new.name] = new
    return new
