"""The precision menu: named levels read from YAML, and the fake-quant recipe that simulates each level."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from qsched_search.errors import QschedError
from qsched_search.paths import CONFIG_DIR

FORMATS = ("reference", "int", "float8", "cast")
GRANULARITIES = {"weight": ("per_channel", "per_tensor"), "act": ("per_token", "per_tensor")}
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
DEFAULT_MENU = CONFIG_DIR / "precisions.yaml"


@dataclass(frozen=True)
class Level:
    """One precision level. Checks itself on construction, so a bad YAML entry fails where it is read.

    Args:
        name (`str`): the level's name in schedules, e.g. `"w4a8"`.
        format (`str`): `reference` (no rounding), `int`, `float8` or `cast` (a 16-bit float dtype).
        weight_bits (`int`), act_bits (`int`): bit widths; an `int` level with `act_bits >= 16` is weight-only.
        weight_granularity (`str`, *optional*, defaults to `"per_channel"`): one scale per output channel or one
            per tensor.
        act_granularity (`str`, *optional*, defaults to `"per_token"`): one scale per token (per pixel for
            convolutions) or one per tensor; activation scales are computed on every call (dynamic quantization).
        dtype (`str`, *optional*): the storage dtype of `float8` and `cast` levels.
    """

    name: str
    format: str
    weight_bits: int
    act_bits: int
    weight_granularity: str = "per_channel"
    act_granularity: str = "per_token"
    dtype: str | None = None

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
        if self.format in ("float8", "cast") and self.dtype not in DTYPES:
            raise QschedError(f"{where}: format {self.format} needs dtype, one of {', '.join(DTYPES)}; got {self.dtype!r}")

    @property
    def is_reference(self) -> bool:
        return self.format == "reference"

    @property
    def quantizes_activations(self) -> bool:
        return not self.is_reference and not (self.format == "int" and self.act_bits >= 16)

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
        kind = self.dtype if self.format == "float8" else f"int{self.weight_bits} symmetric"
        return f"W{self.weight_bits} {kind} {self.weight_granularity}, {acts}"


@dataclass(frozen=True)
class Menu:
    """The levels a run may use, which layer types they quantize, and extra name patterns kept at reference."""

    levels: dict[str, Level]
    layer_types: tuple[str, ...] = ("Linear", "Conv2d")
    extra_exclude: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""

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
        return {"layer_types": list(self.layer_types), "extra_exclude": list(self.extra_exclude),
                "levels": {n: {k: v for k, v in asdict(lv).items() if k != "name" and v is not None} for n, lv in self.levels.items()}}


def load_menu(path: str | Path | None = None) -> Menu:
    """Reads a precision menu YAML (defaults to `configs/precisions.yaml`)."""
    path = Path(path) if path else DEFAULT_MENU
    if not path.is_file():
        raise QschedError(f"precision menu {str(path)!r} not found: pass --menu PATH to a YAML file like configs/precisions.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
        levels = {name: Level(name=name, **spec) for name, spec in raw["levels"].items()}
    except QschedError:
        raise
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise QschedError(f"precision menu {str(path)!r} is malformed ({type(exc).__name__}: {exc}); see configs/precisions.yaml for the format") from None
    unknown = set(raw.get("layer_types", [])) - set(LAYER_TYPES)
    if unknown:
        raise QschedError(f"precision menu {str(path)!r}: layer_types {sorted(unknown)} unsupported; allowed: {list(LAYER_TYPES)}")
    return Menu(levels=levels, layer_types=tuple(raw.get("layer_types", LAYER_TYPES)),
                extra_exclude=tuple(raw.get("extra_exclude", [])), source=str(path))


LAYER_TYPES = {"Linear": torch.nn.Linear, "Conv2d": torch.nn.Conv2d}


# ----------------------------------------------------------------------------------------------- fake quantization


def _int_range(bits: int) -> tuple[int, int]:
    # Symmetric, narrow range (-q..q) so that zero is exact and the scale is max|x| / q.
    q = 2 ** (bits - 1) - 1
    return -q, q


def _scales(amax: torch.Tensor, bound: float) -> torch.Tensor:
    return (amax.float() / bound).clamp(min=1e-12)


def fake_quant_int(x: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Symmetric integer fake quantization with one scale per slice along `axis` (or one per tensor)."""
    qmin, qmax = _int_range(bits)
    xf = x.float()
    if axis is None:
        scale = _scales(xf.abs().amax(), qmax)
        out = torch.fake_quantize_per_tensor_affine(xf, scale, torch.zeros((), dtype=torch.int32), qmin, qmax)
    else:
        dims = [d for d in range(xf.dim()) if d != axis % xf.dim()]
        scale = _scales(xf.abs().amax(dim=dims), qmax)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        out = torch.fake_quantize_per_channel_affine(xf, scale, zero, axis % xf.dim(), qmin, qmax)
    return out.to(x.dtype)


def fake_quant_float(x: torch.Tensor, dtype: torch.dtype, axis: int | None) -> torch.Tensor:
    """Scaled float8 fake quantization: scale into the format's range, round through the dtype, scale back."""
    xf = x.float()
    bound = torch.finfo(dtype).max
    if axis is None:
        scale = _scales(xf.abs().amax(), bound)
    else:
        dims = [d for d in range(xf.dim()) if d != axis % xf.dim()]
        shape = [1] * xf.dim()
        shape[axis % xf.dim()] = -1
        scale = _scales(xf.abs().amax(dim=dims), bound).view(shape)
    return ((xf / scale).to(dtype).float() * scale).to(x.dtype)


def quantize_weight(weight: torch.Tensor, level: Level) -> torch.Tensor:
    """The weight as the level sees it, rounded once (output channels are dim 0 for Linear and Conv2d)."""
    if level.is_reference:
        return weight
    if level.format == "cast":
        return weight.to(DTYPES[level.dtype]).to(weight.dtype)
    axis = 0 if level.weight_granularity == "per_channel" else None
    if level.format == "float8":
        return fake_quant_float(weight, DTYPES[level.dtype], axis)
    return fake_quant_int(weight, level.weight_bits, axis)


def activation_quantizer(level: Level) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function that rounds a layer's input on every call, or None when the level leaves activations alone."""
    if level.format == "cast":
        dtype = DTYPES[level.dtype]
        return lambda x: x.to(dtype).to(x.dtype)
    if not level.quantizes_activations:
        return None
    per_token = level.act_granularity == "per_token"

    def rounding(x2d: torch.Tensor, axis: int | None) -> torch.Tensor:
        if level.format == "float8":
            return fake_quant_float(x2d, DTYPES[level.dtype], axis)
        return fake_quant_int(x2d, level.act_bits, axis)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if not per_token:
            return rounding(x, None)
        if x.dim() == 4:
            # Conv2d input (B, C, H, W): a "token" is one pixel's channel vector.
            b, c, h, w = x.shape
            flat = x.permute(0, 2, 3, 1).reshape(-1, c)
            return rounding(flat, 0).reshape(b, h, w, c).permute(0, 3, 1, 2)
        shape = x.shape
        return rounding(x.reshape(-1, shape[-1]), 0).reshape(shape)

    return quantize
