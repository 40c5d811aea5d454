"""Which layers a level quantizes: one rule per target, shared by the simulation and the real-kernel bank.

Under target `torchao` a level quantizes the Linear layers that torchao's kernel for it takes (in- and out-features
divisible as the kernel needs, activation-quantizing kernels only where a call has enough rows, and, with a regional
compile, only inside the compiled blocks); a level torchao has no kernel for follows the same Linear rules. Under
target `generic` every Linear and Conv2d not excluded is rounded (back ends with int8 convolutions).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from torch import nn

from qsched_search.quant.kernels import KernelChoice, maybe_kernel
from qsched_search.quant.levels import Level, Menu

__all__ = ["MIN_ROWS", "LayerRule", "layer_rule", "repeated_block_prefixes", "select_layers"]

# Activation-quantizing kernels skip Linear layers that saw fewer rows per call than this (per-sample conditioning
# projections: dynamic quantization costs more than it saves there, and int8 matrix products need more than 16 rows).
MIN_ROWS = 32


@dataclass(frozen=True)
class LayerRule:
    """The eligibility rule of one level under one target."""

    types: tuple[type, ...]
    in_multiple: int = 1
    out_multiple: int = 1
    min_rows: int = 0

    def eligible(self, module: nn.Module, rows: int | None) -> bool:
        if not isinstance(module, self.types):
            return False
        if isinstance(module, nn.Linear):
            if module.in_features % self.in_multiple or module.out_features % self.out_multiple:
                return False
        if self.min_rows and rows is not None and rows < self.min_rows:
            return False
        return True


def layer_rule(level: Level, menu: Menu, model_dtype: str, kernel: KernelChoice | None = None) -> LayerRule:
    """The rule `level` follows under `menu.target`; `kernel` defaults to the level's torchao kernel, if any."""
    if level.runs_as_is(model_dtype):
        return LayerRule(types=())
    if menu.target == "generic":
        return LayerRule(types=(nn.Linear, nn.Conv2d))
    kernel = kernel or maybe_kernel(level, model_dtype)
    if kernel is not None:
        return LayerRule((nn.Linear,), kernel.in_multiple, kernel.out_multiple,
                         MIN_ROWS if kernel.quantizes_activations else 0)
    return LayerRule((nn.Linear,), 16, 16, MIN_ROWS if level.quantizes_activations else 0)


def repeated_block_prefixes(denoiser: nn.Module) -> tuple[str, ...]:
    """`name.` of every module of the model's `_repeated_blocks` classes (diffusers' regional-compile scope)."""
    repeated = tuple(getattr(denoiser, "_repeated_blocks", ()) or ())
    return tuple(f"{n}." for n, m in denoiser.named_modules() if type(m).__name__ in repeated)


def select_layers(denoiser: nn.Module, rule: LayerRule, exclude: Sequence[str], rows: Mapping[str, int] | None = None,
                  regions: Iterable[str] | None = None) -> list[str]:
    """The names of the denoiser's modules `rule` quantizes, in module order.

    Args:
        denoiser (`nn.Module`): the pipeline's `unet` or `transformer`.
        rule (`LayerRule`): from `layer_rule`.
        exclude (`Sequence[str]`): fnmatch patterns of module names kept at the reference level.
        rows (`Mapping[str, int]`, *optional*): rows each Linear saw in one recorded call; without them no layer is
            skipped for its row count.
        regions (`Iterable[str]`, *optional*): name prefixes of the compiled regions; None: the whole model.
    """
    regions = tuple(regions) if regions is not None else None
    out = []
    for name, module in denoiser.named_modules():
        if not name or any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        if regions is not None and not name.startswith(regions):
            continue
        if rule.eligible(module, None if rows is None else rows.get(name, 0)):
            out.append(name)
    return out
