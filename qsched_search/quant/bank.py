"""The bank interface: a denoiser's precision levels built once and held side by side, one assignment active at a time.

Two banks implement it: `SimulatedBank` (`qsched_search.quant.sim_bank`) rounds weights and activations in plain
PyTorch on any device; `RealKernelBank` (`qsched_search.quant.torchao_bank`) runs torchao's kernels. Both choose
a level's layers with the same rule (`qsched_search.quant.targets`), so a level quantizes the same layers in both.
Callers (rollout, probe, search, calibrate, apply, profile) use only what this base class declares.

What a caller may rely on:
- The denoiser object stays the one the pipeline holds (`pipe.unet.config` keeps working); `remove()` restores
  it exactly, and a bank is removed before another is built on the same denoiser.
- The active state is one `LayerAssignment` (`qsched_search.quant.groups`): a default level and, for some layers,
  another level. `set_assignment(a)` makes it active; `set_level(name)` is the assignment "every layer at name".
  Neither moves weights (the real-kernel bank builds a copy for an assignment with overrides the first time it is
  set, or at `prepare`), and either takes effect at the next denoiser call.
- A layer runs at its assigned level only if that level quantizes it (`quantized_layers[level]`); otherwise at the
  reference, as in a uniform assignment of that level.
- `calls` counts denoiser calls per assignment key (the level's name for a uniform one) since the bank was built:
  proof of what ran.
- `quantized_layers[level]` names the modules the level quantizes; the reference quantizes none.
  `switchable_layers` is their union: the layers an override can move.
- `level_costs()` gives each level's `bops` and `memory` as a fraction of the reference's, `layer_costs()` the
  per-layer table that prices any assignment exactly (`LayerCosts.cost`); both need the MAC counts of one denoiser
  call, measured from `calibration` or, without it, at the first call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from qsched_search.errors import QschedError
from qsched_search.quant.costs import Footprint, LayerCosts
from qsched_search.quant.groups import LayerAssignment
from qsched_search.quant.kernels import KernelChoice
from qsched_search.quant.levels import Menu
from qsched_search.quant.targets import layer_rule, repeated_block_prefixes, select_layers

__all__ = ["BACKENDS", "COMPILE_MODES", "Bank", "CallStats", "default_compile", "dtype_name", "installed_bank", "measure_call",
           "plan_layers"]

BACKENDS = ("sim", "torchao")
COMPILE_MODES = ("full", "regional", "none")
HOOK_NAME = "qsched.bank"


def dtype_name(module: nn.Module) -> str:
    """The module's parameter dtype as its torch name (`"bfloat16"`)."""
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def default_compile(denoiser: nn.Module) -> str:
    """The real-kernel bank's default compile scope: its repeated blocks when the model declares them (a short
    compile, and what ran fastest on the GPU), else the whole model."""
    return "regional" if repeated_block_prefixes(denoiser) else "full"


@dataclass
class CallStats:
    """What one recorded denoiser call showed: multiply-accumulates per sample and rows per call of each layer."""

    macs: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)


