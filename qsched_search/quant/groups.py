"""Layer groups and per-layer assignments: which modules a group names, and which level each layer runs at in a step.

A family YAML (`configs/families/*.yaml`) lists groupings under `layer_groups`; each grouping is a list of group
specs, each a name and fnmatch patterns of module names, where `{block}` stands for each unit of the model (its
repeated blocks, diffusers' regional-compile scope, unless the spec says `each: PATTERN`):

    layer_groups:
      default: block-role
      block-role:
        - {name: "{block}/attn1.qkv", layers: ["{block}.attn1.to_[qkv]"]}
        - {name: "{block}/ff", layers: ["{block}.ff.*"]}
        - {name: "{block}/conv", each: "*resnets.*", layers: ["{block}.conv*"]}

A group holds the layers some built level quantizes (a convolution group is empty under target torchao and is left
out); a layer belongs to the first group that names it. `resolve_step` turns a schedule step (level + overrides) into
the bank's `LayerAssignment`: a default level and the layers that run at another one. Importable without torch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from qsched_search.errors import QschedError
from qsched_search.results.assignment import GROUP_NAME, StepAssignment

logger = logging.getLogger(__name__)

__all__ = ["GroupSpec", "LayerAssignment", "LayerGroups", "bank_groups", "build_groups", "grouping_specs", "resolve_step",
           "specs_from_list"]

PLACEHOLDER = "{block}"


@dataclass(frozen=True)
class LayerAssignment:
    """What the bank runs for one denoiser call: every switchable layer at `default`, except `overrides`.

    Args:
        default (`str`): the level of every layer not overridden.
        overrides (`tuple[tuple[str, str], ...]`): (module name, level) pairs, sorted, none at `default`.
    """

    default: str
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        cleaned = tuple(sorted((str(n), str(lv)) for n, lv in dict(self.overrides).items() if lv != self.default))
        object.__setattr__(self, "overrides", cleaned)

    @property
    def uniform(self) -> bool:
        return not self.overrides

    @property
    def levels(self) -> tuple[str, ...]:
        """The levels this assignment uses, the default first."""
        return tuple(dict.fromkeys([self.default, *(lv for _, lv in self.overrides)]))

    def level_of(self, layer: str) -> str:
        return dict(self.overrides).get(layer, self.default)

    @property
    def key(self) -> str:
        """A short unique name: the default level, the number of layers overridden per level, and a hash of which
        (`w4a4+6xw8a8#3f2a9c01`); a uniform assignment's key is its level."""
        if not self.overrides:
            return self.default
        counts: dict[str, int] = {}
        for _, lv in self.overrides:
            counts[lv] = counts.get(lv, 0) + 1
        digest = hashlib.sha256(repr(self.overrides).encode()).hexdigest()[:8]
        return f"{self.default}+" + "+".join(f"{n}x{lv}" for lv, n in sorted(counts.items())) + f"#{digest}"


@dataclass(frozen=True)
class GroupSpec:
    """One entry of a grouping: a name and module-name patterns, `{block}` expanding over the model's units."""

    name: str
    layers: tuple[str, ...]
    each: str | None = None  # the units `{block}` stands for: modules matching this pattern; None: repeated blocks

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.name or not self.layers:
            raise QschedError(f"layer group {self.name!r}: needs a name and at least one pattern in layers")
        uses = [PLACEHOLDER in self.name, any(PLACEHOLDER in p for p in self.layers)]
        if uses[0] != uses[1]:
            raise QschedError(f"layer group {self.name!r}: {PLACEHOLDER} must appear in both the name and the layers "
                              f"patterns ({list(self.layers)}), or in neither")


