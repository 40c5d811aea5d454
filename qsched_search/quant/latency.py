"""Measures each precision level's denoiser step latency and memory on the current device: the latency profile CSV."""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from qsched_search.errors import QschedError
from qsched_search.results.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["PROFILE_COLUMNS", "ProfileSettings", "environment", "profile_bank", "profile_model", "time_calls", "write_csv"]

# `level` and `ms_per_step` are what `qsched search --cost latency --profile` reads; the rest say what was measured.
PROFILE_COLUMNS = ["level", "ms_per_step", "ms_p10", "ms_p90", "ms_min", "repeats", "batch", "resolution", "device",
                   "backend", "kernel", "compile", "compile_s", "quantized_layers", "level_extra_bytes",
                   "denoiser_bytes", "peak_memory_bytes", "torch", "torchao", "date"]


def environment(device: str | torch.device) -> dict:
    """Device, library versions and date: every result file records them."""
    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = ""
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = ""
    from qsched_search.results.provenance import device_name

    env = {"device": device_name(str(device)), "torch": torch.__version__, "torchao": torchao_version,
           "diffusers": diffusers_version, "python": platform.python_version(),
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if torch.device(device).type == "cuda":
        env["cuda"] = torch.version.cuda
        env["driver_visible_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, repeats: int = 20) -> list[float]:
    """Milliseconds of `repeats` calls of `fn` after `warmup` untimed ones.

    On CUDA each call is timed with CUDA events (recorded around the call, read after it finished); on the CPU with
    the host clock. The device is synchronised before every call, so a call's time includes its launch overhead.
    """
    device = torch.device(device)
    if repeats < 1:
        raise QschedError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            out.append((time.perf_counter() - started) * 1e3)
    return out


def time_pipeline_calls(call: Callable[[int], object], device: str | torch.device, repeats: int) -> tuple[float, list[float]]:
    """Seconds of a first call (the one that compiles and captures graphs) and milliseconds of `repeats` more, sorted.

    `call(k)` runs repeat k (0 for the first), so that each can seed its own generator. Whole calls are timed on the
    host clock, the device synchronised before and after each: a pipeline call's host work (text encoding, the
    scheduler, decoding) is part of what a user waits for.
    """
    device = torch.device(device)
    if repeats < 1:
        raise QschedError(f"repeats must be at least 1, got {repeats}")
    _sync(device)
    started = time.perf_counter()
    call(0)
    _sync(device)
    first = time.perf_counter() - started
    ms = []
    for k in range(repeats):
        _sync(device)
        started = time.perf_counter()
        call(k)
        _sync(device)
        ms.append((time.perf_counter() - started) * 1e3)
    return first, sorted(ms)


def summarise(ms: Sequence[float]) -> dict:
    """Median and spread (10th and 90th percentiles, minimum) of a list of milliseconds."""
    ordered = sorted(ms)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"ms_per_step": statistics.median(ordered), "ms_p10": pct(0.1), "ms_p90": pct(0.9), "ms_min": ordered[0],
            "repeats": len(ordered)}


def profile_bank(bank, args: tuple, kwargs: dict, device: str | torch.device, levels: Sequence[str] | None = None,
                 warmup: int = 3, repeats: int = 20, shape_key: str = "", extra: dict | None = None) -> list[dict]:
    """One profile row per level: the denoiser called with `(args, kwargs)` at that level.

    Args:
        bank (`Bank`): installed in the denoiser.
        args, kwargs: one denoiser call's inputs.
        device: where the denoiser runs.
        levels (*optional*): the levels to time; all the bank's levels if omitted.
        warmup (`int`, defaults to 3), repeats (`int`, defaults to 20): untimed and timed calls per level.
        shape_key (`str`): names the input shape in `bank.compile_seconds`.
        extra (`dict`, *optional*): columns added to every row (batch, resolution...).

    Returns:
        `list[dict]`: rows with PROFILE_COLUMNS' keys (those known here).
    """
    device = torch.device(device)
    levels = list(levels or bank.levels)
    memory = bank.memory()
    per_level_extra = memory.get("per_level_extra_bytes", {})
    env = environment(device)
    rows = []
    compile_s = getattr(bank, "compile_seconds", {})
    previous = bank.active
    try:
        for level in levels:
            bank.set_level(level)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def call():
                with torch.no_grad():
                    bank.denoiser(*args, **kwargs)

            ms = time_calls(call, device, warmup=warmup, repeats=repeats)
            row = {"level": level, **summarise(ms), "device": env["device"], "backend": bank.backend,
                   "kernel": bank.kernel(level), "compile": bank.compile if bank.backend == "torchao" else "none",
                   "compile_s": compile_s.get((level, shape_key), float("nan")),
                   "quantized_layers": len(bank.quantized_layers.get(level, [])),
                   "level_extra_bytes": per_level_extra.get(level, ""),
                   "denoiser_bytes": memory.get("denoiser_bytes", ""),
                   "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else "",
                   "torch": env["torch"], "torchao": env["torchao"], "date": env["date"], **(extra or {})}
            rows.append(row)
    finally:
        bank.set_level(previous)
    return rows


def write_csv(rows: list[dict], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Writes rows atomically (a temporary file, then a rename); columns in `columns` first, then any others."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if columns:
        ordered = [c for c in columns if c in frame.columns] + [c for c in frame.columns if c not in columns]
        frame = frame[ordered]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


@dataclass(frozen=True)
class ProfileSettings:
    """What `qsched profile` measures.

    Args:
        model (`str`): `"embedded"`, a pipeline folder or a hub id.
        precisions (`tuple[str]`): levels to profile besides the reference.
        reference (`str`): the pipeline's own level.
        batch (`int`), resolution (`int`, *optional*): the denoiser's input shape (resolution in pixels; the
            family's default size if None).
        device (`str`), dtype (`str`): where and in which dtype the pipeline runs.
        backend (`str`, defaults to `"auto"`): `"torchao"` (real kernels), `"sim"` (the simulation, whose latency
            says nothing about a deployment; for checking the tool on a CPU) or `"auto"` (torchao on CUDA).
        compile (`str`, *optional*): `"full"`, `"regional"` or `"none"`; the model's repeated blocks if it has them.
        compile_mode (`str`, *optional*): torch.compile mode.
        cuda_graphs (`bool`, defaults to `False`): replay each level as one CUDA graph (torchao backend, CUDA only).
        warmup (`int`), repeats (`int`): untimed and timed calls per level.
        family (`str`, *optional*): the model family; detected if None.
        menu (`str`, *optional*): the precision menu YAML.
        loras (`tuple`, *optional*): LoRAs (`LoraSpec` or `PATH_OR_ID[:SCALE]`) fused before the bank is built, as
            in a search; checked to match and change the weights (no images are made here).
    """

    model: str
    precisions: tuple[str, ...]
    reference: str = "fp32"
    batch: int = 1
    resolution: int | None = None
    device: str = "cuda"
    dtype: str = "bfloat16"
    backend: str = "auto"
    compile: str | None = None
    compile_mode: str | None = None
    cuda_graphs: bool = False
    warmup: int = 3
    repeats: int = 20
    family: str | None = None
    menu: str | None = None
    loras: tuple = ()

    def __post_init__(self):
        from qsched_search.pipeline.lora import LoraSpec
        from qsched_search.quant.backends import resolve_backend

        object.__setattr__(self, "loras", tuple(LoraSpec.coerce(x) for x in self.loras))
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise QschedError(f"--device {self.device} but no CUDA device is visible here; run on a GPU machine or pass --device cpu")
        object.__setattr__(self, "backend", resolve_backend(self.backend, self.device))
        if self.batch < 1:
            raise QschedError(f"--batch must be at least 1, got {self.batch}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise QschedError(f"--resolution must be a positive multiple of 8 pixels, got {self.resolution}")
        if self.repeats < 1 or self.warmup < 0:
            raise QschedError(f"--repeats must be >= 1 and --warmup >= 0; got {self.repeats}, {self.warmup}")
        if self.cuda_graphs and self.backend != "torchao":
            raise QschedError(f"--cuda-graphs needs --backend torchao on a CUDA device; got --backend {self.backend} "
                              f"--device {self.device}; drop --cuda-graphs")


def profile_model(settings: ProfileSettings, on_status: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """Loads the model, installs a bank of the levels and returns one profile row per level (reference first)."""
    from qsched_search.pipeline.loading import load_model
    from qsched_search.pipeline.lora import apply_loras
    from qsched_search.pipeline.rollout import capture_denoiser_call
    from qsched_search.quant.backends import build_bank, check_levels
    from qsched_search.quant.levels import load_menu

    menu = load_menu(settings.menu)
    levels = list(dict.fromkeys([settings.reference, *settings.precisions]))
    menu.select(levels)
    check_levels(settings.backend, menu, levels, settings.dtype)  # before the model loads: fails in a second
    on_status(f"loading {settings.model} on {settings.device} ({settings.dtype})")
    model = load_model(settings.model, device=settings.device, dtype=settings.dtype, family=settings.family)
    model.loras = apply_loras(model, settings.loras)  # fused before the bank, as a search does
    if model.loras is not None:
        on_status(f"fused LoRA {model.loras.describe()} into {len(model.loras.modules)} modules")
    call = {**model.family.call_defaults, "prompt": [model.family.default_prompts[0] if model.family.default_prompts else "a photo"] * settings.batch,
            "num_inference_steps": 1, "output_type": "latent"}
    if settings.resolution is not None:
        call.update(height=settings.resolution, width=settings.resolution)
    resolution = call.get("height", "")
    args, kwargs = capture_denoiser_call(model.pipe, model.denoiser, call)
    on_status(f"building {len(levels)} levels on backend {settings.backend}")
    bank = build_bank(settings.backend, model.denoiser, menu, levels[1:], settings.reference, list(model.family.exclude),
                      calibration=(args, kwargs), compile=settings.compile, cuda_graphs=settings.cuda_graphs)
    shape_key = f"{resolution}px-b{settings.batch}"
    try:
        if hasattr(bank, "warm_up"):
            on_status("compiling each level for this input shape (the first call of each)")
            bank.warm_up(*args, shape_key=shape_key, **kwargs)
        on_status(f"timing {len(levels)} levels, {settings.repeats} calls each")
        rows = profile_bank(bank, args, kwargs, settings.device, levels, warmup=settings.warmup,
                            repeats=settings.repeats, shape_key=shape_key,
                            extra={"batch": settings.batch, "resolution": resolution, "model": settings.model,
                                   "family": model.family.family, "dtype": settings.dtype,
                                   "loras": model.loras.describe() if model.loras is not None else ""})
    finally:
        bank.remove()
    ref = rows[0]["ms_per_step"]
    for row in rows:
        row["relative_to_reference"] = row["ms_per_step"] / ref
        if row["relative_to_reference"] > 1.0 and row["level"] != settings.reference:
            logger.warning("level %s is slower than the reference %s here (%.2fx); a latency search will avoid it",
                           row["level"], settings.reference, row["relative_to_reference"])
    return rows
