"""The real-kernel bank: one torchao-quantized, torch.compile'd copy of the denoiser per level, switched per step.

The simulation bank (`qsched_search.quant.sim_bank`) computes a level's rounding on any machine; this bank runs the
level's real kernels (fp8 and int8 tensor-core matrix products, int8/int4 weight-only kernels), so its step latency is
what a deployment sees. Both quantize the same layers (`qsched_search.quant.targets`). Each level is a copy of the
denoiser module whose parameters are the *same tensor objects* as the original's, except the quantized Linear
weights, which torchao replaces in the copy only: a copy costs only its quantized weights.

Quantized execution is slower than bf16 without compile (eager torchao int8 W8A8 ran 17x slower than bf16 on an
SDXL UNet), so every copy is compiled once; switching a level is one attribute write, and the compiled graphs of
all levels stay cached side by side (one dynamo cache entry per level and input shape). Compiled but launched from
Python, small batches stay host-bound; `cuda_graphs=True` replays each (level, shape) as one captured CUDA graph
(measured: on an H100 without graphs every SDXL level was slower than bf16; on an H200 with them FLUX.1-schnell
fp8 ran 1.31x faster than bf16 at 1024 px, batch 1).

A per-layer assignment (some layers at another level than the step's) runs on one more copy of its own, assembled
from the level copies' quantized layers (the same module objects, so it adds no weight memory) and compiled once:
as many extra copies as distinct assignments with overrides are set or prepared (`memory()` reports them).

Example:
    bank = RealKernelBank(pipe.transformer, menu, ["fp8"], reference="bf16", exclude=family.exclude,
                          calibration=(args, kwargs), cuda_graphs=True)
    bank.warm_up(*args, **kwargs)        # compiles every level for this input shape; bank.compile_seconds
    bank.set_level("fp8"); pipe.transformer(*args, **kwargs)
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable, ClassVar

import torch
from torch import nn

from qsched_search.errors import QschedError
from qsched_search.quant.bank import Bank
from qsched_search.quant.cuda_graphs import GraphCache
from qsched_search.quant.groups import LayerAssignment
from qsched_search.quant.kernels import KernelChoice, kernel_for, torchao

logger = logging.getLogger(__name__)

__all__ = ["RealKernelBank", "tensor_bytes"]

# Per-level compiled graphs live side by side in dynamo's cache of the one `forward` code object all copies share:
# one entry per (level, input shape), so the default limit of 8 would silently fall back to eager.
RECOMPILE_LIMIT = 256




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


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the module structure whose parameters and buffers are the original tensor objects (and none of
    the hooks installed on the original)."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    variant = copy.deepcopy(module, memo)
    for attr in ("_diffusers_hook", "forward"):
        variant.__dict__.pop(attr, None)
    return variant


class RealKernelBank(Bank):
    """Routes every denoiser call to the active level's compiled, torchao-quantized copy; see `Bank` for the shared
    arguments (`compile` defaults to the model's repeated blocks when it declares them, else the whole model).

    Args:
        compile_mode (`str`, *optional*): torch.compile's mode (`"max-autotune-no-cudagraphs"`...); torch's default
            if None.
        cuda_graphs (`bool`, defaults to `False`): replay each (level, input shape) as one captured CUDA graph
            (`qsched_search.quant.cuda_graphs`): removes the host overhead that makes compiled quantized levels
            slower than bf16 at small batches. A call then returns the graph's static output buffers, which the
            next call of the same level and shape overwrites.
    """

    backend: ClassVar[str] = "torchao"

    def __init__(self, denoiser, menu, levels, reference, exclude=(), *, compile_mode: str | None = None,
                 cuda_graphs: bool = False, **kwargs):
        super().__init__(denoiser, menu, levels, reference, exclude, **kwargs)
        device = next(denoiser.parameters()).device
        if cuda_graphs and device.type != "cuda":
            raise QschedError(f"cuda_graphs=True needs the denoiser on a CUDA device; it is on {device}; pass cuda_graphs=False")
        self.compile_mode = compile_mode
        self.build_seconds: dict[str, float] = {}
        self.compile_seconds: dict[tuple[str, str], float] = {}
        self.graph_seconds: dict[tuple[str, str], float] = {}
        self.graphs = GraphCache() if cuda_graphs else None
        if self.compile != "none":
            _raise_recompile_limits()
            # The int8 W8A8 path relies on inductor fusing the int matmul with its rescale; harmless for other levels.
            torch._inductor.config.force_fuse_int_mm_with_mul = True
        self._copies: dict[str, nn.Module] = {}
        self._runners: dict[str, Callable] = {}
        self._mixed: dict[LayerAssignment, nn.Module] = {}
        self._mixed_runners: dict[LayerAssignment, Callable] = {}
        for name in self.levels:
            started = time.perf_counter()
            self._copies[name] = self._build(name)
            self._runners[name] = self._compiled(self._copies[name])
            self.build_seconds[name] = time.perf_counter() - started
        self._install_hook(route=self._forward)

    # ------------------------------------------------------------------------------------------- building

    def _kernel(self, level: str) -> KernelChoice:
        return kernel_for(self.menu[level], self.model_dtype)

    def kernel(self, level: str) -> str:
        return self.kernels[level].kernel

    def _build(self, name: str) -> nn.Module:
        choice = self.kernels[name]
        variant = _shared_copy(self.denoiser)
        if choice.is_identity:
            return variant
        chosen = set(self.quantized_layers[name])
        seen: list[str] = []

        def filter_fn(module, fqn):
            if fqn in chosen:
                seen.append(fqn)
                return True
            return False

        try:
            torchao().quantize_(variant, choice.config(), filter_fn)
        except QschedError:
            raise
        except Exception as exc:  # torchao raises many types for an unsupported device, dtype or shape
            raise QschedError(f"precision level {name!r}: torchao could not quantize the denoiser with {choice.kernel} "
                              f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                              "drop this level or run on a device with that kernel") from None
        if set(seen) != chosen:
            raise QschedError(f"precision level {name!r}: torchao quantized {len(seen)} of the {len(chosen)} layers chosen "
                              f"(first missing: {sorted(chosen - set(seen))[:1]}); the layer rule and torchao disagree")
        return variant

    def _prepare(self, assignment: LayerAssignment) -> None:
        if assignment.uniform or assignment in self._mixed:
            return
        started = time.perf_counter()
        variant = _shared_copy(self.denoiser)
        for layer in self.switchable_layers:
            level = assignment.level_of(layer)
            if self.kernels[level].is_identity or layer not in self._quantized_sets()[level]:
                continue
            # The level copy's quantized module itself: shared, so the mixed copy holds no weights of its own.
            parent_name, _, child = layer.rpartition(".")
            parent = variant.get_submodule(parent_name) if parent_name else variant
            setattr(parent, child, self._copies[level].get_submodule(layer))
        self._mixed[assignment] = variant
        self._mixed_runners[assignment] = self._compiled(variant)
        self.build_seconds[assignment.key] = time.perf_counter() - started
        logger.info("built a compiled copy for assignment %s (%d of them now)", assignment.key, len(self._mixed))

    def _quantized_sets(self) -> dict[str, set]:
        cached = getattr(self, "_sets_cache", None)
        if cached is None:
            cached = self._sets_cache = {lv: set(names) for lv, names in self.quantized_layers.items()}
        return cached

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

    # ------------------------------------------------------------------------------------------- running

    def _forward(self, *args, **kwargs):
        assignment = self._state.assignment
        runner = self._runners[assignment.default] if assignment.uniform else self._mixed_runners[assignment]
        if self.graphs is not None:
            return self.graphs(assignment.key if assignment.uniform else assignment, runner, args, kwargs)
        return runner(*args, **kwargs)

    def warm_up(self, *args, shape_key: str = "", levels=None, on_level: Callable | None = None, assignments=(),
                **kwargs) -> dict[str, float]:
        """Runs every level (and each of `assignments`) once on these inputs, compiling it for their shapes, and
        returns the seconds of each, by level name or assignment key.

        The first call of a level for a new input shape includes its compile; the seconds are also kept in
        `compile_seconds[(level, shape_key)]`. With CUDA graphs the level's graph is captured after that call, and
        its seconds kept in `graph_seconds[(level, shape_key)]`. `on_level(level, seconds)` is called after each level.
        """
        out = {}
        previous = self.assignment
        todo = [LayerAssignment(name) for name in (levels or self.levels)] + [a for a in assignments if not a.uniform]
        try:
            for assignment in todo:
                self.set_assignment(assignment)
                runner = self._runners[assignment.default] if assignment.uniform else self._mixed_runners[assignment]
                graph_key = assignment.key if assignment.uniform else assignment
                _sync(self.denoiser)
                started = time.perf_counter()
                with torch.no_grad():
                    runner(*args, **kwargs)  # the compile, outside any graph capture
                _sync(self.denoiser)
                out[assignment.key] = time.perf_counter() - started
                self.compile_seconds[(assignment.key, shape_key)] = out[assignment.key]
                if self.graphs is not None:
                    started = time.perf_counter()
                    with torch.no_grad():
                        self.graphs(graph_key, runner, args, kwargs)
                    _sync(self.denoiser)
                    self.graph_seconds[(assignment.key, shape_key)] = time.perf_counter() - started
                if on_level is not None:
                    on_level(assignment.key, out[assignment.key])
        finally:
            self.set_assignment(previous)
        return out

    # ------------------------------------------------------------------------------------------- accounting

    def memory(self) -> dict:
        """Bytes of the denoiser's own tensors and of what each level's copy adds (shared tensors counted once), and
        the copies built for assignments with overrides (`assignment_copies`) with the bytes they add."""
        seen: set = set()
        base = tensor_bytes([self.denoiser], seen)
        per_level = {name: tensor_bytes([self._copies[name]], seen) for name in self.levels}
        per_assignment = {a.key: tensor_bytes([m], seen) for a, m in self._mixed.items()}
        extra = sum(per_level.values()) + sum(per_assignment.values())
        return {"denoiser_bytes": base, "bank_extra_bytes": extra, "total_bytes": base + extra,
                "per_level_extra_bytes": per_level, "assignment_copies": len(self._mixed),
                "assignment_extra_bytes": sum(per_assignment.values()), "per_assignment_extra_bytes": per_assignment,
                "compiled_copies": len(self._copies) + len(self._mixed),
                "bank_vs_denoiser": (base + extra) / base if base else float("nan")}

    def _uninstall(self) -> None:
        self._runners.clear()
        self._copies.clear()
        self._mixed.clear()
        self._mixed_runners.clear()
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
