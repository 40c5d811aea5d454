"""`--backend auto|sim|torchao`: which bank measures and runs a schedule, chosen by name and built in one place."""

from __future__ import annotations

from typing import Sequence

from qsched_search.errors import QschedError
from qsched_search.quant.bank import Bank
from qsched_search.quant.kernels import kernel_for, real_kernel_levels
from qsched_search.quant.levels import Menu, load_menu

__all__ = ["BACKEND_CHOICES", "DEFAULT_PRECISIONS", "bank_class", "build_bank", "check_levels", "default_precisions",
           "resolve_backend"]

BACKEND_CHOICES = ("auto", "sim", "torchao")
# The levels probed and searched when --precisions is omitted: on the simulation the integer ladder down to 4-bit
# activations; on the real kernels the fast levels torchao runs (those of them the pipeline's dtype allows).
DEFAULT_PRECISIONS = {"sim": ("w8a8", "w4a8", "w4a4"), "torchao": ("fp8", "w8a8", "w4a16")}


def resolve_backend(backend: str, device: str) -> str:
    """`auto` is the real kernels on a CUDA device and the simulation elsewhere; `sim` and `torchao` are themselves."""
    if backend not in BACKEND_CHOICES:
        raise QschedError(f"--backend {backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if backend == "auto":
        return "torchao" if str(device).startswith("cuda") else "sim"
    if backend == "torchao" and not str(device).startswith("cuda"):
        raise QschedError(f"--backend torchao runs torchao's GPU kernels and needs --device cuda, got --device {device}; "
                          "use --backend sim on a CPU")
    return backend


def default_precisions(backend: str, device: str, dtype: str, menu: Menu | str | None = None) -> tuple[str, ...]:
    """`DEFAULT_PRECISIONS` of the backend `backend` resolves to on `device`; on the real kernels only the levels with
    a kernel for a `dtype` pipeline (int4 weight-only needs bfloat16)."""
    resolved = resolve_backend(backend, device)
    if resolved == "sim":
        return DEFAULT_PRECISIONS["sim"]
    runnable = set(real_kernel_levels(menu if isinstance(menu, Menu) else load_menu(menu), dtype))
    return tuple(name for name in DEFAULT_PRECISIONS["torchao"] if name in runnable)


def bank_class(backend: str) -> type[Bank]:
    if backend == "sim":
        from qsched_search.quant.sim_bank import SimulatedBank

        return SimulatedBank
    if backend == "torchao":
        from qsched_search.quant.torchao_bank import RealKernelBank

        return RealKernelBank
    raise QschedError(f"backend {backend!r} is not one of sim, torchao")


def check_levels(backend: str, menu: Menu, levels: Sequence[str], model_dtype: str) -> None:
    """A one-line error, before anything heavy runs, for a level the backend cannot run (naming the one that can)."""
    for name in levels:
        level = menu[name]
        if backend == "torchao":
            kernel_for(level, model_dtype)


def build_bank(backend: str, denoiser, menu: Menu, levels: Sequence[str], reference: str, exclude: Sequence[str] = (),
               *, calibration=None, compile: str | None = None, cuda_graphs: bool = False, layers=None) -> Bank:
    """The bank of `backend` (`sim` or `torchao`, already resolved) installed in `denoiser`."""
    kwargs = dict(calibration=calibration, compile=compile, layers=layers)
    if backend == "torchao":
        kwargs["cuda_graphs"] = cuda_graphs
    elif cuda_graphs:
        raise QschedError("cuda_graphs=True replays real kernels; it needs --backend torchao on a CUDA device")
    return bank_class(backend)(denoiser, menu, list(levels), reference, list(exclude), **kwargs)
