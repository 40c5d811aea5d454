"""A per-step precision schedule (with optional per-layer overrides): its cost, its validation against the menu and
the layer groups, and its JSON file with a schema.

Schema versions: 3 adds `overrides` (per step, a list of group or pattern -> level) and `layer_groups` (the groups'
module names); 2 added the `execution` section; files of versions 1 and 2 load as schedules without overrides.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from qsched_search.errors import QschedError
from qsched_search.quant.levels import Menu, load_menu, menu_from_dict
from qsched_search.resources import SCHEDULE_SCHEMA
from qsched_search.results.assignment import Override, StepAssignment
from qsched_search.results.coefficients import Coefficients
from qsched_search.results.io import write_json
from qsched_search.results.tables import BUDGET_EPS

__all__ = [
    "COST_MODELS",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "Quality",
    "Schedule",
    "cost_of",
    "load_schedule",
    "save_schedule",
    "schedule_schema",
    "validate_schedule_dict",
]

SCHEMA_VERSION = 3
SCHEMA_PATH = SCHEDULE_SCHEMA
COST_MODELS = ("bops", "memory", "latency")
_FIX = "fix the file or re-run `qsched search`"


def cost_of(levels: Sequence[str], level_costs: Mapping[str, float]) -> float:
    """The cost of a schedule: the mean over steps of each step's level cost.

    Args:
        levels (`Sequence[str]`): one level per step.
        level_costs (`Mapping[str, float]`): each level's cost relative to the reference level (the reference
            costs 1), under one cost model.

    Returns:
        `float`: the schedule's cost as a fraction of the all-reference schedule's.
    """
    if not levels:
        raise QschedError("cost_of: the schedule has no steps; give one level per step")
    missing = [lv for lv in dict.fromkeys(levels) if lv not in level_costs]
    if missing:
        raise QschedError(f"cost_of: level {missing[0]!r} has no cost; costs are known for {', '.join(level_costs)}; "
                          "add the level to --precisions so that its cost is measured")
    return sum(float(level_costs[lv]) for lv in levels) / len(levels)


@dataclass(frozen=True)
class Quality:
    """A schedule's measured quality: one metric over the evaluation set, with its 95% confidence interval.

    `ci_low` / `ci_high` are None when the interval is undefined (e.g. one image).
    """

    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    higher_is_better: bool
    per_image: tuple[float | None, ...] | None = None  # each sample's value (None where an image was unusable)

    def __post_init__(self):
        if self.per_image is not None:
            object.__setattr__(self, "per_image", tuple(None if v is None or v != v else float(v) for v in self.per_image))
        if not isinstance(self.metric, str) or not self.metric:
            raise QschedError(f"schedule quality.metric = {self.metric!r} is invalid; allowed: a metric name such as 'lpips'")
        if not _is_number(self.value) or not math.isfinite(self.value):
            raise QschedError(f"schedule quality.value = {self.value!r} is invalid; allowed: a finite number")
        for name in ("ci_low", "ci_high"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or math.isnan(v)):
                raise QschedError(f"schedule quality.{name} = {v!r} is invalid; allowed: a number or None (undefined interval)")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise QschedError(f"schedule quality.n = {self.n!r} is invalid; allowed: a positive integer (images measured)")
        if not isinstance(self.higher_is_better, bool):
            raise QschedError(f"schedule quality.higher_is_better = {self.higher_is_better!r} is invalid; allowed: true or false")

    def to_dict(self) -> dict:
        out = {"metric": self.metric, "value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high,
               "n": self.n, "higher_is_better": self.higher_is_better}
        if self.per_image is not None:
            out["per_image"] = list(self.per_image)
        return out

    def describe(self) -> str:
        ci = "" if self.ci_low is None or self.ci_high is None else f" [{self.ci_low:.4g}, {self.ci_high:.4g}]"
        return f"{self.metric} {self.value:.4g}{ci} (n={self.n})"


@dataclass(frozen=True)
class Schedule:
    """One precision level per denoising step, with what it was searched for, what it costs and how good it measured.

    Checks itself on construction: every error is one line naming the field, the value and what is allowed.

    Args:
        levels (`tuple[str]`): the level of each step, step 0 first.
        steps (`int`): the number of denoising steps; must equal `len(levels)`.
        timesteps (`tuple[int]`): the scheduler's timestep at each step (one per step).
        reference (`str`): the reference level every cost and quality is relative to.
        model_id (`str`): "embedded", a folder or a hub id.
        weights_sha256 (`str`): sha256 of the denoiser's parameters (`LoadedModel.weights_sha256()`).
        budget (`float`): the cost budget, a fraction in (0, 1] of the all-reference cost.
        cost_model (`str`): the cost model the budget is in: `bops`, `memory` or `latency`.
        cost (`Mapping[str, float | None]`): the schedule's cost under every cost model (`latency` None without a
            profile); the cost under `cost_model` must be within `budget`.
        quality (`Quality`): the measured quality.
        provenance (`Mapping`): tool_version, seed, prompts_sha256, command, created (more keys allowed).
        extras (`Mapping`, *optional*): optional JSON fields (`menu`, `exclude`, `search`, `coefficients`,
            `layer_groups`, `loras`), kept as they are; a `coefficients` section must cover exactly `steps` steps.
        overrides (`tuple[tuple[Override, ...], ...]`, *optional*): per step, the per-layer overrides of its level
            (a later one wins where two name the same layer); empty: none at any step. A group an override names
            must be in the `layer_groups` section when the file has one.
    """

    levels: tuple[str, ...]
    steps: int
    timesteps: tuple[int, ...]
    reference: str
    model_id: str
    weights_sha256: str
    budget: float
    cost_model: str
    cost: Mapping[str, float | None]
    quality: Quality
    provenance: Mapping[str, Any]
    extras: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[tuple[Override, ...], ...] = ()

    def __post_init__(self):
        # Copies, so that neither the caller's lists nor ours change behind the other's back.
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "timesteps", tuple(self.timesteps))
        object.__setattr__(self, "cost", dict(self.cost))
        object.__setattr__(self, "provenance", dict(self.provenance))
        object.__setattr__(self, "extras", dict(self.extras))
        if not self.levels or not all(isinstance(lv, str) and lv for lv in self.levels):
            raise QschedError(f"schedule levels = {list(self.levels)!r} is invalid; allowed: a non-empty list of level names, one per step")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise QschedError(f"schedule steps = {self.steps!r} is invalid; allowed: a positive integer")
        if len(self.levels) != self.steps:
            raise QschedError(f"schedule levels has {len(self.levels)} entries {list(self.levels)} but steps = {self.steps}; "
                              "allowed: exactly one level per step")
        if len(self.timesteps) != self.steps or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.timesteps):
            raise QschedError(f"schedule timesteps = {list(self.timesteps)!r} is invalid; allowed: {self.steps} integers, one per step")
        if not _is_number(self.budget) or not 0 < self.budget <= 1:
            raise QschedError(f"schedule budget.fraction = {self.budget!r} is outside (0, 1]; allowed: a fraction of the "
                              "all-reference cost greater than 0 and at most 1, e.g. 0.5")
        if self.cost_model not in COST_MODELS:
            raise QschedError(f"schedule budget.cost_model = {self.cost_model!r} is unknown; allowed: {', '.join(COST_MODELS)}")
        for model in COST_MODELS:
            value = self.cost.get(model)
            if model not in self.cost or (value is None and model != "latency"):
                raise QschedError(f"schedule cost.{model} = {value!r} is missing; allowed: a number >= 0"
                                  + (" or null" if model == "latency" else ""))
            if value is not None and (not _is_number(value) or not value >= 0):
                raise QschedError(f"schedule cost.{model} = {value!r} is invalid; allowed: a number >= 0")
        spent = self.cost[self.cost_model]
        if spent is None:
            raise QschedError(f"schedule cost.{self.cost_model} = null but the budget is in {self.cost_model}; "
                              "allowed: a number (measure a latency profile with `qsched profile`)")
        if spent > self.budget + BUDGET_EPS:
            raise QschedError(f"schedule cost.{self.cost_model} = {spent:.6g} is over budget.fraction = {self.budget:g}; "
                              "allowed: a cost at most the budget")
        if not isinstance(self.quality, Quality):
            raise QschedError(f"schedule quality = {self.quality!r} is invalid; allowed: a Quality")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise QschedError(f"schedule model.id = {self.model_id!r} is invalid; allowed: a non-empty model id")
        _ = self.coefficients  # a section for another step count fails here, not when a pipeline runs it
        overrides = tuple(tuple(step) for step in self.overrides)
        if overrides and len(overrides) != self.steps:
            raise QschedError(f"schedule overrides has {len(overrides)} entries but steps = {self.steps}; allowed: one "
                              "list of overrides per step (an empty list for a step without any)")
        for i, step in enumerate(overrides):
            for j, o in enumerate(step):
                if not isinstance(o, Override):
                    raise QschedError(f"schedule overrides[{i}][{j}] = {o!r} is invalid; allowed: an Override")
        object.__setattr__(self, "overrides", overrides if any(overrides) else ())
        recorded = (self.extras.get("layer_groups") or {}).get("groups")
        if recorded is not None:
            self.validate_groups(recorded, "the file's layer_groups section")

    @property
    def coefficients(self) -> Coefficients | None:
        """The Q-Sched coefficients of the `coefficients` section, or None if the file has none."""
        raw = self.extras.get("coefficients")
        return None if raw is None else Coefficients.from_dict(raw, source="schedule coefficients", steps=self.steps)

    # ------------------------------------------------------------------------------------------- views

    @property
    def step_assignments(self) -> tuple[StepAssignment, ...]:
        """Each step's level with its per-layer overrides (none for a per-step schedule)."""
        return tuple(StepAssignment(lv, self.overrides[i] if self.overrides else ()) for i, lv in enumerate(self.levels))

    @property
    def has_overrides(self) -> bool:
        return bool(self.overrides)

    @property
    def all_levels(self) -> tuple[str, ...]:
        """Every level the schedule runs, the steps' own and the overrides', in order of first use."""
        return tuple(dict.fromkeys(lv for step in self.step_assignments for lv in step.levels))

    def validate_groups(self, groups, where: str = "the model family's layer groups") -> "Schedule":
        """Checks that every group an override names is one of `groups` (names); returns self."""
        known = set(groups)
        for i, step in enumerate(self.overrides):
            for j, o in enumerate(step):
                if o.group is not None and o.group not in known:
                    shown = ", ".join(sorted(known)[:4]) + (f" and {len(known) - 4} more" if len(known) > 4 else "")
                    raise QschedError(f"schedule overrides[{i}][{j}].group = {o.group!r} is not in {where}; allowed: "
                                      f"{shown or 'none (no groups)'}; see `qsched precisions --groups`")
        return self

    @property
    def execution(self) -> Mapping[str, Any]:
        """How the quality was measured and how the schedule runs (schema 2): backend, target, device, and per level
        its kernel, ms per step and quantized layers; `{}` for a version-1 file."""
        return self.extras.get("execution") or {}

    @property
    def loras(self) -> Mapping[str, Any] | None:
        """The `loras` section: the LoRAs fused into the model when the quality was measured (each one's id, sha256,
        scale), the denoiser modules they changed and their fused weights' sha256; None if measured without."""
        return self.extras.get("loras") or None

    @property
    def backend(self) -> str | None:
        return self.execution.get("backend")

    def quantized_layers(self, level: str) -> list[str] | None:
        """The module names `level` quantized when the quality was measured, or None if the file does not say."""
        layers = (self.execution.get("levels") or {}).get(level, {}).get("quantized_layers")
        return None if layers is None else list(layers)

    def menu(self) -> Menu | None:
        """The precision menu recorded in the file (`menu` field), or None if the file has none."""
        raw = self.extras.get("menu")
        return menu_from_dict(raw, source="schedule.json menu") if raw else None

    def validate(self, menu: Menu) -> "Schedule":
        """Checks every level and the reference against `menu`; returns self so that calls chain."""
        for i, level in enumerate(self.levels):
            if level not in menu.levels:
                raise QschedError(f"schedule levels[{i}] = {level!r} is not in the precision menu {menu.source or ''}; "
                                  f"allowed: {', '.join(menu.names)}; add the level to the menu YAML or pass the menu it was made with")
        for i, step in enumerate(self.overrides):
            for j, o in enumerate(step):
                if o.level not in menu.levels:
                    raise QschedError(f"schedule overrides[{i}][{j}].level = {o.level!r} is not in the precision menu "
                                      f"{menu.source or ''}; allowed: {', '.join(menu.names)}")
        if self.reference not in menu.levels:
            raise QschedError(f"schedule reference = {self.reference!r} is not in the precision menu {menu.source or ''}; "
                              f"allowed: {', '.join(n for n, lv in menu.levels.items() if lv.is_reference)}")
        if menu[self.reference].format not in ("reference", "cast"):
            raise QschedError(f"schedule reference = {self.reference!r} has format {menu[self.reference].format!r}; "
                              f"allowed: a level that runs the pipeline as it is (format 'reference' or 'cast')")
        return self

    # ------------------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        out = {
            "schema_version": SCHEMA_VERSION,
            "model": {"id": self.model_id, "weights_sha256": self.weights_sha256},
            "steps": self.steps,
            "timesteps": list(self.timesteps),
            "levels": list(self.levels),
            "reference": self.reference,
            "budget": {"fraction": self.budget, "cost_model": self.cost_model},
            "cost": {m: self.cost.get(m) for m in COST_MODELS},
            "quality": self.quality.to_dict(),
            "provenance": dict(self.provenance),
        }
        if self.overrides:
            out["overrides"] = [[o.to_dict() for o in step] for step in self.overrides]
        for key, value in self.extras.items():
            out.setdefault(key, value)
        return _json_clean(out)

    @classmethod
    def from_dict(cls, obj: Any, source: str = "schedule") -> "Schedule":
        """Builds a schedule from its JSON object after validating it against the schema."""
        validate_schedule_dict(obj, source)
        known = {"schema_version", "model", "steps", "timesteps", "levels", "reference", "budget", "cost", "quality",
                 "provenance", "overrides"}
        q = obj["quality"]
        try:
            overrides = tuple(tuple(Override.from_dict(o, f"schedule overrides[{i}][{j}]") for j, o in enumerate(step))
                              for i, step in enumerate(obj.get("overrides") or ()))
            return cls(
                levels=tuple(obj["levels"]),
                steps=obj["steps"],
                timesteps=tuple(obj["timesteps"]),
                reference=obj["reference"],
                model_id=obj["model"]["id"],
                weights_sha256=obj["model"]["weights_sha256"],
                budget=float(obj["budget"]["fraction"]),
                cost_model=obj["budget"]["cost_model"],
                cost={m: obj["cost"][m] for m in COST_MODELS},
                quality=Quality(q["metric"], float(q["value"]), _opt_float(q["ci_low"]), _opt_float(q["ci_high"]),
                                q["n"], q["higher_is_better"], q.get("per_image")),
                provenance=obj["provenance"],
                extras={k: v for k, v in obj.items() if k not in known},
                overrides=overrides,
            )
        except QschedError as exc:
            raise QschedError(f"{source}: {exc}; {_FIX}") from None


