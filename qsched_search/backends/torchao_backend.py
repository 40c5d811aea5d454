"""The real-kernel precision bank: one torchao-quantized, torch.compile'd copy of the denoiser per level, switched per step.

The fake-quant bank (`qsched_search.bank`) simulates a level's rounding on any machine; this bank runs the level's
real kernels (fp8 and int8 tensor-core matrix products, int8/int4 weight-only kernels), so its step latency is what a
deployment would see. Each level is a copy of the denoiser module whose parameters are the *same tensor objects* as
the original's, except the quantized Linear weights, which torchao replaces in the copy only. A copy therefore costs
only its quantized weights; convolutions, norms, embeddings and the excluded layers are shared by every level.

Quantized execution is slower than bf16 without compile (eager torchao int8 W8A8 ran 17x slower than bf16 on an
SDXL UNet), so every copy is compiled once; switching a level is one attribute write, and the compiled graphs of
all levels stay cached side by side (one dynamo cache entry per level and input shape). Compiled but launched from
Python, small batches stay host-bound; `cuda_graphs=True` replays each (level, shape) as one captured CUDA graph
(measured: on an H100 without graphs every SDXL level was slower than bf16; on an H200 with them FLUX.1-schnell
fp8 ran 1.31x faster than bf16 at 1024 px, batch 1).

Example:
    bank = RealKernelBank(pipe.unet, menu, ["fp8", "w8a8"], reference="bf16", exclude=family.exclude)
    bank.warm_up(*args, **kwargs)        # compiles every level for this input shape; bank.compile_seconds
    bank.set_level("fp8"); pipe.unet(*args, **kwargs)
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from qsched_search.backends.cuda_graphs import GraphCache
from qsched_search.errors import QschedError
from qsched_search.precisions import DTYPES, Level, Menu

logger = logging.getLogger(__name__)

__all__ = ["KernelChoice", "RealKernelBank", "kernel_for", "register_kernel", "real_kernel_levels", "tensor_bytes"]

# Per-level compiled graphs live side by side in dynamo's cache of the one `forward` code object all copies share:
# one entry per (level, input shape), so the default limit of 8 would silently fall back to eager.
RECOMPILE_LIMIT = 256
INT4_GROUP_SIZE = 128


# ================================================================================================ level -> kernel


@dataclass(frozen=True)
class KernelChoice:
    """How a precision level runs on real kernels.

    Args:
        level (`str`): the menu level.
        kernel (`str`): a short name of the kernel path, recorded in profiles (e.g. `"torchao-fp8-rowwise"`).
        config (`object`, *optional*): the torchao config applied to the level's Linear layers; None runs the
            denoiser as it is (the reference level).
        quantizes_activations (`bool`): whether activations are quantized on every call (these levels skip Linear
            layers with few rows per call, whose dynamic-quantization overhead exceeds the gain).
        min_in_features_multiple (`int`): the kernel's divisibility need on the Linear's input features.
    """

    level: str
    kernel: str
    config: Any = None
    quantizes_activations: bool = False
    min_in_features_multiple: int = 16

    @property
    def is_identity(self) -> bool:
        return self.config is None


_KERNELS: list[tuple[str, Callable[[Level, torch.dtype], KernelChoice | None]]] = []


def register_kernel(name: str):
    """Registers a rule `(level, model_dtype) -> KernelChoice | None`; rules are tried in registration order."""

    def wrap(fn):
        _KERNELS.append((name, fn))
        return fn

    return wrap


def _ao():
    """torchao.quantization, or a one-line error saying how to install it."""
    try:
        import torchao.quantization as ao
    except ImportError:
        raise QschedError("the real-kernel backend needs torchao: pip install 'qsched-search[gpu]' (torchao 0.18 for "
                          "torch 2.11), or use the fake-quant backend") from None
    return ao


def _granularity(name: str):
    ao = _ao()
    return ao.PerTensor() if name == "per_tensor" else ao.PerRow()


@register_kernel("identity")
def _identity(level: Level, model_dtype: torch.dtype) -> KernelChoice | None:
    if level.is_reference or (level.format == "cast" and DTYPES[level.dtype] == model_dtype):
        return KernelChoice(level.name, "none (the pipeline's own dtype)")
    return None


@register_kernel("float8-dynamic")
def _float8_dynamic(level: Level, model_dtype: torch.dtype) -> KernelChoice | None:
    if level.format != "float8" or (level.weight_bits, level.act_bits) != (8, 8):
        return None
    if (level.weight_granularity == "per_tensor") != (level.act_granularity == "per_tensor"):
        raise QschedError(f"precision level {level.name!r}: torchao's float8 kernels need the same granularity for weights "
                          f"and activations; got weight {level.weight_granularity}, act {level.act_granularity}; "
                          "use per_channel with per_token, or per_tensor with per_tensor")
    dtype = DTYPES[level.dtype]
    config = _ao().Float8DynamicActivationFloat8WeightConfig(activation_dtype=dtype, weight_dtype=dtype,
                                                       granularity=_granularity(level.weight_granularity),
                                                       set_inductor_config=False)
    rowwise = "rowwise" if level.weight_granularity == "per_channel" else "tensorwise"
    return KernelChoice(level.name, f"torchao Float8DynamicActivationFloat8Weight {level.dtype} {rowwise}", config, True)


@register_kernel("int8-dynamic")
def _int8_dynamic(level: Level, model_dtype: torch.dtype) -> KernelChoice | None:
    if level.format != "int" or (level.weight_bits, level.act_bits) != (8, 8):
        return None
    config = _ao().Int8DynamicActivationInt8WeightConfig(
        granularity=[_granularity("per_tensor" if level.act_granularity == "per_tensor" else "per_channel"),
                     _granularity(level.weight_granularity)],
        set_inductor_config=False)
    return KernelChoice(level.name, "torchao Int8DynamicActivationInt8Weight", config, True)


@register_kernel("int8-weight-only")
def _int8_weight_only(level: Level, model_dtype: torch.dtype) -> KernelChoice | None:
    if level.format != "int" or level.weight_bits != 8 or level.act_bits < 16:
        return None
    config = _ao().Int8WeightOnlyConfig(granularity=_granularity(level.weight_granularity), set_inductor_config=False)
    return KernelChoice(level.name, "torchao Int8WeightOnly", config, False)


@register_kernel("int4-weight-only")
def _int4_weight_only(level: Level, model_dtype: torch.dtype) -> KernelChoice | None:
    if level.format != "int" or level.weight_bits != 4 or level.act_bits < 16:
        return None
    if model_dtype != torch.bfloat16:
        raise QschedError(f"precision level {level.name!r}: the int4 weight-only kernel (tinygemm) needs a bfloat16 "
                          f"pipeline; this one is {model_dtype}; load the model with --dtype bfloat16")
    if level.weight_granularity == "per_channel":
        # Allowed but not what the menu says: tinygemm has no per-channel int4; the profile records the group size.
        logger.warning("precision level %r: per_channel int4 runs as group-wise int4 (group %d), the only int4 layout "
                       "with a kernel in core PyTorch", level.name, INT4_GROUP_SIZE)
    # tile_packed_to_4d is tinygemm (torch.ops.aten._weight_int4pack_mm, in core PyTorch); the default "plain"
    # layout needs the fbgemm-gpu-genai package, which the benchmark device does not have.
    config = _ao().Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d",
                                  set_inductor_config=False)
    return KernelChoice(level.name, f"torchao Int4WeightOnly tinygemm group {INT4_GROUP_SIZE}", config, False,
                        min_in_features_multiple=INT4_GROUP_SIZE)


def real_kernel_levels(menu: Menu, model_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The menu's levels that have a real kernel for a pipeline of `model_dtype` (the rest are simulated only)."""
    out = []
    for name, level in menu.levels.items():
        try:
            kernel_for(level, model_dtype)
        except QschedError:
            continue
        out.append(name)
    return out


