"""What a level, or a per-layer assignment, costs relative to the reference: bit-operations and weight memory
counted from a recorded denoiser call, latency measured."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import pandas as pd

from qsched_search.errors import QschedError
from qsched_search.quant.levels import Level
from qsched_search.results.assignment import StepAssignment, as_steps, step_levels
from qsched_search.results.schedule import COST_MODELS, cost_of

if TYPE_CHECKING:
    from qsched_search.quant.groups import LayerAssignment, LayerGroups

logger = logging.getLogger(__name__)

__all__ = ["CostTable", "Footprint", "LayerCosts", "load_latency_profile", "override_latency_unknown"]


def override_latency_unknown(option: str) -> QschedError:
    """The one refusal of `latency` for schedules with per-layer overrides, whichever option asked for it."""
    return QschedError(f"{option}: a step with per-layer overrides runs its own compiled copy, whose latency is known "
                       "only when measured; price a per-layer search by --cost bops or memory")


@dataclass(frozen=True)
class Footprint:
    """Where the denoiser's multiply-accumulates and parameters are: in switchable layers or kept at reference."""

    quantized_macs: int
    other_macs: int
    quantized_params: int
    other_params: int

    def level_costs(self, level: Level, reference: Level) -> dict[str, float]:
        """The level's cost relative to running everything at the reference level.

        `bops`: multiply-accumulates of Linear/Conv2d layers weighted by weight_bits * act_bits (attention score
        products and normalisations are not counted); `memory`: bytes of the denoiser's parameters.
        """
        macs = self.quantized_macs + self.other_macs
        bops = (self.quantized_macs * level.relative_bops + self.other_macs * reference.relative_bops) / (
            macs * reference.relative_bops
        )
        params = self.quantized_params + self.other_params
        memory = (self.quantized_params * level.weight_bits + self.other_params * reference.weight_bits) / (
            params * reference.weight_bits
        )
        return {"bops": bops, "memory": memory}


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer MACs and parameters of one recorded denoiser call: prices any per-layer assignment exactly.

    Args:
        macs (`Mapping[str, int]`): multiply-accumulates per sample of every Linear and Conv2d of the call.
        params (`Mapping[str, int]`): weight elements of each switchable layer.
        total_params (`int`): every parameter of the denoiser.
        quantized (`Mapping[str, Sequence[str]]`): level -> the layers it quantizes.
        bits (`Mapping[str, tuple[int, int]]`): level -> (weight bits, activation bits).
        reference (`str`): the level every cost is relative to.
    """

    macs: Mapping[str, int]
    params: Mapping[str, int]
    total_params: int
    quantized: Mapping[str, Sequence[str]]
    bits: Mapping[str, tuple[int, int]]
    reference: str

    def __post_init__(self):
        object.__setattr__(self, "_sets", {lv: frozenset(names) for lv, names in self.quantized.items()})

    def cost(self, assignment: "LayerAssignment") -> dict[str, float]:
        """`bops` and `memory` of one denoiser call under `assignment`, relative to the all-reference call: a layer
        counts at its assigned level's bits where that level quantizes it, at the reference's elsewhere (the rule of
        `Footprint.level_costs`, layer by layer)."""
        ref_w, ref_a = self.bits[self.reference]
        total_macs = sum(self.macs.values())
        bops, memory = total_macs * ref_w * ref_a, self.total_params * ref_w
        overrides = dict(assignment.overrides)
        for layer, n_params in self.params.items():
            level = overrides.get(layer, assignment.default)
            if layer in self._sets.get(level, ()):
                w, a = self.bits[level]
                bops += self.macs.get(layer, 0) * (w * a - ref_w * ref_a)
                memory += n_params * (w - ref_w)
        return {"bops": bops / (total_macs * ref_w * ref_a), "memory": memory / (self.total_params * ref_w)}

    def macs_of(self, layers: Sequence[str]) -> int:
        return sum(int(self.macs.get(n, 0)) for n in layers)

    def params_of(self, layers: Sequence[str]) -> int:
        return sum(int(self.params.get(n, 0)) for n in layers)


@dataclass(frozen=True)
class CostTable:
    """Each level's cost relative to the reference level (which costs 1) under every cost model.

    A schedule whose steps have per-layer overrides is priced layer by layer (`layers`, resolving groups with
    `groups`) for `bops` and `memory`; its `latency` is unknown (None) unless measured, since a mixed step runs its
    own compiled copy.

    Args:
        tables (`Mapping[str, Mapping[str, float] | None]`): cost model -> level -> relative cost; `latency` is
            None without a measured profile.
        layers (`LayerCosts`, *optional*): the per-layer table (`Bank.layer_costs()`), for steps with overrides.
        groups (`LayerGroups`, *optional*): the layer groups the overrides name.
    """

    tables: Mapping[str, Mapping[str, float] | None]
    layers: LayerCosts | None = None
    groups: "LayerGroups | None" = None

    @classmethod
    def from_bank(cls, bank, latency: Mapping[str, float] | None = None, groups: "LayerGroups | None" = None) -> "CostTable":
        """`bops` and `memory` from `Bank.level_costs()` (and `Bank.layer_costs()` for overrides); `latency` (level ->
        ms per step relative to the reference) from `load_latency_profile` or a measurement in this process."""
        per_level = bank.level_costs()
        return cls({
            "bops": {lv: c["bops"] for lv, c in per_level.items()},
            "memory": {lv: c["memory"] for lv, c in per_level.items()},
            "latency": dict(latency) if latency is not None else None,
        }, layers=bank.layer_costs(), groups=groups)

    def model(self, name: str) -> Mapping[str, float]:
        if name not in COST_MODELS:
            raise QschedError(f"--cost {name!r} is not a cost model; allowed: {', '.join(COST_MODELS)}")
        table = self.tables.get(name)
        if table is None:
            raise QschedError(f"--cost {name} needs a latency profile: pass --profile FILE, a CSV with columns level and "
                              "ms_per_step (measure one with `qsched profile` on the target GPU), or use --cost bops|memory")
        return table

    def cost(self, levels: Sequence[str | StepAssignment], model: str) -> float:
        """The schedule's cost under `model` (steps may carry overrides)."""
        table = self.model(model)
        steps = as_steps(levels)
        if not any(s.overrides for s in steps):
            return cost_of(step_levels(steps), table)
        if model == "latency":
            raise override_latency_unknown("--cost latency")
        return sum(self._step_cost(s)[model] for s in steps) / len(steps)

    def costs(self, levels: Sequence[str | StepAssignment]) -> dict[str, float | None]:
        steps = as_steps(levels)
        if not any(s.overrides for s in steps):
            plain = step_levels(steps)
            return {m: (None if self.tables.get(m) is None else cost_of(plain, self.tables[m])) for m in COST_MODELS}
        per_step = [self._step_cost(s) for s in steps]
        out: dict[str, float | None] = {m: sum(c[m] for c in per_step) / len(steps) for m in ("bops", "memory")}
        out["latency"] = None
        return out

    def _step_cost(self, step: StepAssignment) -> dict[str, float]:
        if not step.overrides:
            return {m: float(self.tables[m][step.level]) for m in ("bops", "memory")}
        if self.layers is None:
            raise QschedError("a step with per-layer overrides needs the per-layer cost table; build the CostTable "
                              "with CostTable.from_bank(bank, groups=...)")
        from qsched_search.quant.groups import resolve_step

        return self.layers.cost(resolve_step(step, list(self.layers.params), self.groups))

    def to_dict(self) -> dict:
        return {m: (None if t is None else dict(t)) for m, t in self.tables.items()}


