"""The simulation bank: each level's rounding computed in plain PyTorch, on any device, held side by side.

Under target torchao a level with a torchao kernel rounds as that kernel does (`qsched_search.quant.fake_quant`'s
torchao recipes, on the layers the kernel takes); a level torchao has no kernel for, and every level under target
generic, uses the classic recipe: weights rounded once per output channel, activations on every call per token.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qsched_search.quant.bank import Bank
from qsched_search.quant.fake_quant import LinearRecipe, activation_quantizer, quantize_weight
from qsched_search.quant.kernels import KernelChoice, maybe_kernel
from qsched_search.quant.levels import Level

__all__ = ["SimulatedBank", "SwitchableLayer"]


class SwitchableLayer(nn.Module):
    """Wraps a Linear or Conv2d and computes with the rounding of the level the active assignment gives it.

    The wrapped module keeps its own parameters (levels that leave this layer alone call it untouched); the levels'
    prepared weights are plain tensors held here, so `state_dict()` of the denoiser gains nothing while the bank
    is installed.
    """

    def __init__(self, inner: nn.Linear | nn.Conv2d, forwards: dict[str, Callable], extra_bytes: int, bank: "SimulatedBank",
                 name: str = ""):
        super().__init__()
        self.inner = inner
        self._forwards = forwards
        self._extra_bytes = extra_bytes
        self._bank = bank
        self._name = name

    def extra_bytes(self) -> int:
        return self._extra_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._bank._state
        fn = self._forwards.get(state.overrides.get(self._name, state.assignment.default) if state.overrides
                                else state.assignment.default)
        return self.inner(x) if fn is None else fn(x)


def _generic(inner: nn.Module, level: Level) -> tuple[Callable, int]:
    """The classic recipe: the weight rounded once, the input rounded on every call, the product in the model's dtype."""
    with torch.no_grad():
        weight = quantize_weight(inner.weight.detach(), level)
    act = activation_quantizer(level)

    def forward(x):
        if act is not None:
            x = act(x)
        if isinstance(inner, nn.Linear):
            return F.linear(x, weight, inner.bias)
        return inner._conv_forward(x, weight, inner.bias)

    return forward, weight.numel() * weight.element_size()


def _kernel_recipe(inner: nn.Linear, level: Level, kernel: KernelChoice) -> tuple[Callable, int]:
    with torch.no_grad():
        recipe = LinearRecipe(kernel.recipe, level, inner.weight)
    return (lambda x: recipe(x, inner.bias)), recipe.extra_bytes()


class SimulatedBank(Bank):
    """Installs switchable layers into a denoiser in place; see `Bank` for the arguments and the guarantees.

    A per-layer assignment costs nothing to switch to: each layer looks its level up in the active assignment.

    Example:
        bank = SimulatedBank(pipe.unet, load_menu(), ["w8a8", "fp8"], reference="fp32", exclude=family.exclude)
        bank.set_level("w8a8"); pipe(...)   # every denoiser call now rounds as w8a8's kernel does
        bank.set_assignment(LayerAssignment("w8a8", (("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "fp32"),)))
        bank.remove()
    """

    backend: ClassVar[str] = "sim"

    def __init__(self, denoiser, menu, levels, reference, exclude=(), **kwargs):
        super().__init__(denoiser, menu, levels, reference, exclude, **kwargs)
        modules = dict(denoiser.named_modules())
        per_layer: dict[str, dict[str, Callable]] = {}
        extra: dict[str, int] = {}
        self._level_bytes = {name: 0 for name in self.levels}
        for level_name, names in self.quantized_layers.items():
            level = menu[level_name]
            kernel = self.kernels[level_name]
            for name in names:
                inner = modules[name]
                if kernel is not None and kernel.recipe == "identity":
                    continue
                if kernel is not None and isinstance(inner, nn.Linear):
                    fn, nbytes = _kernel_recipe(inner, level, kernel)
                else:
                    fn, nbytes = _generic(inner, level)
                per_layer.setdefault(name, {})[level_name] = fn
                extra[name] = extra.get(name, 0) + nbytes
                self._level_bytes[level_name] += nbytes
        self._originals: dict[str, nn.Module] = {}
        self.layers: dict[str, SwitchableLayer] = {}
        for name, forwards in per_layer.items():
            layer = SwitchableLayer(modules[name], forwards, extra[name], self, name)
            self._set_submodule(name, layer)
            self._originals[name] = modules[name]
            self.layers[name] = layer
        self._install_hook()

    def _kernel(self, level: str) -> KernelChoice | None:
        lv = self.menu[level]
        if lv.runs_as_is(self.model_dtype):
            return KernelChoice(level, "none", "identity")
        if self.menu.target != "torchao":
            return None
        return maybe_kernel(lv, self.model_dtype)

    def kernel(self, level: str) -> str:
        lv, choice = self.menu[level], self.kernels[level]
        if lv.runs_as_is(self.model_dtype):
            return "none (the pipeline's own dtype)"
        if choice is None:
            return f"simulated: {lv.describe()} ({self.menu.target} target; no torchao kernel)"
        return f"simulated {choice.kernel}"

    def memory(self) -> dict:
        base = sum(p.numel() * p.element_size() for p in self.denoiser.parameters())
        extra = sum(self._level_bytes.values())
        # Per-layer assignments need no copy here: each layer looks its level up at every call.
        return {"denoiser_bytes": base, "bank_extra_bytes": extra, "total_bytes": base + extra,
                "per_level_extra_bytes": dict(self._level_bytes), "assignment_copies": 0, "assignment_extra_bytes": 0}

    def _counted_modules(self):
        inners = {id(layer.inner) for layer in self.layers.values()}
        return [(n, m) for n, m in self.denoiser.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d, SwitchableLayer)) and id(m) not in inners]

    def _uninstall(self) -> None:
        for name, module in self._originals.items():
            self._set_submodule(name, module)
        self._originals.clear()

    def _set_submodule(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.denoiser.get_submodule(parent_name) if parent_name else self.denoiser
        setattr(parent, child, module)
