"""The precision bank: every level's weights built once and held together, one level active at a time."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qsched_search.errors import QschedError
from qsched_search.precisions import LAYER_TYPES, Level, Menu, activation_quantizer, quantize_weight


@dataclass
class _BankState:
    """Shared by the bank and every switchable layer: switching a level is one attribute write."""

    active: str
    calls: Counter = field(default_factory=Counter)


class SwitchableLayer(nn.Module):
    """Wraps a Linear or Conv2d and computes with the active level's weight and activation rounding.

    The wrapped module keeps its own parameters (the reference level uses them untouched); other levels' weights
    are plain tensors held here, so `state_dict()` of the denoiser gains nothing while the bank is installed.
    """

    def __init__(self, inner: nn.Linear | nn.Conv2d, levels: list[Level], state: _BankState):
        super().__init__()
        self.inner = inner
        self._state = state
        with torch.no_grad():
            self._weights = {lv.name: quantize_weight(inner.weight.detach(), lv) for lv in levels if not lv.is_reference}
        self._act = {lv.name: activation_quantizer(lv) for lv in levels}

    def extra_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self._weights.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self._state.active
        weight = self._weights.get(level)
        if weight is None:
            return self.inner(x)
        act = self._act[level]
        if act is not None:
            x = act(x)
        if isinstance(self.inner, nn.Linear):
            return F.linear(x, weight, self.inner.bias)
        return self.inner._conv_forward(x, weight, self.inner.bias)


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


class PrecisionBank:
    """Installs switchable layers into a denoiser in place and selects the active level.

    Build the bank after the pipeline is on its device and in its dtype: the levels' weights are made there once.
    The denoiser object stays the same (the pipeline keeps reading `pipe.unet.config`); `remove()` puts the original
    layers back.

    Args:
        denoiser (`nn.Module`): the pipeline's `unet` or `transformer`.
        menu (`Menu`): the precision menu.
        levels (`list[str]`): the levels this run needs; the menu's reference level is added if missing.
        reference (`str`): the level whose layers are left untouched (the pipeline's own precision).
        exclude (`list[str]`, *optional*): fnmatch patterns of module names kept at the reference level.
    """

    def __init__(self, denoiser: nn.Module, menu: Menu, levels: list[str], reference: str, exclude: list[str] = ()):
        ref = menu[reference]
        if not ref.is_reference:
            raise QschedError(f"reference level {reference!r} has format {ref.format!r}; the reference must have format 'reference'")
        self.menu = menu
        self.reference = reference
        self.levels = list(dict.fromkeys([reference, *levels]))
        self.denoiser = denoiser
        self._state = _BankState(active=reference)
        patterns = list(exclude) + list(menu.extra_exclude)
        types = tuple(LAYER_TYPES[t] for t in menu.layer_types)
        chosen = [
            (name, module)
            for name, module in denoiser.named_modules()
            if isinstance(module, types) and not any(fnmatch.fnmatch(name, p) for p in patterns)
        ]
        if not chosen:
            raise QschedError(f"no {'/'.join(menu.layer_types)} layer of the denoiser is left to quantize after excluding {patterns}")
        level_objs = menu.select(self.levels)
        self._originals: dict[str, nn.Module] = {}
        self.layers: dict[str, SwitchableLayer] = {}
        for name, module in chosen:
            layer = SwitchableLayer(module, level_objs, self._state)
            self._set_submodule(name, layer)
            self._originals[name] = module
            self.layers[name] = layer
        self._macs: dict[str, int] = {}
        inner_ids = {id(layer.inner) for layer in self.layers.values()}
        self._hooks = [
            m.register_forward_hook(self._count_macs(n))
            for n, m in denoiser.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, SwitchableLayer)) and id(m) not in inner_ids
        ]
        self._hooks.append(denoiser.register_forward_pre_hook(self._count_call))

    # ------------------------------------------------------------------------------------------- switching

    @property
    def active(self) -> str:
        return self._state.active

    def check(self, names) -> None:
        """Raises a one-line error for a name that is not in the menu, or not among the levels this bank built."""
        for name in names:
            self.menu[name]
            if name not in self.levels:
                raise QschedError(f"precision {name!r} is in the menu but this run built only {', '.join(self.levels)}; add it to --precisions")

    def set_level(self, name: str) -> None:
        if name not in self.levels:
            self.check([name])
        self._state.active = name

    @property
    def calls(self) -> Counter:
        """Denoiser calls per level since the bank was built: proof of which level ran."""
        return self._state.calls

    def remove(self) -> None:
        """Restores the original layers and removes the bank's hooks."""
        for name, module in self._originals.items():
            self._set_submodule(name, module)
        for hook in self._hooks:
            hook.remove()
        self._originals.clear()

    # ------------------------------------------------------------------------------------------- accounting

    def memory(self) -> dict[str, int]:
        """Bytes of the denoiser's own parameters and of the extra weights the bank holds for other levels."""
        base = sum(p.numel() * p.element_size() for p in self.denoiser.parameters())
        extra = sum(layer.extra_bytes() for layer in self.layers.values())
        return {"denoiser_bytes": base, "bank_extra_bytes": extra, "total_bytes": base + extra}

    def footprint(self) -> Footprint:
        """MACs and parameters in switchable vs reference-only layers, measured during the first denoiser call."""
        if not self._macs:
            raise QschedError("the bank has not seen a denoiser call yet; run the pipeline once before asking for costs")
        q_macs = sum(v for k, v in self._macs.items() if k in self.layers)
        q_params = sum(layer.inner.weight.numel() for layer in self.layers.values())
        total_params = sum(p.numel() for p in self.denoiser.parameters())
        return Footprint(q_macs, sum(self._macs.values()) - q_macs, q_params, total_params - q_params)

    def level_costs(self) -> dict[str, dict[str, float]]:
        """Each level's `bops` and `memory` cost as a fraction of the reference level's."""
        fp = self.footprint()
        ref = self.menu[self.reference]
        return {name: fp.level_costs(self.menu[name], ref) for name in self.levels}

    # ------------------------------------------------------------------------------------------- internals

    def _set_submodule(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.denoiser.get_submodule(parent_name) if parent_name else self.denoiser
        setattr(parent, child, module)

    def _count_call(self, module, args):
        self._state.calls[self._state.active] += 1

    def _count_macs(self, name: str):
        def hook(module, inputs, output):
            if name in self._macs:
                return
            module = module.inner if isinstance(module, SwitchableLayer) else module
            if isinstance(module, nn.Linear):
                self._macs[name] = output.numel() // output.shape[0] * module.in_features
            else:
                k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                self._macs[name] = output.numel() // output.shape[0] * k

        return hook