def kernel_for(level: Level, model_dtype: torch.dtype) -> KernelChoice:
    """The real-kernel path of `level` on a pipeline of `model_dtype`; raises a one-line error when none exists."""
    for _, rule in _KERNELS:
        choice = rule(level, model_dtype)
        if choice is not None:
            return choice
    raise QschedError(f"precision level {level.name!r} ({level.describe()}) has no real kernel in this backend; "
                      f"real kernels exist for: the pipeline's own dtype, float8 W8A8, int W8A8, int W8A16, int W4A16 "
                      f"(rules: {', '.join(name for name, _ in _KERNELS)}); its quality can still be simulated with "
                      "the fake-quant bank")


# ================================================================================================ memory accounting


def _leaves(t: torch.Tensor):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def tensor_bytes(modules, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind the parameters and buffers of `modules` (quantized tensors unpacked).

    Storages already in `seen` are not counted again, so shared tensors count once across several modules.
    """
    seen = set() if seen is None else seen
    total = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            for leaf in _leaves(t):
                storage = leaf.untyped_storage()
                key = (leaf.device, storage.data_ptr())
                if key in seen or storage.nbytes() == 0:
                    continue
                seen.add(key)
                total += storage.nbytes()
    return total


# ================================================================================================ the bank


@dataclass
class _State:
    active: str
    calls: Counter = field(default_factory=Counter)


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the module structure whose parameters and buffers are the original tensor objects."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


class RealKernelBank:
    """Installs a per-level switch into a denoiser: every call runs the active level's compiled, quantized copy.

    The denoiser object stays the one the pipeline holds (its `.config`, `.dtype` and sub-modules are untouched); its
    `forward` is redirected to the active copy. `remove()` restores it. Duck-types `PrecisionBank` where the rollout
    needs it (`levels`, `reference`, `active`, `check`, `set_level`, `calls`, `memory`, `remove`), so
    `qsched_search.rollout.Runner` runs schedules on real kernels unchanged.

    Args:
        denoiser (`nn.Module`): the pipeline's `unet` or `transformer`, already on its device and in its dtype.
        menu (`Menu`): the precision menu.
        levels (`list[str]`): the levels to build; the reference is added if missing.
        reference (`str`): the level that runs the denoiser as it is (format `reference`, or `cast` to its dtype).
        exclude (`list[str]`, *optional*): fnmatch patterns of module names kept at the reference level.
        compile (`str`, defaults to `"full"`): `"full"` compiles each level's whole copy, `"regional"` only its
            repeated blocks (diffusers' `compile_repeated_blocks`: much shorter compile), `"none"` runs eager
            (quantized levels are then slower than the reference).
        compile_mode (`str`, *optional*): torch.compile's mode (`"max-autotune-no-cudagraphs"`, `"reduce-overhead"`
            for CUDA graphs...); torch's default if None.
        min_rows (`int`, defaults to 32): activation-quantized levels skip Linear layers that saw fewer rows per call
            than this in `calibrate` (per-sample conditioning projections: dynamic quantization costs more than it
            saves there, and int8 matrix products need more than 16 rows).
        calibration (`tuple`, *optional*): `(args, kwargs)` of one denoiser call, used to count each Linear's rows
            before quantizing; without it no Linear is skipped for its row count.
        cuda_graphs (`bool`, defaults to `False`): replay each (level, input shape) as one captured CUDA graph
            (`qsched_search.backends.cuda_graphs`): removes the host overhead that makes compiled quantized levels
            slower than bf16 at small batches. A call then returns the graph's static output buffers, which the
            next call of the same level and shape overwrites.
    """

    def __init__(self, denoiser: nn.Module, menu: Menu, levels: list[str], reference: str, exclude=(), *,
                 compile: str = "full", compile_mode: str | None = None, min_rows: int = 32,
                 calibration: tuple[tuple, dict] | None = None, cuda_graphs: bool = False):
        if compile not in ("full", "regional", "none"):
            raise QschedError(f"compile={compile!r} is not one of full, regional, none")
        if getattr(denoiser, "_qsched_real_bank", None) is not None:
            raise QschedError("this denoiser already has a real-kernel bank installed; call .remove() on it first")
        self.menu = menu
        self.denoiser = denoiser
        self.reference = reference
        self.levels = list(dict.fromkeys([reference, *levels]))
        self.dtype = next(denoiser.parameters()).dtype
        if _identity(menu[reference], self.dtype) is None:
            raise QschedError(f"reference level {reference!r} would quantize ({menu[reference].describe()}); the reference "
                              f"must be the pipeline's own precision: a level of format 'reference' or 'cast' to {self.dtype}")
        self.choices = {name: kernel_for(menu[name], self.dtype) for name in self.levels}
        self.compile, self.compile_mode = compile, compile_mode
        self.exclude = list(exclude) + list(menu.extra_exclude)
        self.rows = self._count_rows(calibration) if calibration is not None else {}
        # Regional compile leaves everything outside the repeated blocks eager, and an eager torchao layer is slower
        # than bf16 (measured on an H100: SDXL UNet with regional compile and every Linear quantized, fp8 ran 1.9x
        # slower than bf16, int8 weight-only 61x slower); so with regional compile only the blocks' Linears quantize.
        repeated = tuple(getattr(denoiser, "_repeated_blocks", ()) or ())
        self._compiled_regions = tuple(f"{n}." for n, m in denoiser.named_modules() if type(m).__name__ in repeated)
        self.min_rows = min_rows
        self.quantized_layers: dict[str, list[str]] = {}
        self.build_seconds: dict[str, float] = {}
        self.compile_seconds: dict[tuple[str, str], float] = {}
        self.graph_seconds: dict[tuple[str, str], float] = {}
        self._state = _State(active=reference)
        if cuda_graphs and next(denoiser.parameters()).device.type != "cuda":
            raise QschedError("cuda_graphs=True needs the denoiser on a CUDA device; it is on "
                              f"{next(denoiser.parameters()).device}; pass cuda_graphs=False")
        self.graphs = GraphCache() if cuda_graphs else None
        if compile != "none":
            _raise_recompile_limits()
            # The int8 W8A8 path relies on inductor fusing the int matmul with its rescale; harmless for other levels.
            torch._inductor.config.force_fuse_int_mm_with_mul = True
        self._copies: dict[str, nn.Module] = {}
        self._runners: dict[str, Callable] = {}
        base_seen: set = set()
        self._base_bytes = tensor_bytes([denoiser], base_seen)
        for name in self.levels:
            started = time.perf_counter()
            self._copies[name], self.quantized_layers[name] = self._build(name)
            self._runners[name] = self._compiled(self._copies[name])
            self.build_seconds[name] = time.perf_counter() - started
        self._original_forward_in_dict = "forward" in denoiser.__dict__
        denoiser.forward = self._forward
        denoiser._qsched_real_bank = self
        self._hooks = [denoiser.register_forward_pre_hook(self._count_call)]

    # ------------------------------------------------------------------------------------------- building

    def _count_rows(self, calibration) -> dict[str, int]:
        rows: dict[str, int] = {}
        hooks = []
        for name, module in self.denoiser.named_modules():
            if isinstance(module, nn.Linear):
                def hook(mod, inputs, _name=name):
                    x = inputs[0]
                    rows[_name] = max(rows.get(_name, 0), x.numel() // max(1, x.shape[-1]))
                hooks.append(module.register_forward_pre_hook(hook))
        args, kwargs = calibration
        try:
            with torch.no_grad():
                self.denoiser(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return rows

    def eligible(self, name: str, module: nn.Module, choice: KernelChoice) -> bool:
        """Whether `choice` quantizes this module: a Linear not excluded, of kernel-friendly shape and enough rows."""
        if not isinstance(module, nn.Linear) or any(fnmatch.fnmatch(name, p) for p in self.exclude):
            return False
        if module.in_features % choice.min_in_features_multiple or module.out_features % 16:
            return False
        if choice.quantizes_activations and self.rows and self.rows.get(name, 0) < self.min_rows:
            return False
        if self.compile == "regional" and not name.startswith(self._compiled_regions):
            return False
        return True

    def _build(self, name: str) -> tuple[nn.Module, list[str]]:
        choice = self.choices[name]
        variant = _shared_copy(self.denoiser)
        if choice.is_identity:
            return variant, []
        quantize_ = _ao().quantize_
        chosen: list[str] = []

        def filter_fn(module, fqn):
            ok = self.eligible(fqn, module, choice)
            if ok:
                chosen.append(fqn)
            return ok

        try:
            quantize_(variant, choice.config, filter_fn)
        except Exception as exc:  # torchao raises many types for an unsupported device, dtype or shape
            raise QschedError(f"precision level {name!r}: torchao could not quantize the denoiser with {choice.kernel} "
                              f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                              "drop this level or run on a device with that kernel") from None
        if not chosen:
            raise QschedError(f"precision level {name!r}: no Linear layer of the denoiser is eligible for {choice.kernel} "
                              f"after excluding {self.exclude} and layers under {self.min_rows} rows per call")
        return variant, chosen

    def _compiled(self, variant: nn.Module) -> Callable:
        if self.compile == "none":
            return variant
        kwargs = {"dynamic": False}
        if self.compile_mode:
            kwargs["mode"] = self.compile_mode
        if self.compile == "regional":
            if not hasattr(variant, "compile_repeated_blocks"):
                raise QschedError(f"compile='regional' needs a diffusers model with repeated blocks; {type(variant).__name__} "
                                  "has none; use compile='full'")
            variant.compile_repeated_blocks(**kwargs)
            return variant
        return torch.compile(variant, **kwargs)

    # ------------------------------------------------------------------------------------------- switching

    @property
    def active(self) -> str:
        return self._state.active

    @property
    def calls(self) -> Counter:
        """Denoiser calls per level since the bank was built."""
        return self._state.calls

    def check(self, names) -> None:
        for name in names:
            self.menu[name]
            if name not in self.levels:
                raise QschedError(f"precision {name!r} is in the menu but this bank built only {', '.join(self.levels)}; "
                                  "add it to --precisions")

    def set_level(self, name: str) -> None:
        if name not in self._runners:
            self.check([name])
        self._state.active = name

    def _forward(self, *args, **kwargs):
        runner = self._runners[self._state.active]
        if self.graphs is not None:
            return self.graphs(self._state.active, runner, args, kwargs)
        return runner(*args, **kwargs)

    def _count_call(self, module, args):
        self._state.calls[self._state.active] += 1

    def warm_up(self, *args, shape_key: str = "", levels=None, on_level: Callable | None = None, **kwargs) -> dict[str, float]:
        """Runs every level once on these inputs (compiling it for their shapes) and returns each level's seconds.

        The first call of a level for a new input shape includes its compile; the seconds are also kept in
        `compile_seconds[(level, shape_key)]`. With CUDA graphs the level's graph is captured after that call, and
        its seconds kept in `graph_seconds[(level, shape_key)]`. `on_level(level, seconds)` is called after each level.
        """
        out = {}
        previous = self.active
        try:
            for name in levels or self.levels:
                self.set_level(name)
                _sync(self.denoiser)
                started = time.perf_counter()
                with torch.no_grad():
                    self._runners[name](*args, **kwargs)  # the compile, outside any graph capture
                _sync(self.denoiser)
                out[name] = time.perf_counter() - started
                self.compile_seconds[(name, shape_key)] = out[name]
                if self.graphs is not None:
                    started = time.perf_counter()
                    with torch.no_grad():
                        self.graphs(name, self._runners[name], args, kwargs)
                    _sync(self.denoiser)
                    self.graph_seconds[(name, shape_key)] = time.perf_counter() - started
                if on_level is not None:
                    on_level(name, out[name])
        finally:
            self.set_level(previous)
        return out

    # ------------------------------------------------------------------------------------------- accounting

    def memory(self) -> dict:
        """Bytes of the denoiser's own tensors and of what each level's copy adds (shared tensors counted once)."""
        seen: set = set()
        base = tensor_bytes([self.denoiser], seen)
        per_level = {name: tensor_bytes([self._copies[name]], seen) for name in self.levels}
        extra = sum(per_level.values())
        return {"denoiser_bytes": base, "bank_extra_bytes": extra, "total_bytes": base + extra,
                "per_level_extra_bytes": per_level, "bank_vs_denoiser": (base + extra) / base if base else float("nan")}

    def remove(self) -> None:
        """Restores the denoiser's own forward and drops every level's copy."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if "forward" in self.denoiser.__dict__ and not self._original_forward_in_dict:
            del self.denoiser.forward
        self.denoiser._qsched_real_bank = None
        self._runners.clear()
        self._copies.clear()
        if self.graphs is not None:
            self.graphs.clear()


def _raise_recompile_limits() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 4 * RECOMPILE_LIMIT:
            setattr(cfg, name, 4 * RECOMPILE_LIMIT)


def _sync(module: nn.Module) -> None:
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
