"""The precision menu: named levels read from YAML, each checked where it is read. Importable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from qsched_search.errors import QschedError
from qsched_search.resources import DEFAULT_MENU

__all__ = ["DTYPE_NAMES", "FORMATS", "LAYER_TYPES", "TARGETS", "Level", "Menu", "load_menu"]

FORMATS = ("reference", "int", "float8", "cast")
GRANULARITIES = {"weight": ("per_channel", "per_tensor", "per_group"), "act": ("per_token", "per_tensor")}
DTYPE_NAMES = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
LAYER_TYPES = ("Linear", "Conv2d")
# Whose kernels the simulation follows: torchao quantizes Linear layers only, with its own eligibility rules and
# numerics; generic also rounds Conv2d layers (back ends with int8 convolutions), with the classic per-channel recipe.
TARGETS = ("torchao", "generic")


@dataclass(frozen=True)
class Level:
    """One precision level. Checks itself on construction, so a bad YAML entry fails where it is read.

    Args:
        name (`str`): the level's name in schedules, e.g. `"w4a8"`.
        format (`str`): `reference` (no rounding), `int`, `float8` or `cast` (a 16-bit float dtype).
        weight_bits (`int`), act_bits (`int`): bit widths; an `int` or `float8` level with `act_bits >= 16` is
            weight-only.
        weight_granularity (`str`, *optional*, defaults to `"per_channel"`): one scale per output channel, one per
            tensor, or `per_group` (one scale and zero point per `group_size` input features of a channel, as
            torchao's int4 kernel stores them).
        act_granularity (`str`, *optional*, defaults to `"per_token"`): one scale per token (per pixel for
            convolutions) or one per tensor; activation scales are computed on every call (dynamic quantization).
        dtype (`str`, *optional*): the storage dtype of `float8` and `cast` levels.
        group_size (`int`, *optional*): input features per scale for `per_group` weights (e.g. 128).
    """

    name: str
    format: str
    weight_bits: int
    act_bits: int
    weight_granularity: str = "per_channel"
    act_granularity: str = "per_token"
    dtype: str | None = None
    group_size: int | None = None

    def __post_init__(self):
        where = f"precision level {self.name!r}"
        if self.format not in FORMATS:
            raise QschedError(f"{where}: format {self.format!r} is not one of {', '.join(FORMATS)}")
        for attr in ("weight_bits", "act_bits"):
            bits = getattr(self, attr)
            if not isinstance(bits, int) or not 2 <= bits <= 32:
                raise QschedError(f"{where}: {attr}={bits!r} must be an integer from 2 to 32")
        if self.weight_granularity not in GRANULARITIES["weight"]:
            raise QschedError(f"{where}: weight_granularity {self.weight_granularity!r} is not one of {GRANULARITIES['weight']}")
        if self.act_granularity not in GRANULARITIES["act"]:
            raise QschedError(f"{where}: act_granularity {self.act_granularity!r} is not one of {GRANULARITIES['act']}")
        if self.format in ("float8", "cast") and self.dtype not in DTYPE_NAMES:
            raise QschedError(f"{where}: format {self.format} needs dtype, one of {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        if (self.weight_granularity == "per_group") != (self.group_size is not None):
            raise QschedError(f"{where}: weight_granularity per_group goes with group_size (and only it); got "
                              f"{self.weight_granularity} with group_size={self.group_size!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise QschedError(f"{where}: group_size={self.group_size!r} must be an integer >= 2, e.g. 128")

    @property
    def is_reference(self) -> bool:
        return self.format == "reference"

    def runs_as_is(self, model_dtype: str) -> bool:
        """Whether this level leaves a pipeline of `model_dtype` (e.g. "bfloat16") as it is: the reference format,
        or a cast to the pipeline's own dtype. Such a level can be a run's reference."""
        return self.is_reference or (self.format == "cast" and self.dtype == model_dtype)

    @property
    def quantizes_activations(self) -> bool:
        # 16-bit activations with int or float8 weights: weight-only (float8 W8A16 is the a16 mode of an FP8 checkpoint).
        return not self.is_reference and not (self.format in ("int", "float8") and self.act_bits >= 16)

    @property
    def relative_bops(self) -> float:
        """Bit-operations of one multiply-accumulate relative to a 16x16-bit one."""
        return self.weight_bits * self.act_bits / (16 * 16)

    def describe(self) -> str:
        if self.is_reference:
            return f"reference ({self.weight_bits}-bit float, no rounding)"
        if self.format == "cast":
            return f"weights and activations rounded to {self.dtype}"
        acts = f"A{self.act_bits} {self.act_granularity} dynamic" if self.quantizes_activations else "activations untouched"
        if self.format == "float8":
            kind = self.dtype
        elif self.weight_granularity == "per_group":
            kind = f"int{self.weight_bits} asymmetric"
        else:
            kind = f"int{self.weight_bits} symmetric"
        grouping = f"groups of {self.group_size}" if self.group_size else self.weight_granularity
        return f"W{self.weight_bits} {kind} {grouping}, {acts}"


@dataclass(frozen=True)
class Menu:
    """The levels a run may use, whose kernels their simulation follows, and extra name patterns kept at reference.

    `target` decides which layers a level quantizes (`torchao`: the Linear layers torchao's kernels take;
    `generic`: Linear and Conv2d); `layer_types` follows from it.
    """

    levels: dict[str, Level]
    target: str = "torchao"
    extra_exclude: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise QschedError(f"precision menu {self.source or ''}: target {self.target!r} is not one of "
                              f"{', '.join(TARGETS)}; use torchao (real-kernel layers) or generic (also convolutions)")

    @property
    def layer_types(self) -> tuple[str, ...]:
        return ("Linear",) if self.target == "torchao" else LAYER_TYPES

    def __getitem__(self, name: str) -> Level:
        try:
            return self.levels[name]
        except KeyError:
            raise QschedError(
                f"unknown precision {name!r}: the menu {self.source or ''} has {', '.join(self.levels)}; "
                "add a level to the menu YAML or pick one of those"
            ) from None

    def select(self, names: list[str]) -> list[Level]:
        return [self[name] for name in names]

    @property
    def names(self) -> list[str]:
        return list(self.levels)

    def to_dict(self) -> dict:
        return {"target": self.target, "layer_types": list(self.layer_types), "extra_exclude": list(self.extra_exclude),
                "levels": {n: {k: v for k, v in asdict(lv).items() if k != "name" and v is not None} for n, lv in self.levels.items()}}


def load_menu(path: str | Path | None = None) -> Menu:
    """Reads a precision menu YAML (defaults to the packaged `configs/precisions.yaml`)."""
    path = Path(path) if path else DEFAULT_MENU
    if not path.is_file():
        raise QschedError(f"precision menu {str(path)!r} not found: pass --menu PATH to a YAML file like configs/precisions.yaml")
    try:
        return menu_from_dict(yaml.safe_load(path.read_text()), source=str(path))
    except QschedError:
        raise
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise QschedError(f"precision menu {str(path)!r} is malformed ({type(exc).__name__}: {exc}); see configs/precisions.yaml for the format") from None


def menu_from_dict(raw: dict, source: str = "") -> Menu:
    """A menu from its YAML or JSON form (`Menu.to_dict()`, a menu file, a schedule's `menu` section).

    A `layer_types` entry without a `target` (files written before targets existed) reads as `generic` when it
    names Conv2d, since those files' simulation rounded convolutions too.
    """
    levels = {name: Level(name=name, **spec) for name, spec in raw["levels"].items()}
    target = raw.get("target")
    if target is None:
        target = "generic" if "Conv2d" in (raw.get("layer_types") or LAYER_TYPES) else "torchao"
    return Menu(levels=levels, target=target, extra_exclude=tuple(raw.get("extra_exclude", ()) or ()), source=source)