def load_latency_profile(path: str | Path, levels: Sequence[str], reference: str) -> dict[str, float]:
    """Reads a latency profile CSV (`level`, `ms_per_step`, more columns allowed) into costs relative to the reference.

    Several rows of one level are averaged. A level slower than the reference is allowed (it happens on real
    kernels, e.g. int4 without compile) but logged, since a search will then avoid it for a reason worth knowing.
    """
    path = Path(path)
    if not path.is_file():
        raise QschedError(f"--profile {str(path)!r} not found; pass a CSV with columns level, ms_per_step "
                          "(measure one with `qsched profile` on the target GPU)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QschedError(f"--profile {str(path)!r} is not a readable CSV ({type(exc).__name__}); "
                          "expected columns level, ms_per_step") from None
    absent = [c for c in ("level", "ms_per_step") if c not in frame.columns]
    if absent:
        raise QschedError(f"--profile {str(path)!r} lacks column(s) {', '.join(absent)} (it has {', '.join(map(str, frame.columns))}); "
                          "expected at least level, ms_per_step")
    ms = pd.to_numeric(frame["ms_per_step"], errors="coerce").groupby(frame["level"].astype(str)).mean()
    missing = [lv for lv in dict.fromkeys([reference, *levels]) if lv not in ms.index]
    if missing:
        raise QschedError(f"--profile {str(path)!r} has no row for level(s) {', '.join(missing)} (it has {', '.join(ms.index)}); "
                          "profile every level you search over, the reference included")
    bad = [lv for lv in dict.fromkeys([reference, *levels]) if not (ms[lv] > 0 and math.isfinite(ms[lv]))]
    if bad:
        raise QschedError(f"--profile {str(path)!r}: ms_per_step of {bad[0]!r} is {ms[bad[0]]!r}; allowed: a positive number")
    out = {lv: float(ms[lv] / ms[reference]) for lv in dict.fromkeys([reference, *levels])}
    slower = [lv for lv, c in out.items() if c > 1.0]
    if slower:
        logger.warning("latency profile %s: %s slower than the reference %s; the search will avoid them",
                       path, ", ".join(f"{lv} ({out[lv]:.2f}x)" for lv in slower), reference)
    return out
