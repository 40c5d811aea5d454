"""One schedule's measurement as it is stored (probe cell lines, trial attributes): encoded and read in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Estimate", "Measurement", "finite_or_none"]


def finite_or_none(x: Any) -> float | None:
    """A finite float, or None for anything else (NaN, inf, None, text): JSON has no NaN."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _encode(x: Any) -> float | str | None:
    """A number for a stored record: finite as is, +-inf as "inf" / "-inf" (PSNR of identical images is inf, and a
    resumed probe must read back what it measured), NaN and non-numbers as None. `float()` reads all three back."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class Estimate:
    """A metric's value over a set of images with its 95% confidence interval.

    `ci_low` and `ci_high` are NaN when the interval is undefined (one image, or a mix of infinite and finite
    per-image values such as PSNR of partly identical images). `per_image` holds the values the mean was taken
    over, for metrics that have them, so that two schedules on the same samples compare sample by sample.
    """

    value: float
    ci_low: float
    ci_high: float
    n: int
    per_image: tuple[float, ...] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Measurement:
    """What one schedule measured on the evaluation set.

    Args:
        estimates (`Mapping[str, Estimate]`): metric name -> estimate; empty when the evaluation failed.
        timesteps (`tuple[int]`): the scheduler's timestep at each step, as the run saw them.
        unhealthy_images (`int`): images left out of the metrics (NaN, blank or noise).
        fail_reason (`str`, *optional*): why the evaluation failed; None when it did not.
        origin (`str`): where it was measured ("probe", "STUDY trial N"...), for trials.csv readers.
        seconds (`float`, *optional*): wall time of the evaluation.
    """

    estimates: Mapping[str, Estimate] = field(default_factory=dict)
    timesteps: tuple[int, ...] = ()
    unhealthy_images: int = 0
    fail_reason: str | None = None
    origin: str = ""
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return bool(self.fail_reason)

    def has(self, metric: str) -> bool:
        """Whether this measurement answers `metric`: a failure answers every metric (it fails on all of them)."""
        return self.failed or metric in self.estimates

    def value(self, metric: str) -> float | None:
        est = self.estimates.get(metric)
        return None if est is None else finite_or_none(est.value)

    def to_dict(self) -> dict:
        """JSON: estimates as [value, ci_low, ci_high, n] (NaN as null, infinities as "inf" / "-inf"); per-image
        values under `per_image`."""
        out: dict[str, Any] = {
            "estimates": {k: [_encode(e.value), _encode(e.ci_low), _encode(e.ci_high), int(e.n)]
                          for k, e in self.estimates.items()},
            "timesteps": [int(t) for t in self.timesteps],
            "unhealthy_images": int(self.unhealthy_images),
            "fail_reason": self.fail_reason or None,
        }
        per_image = {k: [_encode(v) for v in e.per_image] for k, e in self.estimates.items() if e.per_image}
        if per_image:
            out["per_image"] = per_image
        if self.origin:
            out["origin"] = self.origin
        if self.seconds is not None:
            out["seconds"] = round(float(self.seconds), 3)
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Measurement":
        per_image = obj.get("per_image") or {}

        def num(x):
            return math.nan if x is None else float(x)

        estimates = {}
        for name, (value, lo, hi, n) in (obj.get("estimates") or {}).items():
            values = per_image.get(name)
            estimates[name] = Estimate(num(value), num(lo), num(hi), int(n),
                                       None if values is None else tuple(num(v) for v in values))
        return cls(estimates=estimates, timesteps=tuple(int(t) for t in obj.get("timesteps") or ()),
                   unhealthy_images=int(obj.get("unhealthy_images") or 0), fail_reason=obj.get("fail_reason") or None,
                   origin=str(obj.get("origin") or ""), seconds=obj.get("seconds"))