@functools.lru_cache(maxsize=1)
def schedule_schema() -> dict:
    """The published JSON Schema (draft 2020-12) of schedule.json."""
    return json.loads(SCHEMA_PATH.read_text())


def validate_schedule_dict(obj: Any, source: str = "schedule") -> None:
    """Validates a schedule's JSON object against the schema; raises a one-line QschedError on the first problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schedule_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is None:
        return
    raise QschedError(f"{source}: {_describe_error(error)}; {_FIX}")


def _describe_error(error) -> str:
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path).replace(".[", "[")
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        field_name = f"{path}.{missing}" if path else missing
        allowed = error.schema.get("properties", {}).get(missing, {}).get("description", "see the schema")
        return f"field {field_name} is missing; allowed: {allowed}"
    if error.validator == "type" and not path:
        return f"the file holds a JSON {type(error.instance).__name__}; allowed: a JSON object (see {SCHEMA_PATH.name})"
    allowed = error.schema.get("description")
    if allowed is None and error.parent is None:
        allowed = _parent_description(error)
    value = _short(error.instance)
    return f"field {path or '(top level)'} = {value} is invalid ({_short_message(error.message)}); allowed: {allowed or 'see ' + SCHEMA_PATH.name}"


def _parent_description(error) -> str | None:
    # Items of an array carry no description of their own; the array's does.
    schema = schedule_schema()
    node = schema
    for part in error.absolute_path:
        if isinstance(part, int):
            return node.get("description")
        node = node.get("properties", {}).get(part, {})
    return node.get("description")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_message(message: str, limit: int = 120) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Validates `schedule` against the schema and writes it atomically to `path` (usually `ResultsDir.schedule`)."""
    obj = schedule.to_dict()
    validate_schedule_dict(obj, f"schedule to write to {path}")
    write_json(path, obj)
    return Path(path)


def load_schedule(path: str | Path, menu: Menu | str | Path | None = None) -> Schedule:
    """Reads a schedule.json, validates it against the schema and its levels against a precision menu.

    Args:
        path (`str` or `Path`): the schedule file (or a results folder holding `schedule.json`).
        menu (`Menu`, `str` or `Path`, *optional*): the menu to check the levels against; defaults to the menu
            recorded in the file, else `configs/precisions.yaml`.

    Returns:
        `Schedule`: the validated schedule.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "schedule.json"
    if not path.is_file():
        raise QschedError(f"schedule file {str(path)!r} not found; pass the schedule.json that `qsched search` wrote")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QschedError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {_FIX}") from None
    schedule = Schedule.from_dict(obj, source=str(path))
    if menu is None:
        menu = schedule.menu() or load_menu()
    elif not isinstance(menu, Menu):
        menu = load_menu(menu)
    try:
        schedule.validate(menu)
    except QschedError as exc:
        raise QschedError(f"{path}: {exc}") from None
    return schedule


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _json_clean(obj: Any) -> Any:
    """NaN and infinity are not JSON: an undefined number is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj
