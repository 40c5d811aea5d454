"""Benchmarks real-kernel precision levels and mixed per-step schedules on one GPU (SDXL UNet, FLUX.1-schnell transformer).

Random-weight denoisers built from the real model configs (no downloads), each level a torchao-quantized,
torch.compile'd copy of the denoiser in one `RealKernelBank`, replayed as one CUDA graph per level and shape
(`--no-cuda-graphs` to run without; bf16 always runs the same way). For every model, resolution and batch it measures:
ms per step of each level (CUDA events, median and spread), compile time, bank memory, the cost of a precision
switch, and the end-to-end denoising loop (denoiser + diffusers scheduler, all steps) of mixed schedules against
bf16 compiled the same way, with the latency cost model's prediction beside each measurement.

Rows are written as soon as they are measured, so a run stopped by a time limit still leaves its data.

    scripts/run_bench_gpu.sh "$OUT/gpu"                          # on the GPU machine: the settings of results/bench/gpu
    python scripts/bench_gpu.py --out results/bench/gpu            # the full grid
    python scripts/bench_gpu.py --tiny --out /tmp/bench            # tiny configs: checks the script in a minute
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search.quant.latency import environment, profile_bank, summarise, write_csv  # noqa: E402
from qsched_search.quant.levels import Level, Menu  # noqa: E402
from qsched_search.quant.torchao_bank import RealKernelBank  # noqa: E402
from qsched_search.results.schedule import cost_of  # noqa: E402

logger = logging.getLogger("bench_gpu")
DEVICE = "cuda"  # --device cpu runs the tiny configs here, to check the script without a GPU

# stabilityai/sdxl-turbo (= stable-diffusion-xl-base-1.0) unet/config.json: 2,567,463,684 parameters.
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], flip_sin_to_cos=True,
    freq_shift=0, in_channels=4, layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
# black-forest-labs/FLUX.1-schnell transformer/config.json; num_layers / num_single_layers are cut by --flux-blocks.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=False, axes_dims_rope=(16, 56, 56))
FLUX_TEXT_TOKENS = 256  # FLUX.1-schnell's max_sequence_length
SDXL_TEXT_TOKENS = 77

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                 cross_attention_dim=64, norm_num_groups=16)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
                 axes_dims_rope=(8, 12, 12))

# Exclusions as in configs/families (sdxl-turbo.yaml, flux-schnell.yaml): first/last layers and embedders.
EXCLUDE = {"sdxl": ["conv_in", "conv_out", "time_embedding.*", "add_embedding.*"],
           "flux": ["x_embedder", "context_embedder", "proj_out", "time_text_embed.*", "norm_out.*"]}

LEVELS = {
    "bf16": Level("bf16", "reference", 16, 16),
    "fp8": Level("fp8", "float8", 8, 8, dtype="float8_e4m3fn"),
    "fp8t": Level("fp8t", "float8", 8, 8, "per_tensor", "per_tensor", dtype="float8_e4m3fn"),
    "w8a8": Level("w8a8", "int", 8, 8),
    "w8a16": Level("w8a16", "int", 8, 16),
    "w4a16": Level("w4a16", "int", 4, 16, "per_group", group_size=128),  # tinygemm: groups of 128 input features
}


class Out:
    """The result files, rewritten atomically after every new row."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.levels: list[dict] = []
        self.schedules: list[dict] = []
        self.summary: dict = {"cells": [], "not_run": [], "errors": []}

    def add_levels(self, rows):
        self.levels += rows
        write_csv(self.levels, self.folder / "levels.csv", ["model", "resolution", "batch", "level", "ms_per_step"])

    def add_schedule(self, row):
        self.schedules.append(row)
        write_csv(self.schedules, self.folder / "schedules.csv",
                  ["model", "resolution", "batch", "schedule", "budget", "ms_end_to_end", "speedup_vs_bf16"])

    def save_summary(self):
        tmp = self.folder / ".summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2, default=str))
        os.replace(tmp, self.folder / "summary.json")


# ================================================================================================ models


def build_denoiser(kind: str, tiny: bool, flux_blocks: tuple[int, int]):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: no fp32 copy of 2.6B weights on the way
    try:
        with torch.device(DEVICE):
            if kind == "sdxl":
                model = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET))
            else:
                cfg = dict(TINY_FLUX if tiny else FLUX_TRANSFORMER)
                if not tiny:
                    cfg["num_layers"], cfg["num_single_layers"] = flux_blocks
                model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


class Inputs:
    """One denoiser call's inputs at a resolution and batch, and a diffusers scheduler for the denoising loop."""

    def __init__(self, kind: str, model, resolution: int, batch: int, steps: int, tiny: bool):
        self.kind, self.model, self.batch, self.steps = kind, model, batch, steps
        g = torch.Generator(DEVICE).manual_seed(1234)
        bf = dict(device=DEVICE, dtype=torch.bfloat16, generator=g)
        latent = resolution // 8
        if kind == "sdxl":
            from diffusers import EulerAncestralDiscreteScheduler

            cross = model.config.cross_attention_dim
            pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
            self.latents = torch.randn(batch, 4, latent, latent, **bf)
            self.cond = dict(encoder_hidden_states=torch.randn(batch, SDXL_TEXT_TOKENS, cross, **bf) * 0.5,
                             added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, **bf) * 0.5,
                                                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                                                         device=DEVICE, dtype=torch.bfloat16)},
                             return_dict=False)
            # SDXL-Turbo's scheduler: Euler ancestral, trailing timesteps.
            self.scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                             timestep_spacing="trailing")
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler
            from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

            channels = model.config.in_channels  # 16 latent channels packed 2x2
            tokens = (latent // 2) ** 2
            text_tokens = 16 if tiny else FLUX_TEXT_TOKENS
            self.latents = torch.randn(batch, tokens, channels, **bf)
            self.img_ids = FluxPipeline._prepare_latent_image_ids(batch, latent // 2, latent // 2, DEVICE, torch.bfloat16)
            self.cond = dict(encoder_hidden_states=torch.randn(batch, text_tokens, model.config.joint_attention_dim, **bf) * 0.5,
                             pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, **bf) * 0.5,
                             txt_ids=torch.zeros(text_tokens, 3, device=DEVICE, dtype=torch.bfloat16),
                             img_ids=self.img_ids, guidance=None, return_dict=False)
            # FLUX.1-schnell's scheduler: flow-matching Euler, no shift.
            self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        self.generator = torch.Generator(DEVICE)

    def call_args(self, latents, t) -> tuple[tuple, dict]:
        """The denoiser's inputs at scheduler timestep `t`, as the diffusers pipeline passes them."""
        if self.kind == "sdxl":
            return (latents, t), self.cond
        timestep = (t.expand(latents.shape[0]).to(latents.dtype)) / 1000  # FluxPipeline divides by 1000
        return (), dict(hidden_states=latents, timestep=timestep, **self.cond)

    def one_call(self) -> tuple[tuple, dict]:
        t = torch.tensor(999.0 if self.kind == "sdxl" else 1000.0, device=DEVICE)
        return self.call_args(self.latents, t)

    def set_timesteps(self):
        if self.kind == "sdxl":
            self.scheduler.set_timesteps(self.steps, device=DEVICE)
        else:
            import numpy as np

            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / self.steps, self.steps).tolist(), device=DEVICE)
        return self.scheduler.timesteps

    def loop(self, bank, levels) -> torch.Tensor:
        """The denoising loop of a diffusers pipeline, switching the level before each step."""
        timesteps = self.set_timesteps()
        self.generator.manual_seed(0)
        latents = self.latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                bank.set_level(levels[i])
                model_in = self.scheduler.scale_model_input(latents, t) if self.kind == "sdxl" else latents
                args, kwargs = self.call_args(model_in, t)
                out = bank.denoiser(*args, **kwargs)[0]
                step_kwargs = {"generator": self.generator} if self.kind == "sdxl" else {}
                latents = self.scheduler.step(out, t, latents, return_dict=False, **step_kwargs)[0]
        return latents


# ================================================================================================ schedules


def budget_schedules(order: list[str], rel: dict[str, float], steps: int, budgets: list[float]) -> list[tuple[float, tuple]]:
    """For each budget, the schedule the latency cost model allows with the most precise steps placed first.

    Without real weights there is no quality to search on; this stands in for the search with the prior its probes
    usually find for few-step models (the first steps are the most sensitive): among all schedules whose predicted
    latency fraction is within the budget, the one whose levels, read from step 0, rank highest in `order`.
    """
    rank = {lv: i for i, lv in enumerate(order)}
    candidates = list(itertools.product(order, repeat=steps))
    out = []
    for budget in budgets:
        feasible = [s for s in candidates if cost_of(s, rel) <= budget + 1e-9]
        if not feasible:
            continue
        best = min(feasible, key=lambda s: (tuple(rank[lv] for lv in s), cost_of(s, rel)))
        out.append((budget, best))
    fastest = min(candidates, key=lambda s: (cost_of(s, rel), tuple(rank[lv] for lv in s)))
    out.append((None, fastest))
    seen, unique = set(), []
    for budget, sched in out:
        if sched not in seen:
            seen.add(sched)
            unique.append((budget, sched))
    return unique


class _Timer:
    """Milliseconds of a region: CUDA events on the GPU, the host clock on the CPU."""

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def _median_ms(fn, calls: int = 20) -> float:
    fn()
    times = []
    for _ in range(calls):
        with _Timer() as timer:
            fn()
        times.append(timer.ms)
    return summarise(times)["ms_per_step"]


def roofline() -> dict:
    """What bounds FLUX at 1024 px: bf16 vs fp8 rowwise matrix-product rates and bf16 attention time at its shapes.

    The MLP's first product (4352 tokens x 3072 -> 12288) and one attention call (24 heads, 4352 tokens, head 128);
    FLUX.1-schnell calls attention 57 times a step (19 double + 38 single blocks).
    """
    import torch.nn.functional as F

    m, k, n = 4352, 3072, 12288
    a = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    bf16_ms = _median_ms(lambda: a @ b.t())
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa = torch.rand(m, 1, device=DEVICE, dtype=torch.float32) + 0.5
    sb = torch.rand(1, n, device=DEVICE, dtype=torch.float32) + 0.5
    fp8_ms = _median_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                                 use_fast_accum=True))
    q = torch.randn(1, 24, 4352, 128, device=DEVICE, dtype=torch.bfloat16)
    attn_ms = _median_ms(lambda: F.scaled_dot_product_attention(q, q, q))
    flops = 2 * m * k * n
    return {"gemm_shape": [m, k, n], "bf16_gemm_ms": bf16_ms, "bf16_tflops": flops / bf16_ms / 1e9,
            "fp8_rowwise_gemm_ms": fp8_ms, "fp8_rowwise_tflops": flops / fp8_ms / 1e9,
            "fp8_gemm_speedup": bf16_ms / fp8_ms, "sdpa_bf16_ms_per_call": attn_ms,
            "sdpa_tflops": 4 * 24 * 4352 * 4352 * 128 / attn_ms / 1e9, "flux_sdpa_ms_per_step": 57 * attn_ms}


def check_outputs(bank, args, kwargs, levels) -> dict:
    """Per level: relative L2 error of its output against bf16's, and of its graph replay against its direct call."""

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    outs, direct = {}, {}
    with torch.no_grad():
        for lv in levels:
            bank.set_level(lv)
            outs[lv] = bank.denoiser(*args, **kwargs)[0].clone()
            direct[lv] = bank._runners[lv](*args, **kwargs)[0].clone()
    bank.set_level("bf16")
    return {lv: {"vs_bf16": rel(outs[lv], outs["bf16"]), "graph_vs_direct": rel(outs[lv], direct[lv]),
                 "finite": bool(torch.isfinite(outs[lv]).all())} for lv in levels}


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def time_loop(inputs: Inputs, bank, levels, repeats: int) -> list[float]:
    inputs.loop(bank, levels)  # warm: every (level, shape) is compiled already; this settles the allocator
    out = []
    for _ in range(repeats):
        with _Timer() as timer:
            inputs.loop(bank, levels)
        out.append(timer.ms)
    return out