def _record(stats: CallStats, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    # A wrapper of the simulation bank stands for the layer it wraps (its `inner`).
    module = getattr(module, "inner", module)
    x = inputs[0]
    if isinstance(module, nn.Linear):
        stats.rows[name] = max(stats.rows.get(name, 0), x.numel() // max(1, x.shape[-1]))
        stats.macs.setdefault(name, output.numel() // output.shape[0] * module.in_features)
    else:
        k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        stats.macs.setdefault(name, output.numel() // output.shape[0] * k)


def _recording_hooks(stats: CallStats, modules) -> list:
    return [m.register_forward_hook(lambda mod, i, o, _n=n: _record(stats, _n, mod, i, o)) for n, m in modules]


def _layers(denoiser: nn.Module):
    return [(n, m) for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def measure_call(denoiser: nn.Module, args: tuple, kwargs: dict) -> CallStats:
    """Runs one denoiser call and records each Linear's and Conv2d's MACs per sample and rows per call."""
    stats = CallStats()
    handles = _recording_hooks(stats, _layers(denoiser))
    try:
        with torch.no_grad():
            denoiser(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


def installed_bank(denoiser: nn.Module) -> "Bank | None":
    """The bank installed in `denoiser`, if any."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(HOOK_NAME)
    return None if hook is None else hook.bank


def plan_layers(denoiser: nn.Module, menu: Menu, levels: Sequence[str], exclude: Sequence[str],
                kernels: Mapping[str, KernelChoice | None], rows: Mapping[str, int] | None = None,
                compile: str | None = None, layers: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Level -> the module names it quantizes, by the target's rule (or as `layers` records them), building nothing.

    Both banks call this, so a level quantizes the same layers in the simulation and on the real kernels.
    """
    compile = compile or default_compile(denoiser)
    # The compile scope narrows torchao's layers only; target generic rounds every Linear and Conv2d not excluded.
    regions = repeated_block_prefixes(denoiser) if compile == "regional" and menu.target == "torchao" else None
    modules = dict(denoiser.named_modules())
    model_dtype = dtype_name(denoiser)
    out = {}
    for name in levels:
        if layers is not None and name in layers:
            missing = [n for n in layers[name] if n not in modules]
            if missing:
                raise QschedError(f"level {name!r} is recorded to quantize {missing[0]!r}, which this denoiser does not "
                                  f"have ({len(missing)} such names); apply the schedule to the model it was searched on")
            out[name] = list(layers[name])
        else:
            rule = layer_rule(menu[name], menu, model_dtype, kernels.get(name))
            out[name] = select_layers(denoiser, rule, exclude, rows, regions)
    return out


@dataclass
class _State:
    assignment: LayerAssignment
    overrides: dict = field(default_factory=dict)  # layer -> level: `assignment.overrides` for the per-layer lookup
    calls: Counter = field(default_factory=Counter)

    @property
    def active(self) -> str:
        return self.assignment.default


class _BankHook(ModelHook):
    """The bank's named hook on the denoiser: counts calls per assignment and, for a bank that runs other modules
    than the denoiser's own (the real-kernel copies), routes the call to the active assignment's."""

    def __init__(self, bank: "Bank", route: Callable | None):
        super().__init__()
        self.bank = bank
        if route is not None:
            self.new_forward = lambda module, *args, **kwargs: route(*args, **kwargs)

    def pre_forward(self, module, *args, **kwargs):
        self.bank._state.calls[self.bank._state.assignment.key] += 1
        return args, kwargs


class Bank(ABC):
    """A denoiser's precision levels, built once; one assignment (a level per layer) is active at a time.

    Args:
        denoiser (`nn.Module`): the pipeline's `unet` or `transformer`, already on its device and in its dtype.
        menu (`Menu`): the precision menu; its `target` decides which layers each level quantizes.
        levels (`Sequence[str]`): the levels to build; the reference is added first if missing.
        reference (`str`): the level that runs the denoiser as it is.
        exclude (`Sequence[str]`, *optional*): fnmatch patterns of module names kept at the reference level.
        calibration (`tuple`, *optional*): `(args, kwargs)` of one denoiser call: its MAC counts give the costs and
            its row counts let activation-quantizing levels skip layers with few rows.
        compile (`str`, *optional*): the real-kernel bank's compile scope (`full`, `regional`, `none`); with
            `regional` only layers inside the compiled blocks quantize, in both banks. Defaults to
            `default_compile(denoiser)`.
        layers (`Mapping[str, Sequence[str]]`, *optional*): level -> module names to quantize, as a schedule
            recorded them; replaces the rule for those levels, so a deployment quantizes what the search measured.
    """

    backend: ClassVar[str]

    def __init__(self, denoiser: nn.Module, menu: Menu, levels: Sequence[str], reference: str, exclude: Sequence[str] = (),
                 *, calibration: tuple[tuple, dict] | None = None, compile: str | None = None,
                 layers: Mapping[str, Sequence[str]] | None = None):
        if installed_bank(denoiser) is not None:
            raise QschedError("this denoiser already has a precision bank installed; call .remove() on it first")
        compile = compile or default_compile(denoiser)
        if compile not in COMPILE_MODES:
            raise QschedError(f"compile={compile!r} is not one of {', '.join(COMPILE_MODES)}")
        self.denoiser, self.menu, self.reference, self.compile = denoiser, menu, reference, compile
        self.levels = list(dict.fromkeys([reference, *levels]))
        menu.select(self.levels)  # an unknown name fails here, naming the menu's levels
        self.exclude = [*exclude, *menu.extra_exclude]
        self.model_dtype = dtype_name(denoiser)
        if not menu[reference].runs_as_is(self.model_dtype):
            raise QschedError(f"reference level {reference!r} would round the pipeline ({menu[reference].describe()}); the "
                              f"reference must be its own precision: a level of format 'reference' or a cast to {self.model_dtype}")
        self.stats = measure_call(denoiser, *calibration) if calibration is not None else None
        self.kernels: dict[str, KernelChoice | None] = {name: self._kernel(name) for name in self.levels}
        self.quantized_layers = plan_layers(denoiser, menu, self.levels, self.exclude, self.kernels,
                                            None if self.stats is None else self.stats.rows, compile, layers)
        for name in self.levels:
            # A level that runs the pipeline as it is (a second reference, a cast to its own dtype) quantizes nothing.
            if name != reference and not menu[name].runs_as_is(self.model_dtype) and not self.quantized_layers[name]:
                raise QschedError(f"precision level {name!r} quantizes no layer of the denoiser under target "
                                  f"{menu.target} (after excluding {self.exclude}); drop the level or change the target")
        self._state = _State(assignment=LayerAssignment(reference))
        self._lazy_stats: list = []

    # ------------------------------------------------------------------------------------------- subclasses

    @abstractmethod
    def _kernel(self, level: str) -> KernelChoice | None:
        """The kernel facts of `level` on this backend (None: the generic simulated recipe)."""

    @abstractmethod
    def kernel(self, level: str) -> str:
        """A short description of what runs `level` (recorded in schedules and profiles)."""

    @abstractmethod
    def memory(self) -> dict:
        """`denoiser_bytes`, `bank_extra_bytes`, `total_bytes` and `per_level_extra_bytes` (level -> bytes)."""

    @abstractmethod
    def _uninstall(self) -> None:
        """Undoes what the subclass installed besides the bank hook."""

    def _install_hook(self, route: Callable | None = None) -> None:
        """Registers the bank's hook on the denoiser (subclasses call it last in their constructor)."""
        HookRegistry.check_if_exists_or_initialize(self.denoiser).register_hook(_BankHook(self, route), HOOK_NAME)
        if self.stats is None:  # no calibration call: MACs are counted during the first call instead
            self.stats = CallStats()
            self._lazy_stats = _recording_hooks(self.stats, self._counted_modules())

    # ------------------------------------------------------------------------------------------- switching

    @property
    def active(self) -> str:
        """The active assignment's default level (the level of every layer when it has no overrides)."""
        return self._state.active

    @property
    def assignment(self) -> LayerAssignment:
        return self._state.assignment

    @property
    def calls(self) -> Counter:
        """Denoiser calls per assignment key (a level's name for a uniform assignment) since the bank was built."""
        return self._state.calls

    @property
    def switchable_layers(self) -> list[str]:
        """The layers some built level quantizes, in module order: those an override can move."""
        chosen = {n for names in self.quantized_layers.values() for n in names}
        return [n for n, _ in self.denoiser.named_modules() if n in chosen]

    def check(self, names) -> None:
        """A one-line error for a name that is not in the menu, or not among the levels this bank built."""
        for name in names:
            self.menu[name]
            if name not in self.levels:
                raise QschedError(f"precision {name!r} is in the menu but this bank built only {', '.join(self.levels)}; "
                                  "add it to --precisions")

    def set_level(self, name: str) -> None:
        """Every layer at `name`: the uniform assignment."""
        self.set_assignment(LayerAssignment(name))

    def set_assignment(self, assignment: LayerAssignment) -> None:
        """Makes `assignment` active from the next denoiser call on (a uniform one is one attribute write)."""
        if assignment.overrides or assignment.default not in self.quantized_layers:
            self.check_assignment(assignment)
            self._prepare(assignment)
        self._state.assignment = assignment
        self._state.overrides = dict(assignment.overrides)

    def check_assignment(self, assignment: LayerAssignment) -> None:
        """A one-line error for a level this bank did not build or an override of a layer it cannot switch."""
        self.check(assignment.levels)
        if assignment.overrides:
            known = self._switchable_set()
            unknown = [n for n, _ in assignment.overrides if n not in known]
            if unknown:
                raise QschedError(f"layer {unknown[0]!r} is overridden but no level of this bank quantizes it "
                                  f"({len(unknown)} such layers); override only layers of `switchable_layers`")

    def prepare(self, assignments) -> None:
        """Builds what the assignments need before they run (the real-kernel bank: one compiled copy each with
        overrides), so that no build happens in the middle of a run."""
        for a in assignments:
            self.check_assignment(a)
            self._prepare(a)

    def _prepare(self, assignment: LayerAssignment) -> None:
        """Builds what `assignment` needs, if anything (subclasses)."""

    def _switchable_set(self) -> set:
        cached = getattr(self, "_switchable_cache", None)
        if cached is None:
            cached = self._switchable_cache = {n for names in self.quantized_layers.values() for n in names}
        return cached

    def remove(self) -> None:
        """Restores the denoiser: its own layers and forward, no bank hook."""
        registry = getattr(self.denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
        for h in self._lazy_stats:
            h.remove()
        self._lazy_stats = []
        self._uninstall()

    # ------------------------------------------------------------------------------------------- accounting

    def footprint(self, level: str) -> Footprint:
        """MACs and parameters of `level`'s quantized layers vs the rest of the denoiser."""
        if self.stats is None or not self.stats.macs:
            raise QschedError("the bank has not seen a denoiser call yet; run the pipeline once (or build the bank "
                              "with calibration=...) before asking for costs")
        layers = set(self.quantized_layers[level])
        modules = dict(self.denoiser.named_modules())
        q_macs = sum(v for k, v in self.stats.macs.items() if k in layers)
        q_params = sum(getattr(modules[name], "inner", modules[name]).weight.numel() for name in layers)
        total_params = sum(p.numel() for p in self.denoiser.parameters())
        return Footprint(q_macs, sum(self.stats.macs.values()) - q_macs, q_params, total_params - q_params)

    def level_costs(self) -> dict[str, dict[str, float]]:
        """Each level's `bops` and `memory` cost as a fraction of the reference level's."""
        ref = self.menu[self.reference]
        return {name: self.footprint(name).level_costs(self.menu[name], ref) for name in self.levels}

    def layer_costs(self) -> LayerCosts:
        """Per-layer MACs and parameters of the recorded call, and each level's layers and bits: the table that
        prices an assignment with overrides exactly (`LayerCosts.cost(assignment)`)."""
        self.footprint(self.reference)  # the same one-line error when no call was recorded yet
        modules = dict(self.denoiser.named_modules())
        switchable = self.switchable_layers
        params = {n: getattr(modules[n], "inner", modules[n]).weight.numel() for n in switchable}
        return LayerCosts(
            macs={n: int(v) for n, v in self.stats.macs.items()}, params=params,
            total_params=sum(p.numel() for p in self.denoiser.parameters()),
            quantized={lv: tuple(self.quantized_layers[lv]) for lv in self.levels},
            bits={lv: (self.menu[lv].weight_bits, self.menu[lv].act_bits) for lv in self.levels},
            reference=self.reference)

    def describe(self) -> dict:
        """What schedules and manifests record of the bank: backend, target, compile, and per level its kernel and
        quantized layers."""
        return {"backend": self.backend, "target": self.menu.target, "compile": self.compile,
                "levels": {name: {"kernel": self.kernel(name), "quantized_layers": list(self.quantized_layers[name])}
                           for name in self.levels}}

    # ------------------------------------------------------------------------------------------- internals

    def _counted_modules(self):
        """(name, module) pairs whose calls measure the layers' MACs (the simulation counts its wrappers)."""
        return _layers(self.denoiser)