def specs_from_list(raw: Any, source: str) -> list[GroupSpec]:
    """Group specs from YAML: a list of {name, layers, each?} mappings."""
    if not isinstance(raw, list) or not raw:
        raise QschedError(f"{source}: a grouping is a non-empty list of {{name, layers}} entries; got {raw!r}"[:300])
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "name" not in entry or "layers" not in entry:
            raise QschedError(f"{source}[{i}] = {entry!r} is invalid; allowed: {{name: NAME, layers: [PATTERN, ...]}}"[:300])
        layers = entry["layers"]
        layers = [layers] if isinstance(layers, str) else list(layers)
        out.append(GroupSpec(str(entry["name"]), tuple(str(p) for p in layers), entry.get("each")))
    return out


def grouping_specs(family_groups: Mapping[str, Any], default: str | None, grouping: str | None,
                   family: str = "") -> tuple[str, list[GroupSpec]]:
    """The named grouping of a family, or one read from a YAML file (`grouping` ending in .yaml/.yml).

    Returns:
        `(name, specs)`.
    """
    if grouping and grouping.endswith((".yaml", ".yml")):
        path = Path(grouping)
        if not path.is_file():
            raise QschedError(f"--grouping {grouping!r} not found; pass a YAML file with a list of {{name, layers}} "
                              "entries, or a grouping name of the family")
        raw = yaml.safe_load(path.read_text())
        return path.stem, specs_from_list(raw, f"--grouping {grouping}")
    name = grouping or default
    if not family_groups or name is None:
        raise QschedError(f"model family {family!r} defines no layer_groups; add them to configs/families/{family}.yaml "
                          "or pass --grouping FILE.yaml")
    if name not in family_groups:
        raise QschedError(f"--grouping {name!r} is not a grouping of model family {family!r}; allowed: "
                          f"{', '.join(family_groups)} or a YAML file")
    return name, specs_from_list(family_groups[name], f"configs/families/{family}.yaml layer_groups.{name}")


@dataclass(frozen=True)
class LayerGroups:
    """The groups of one grouping resolved on one denoiser: name -> module names, in module order.

    `ungrouped` names the switchable layers no group holds (they follow each step's level).
    """

    name: str
    groups: Mapping[str, tuple[str, ...]]
    ungrouped: tuple[str, ...] = ()
    switchable: tuple[str, ...] = ()
    specs: tuple[GroupSpec, ...] = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "groups", {k: tuple(v) for k, v in self.groups.items()})

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def layers_of(self, group: str) -> tuple[str, ...]:
        try:
            return self.groups[group]
        except KeyError:
            shown = ", ".join(list(self.groups)[:6]) + (f" and {len(self.groups) - 6} more" if len(self.groups) > 6 else "")
            raise QschedError(f"layer group {group!r} is not a group of grouping {self.name!r}; allowed: {shown} "
                              "(`qsched precisions --groups` lists them)") from None

    def to_dict(self) -> dict:
        """The `layer_groups` section of a schedule: the grouping's name and each group's module names."""
        return {"grouping": self.name, "groups": {k: list(v) for k, v in self.groups.items()}}

    @classmethod
    def from_dict(cls, obj: Mapping, switchable: Sequence[str] = ()) -> "LayerGroups":
        groups = {str(k): tuple(v) for k, v in (obj.get("groups") or {}).items()}
        held = {n for v in groups.values() for n in v}
        return cls(str(obj.get("grouping") or "recorded"), groups, tuple(n for n in switchable if n not in held),
                   tuple(switchable))


def _units(names: Sequence[str], each: str | None, repeated: Sequence[str]) -> list[str]:
    if each is None:
        return [p.rstrip(".") for p in repeated]
    matched = [n for n in names if n and fnmatch.fnmatch(n, each)]
    # The top-most matches: "*resnets.*" matches a resnet and its children; the resnet is the unit.
    return [n for n in matched if not any(n.startswith(m + ".") for m in matched if m != n)]


