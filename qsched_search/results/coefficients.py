"""Q-Sched's per-step coefficients as data: two factors per step, their checks, and their JSON section."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from qsched_search.errors import QschedError
from qsched_search.resources import SCHEDULE_SCHEMA

__all__ = [
    "COEFFICIENTS_SCHEMA",
    "COEFFICIENTS_VERSION",
    "KINDS",
    "Coefficients",
    "validate_coefficients_dict",
]

logger = logging.getLogger(__name__)

COEFFICIENTS_VERSION = 1
KINDS = ("identity", "ramp", "per-step")
# The published search range is [0.8, 1.2]; values far outside it are allowed but worth a warning.
_PLAUSIBLE = (0.5, 2.0)
# Ramp values are written to JSON as floats; a file's per-step lists must match its (m, s) within this.
_RAMP_TOL = 1e-6

# The `coefficients` section of schedule.json (JSON Schema draft 2020-12), read from the published schema so that
# the file and the code cannot disagree. Cross-field rules JSON Schema cannot
# state (len(model_coeff) == len(sample_coeff) == steps; a ramp's lists equal linspace(m, 1, steps)) are checked by
# `Coefficients.from_dict` and, for `steps`, by the schedule that holds the section.
COEFFICIENTS_SCHEMA: dict = json.loads(SCHEDULE_SCHEMA.read_text())["properties"]["coefficients"]


def _positive_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _linspace(start: float, stop: float, n: int) -> tuple[float, ...]:
    """The ramp exactly as the published code builds it: `torch.linspace(start, stop, n, dtype=torch.float32)`.

    float32 values, not a float64 formula: the two differ by ~4e-6, which bf16 samplers amplify to whole ulps.
    """
    import torch  # only a ramp needs it; the results contract stays importable without torch

    return tuple(float(v) for v in torch.linspace(start, stop, n, dtype=torch.float32).tolist())


@dataclass(frozen=True)
class Coefficients:
    """One factor for the denoiser output and one for the current sample at every denoising step.

    At step i, the scheduler's `step(model_output, timestep, sample)` is called with `model_output * model_coeff[i]`
    and `sample * sample_coeff[i]`. The patched schedulers of the published Q-Sched code multiply the same two
    tensors at the top of `step()`, before the x0 prediction, and use the scaled sample for the whole update
    (Euler ancestral, TCD, flow-match Euler), so scaling the two inputs of the stock `step()` is the same sampler.

    Checks itself on construction: every error is one line naming the field, the value and what is allowed.

    Args:
        model_coeff (`tuple[float]`): the denoiser-output factor of each step, step 0 first.
        sample_coeff (`tuple[float]`): the sample factor of each step; as many as `model_coeff`.
        kind (`str`, defaults to `"per-step"`): `identity`, `ramp` or `per-step`; how the values were made.
        ramp (`tuple[float, float]`, *optional*): `(m, s)` for kind `ramp`.
        calibration (`Mapping`, *optional*): how the values were learned, kept as given (JSON-serialisable).
    """

    model_coeff: tuple[float, ...]
    sample_coeff: tuple[float, ...]
    kind: str = "per-step"
    ramp: tuple[float, float] | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "model_coeff", tuple(self.model_coeff))
        object.__setattr__(self, "sample_coeff", tuple(self.sample_coeff))
        object.__setattr__(self, "calibration", dict(self.calibration))
        for name in ("model_coeff", "sample_coeff"):
            values = getattr(self, name)
            if not values:
                raise QschedError(f"coefficients {name} is empty; allowed: one positive number per denoising step")
            bad = [v for v in values if not _positive_finite(v)]
            if bad:
                raise QschedError(f"coefficients {name} = {list(values)} holds {bad[0]!r}; allowed: finite numbers > 0 "
                                  "(1 leaves the step unchanged)")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if len(self.model_coeff) != len(self.sample_coeff):
            raise QschedError(f"coefficients model_coeff has {len(self.model_coeff)} values but sample_coeff has "
                              f"{len(self.sample_coeff)}; allowed: one of each per denoising step")
        if self.kind not in KINDS:
            raise QschedError(f"coefficients kind = {self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        if self.kind == "ramp":
            if self.ramp is None or len(self.ramp) != 2 or not all(_positive_finite(v) for v in self.ramp):
                raise QschedError(f"coefficients kind 'ramp' needs ramp = (m, s) with two numbers > 0, got {self.ramp!r}; "
                                  "build it with Coefficients.from_ramp(m, s, steps)")
            object.__setattr__(self, "ramp", (float(self.ramp[0]), float(self.ramp[1])))
            m, s = self.ramp
            if not (_close(_linspace(m, 1.0, self.steps), self.model_coeff)
                    and _close(_linspace(s, 1.0, self.steps), self.sample_coeff)):
                raise QschedError(f"coefficients say ramp (m, s) = {self.ramp} but their per-step values "
                                  f"{list(self.model_coeff)}, {list(self.sample_coeff)} are not linspace(m, 1, "
                                  f"{self.steps}) and linspace(s, 1, {self.steps}); use kind 'per-step' for free values")
        elif self.ramp is not None:
            raise QschedError(f"coefficients ramp = {self.ramp!r} is given but kind = {self.kind!r}; allowed: ramp only "
                              "with kind 'ramp'")
        if self.kind == "identity" and not self.is_identity:
            raise QschedError("coefficients kind 'identity' holds values other than 1; use kind 'per-step'")
        low, high = _PLAUSIBLE
        outside = [v for v in self.model_coeff + self.sample_coeff if not low <= v <= high]
        if outside:
            logger.warning("coefficients hold %s, outside [%g, %g]: a step this far from the sampler's own is "
                           "likely to break the images", outside[0], low, high)

    # ------------------------------------------------------------------------------------------- constructors

    @classmethod
    def identity(cls, steps: int) -> "Coefficients":
        """All factors 1: the stock sampler."""
        _check_steps(steps)
        return cls((1.0,) * steps, (1.0,) * steps, kind="identity")

    @classmethod
    def from_ramp(cls, m: float, s: float, steps: int, calibration: Mapping[str, Any] | None = None) -> "Coefficients":
        """The published two-scalar form: `model_coeff = linspace(m, 1, steps)`, `sample_coeff = linspace(s, 1, steps)`.

        The first step gets `m` and `s`, the last step 1 (with one step, `m` and `s`).
        """
        _check_steps(steps)
        for name, v in (("m", m), ("s", s)):
            if not _positive_finite(v):
                raise QschedError(f"ramp {name} = {v!r} is invalid; allowed: a finite number > 0, e.g. in [0.8, 1.2]")
        return cls(_linspace(m, 1.0, steps), _linspace(s, 1.0, steps), kind="ramp", ramp=(float(m), float(s)),
                   calibration=calibration or {})

    @classmethod
    def per_step(cls, model_coeff: Sequence[float], sample_coeff: Sequence[float],
                 calibration: Mapping[str, Any] | None = None) -> "Coefficients":
        """Free values, one pair per step."""
        return cls(tuple(model_coeff), tuple(sample_coeff), kind="per-step", calibration=calibration or {})

    # ------------------------------------------------------------------------------------------- views

    @property
    def steps(self) -> int:
        return len(self.model_coeff)

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.model_coeff + self.sample_coeff)

    def at(self, step: int) -> tuple[float, float]:
        """`(model_coeff, sample_coeff)` of step `step` (0-based)."""
        if not 0 <= step < self.steps:
            raise QschedError(f"denoising step {step} has no coefficients: they cover steps 0..{self.steps - 1}; "
                              f"run the pipeline with num_inference_steps={self.steps}, as they were made")
        return self.model_coeff[step], self.sample_coeff[step]

    def with_calibration(self, calibration: Mapping[str, Any]) -> "Coefficients":
        return Coefficients(self.model_coeff, self.sample_coeff, self.kind, self.ramp, calibration)

    def describe(self) -> str:
        if self.kind == "identity":
            return f"identity ({self.steps} steps)"
        if self.kind == "ramp":
            return f"ramp m={self.ramp[0]:.4f} s={self.ramp[1]:.4f} ({self.steps} steps)"
        pairs = ", ".join(f"{m:.3f}/{s:.3f}" for m, s in zip(self.model_coeff, self.sample_coeff))
        return f"per-step model/sample {pairs}"

    # ------------------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        """The `coefficients` section of schedule.json (see `COEFFICIENTS_SCHEMA`)."""
        out: dict[str, Any] = {"version": COEFFICIENTS_VERSION, "kind": self.kind}
        if self.ramp is not None:
            out["ramp"] = {"m": self.ramp[0], "s": self.ramp[1]}
        out["model_coeff"] = list(self.model_coeff)
        out["sample_coeff"] = list(self.sample_coeff)
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_dict(cls, obj: Any, source: str = "coefficients", steps: int | None = None) -> "Coefficients":
        """Builds coefficients from their JSON section after validating it against `COEFFICIENTS_SCHEMA`.

        Args:
            obj (`dict`): the section.
            source (`str`, defaults to `"coefficients"`): named in error messages (a file path, say).
            steps (`int`, *optional*): the schedule's steps; the section must cover exactly these.
        """
        validate_coefficients_dict(obj, source)
        ramp = obj.get("ramp")
        try:
            coeffs = cls(tuple(obj["model_coeff"]), tuple(obj["sample_coeff"]), kind=obj["kind"],
                         ramp=None if ramp is None else (ramp["m"], ramp["s"]), calibration=obj.get("calibration", {}))
        except QschedError as exc:
            raise QschedError(f"{source}: {exc}") from None
        if steps is not None and coeffs.steps != steps:
            raise QschedError(f"{source}: coefficients cover {coeffs.steps} steps but the schedule has {steps}; "
                              "allowed: one model_coeff and one sample_coeff per step; re-run `qsched calibrate`")
        return coeffs


def validate_coefficients_dict(obj: Any, source: str = "coefficients") -> None:
    """Validates a `coefficients` section against `COEFFICIENTS_SCHEMA`; one-line QschedError on the first problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(COEFFICIENTS_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is None:
        return
    path = [p for p in error.absolute_path]
    node = COEFFICIENTS_SCHEMA
    for part in path:
        if isinstance(part, int):
            break
        node = node.get("properties", {}).get(part, node)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        allowed = node.get("properties", {}).get(missing, {}).get("description", "see COEFFICIENTS_SCHEMA")
        raise QschedError(f"{source}: coefficients field {'.'.join(map(str, [*path, missing]))} is missing; "
                          f"allowed: {allowed}")
    where = ".".join(str(p) for p in path) or "(section)"
    raise QschedError(f"{source}: coefficients field {where} = {str(error.instance)[:80]} is invalid "
                      f"({' '.join(error.message.split())[:120]}); allowed: {node.get('description', 'see COEFFICIENTS_SCHEMA')}")


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise QschedError(f"steps = {steps!r} is invalid; allowed: a positive integer (the denoising steps)")


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= _RAMP_TOL * max(1.0, abs(x)) for x, y in zip(a, b))