def switch_cost(bank, args, kwargs, a: str, b: str, calls: int, repeats: int) -> dict:
    """Milliseconds a precision switch adds, from `calls` back-to-back calls alternating a/b (calls - 1 switches)
    against the same calls in two blocks (1 switch), interleaved `repeats` times; medians of each.

    The two sequences do the same work, so their difference is what the extra switches cost; `resolution_ms` (the
    p10-p90 spread of the block runs over the extra switches) says how small a cost the method can resolve.
    """

    def run(seq):
        with _Timer() as timer, torch.no_grad():
            for lv in seq:
                bank.set_level(lv)
                bank.denoiser(*args, **kwargs)
        return timer.ms

    alternating = [a, b] * (calls // 2)
    blocks = [a] * (calls // 2) + [b] * (calls // 2)
    run(alternating), run(blocks)
    alt, blk = [], []
    for _ in range(repeats):
        alt.append(run(alternating))
        blk.append(run(blocks))
    extra = (len(alternating) - 1) - 1
    alt_s, blk_s = summarise(alt), summarise(blk)
    t0 = time.perf_counter()
    for _ in range(10000):
        bank.set_level(a)
        bank.set_level(b)
    python_us = (time.perf_counter() - t0) / 20000 * 1e6
    return {"pair": f"{a}/{b}", "calls": len(alternating), "repeats": repeats, "alternating_ms": alt_s["ms_per_step"],
            "blocks_ms": blk_s["ms_per_step"], "alternating_all_ms": alt, "blocks_all_ms": blk,
            "switch_ms": (alt_s["ms_per_step"] - blk_s["ms_per_step"]) / extra,
            "resolution_ms": (blk_s["ms_p90"] - blk_s["ms_p10"]) / extra, "set_level_python_us": python_us}


# ================================================================================================ main


def run_model(kind: str, args, out: Out, deadline: float) -> None:
    tag = {"sdxl": "sdxl-unet", "flux": "flux-schnell-transformer"}[kind]
    if args.tiny:
        tag += "-tiny"
    elif kind == "flux":
        tag += f"-{args.flux_blocks[0]}x{args.flux_blocks[1]}blocks"
    menu = Menu(levels={k: LEVELS[k] for k in dict.fromkeys(["bf16", *args.levels, *args.schedule_levels])}, source="bench_gpu.py")
    compile_kind = args.sdxl_compile if kind == "sdxl" else args.flux_compile
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    mem0 = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    model = build_denoiser(kind, args.tiny, args.flux_blocks)
    denoiser_mem = torch.cuda.memory_allocated() - mem0 if cuda else float("nan")
    print(f"[{tag}] built in {time.perf_counter() - t0:.1f} s, {denoiser_mem / 2**30:.2f} GiB, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params", flush=True)
    shapes = [(r, b) for r in args.resolutions for b in args.batches]
    first = Inputs(kind, model, shapes[0][0], shapes[0][1], args.steps, args.tiny)
    calib = first.one_call()
    levels = list(dict.fromkeys([*args.levels, *args.schedule_levels]))
    bank_levels = []
    for lv in levels:  # one level at a time, so a level torchao cannot build is recorded and skipped
        if lv == "bf16":
            continue
        try:
            trial = RealKernelBank(model, menu, [lv], "bf16", EXCLUDE[kind], compile="none", calibration=calib)
            trial.remove()
            bank_levels.append(lv)
        except Exception as exc:
            msg = f"{tag} {lv}: not built: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(msg, flush=True)
            out.summary["errors"].append(msg)
    gc.collect()
    mem1 = torch.cuda.memory_allocated() if cuda else 0
    bank = RealKernelBank(model, menu, bank_levels, "bf16", EXCLUDE[kind], compile=compile_kind,
                          compile_mode=args.compile_mode, calibration=calib, cuda_graphs=args.cuda_graphs and cuda)
    bank_mem_measured = torch.cuda.memory_allocated() - mem1 if cuda else float("nan")
    memory = bank.memory()
    sched_levels = [lv for lv in args.schedule_levels if lv in bank.levels]
    sched_bank_bytes = memory["denoiser_bytes"] + sum(memory["per_level_extra_bytes"][lv] for lv in sched_levels)
    cell_mem = {"model": tag, "denoiser_bytes": memory["denoiser_bytes"], "denoiser_bytes_measured": denoiser_mem,
                "bank_levels": bank.levels, "bank_total_bytes": memory["total_bytes"],
                "bank_extra_bytes_measured_cuda": bank_mem_measured,
                "bank_vs_bf16_all_levels": memory["bank_vs_denoiser"],
                "schedule_bank_levels": sched_levels, "schedule_bank_vs_bf16": sched_bank_bytes / memory["denoiser_bytes"],
                "per_level_extra_bytes": memory["per_level_extra_bytes"],
                "quantized_layers": {k: len(v) for k, v in bank.quantized_layers.items()},
                "quantized_layer_names": bank.quantized_layers,
                "compile": compile_kind, "compile_mode": args.compile_mode, "cuda_graphs": bank.graphs is not None}
    out.summary.setdefault("memory", []).append(cell_mem)
    out.save_summary()
    print(f"[{tag}] bank {bank.levels}: {memory['bank_vs_denoiser']:.3f}x bf16 (all levels), "
          f"{cell_mem['schedule_bank_vs_bf16']:.3f}x for {sched_levels}; quantized layers {cell_mem['quantized_layers']}", flush=True)
    try:
        for res, batch in shapes:
            if time.time() > deadline:
                out.summary["not_run"].append(f"{tag} {res}px b{batch}: deadline")
                out.save_summary()
                continue
            cell = f"{tag} {res}px b{batch}"
            try:
                run_cell(kind, tag, model, bank, res, batch, sched_levels, args, out, deadline)
            except Exception as exc:  # one cell's failure must not lose the others
                traceback.print_exc()
                out.summary["errors"].append(f"{cell}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                out.save_summary()
    finally:
        bank.remove()
        del bank, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def run_cell(kind, tag, model, bank, res, batch, sched_levels, args, out: Out, deadline: float) -> None:
    shape_key = f"{res}px-b{batch}"
    cell_levels = bank.levels if (res, batch) in args.full_levels_at else [lv for lv in bank.levels if lv in sched_levels]
    inputs = Inputs(kind, model, res, batch, args.steps, args.tiny)
    call_args, call_kwargs = inputs.one_call()
    started = time.perf_counter()
    cuda = DEVICE == "cuda"
    alloc0, reserved0 = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if cuda else (0, 0)
    compile_s = bank.warm_up(*call_args, shape_key=shape_key, levels=cell_levels, **call_kwargs,
                             on_level=lambda lv, sec: print(f"[{tag} {shape_key}] {lv} first call {sec:.1f} s", flush=True))
    graph_s = {lv: bank.graph_seconds.get((lv, shape_key)) for lv in cell_levels}
    print(f"[{tag} {shape_key}] first calls (compile) " + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items())
          + (("; graph capture " + ", ".join(f"{k} {v:.1f}s" for k, v in graph_s.items())) if bank.graphs else ""), flush=True)
    graph_mem = ({"allocated_delta_bytes": torch.cuda.memory_allocated() - alloc0,
                  "reserved_delta_bytes": torch.cuda.memory_reserved() - reserved0} if cuda else {})
    out.summary.setdefault("compile", []).append({"model": tag, "resolution": res, "batch": batch, "compile_s": compile_s,
                                                  "graph_capture_s": graph_s})
    out.save_summary()
    accuracy = check_outputs(bank, call_args, call_kwargs, cell_levels)
    print(f"[{tag} {shape_key}] rel. error vs bf16 (graph replay) / graph vs no graph: "
          + ", ".join(f"{k} {v['vs_bf16']:.4f}/{v['graph_vs_direct']:.1e}" for k, v in accuracy.items()), flush=True)
    graphs_before = _graphs_compiled()
    captures_before = bank.graphs.captures if bank.graphs else 0
    rows = []
    for lv in cell_levels:  # a level far slower than bf16 (a pathological kernel path) gets 3 calls, not --repeats
        once = profile_bank(bank, call_args, call_kwargs, DEVICE, [lv], warmup=0, repeats=1)[0]["ms_per_step"]
        slow = lv != "bf16" and rows and once > 4 * rows[0]["ms_per_step"] and once > 1000
        row = profile_bank(bank, call_args, call_kwargs, DEVICE, [lv], warmup=0 if slow else args.warmup,
                           repeats=3 if slow else args.repeats, shape_key=shape_key,
                           extra={"model": tag, "resolution": res, "batch": batch, "cuda_graphs": bank.graphs is not None,
                                  "graph_capture_s": graph_s.get(lv)})[0]
        row["relative_to_bf16"] = row["ms_per_step"] / (rows[0]["ms_per_step"] if rows else row["ms_per_step"])
        rows.append(row)
        out.add_levels([row])  # written per level: a call killed mid-cell keeps what it measured
    ms = {r["level"]: r["ms_per_step"] for r in rows}
    print(f"[{tag} {shape_key}] ms/step " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    if time.time() > deadline:
        out.summary["not_run"].append(f"{tag} {shape_key}: switch cost and schedules (deadline)")
        return
    fast = min((lv for lv in sched_levels if lv != "bf16"), key=lambda lv: ms[lv], default=None)
    if fast is not None and (res, batch) in args.switch_at:
        sw = switch_cost(bank, call_args, call_kwargs, "bf16", fast, calls=args.switch_calls, repeats=args.switch_repeats)
        sw.update(model=tag, resolution=res, batch=batch, step_ms_bf16=ms["bf16"], step_ms_fast=ms[fast],
                  switch_fraction_of_step=sw["switch_ms"] / ((ms["bf16"] + ms[fast]) / 2))
        out.summary.setdefault("switch", []).append(sw)
        out.save_summary()
        print(f"[{tag} {shape_key}] switch bf16/{fast}: {sw['switch_ms']:.4f} ms "
              f"({100 * sw['switch_fraction_of_step']:.2f}% of a step)", flush=True)
    rel = {lv: ms[lv] / ms["bf16"] for lv in sched_levels}
    order = sorted(sched_levels, key=lambda lv: ["bf16", "w8a16", "fp8", "fp8t", "w8a8", "w4a16"].index(lv))
    schedules = budget_schedules(order, rel, args.steps, args.budgets)
    baseline = None
    for budget, sched in [(1.0, ("bf16",) * args.steps)] + [s for s in schedules if s[1] != ("bf16",) * args.steps]:
        if time.time() > deadline:
            out.summary["not_run"].append(f"{tag} {shape_key}: schedule {','.join(sched)} (deadline)")
            continue
        times = time_loop(inputs, bank, sched, args.loop_repeats)
        stats = summarise(times)
        if baseline is None:
            baseline = stats["ms_per_step"]
        predicted_fraction = cost_of(sched, rel)
        # The latency cost model: the sum of the profile's per-step latencies of the schedule's levels.
        predicted_ms = sum(ms[lv] for lv in sched)
        row = {"model": tag, "resolution": res, "batch": batch, "schedule": ",".join(sched),
               "budget": budget if budget is not None else "fastest", "predicted_fraction": predicted_fraction,
               "ms_end_to_end": stats["ms_per_step"], "ms_p10": stats["ms_p10"], "ms_p90": stats["ms_p90"],
               "repeats": stats["repeats"], "speedup_vs_bf16": baseline / stats["ms_per_step"],
               "predicted_speedup": 1 / predicted_fraction,
               "ms_predicted": predicted_ms, "prediction_error": stats["ms_per_step"] / predicted_ms - 1,
               "ms_predicted_scaled_by_bf16_loop": predicted_fraction * baseline,
               "steps": args.steps, "switches": sum(a != b for a, b in zip(sched, sched[1:])),
               "compile": bank.compile, "cuda_graphs": bank.graphs is not None,
               "device": out.summary["env"]["device"], "torch": torch.__version__,
               "torchao": out.summary["env"]["torchao"], "date": out.summary["env"]["date"]}
        out.add_schedule(row)
        print(f"[{tag} {shape_key}] {row['schedule']:<28} budget {row['budget']!s:<7} {row['ms_end_to_end']:8.2f} ms "
              f"x{row['speedup_vs_bf16']:.3f} (predicted {predicted_ms:.2f}, {100 * row['prediction_error']:+.1f}%)", flush=True)
    # Every (level, shape) was compiled in warm_up: a graph compiled after it would be a recompile caused by switching.
    out.summary["cells"].append({"model": tag, "resolution": res, "batch": batch, "seconds": time.perf_counter() - started,
                                 "compile_s": compile_s, "graph_capture_s": graph_s, "graph_memory": graph_mem,
                                 "accuracy": accuracy,
                                 "graphs_compiled_after_warm_up": _graphs_compiled() - graphs_before,
                                 "cuda_graphs_captured_after_warm_up": (bank.graphs.captures - captures_before) if bank.graphs else None})
    out.save_summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench/gpu")
    p.add_argument("--models", default="sdxl,flux")
    p.add_argument("--resolutions", default="1024,512")
    p.add_argument("--batches", default="1,4")
    # w8a16 is left out by default: on FLUX at 1024 px its compile took 73 s and its first graph warm-up calls 185 s.
    p.add_argument("--levels", default="bf16,fp8,w8a8", help="levels profiled per step (also: fp8t, w8a16, w4a16)")
    p.add_argument("--schedule-levels", default="bf16,fp8", help="levels mixed in schedules (the bank of a deployment)")
    p.add_argument("--budgets", default="0.95,0.9,0.85,0.8", help="latency fractions to pick schedules for")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loop-repeats", type=int, default=5)
    p.add_argument("--switch-calls", type=int, default=16)
    p.add_argument("--switch-repeats", type=int, default=7)
    p.add_argument("--switch-at", default="1024x1,512x1", help="shapes (RESxBATCH) where the switch cost is measured")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                   help="time bf16 and fp8 matrix products and attention at FLUX's 1024 px shapes first (seconds)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay each (level, shape) as one captured CUDA graph (removes host overhead)")
    p.add_argument("--flux-blocks", default="19,38", help="double,single transformer blocks of the FLUX model (full: 19,38)")
    p.add_argument("--sdxl-compile", default="regional", choices=["full", "regional", "none"])
    p.add_argument("--flux-compile", default="regional", choices=["full", "regional", "none"])
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--time-budget-s", type=float, default=480, help="stop starting new work after this many seconds")
    p.add_argument("--model-deadlines", default="", help="e.g. sdxl=260,flux=460: seconds after the start past which a model starts no new cell")
    p.add_argument("--full-levels-at", default="1024x1", help="shapes (RESxBATCH) where every level is profiled; elsewhere only --schedule-levels")
    p.add_argument("--cache-in", default="", help="torch compile cache artifacts saved by an earlier run (--cache-out)")
    p.add_argument("--cache-out", default="", help="write torch's compile cache artifacts here (zlib) at the end")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (checks the script)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only to check the script with --tiny")
    args = p.parse_args()
    args.resolutions = [int(x) for x in args.resolutions.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.levels = [x for x in args.levels.split(",") if x]
    args.schedule_levels = [x for x in args.schedule_levels.split(",") if x]
    args.budgets = [float(x) for x in args.budgets.split(",") if x]
    args.flux_blocks = tuple(int(x) for x in args.flux_blocks.split(","))
    args.model_deadlines = {k: float(v) for k, v in (x.split("=") for x in args.model_deadlines.split(",") if x)}
    args.full_levels_at = {tuple(int(v) for v in x.split("x")) for x in args.full_levels_at.split(",") if x}
    args.switch_at = {tuple(int(v) for v in x.split("x")) for x in args.switch_at.split(",") if x}
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    deadline = started + args.time_budget_s
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --device cpu --tiny to check the script)")
    out = Out(Path(args.out))
    out.summary["env"] = environment(DEVICE)
    out.summary["command"] = " ".join(sys.argv)
    out.summary["settings"] = {k: v for k, v in vars(args).items()}
    if args.cache_in and Path(args.cache_in).is_file():
        t0 = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(zlib.decompress(Path(args.cache_in).read_bytes()))
        out.summary["cache_in"] = {"file": args.cache_in, "seconds": time.perf_counter() - t0, "info": str(info)[:500]}
        print(f"loaded compile cache {args.cache_in} in {time.perf_counter() - t0:.1f} s", flush=True)
    out.save_summary()
    print(json.dumps(out.summary["env"]), flush=True)
    if args.roofline and DEVICE == "cuda" and not args.tiny:
        try:
            out.summary["roofline"] = roofline()
            print("roofline " + json.dumps(out.summary["roofline"]), flush=True)
        except Exception as exc:
            out.summary["errors"].append(f"roofline: {type(exc).__name__}: {exc}")
        out.save_summary()
    for kind in args.models.split(","):
        if time.time() > deadline:
            out.summary["not_run"].append(f"{kind}: deadline")
            continue
        try:
            run_model(kind, args, out, min(deadline, started + args.model_deadlines.get(kind, 1e9)))
        except Exception as exc:
            traceback.print_exc()
            out.summary["errors"].append(f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        out.save_summary()
    if args.cache_out:
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None:
                blob = zlib.compress(saved[0], 6)
                Path(args.cache_out).write_bytes(blob)
                out.summary["cache_out"] = {"file": args.cache_out, "raw_bytes": len(saved[0]), "zlib_bytes": len(blob)}
                print(f"compile cache: {len(saved[0]) / 2**20:.1f} MiB raw, {len(blob) / 2**20:.1f} MiB zlib", flush=True)
        except Exception as exc:
            out.summary["errors"].append(f"cache_out: {type(exc).__name__}: {exc}")
    out.save_summary()
    print(f"done; not run: {out.summary['not_run']}; errors: {out.summary['errors']}", flush=True)


if __name__ == "__main__":
    main()
