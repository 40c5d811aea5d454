"""Which real kernel runs each precision level: one registered rule per kernel, read by both banks.

A rule turns a level (and the pipeline's dtype) into a `KernelChoice`: the torchao config that runs it, and the facts
the simulation needs to compute what that kernel computes (which recipe rounds the numbers, which layers the kernel
takes). The torchao config is built only when the real-kernel bank asks for it, so the simulation needs no torchao.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from qsched_search.errors import QschedError
from qsched_search.quant.levels import Level, Menu

logger = logging.getLogger(__name__)

__all__ = ["INT4_GROUP_SIZES", "KernelChoice", "kernel_for", "real_kernel_levels", "register_kernel", "torchao"]

# Group sizes torchao's tinygemm int4 kernel takes.
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class KernelChoice:
    """How a precision level runs on real kernels, and what the simulation must mirror of it.

    Args:
        level (`str`): the menu level.
        kernel (`str`): a short name of the kernel path, recorded in profiles and schedules.
        recipe (`str`): the simulation's rounding recipe for this kernel (`identity`, `fp8`, `int8-dynamic`,
            `int8-weight`, `int4-tinygemm`; see `qsched_search.quant.fake_quant`).
        build (`Callable[[], Any]`, *optional*): makes the torchao config; None for the identity.
        quantizes_activations (`bool`): activations are quantized on every call; such levels skip Linear layers
            with few rows per call (see `qsched_search.quant.targets`).
        in_multiple (`int`), out_multiple (`int`): the kernel's divisibility needs on in- and out-features.
    """

    level: str
    kernel: str
    recipe: str
    build: Callable[[], Any] | None = None
    quantizes_activations: bool = False
    in_multiple: int = 16
    out_multiple: int = 16

    @property
    def is_identity(self) -> bool:
        return self.build is None

    def config(self):
        """The torchao config that quantizes a Linear for this kernel (imports torchao)."""
        return None if self.build is None else self.build()


_KERNELS: list[tuple[str, Callable[[Level, str], KernelChoice | None]]] = []


def register_kernel(name: str):
    """Registers a rule `(level, model_dtype_name) -> KernelChoice | None`; rules are tried in registration order."""

    def wrap(fn):
        _KERNELS.append((name, fn))
        return fn

    return wrap


def torchao():
    """torchao.quantization, or a one-line error saying how to install it."""
    try:
        import torchao.quantization as ao
    except ImportError:
        raise QschedError("the torchao backend needs torchao: pip install 'qsched-search[gpu]' (torchao 0.18 for torch "
                          "2.11), or use --backend sim") from None
    return ao


def _granularity(name: str):
    ao = torchao()
    return ao.PerTensor() if name == "per_tensor" else ao.PerRow()


@register_kernel("identity")
def _identity(level: Level, model_dtype: str) -> KernelChoice | None:
    if level.runs_as_is(model_dtype):
        return KernelChoice(level.name, "none (the pipeline's own dtype)", "identity")
    return None


@register_kernel("float8-dynamic")
def _float8_dynamic(level: Level, model_dtype: str) -> KernelChoice | None:
    if level.format != "float8" or (level.weight_bits, level.act_bits) != (8, 8):
        return None
    if (level.weight_granularity == "per_tensor") != (level.act_granularity == "per_tensor"):
        raise QschedError(f"precision level {level.name!r}: torchao's float8 kernels need the same granularity for weights "
                          f"and activations; got weight {level.weight_granularity}, act {level.act_granularity}; "
                          "use per_channel with per_token, or per_tensor with per_tensor")

    def build():
        import torch

        dtype = getattr(torch, level.dtype)
        return torchao().Float8DynamicActivationFloat8WeightConfig(
            activation_dtype=dtype, weight_dtype=dtype, granularity=_granularity(level.weight_granularity),
            set_inductor_config=False)

    rowwise = "rowwise" if level.weight_granularity == "per_channel" else "tensorwise"
    if rowwise == "rowwise" and model_dtype != "bfloat16":  # torchao's PerRow float8 asserts bfloat16 weights
        raise QschedError(f"precision level {level.name!r}: torchao's rowwise float8 kernel needs a bfloat16 pipeline; "
                          f"this one is {model_dtype}; load the model with --dtype bfloat16")
    return KernelChoice(level.name, f"torchao Float8DynamicActivationFloat8Weight {level.dtype} {rowwise}", "fp8", build,
                        quantizes_activations=True)


@register_kernel("int8-dynamic")
def _int8_dynamic(level: Level, model_dtype: str) -> KernelChoice | None:
    if level.format != "int" or (level.weight_bits, level.act_bits) != (8, 8) or level.weight_granularity == "per_group":
        return None

    def build():
        act = "per_tensor" if level.act_granularity == "per_tensor" else "per_channel"
        return torchao().Int8DynamicActivationInt8WeightConfig(
            granularity=[_granularity(act), _granularity(level.weight_granularity)], set_inductor_config=False)

    return KernelChoice(level.name, "torchao Int8DynamicActivationInt8Weight", "int8-dynamic", build,
                        quantizes_activations=True)


@register_kernel("int8-weight-only")
def _int8_weight_only(level: Level, model_dtype: str) -> KernelChoice | None:
    if level.format != "int" or level.weight_bits != 8 or level.act_bits < 16 or level.weight_granularity == "per_group":
        return None

    def build():
        return torchao().Int8WeightOnlyConfig(granularity=_granularity(level.weight_granularity), set_inductor_config=False)

    return KernelChoice(level.name, "torchao Int8WeightOnly", "int8-weight", build)


@register_kernel("int4-weight-only")
def _int4_weight_only(level: Level, model_dtype: str) -> KernelChoice | None:
    if level.format != "int" or level.weight_bits != 4 or level.act_bits < 16:
        return None
    if level.weight_granularity != "per_group" or level.group_size not in INT4_GROUP_SIZES:
        raise QschedError(f"precision level {level.name!r}: torchao's int4 weight-only kernel (tinygemm) stores int4 "
                          f"in groups of {', '.join(map(str, INT4_GROUP_SIZES))} input features; the level says "
                          f"{level.weight_granularity}{f' {level.group_size}' if level.group_size else ''}; set "
                          "weight_granularity: per_group and group_size: 128 in the menu")
    if model_dtype != "bfloat16":
        raise QschedError(f"precision level {level.name!r}: the int4 weight-only kernel (tinygemm) needs a bfloat16 "
                          f"pipeline; this one is {model_dtype}; load the model with --dtype bfloat16")

    def build():
        # tile_packed_to_4d is tinygemm (torch.ops.aten._weight_int4pack_mm, in core PyTorch); the default "plain"
        # layout needs the fbgemm-gpu-genai package.
        return torchao().Int4WeightOnlyConfig(group_size=level.group_size, int4_packing_format="tile_packed_to_4d",
                                              set_inductor_config=False)

    return KernelChoice(level.name, f"torchao Int4WeightOnly tinygemm group {level.group_size}", "int4-tinygemm",
                        build, in_multiple=level.group_size, out_multiple=8)


def kernel_for(level: Level, model_dtype: str) -> KernelChoice:
    """The real-kernel path of `level` on a pipeline of `model_dtype` (e.g. `"bfloat16"`); a one-line error when the
    torchao backend has none (the simulation backend still runs the level)."""
    for _, rule in _KERNELS:
        choice = rule(level, model_dtype)
        if choice is not None:
            return choice
    raise QschedError(f"precision level {level.name!r} ({level.describe()}) has no kernel on backend torchao; backend "
                      f"sim simulates it (--backend sim); torchao has kernels for the pipeline's own dtype, float8 "
                      f"W8A8, int W8A8, int W8A16 and int W4A16 in groups")


def real_kernel_levels(menu: Menu, model_dtype: str = "bfloat16") -> list[str]:
    """The menu's levels that have a torchao kernel for a pipeline of `model_dtype`."""
    out = []
    for name, level in menu.levels.items():
        try:
            kernel_for(level, model_dtype)
        except QschedError:
            continue
        out.append(name)
    return out


def maybe_kernel(level: Level, model_dtype: str) -> KernelChoice | None:
    """`kernel_for`, or None for a level torchao cannot run (the simulation then uses the generic recipe)."""
    try:
        return kernel_for(level, model_dtype)
    except QschedError:
        return None
