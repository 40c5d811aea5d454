"""What a level costs, relative to the reference: bit-operations and weight memory counted, latency measured."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from qsched_search.errors import QschedError
from qsched_search.quant.levels import Level
from qsched_search.results.schedule import COST_MODELS, cost_of

logger = logging.getLogger(__name__)

__all__ = ["CostTable", "Footprint", "load_latency_profile"]


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
class CostTable:
    """Each level's cost relative to the reference level (which costs 1) under every cost model.

    Args:
        tables (`Mapping[str, Mapping[str, float] | None]`): cost model -> level -> relative cost; `latency` is
            None without a measured profile.
    """

    tables: Mapping[str, Mapping[str, float] | None]

    @classmethod
    def from_bank(cls, bank, latency: Mapping[str, float] | None = None) -> "CostTable":
        """`bops` and `memory` from `Bank.level_costs()`; `latency` (level -> ms per step relative to the reference)
        from `load_latency_profile` or a measurement in this process."""
        per_level = bank.level_costs()
        return cls({
            "bops": {lv: c["bops"] for lv, c in per_level.items()},
            "memory": {lv: c["memory"] for lv, c in per_level.items()},
            "latency": dict(latency) if latency is not None else None,
        })

    def model(self, name: str) -> Mapping[str, float]:
        if name not in COST_MODELS:
            raise QschedError(f"--cost {name!r} is not a cost model; allowed: {', '.join(COST_MODELS)}")
        table = self.tables.get(name)
        if table is None:
            raise QschedError(f"--cost {name} needs a latency profile: pass --profile FILE, a CSV with columns level and "
                              "ms_per_step (measure one with `qsched profile` on the target GPU), or use --cost bops|memory")
        return table

    def cost(self, levels: Sequence[str], model: str) -> float:
        return cost_of(levels, self.model(model))

    def costs(self, levels: Sequence[str]) -> dict[str, float | None]:
        return {m: (None if self.tables.get(m) is None else cost_of(levels, self.tables[m])) for m in COST_MODELS}

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
