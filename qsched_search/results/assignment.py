"""A step's precision with per-layer overrides: (group or pattern -> level), as schedules, keys and tables write it.

A step of a schedule runs the whole denoiser at its level unless overrides say otherwise: each override names a
layer group of the model family (`configs/families/*.yaml`, `layer_groups`) or an fnmatch pattern of module names,
and the level those layers run at in this step; a later override wins over an earlier one on the layers both name.
A step without overrides is its level alone, so every per-step schedule is also a schedule of this kind.

The key of a step (its name in trials.csv and every cache) is its level, followed by its overrides in braces:
`w4a4{mid_block.attentions.0.transformer_blocks.0/ff=w8a8;~*attn2.to_[kv]=fp32}` (a pattern starts with `~`).
Importable without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from qsched_search.errors import QschedError

__all__ = ["GROUP_NAME", "Override", "StepAssignment", "as_steps", "brief_key", "has_overrides", "parse_schedule_key", "step_levels"]

# A group name: no character that a key, fnmatch or a CSV cell would read specially.
GROUP_NAME = re.compile(r"^[A-Za-z0-9_.:/+-]+$")
_KEY = re.compile(r"^(?P<level>[^{},;=~]+)(?:\{(?P<overrides>[^{}]*)\})?$")


@dataclass(frozen=True)
class Override:
    """The layers of one group (or matching one pattern) run at `level` in this step.

    Args:
        level (`str`): a level of the precision menu (the reference included: keep these layers at full precision).
        group (`str`, *optional*): a layer group of the model family.
        pattern (`str`, *optional*): an fnmatch pattern of the denoiser's module names; exactly one of the two.
    """

    level: str
    group: str | None = None
    pattern: str | None = None

    def __post_init__(self):
        if (self.group is None) == (self.pattern is None):
            raise QschedError(f"override {self.to_dict()!r} names {'both a group and a pattern' if self.group else 'neither a group nor a pattern'}; "
                              "allowed: exactly one of group or pattern, with a level")
        if not isinstance(self.level, str) or not self.level or not _KEY.match(self.level) or "{" in self.level:
            raise QschedError(f"override level = {self.level!r} is invalid; allowed: a level name of the precision menu")
        if self.group is not None and not GROUP_NAME.match(self.group):
            raise QschedError(f"override group = {self.group!r} is invalid; allowed: a group name of letters, digits and "
                              "_.:/+- (see `qsched precisions --groups`)")
        if self.pattern is not None and (not self.pattern or any(c in self.pattern for c in ",;={}")):
            raise QschedError(f"override pattern = {self.pattern!r} is invalid; allowed: a non-empty fnmatch pattern of "
                              "module names without , ; = { }")

    @property
    def target(self) -> str:
        """The group name, or the pattern prefixed with `~` (as keys write it)."""
        return self.group if self.group is not None else f"~{self.pattern}"

    def to_dict(self) -> dict:
        return {"group": self.group, "level": self.level} if self.group is not None else {"pattern": self.pattern, "level": self.level}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "override") -> "Override":
        if not isinstance(obj, dict) or "level" not in obj or ("group" in obj) == ("pattern" in obj):
            raise QschedError(f"{where} = {obj!r} is invalid; allowed: an object with a level and one of group or pattern")
        return cls(level=obj["level"], group=obj.get("group"), pattern=obj.get("pattern"))

    @classmethod
    def parse(cls, text: str) -> "Override":
        target, sep, level = text.rpartition("=")
        if not sep or not target:
            raise QschedError(f"override {text!r} is invalid; allowed: GROUP=LEVEL or ~PATTERN=LEVEL")
        level = level.strip()
        target = target.strip()
        return cls(level=level, pattern=target[1:]) if target.startswith("~") else cls(level=level, group=target)

    def __str__(self) -> str:
        return f"{self.target}={self.level}"


@dataclass(frozen=True)
class StepAssignment:
    """One step of a schedule: its level and the overrides of that level for some layers, in order.

    `str(step)` is the step's key; a step without overrides is its level's name, so per-step keys are unchanged.
    """

    level: str
    overrides: tuple[Override, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if not isinstance(self.level, str) or not self.level or not _KEY.match(self.level) or "{" in self.level:
            raise QschedError(f"step level = {self.level!r} is invalid; allowed: a level name of the precision menu")
        for o in self.overrides:
            if not isinstance(o, Override):
                raise QschedError(f"step overrides = {self.overrides!r} is invalid; allowed: Override objects")

    @property
    def levels(self) -> tuple[str, ...]:
        """Every level the step uses, its own first."""
        return tuple(dict.fromkeys([self.level, *(o.level for o in self.overrides)]))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(o.group for o in self.overrides if o.group is not None)

    def __str__(self) -> str:
        if not self.overrides:
            return self.level
        return f"{self.level}{{{';'.join(map(str, self.overrides))}}}"

    @classmethod
    def parse(cls, token: str) -> "StepAssignment":
        """A step from its key (`w4a4` or `w4a4{group=w8a8;~pattern=fp32}`)."""
        match = _KEY.match(token.strip())
        if match is None:
            raise QschedError(f"schedule step {token!r} is invalid; allowed: LEVEL or LEVEL{{GROUP=LEVEL;~PATTERN=LEVEL}}")
        inner = match.group("overrides")
        overrides = tuple(Override.parse(part) for part in inner.split(";") if part.strip()) if inner else ()
        return cls(match.group("level").strip(), overrides)


def as_steps(levels: Iterable[str | StepAssignment]) -> tuple[StepAssignment, ...]:
    """Steps from level names, step keys or steps."""
    return tuple(s if isinstance(s, StepAssignment) else StepAssignment.parse(str(s)) for s in levels)


def parse_schedule_key(key: str) -> tuple[StepAssignment, ...]:
    """The steps of a schedule key (step keys comma-joined; no key contains a comma)."""
    return as_steps(part for part in str(key).split(",") if part.strip())


def step_levels(steps: Sequence[str | StepAssignment]) -> tuple[str, ...]:
    """Each step's own level (what a per-step schedule's `levels` holds)."""
    return tuple(s.level if isinstance(s, StepAssignment) else StepAssignment.parse(str(s)).level for s in steps)


def brief_key(key: str) -> str:
    """A schedule key short enough for a table cell: each step's level with the number of its overrides
    (`w4a4+3,w4a4,w4a4,w4a4`); a per-step key is unchanged."""
    steps = parse_schedule_key(key)
    return ",".join(s.level + (f"+{len(s.overrides)}" if s.overrides else "") for s in steps)


def has_overrides(steps: Sequence[str | StepAssignment]) -> bool:
    return any(s.overrides for s in as_steps(steps))