def build_groups(module_names: Sequence[str], specs: Sequence[GroupSpec], switchable: Sequence[str],
                 repeated: Sequence[str], name: str = "groups") -> LayerGroups:
    """Resolves group specs on a denoiser.

    Args:
        module_names (`Sequence[str]`): every module name of the denoiser, in module order.
        specs (`Sequence[GroupSpec]`): the grouping.
        switchable (`Sequence[str]`): the layers some built level quantizes (only these can change level).
        repeated (`Sequence[str]`): the `name.` prefixes of the model's repeated blocks.
        name (`str`): the grouping's name.
    """
    order = {n: i for i, n in enumerate(module_names)}
    switchable = sorted(dict.fromkeys(switchable), key=lambda n: order.get(n, len(order)))
    free = list(switchable)
    groups: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        units = _units(module_names, spec.each, repeated) if PLACEHOLDER in spec.name else [None]
        for unit in units:
            gname = spec.name if unit is None else spec.name.replace(PLACEHOLDER, unit)
            patterns = [p if unit is None else p.replace(PLACEHOLDER, unit) for p in spec.layers]
            members = [n for n in free if any(fnmatch.fnmatch(n, p) for p in patterns)]
            if not members:
                continue  # e.g. convolutions under target torchao: nothing to switch
            if not GROUP_NAME.match(gname):
                raise QschedError(f"layer group name {gname!r} (from {spec.name!r}) has characters a schedule key cannot "
                                  "hold; allowed: letters, digits and _.:/+-")
            if gname in groups:
                raise QschedError(f"layer group {gname!r} is defined twice in grouping {name!r}; give each entry its own name")
            groups[gname] = tuple(members)
            taken = set(members)
            free = [n for n in free if n not in taken]
    # In module order (block by block), as tables and pictures list them.
    position = {n: i for i, n in enumerate(switchable)}
    groups = dict(sorted(groups.items(), key=lambda kv: position[kv[1][0]]))
    return LayerGroups(name, groups, tuple(free), tuple(switchable), tuple(specs))


def bank_groups(bank, family, grouping: str | None = None) -> LayerGroups:
    """The family's grouping (its default if `grouping` is None; or a YAML file) resolved on a bank's denoiser.

    Args:
        bank (`Bank`): the installed bank (its built levels decide which layers can switch).
        family (`Family`): the model family (`layer_groups`, `default_grouping`).
        grouping (`str`, *optional*): a grouping name of the family or a path to a YAML list of group specs.
    """
    from qsched_search.quant.targets import repeated_block_prefixes

    name, specs = grouping_specs(family.layer_groups, family.default_grouping, grouping, family.family)
    names = [n for n, _ in bank.denoiser.named_modules()]
    groups = build_groups(names, specs, bank.switchable_layers, repeated_block_prefixes(bank.denoiser), name)
    if not groups.groups:
        raise QschedError(f"grouping {name!r} holds none of the {len(groups.switchable)} layers the bank can switch "
                          f"(levels {', '.join(bank.levels)}, target {bank.menu.target}); check its patterns")
    return groups


def resolve_step(step: StepAssignment, switchable: Sequence[str], groups: LayerGroups | None) -> LayerAssignment:
    """The bank's assignment for one step: its level, and each override's layers at the override's level (a later
    override wins). A group not in `groups`, or a pattern that matches no switchable layer, is a one-line error."""
    if not step.overrides:
        return LayerAssignment(step.level)
    chosen: dict[str, str] = {}
    for o in step.overrides:
        if o.group is not None:
            if groups is None:
                raise QschedError(f"override {o} names layer group {o.group!r} but no grouping is loaded; pass the model "
                                  "family's groups (or use a pattern: ~PATTERN=LEVEL)")
            layers: Iterable[str] = groups.layers_of(o.group)
        else:
            layers = [n for n in switchable if fnmatch.fnmatch(n, o.pattern)]
            if not layers:
                raise QschedError(f"override pattern {o.pattern!r} matches none of the {len(switchable)} layers the bank "
                                  f"can switch (e.g. {', '.join(list(switchable)[:2])}); fix the pattern")
        for n in layers:
            chosen[n] = o.level
    return LayerAssignment(step.level, tuple(chosen.items()))
