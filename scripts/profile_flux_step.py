"""Profiles one FLUX.1-schnell transformer step at 1024 px: ms per step and GPU time in GEMMs, attention and the rest.

A random-weight FluxTransformer2DModel with FLUX.1-schnell's config (19 double + 38 single blocks; `--blocks` cuts
them) in bf16, batch 1, 4096 image + 256 text tokens, one call at t = 1000. Variants, each a fresh copy of the same
weights compiled with diffusers' `compile_repeated_blocks(fullgraph=True)` and replayed as one CUDA graph:

  bf16_eager       the uncompiled model, launched op by op (the reference output; no CUDA graph)
  bf16             regional compile + CUDA graph
  fp8_rowwise      torchao Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
  fp8_tensorwise   the same with PerTensor()

fp8 quantizes every nn.Linear except x_embedder, context_embedder, proj_out, time_text_embed.*, norm_out.* and the
layers that see fewer than `--min-rows` rows per call (the norm*.linear modulation projections see 1).

For each variant: ms per step (median of CUDA-event-timed graph replays), then torch.profiler (CUDA activity) over a
few replays: the kernels' time per step split into GEMMs, attention and everything else, and the top kernels of each
class; and the relative L2 error of the output (float32) against the bf16 eager output.

Output: breakdown.csv (variant, ms_per_step, gemm_ms, attention_ms, other_ms, rel_err, ...), top_kernels.csv and
summary.json, each rewritten as soon as a variant is done.

    python scripts/profile_flux_step.py --out results/breakdown         # on the GPU (scripts/device_attention.sh)
    python scripts/profile_flux_step.py --out /tmp/b --blocks 2,4       # GPU, a quick run
    python scripts/profile_flux_step.py --dry-run --out /tmp/breakdown  # CPU, tiny config, CPU ops profiled
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import fnmatch
import gc
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qsched_search.results.io import write_text  # noqa: E402  (atomic, as every results file of the project)

import torch
from torch import nn

from qsched_search.quant.latency import time_calls  # noqa: E402

logger = logging.getLogger("profile_flux_step")

# black-forest-labs/FLUX.1-schnell transformer/config.json (num_layers / num_single_layers are cut by --blocks)
FLUX_SCHNELL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                    axes_dims_rope=(16, 56, 56))
# a few-million-parameter model of the same architecture, for --dry-run
FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
                 axes_dims_rope=(8, 12, 12))
EXCLUDE = ["x_embedder", "context_embedder", "proj_out", "time_text_embed.*", "norm_out.*", "*norm*.linear"]
VARIANTS = ["bf16_eager", "bf16", "fp8_rowwise", "fp8_tensorwise"]

BREAKDOWN_COLUMNS = ["variant", "ms_per_step", "gemm_ms", "attention_ms", "other_ms", "rel_err",
                     "kernel_ms", "kernels_per_step", "quantized_linears", "compile_s", "profile_mode", "notes"]
TOP_COLUMNS = ["variant", "class", "rank", "kernel", "ms_per_step", "calls_per_step"]

# Kernel classes by name. Attention first: cuDNN's and FlashAttention's kernels also say "cutlass" or "gemm".
ATTENTION_KEYS = ("flash", "fmha", "sdpa", "attention", "attn", "flex")
GEMM_KEYS = ("gemm", "gemv", "matmul", "xmma", "cutlass", "scaled_mm", "cublas", "nvjet", "triton_tem", "gmma",
             "f8f8bf16", "splitk", "aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")
TRITON_ELEMENTWISE = ("triton_poi", "triton_red", "triton_per")  # inductor's pointwise / reduction / persistent kernels


def classify(name: str) -> str:
    n = name.lower()
    if any(key in n for key in ATTENTION_KEYS):
        return "attention"
    if n.startswith(TRITON_ELEMENTWISE):
        return "other"
    if any(key in n for key in GEMM_KEYS):
        return "gemm"
    return "other"


# ================================================================================================ bookkeeping


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)
                         for k, v in ((k, row.get(k)) for k in columns)})
    return buf.getvalue()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class Results:
    """breakdown.csv, top_kernels.csv and summary.json, rewritten after every variant."""

    def __init__(self, folder: Path, summary: dict):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.top: list[dict] = []
        self.summary = summary

    def add(self, row: dict, top: list[dict]) -> None:
        self.rows.append(row)
        self.top += top
        logger.info("%-15s ms/step=%-9s gemm=%-9s attention=%-9s other=%-9s rel_err=%-10s %s", row["variant"],
                    *(f"{row[k]:.4g}" if isinstance(row.get(k), float) else "-"
                      for k in ("ms_per_step", "gemm_ms", "attention_ms", "other_ms", "rel_err")), row.get("notes", ""))
        self.save()

    def save(self) -> None:
        write_text(self.folder / "breakdown.csv", _csv(self.rows, BREAKDOWN_COLUMNS))
        write_text(self.folder / "top_kernels.csv", _csv(self.top, TOP_COLUMNS))
        write_text(self.folder / "summary.json", json.dumps(self.summary, indent=2, default=str))


# ================================================================================================ model and inputs


def build_model(device: str, cfg: dict) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy of 12B weights on the way
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def latent_image_ids(height: int, width: int, device: str) -> torch.Tensor:
    # Copied from diffusers.pipelines.flux.pipeline_flux.FluxPipeline._prepare_latent_image_ids (no pipeline import)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=torch.bfloat16)


def make_inputs(model: nn.Module, device: str, resolution: int, text_tokens: int, batch: int) -> dict:
    """The transformer's inputs for one call, as FluxPipeline passes them (latents packed 2x2, t = 1000 / 1000)."""
    g = torch.Generator(device).manual_seed(1234)
    bf = dict(device=device, dtype=torch.bfloat16, generator=g)
    side = resolution // 16  # VAE factor 8, then 2x2 packing
    cfg = model.config
    return dict(
        hidden_states=torch.randn(batch, side * side, cfg.in_channels, **bf),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, **bf) * 0.5,
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, **bf) * 0.5,
        timestep=torch.full((batch,), 1.0, device=device, dtype=torch.bfloat16),
        img_ids=latent_image_ids(side, side, device),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=torch.bfloat16),
        guidance=None,
        return_dict=False,
    )


def rows_per_call(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, int]]:
    """One eager call's output and, for each nn.Linear, the rows of its input (the modulation projections see 1)."""
    rows: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, args, name=name):
                rows[name] = max(rows.get(name, 0), args[0].reshape(-1, args[0].shape[-1]).shape[0])
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(**inputs)[0]
    finally:
        for h in hooks:
            h.remove()
    return out, rows


def eligible(module: nn.Module, fqn: str, rows: dict[str, int], min_rows: int) -> bool:
    """Whether fp8 quantizes this layer: a Linear, not excluded, of fp8-GEMM-friendly shape, seeing enough rows."""
    return (isinstance(module, nn.Linear) and not any(fnmatch.fnmatch(fqn, p) for p in EXCLUDE)
            and rows.get(fqn, 0) >= min_rows and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def quantize_fp8(model: nn.Module, granularity: str, rows: dict[str, int], min_rows: int) -> list[str]:
    """Quantizes `model` in place with torchao's dynamic fp8 (weights and activations); returns the layers it chose."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    # set_inductor_config=False: torchao's recommended inductor flags (coordinate-descent tuning) lengthen the compile
    # and would give fp8 a compiler setting that bf16 does not get
    granularity = PerRow() if granularity == "rowwise" else PerTensor()
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
    chosen: list[str] = []

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        ok = eligible(module, fqn, rows, min_rows)
        if ok:
            chosen.append(fqn)
        return ok

    quantize_(model, config, filter_fn)
    return chosen


# ================================================================================================ running


class Runner:
    """Calls the model on fixed inputs: a CUDA graph replay where `graph`, else a plain call (eager or compiled)."""

    def __init__(self, model: nn.Module, inputs: dict, device: str, graph: bool, warmup: int):
        self.model, self.device = model, device
        self.inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        self.graph = None
        if graph:
            # warm-up on a side stream, as torch.cuda.graphs' docs ask, so that lazy init stays out of the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(warmup):
                    model(**self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.output = model(**self.inputs)[0]
            torch.cuda.synchronize()

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.output
        with torch.no_grad():
            return self.model(**self.inputs)[0]

    def plain(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**self.inputs)[0]


def profile_kernels(fn, device: str, steps: int) -> tuple[dict[str, list[float]], int]:
    """Kernel name -> [total ms, calls] over `steps` calls of `fn`, from torch.profiler.

    On CUDA the kernels come from the exported trace's `kernel`, `gpu_memcpy` and `gpu_memset` events, which never
    overlap on one stream; on CPU (--dry-run) the ops' self times stand in for kernels, so that nothing counts twice.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if device == "cuda":
        with tempfile.TemporaryDirectory() as tmp:  # the trace stays out of --out: the device returns few files
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        for ev in events:
            if ev.get("ph") == "X" and str(ev.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset"):
                k = kernels[ev.get("name", "?")]
                k[0] += float(ev.get("dur", 0.0)) / 1e3
                k[1] += 1
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                k = kernels[avg.key]
                k[0] += avg.self_cpu_time_total / 1e3
                k[1] += avg.count
    return dict(kernels), steps


def breakdown(kernels: dict[str, list[float]], steps: int, variant: str, top_n: int) -> tuple[dict, list[dict]]:
    per_class: dict[str, float] = defaultdict(float)
    by_class: dict[str, list] = defaultdict(list)
    calls = 0
    for name, (ms, n) in kernels.items():
        cls = classify(name)
        per_class[cls] += ms / steps
        by_class[cls].append((ms / steps, n / steps, name))
        calls += n
    top = []
    for cls in ("gemm", "attention", "other"):
        for rank, (ms, n, name) in enumerate(sorted(by_class[cls], reverse=True)[:top_n], start=1):
            top.append(dict(variant=variant, **{"class": cls}, rank=rank, kernel=name[:300], ms_per_step=ms,
                            calls_per_step=n))
    total = sum(per_class.values())
    return dict(gemm_ms=per_class["gemm"], attention_ms=per_class["attention"], other_ms=per_class["other"],
                kernel_ms=total, kernels_per_step=calls / steps), top


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


# ================================================================================================ main


def environment(args, device: str) -> dict:
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([sys.executable] + sys.argv),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn_backend_torch=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        setup=dict(resolution=args.resolution, text_tokens=args.text_tokens, batch=args.batch, blocks=args.blocks,
                   compile=args.compile, cuda_graph=args.cuda_graph, repeats=args.repeats,
                   profile_steps=args.profile_steps, min_rows=args.min_rows, exclude=EXCLUDE),
        definitions=dict(
            ms_per_step="median over --repeats calls, each between two CUDA events (graph replays where cuda_graph)",
            gemm_ms_attention_ms_other_ms="GPU kernel time per step by kernel-name class (profiler trace); their sum "
                                          "is kernel_ms, which falls short of ms_per_step by the GPU's idle gaps",
            rel_err="||y - y_bf16_eager|| / ||y_bf16_eager||, in float32, same inputs and weights",
            classes=dict(attention=ATTENTION_KEYS, gemm=GEMM_KEYS, other="everything else, inductor's "
                         "triton_poi/red/per kernels, memcpy and memset included")),
        errors=[],
    )
    for name in ("diffusers", "torchao", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:
            env[name] = f"not importable: {_one_line(exc)}"
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for breakdown.csv, top_kernels.csv, summary.json")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny config, 128 px, 16 text tokens; eager unless --compile regional; no CUDA graph")
    p.add_argument("--blocks", default=None, help="double,single block counts, defaults to `19,38` (FLUX.1-schnell)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--resolution", type=int, default=None, help="pixels, defaults to 1024 (128 with --dry-run)")
    p.add_argument("--text-tokens", type=int, default=None, help="defaults to 256 (16 with --dry-run)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", choices=["regional", "none"], default=None,
                   help="regional: diffusers' compile_repeated_blocks(fullgraph=True); defaults to regional "
                        "(none with --dry-run)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="calls before the CUDA-graph capture")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=10, help="kernels listed per class in top_kernels.csv")
    p.add_argument("--min-rows", type=int, default=None,
                   help="fp8 skips Linear layers that see fewer rows per call, defaults to 32 (8 with --dry-run, whose "
                        "16 text tokens would otherwise keep the text-stream layers in bf16)")
    p.add_argument("--time-budget-s", type=float, default=1e9,
                   help="skip a variant when less time is left than the longest variant so far took")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.resolution = args.resolution or (128 if dry else 1024)
    args.text_tokens = args.text_tokens or (16 if dry else 256)
    args.compile = args.compile or ("none" if dry else "regional")
    args.min_rows = args.min_rows if args.min_rows is not None else (8 if dry else 32)
    if dry:
        args.cuda_graph = False
        args.repeats, args.profile_steps = min(args.repeats, 3), min(args.profile_steps, 2)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if args.blocks is not None:
        try:
            args.blocks = tuple(int(x) for x in args.blocks.split(","))
            assert len(args.blocks) == 2 and min(args.blocks) >= 0
        except (ValueError, AssertionError):
            p.error(f"--blocks: expected two counts like `19,38` (double,single); got {args.blocks!r}")
    return args


def run_variant(name: str, base: nn.Module, inputs: dict, ref: torch.Tensor, rows: dict, args,
                device: str) -> tuple[dict, list]:
    """One variant's breakdown row and top kernels: copy, quantize, compile, capture, time, profile, compare."""
    row: dict = dict(variant=name, notes="")
    started = time.perf_counter()
    runner = out = None
    model = base if name == "bf16_eager" else copy.deepcopy(base)  # every variant starts from the same weights
    try:
        if name.startswith("fp8_"):
            chosen = quantize_fp8(model, name.removeprefix("fp8_").replace("tensorwise", "tensor"), rows, args.min_rows)
            row["quantized_linears"] = len(chosen)
        compiled = name != "bf16_eager" and args.compile == "regional"
        if compiled:
            model.compile_repeated_blocks(fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            first = model(**inputs)[0]  # the compile happens here, not inside the graph capture
        if device == "cuda":
            torch.cuda.synchronize()
        row["compile_s"] = time.perf_counter() - t0 if compiled else None
        use_graph = args.cuda_graph and device == "cuda" and name != "bf16_eager"
        runner = Runner(model, inputs, device, use_graph, args.warmup)
        out = runner()
        row["rel_err"] = rel_err(out, ref)
        if not torch.isfinite(out.float()).all():
            row["notes"] += "non-finite outputs; "
        del first
        row["ms_per_step"] = statistics.median(time_calls(runner, device, warmup=0, repeats=args.repeats))
        kernels, steps = profile_kernels(runner, device, args.profile_steps)
        row["profile_mode"] = "cuda_graph_replay" if use_graph else ("compiled" if compiled else "eager")
        stats, top = breakdown(kernels, steps, name, args.top)
        if use_graph and stats["kernel_ms"] < 0.5 * row["ms_per_step"]:
            # the profiler saw too little of the graph's kernels: profile the same compiled model launched without it
            kernels, steps = profile_kernels(runner.plain, device, args.profile_steps)
            stats, top = breakdown(kernels, steps, name, args.top)
            row["profile_mode"] = "compiled_without_graph"
            row["notes"] += "graph replays showed too few kernels to the profiler; profiled without the graph; "
        row.update(stats)
        row["notes"] = row["notes"].rstrip("; ")
        return row, top
    finally:
        # drop this variant's copy, graph and graph-pool output before the next copy is made, not at return
        runner = out = None
        if model is not base:
            del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - started


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.time_budget_s
    results = Results(args.out, environment(args, device))
    cfg = dict(FLUX_TINY if args.dry_run else FLUX_SCHNELL)
    if args.blocks is not None:
        cfg["num_layers"], cfg["num_single_layers"] = args.blocks
    results.summary["model_config"] = cfg
    logger.info("device %s; torch %s; diffusers %s; torchao %s; config %s", results.summary["device"],
                torch.__version__, results.summary["diffusers"], results.summary["torchao"], cfg)

    t0 = time.perf_counter()
    base = build_model(device, cfg)
    inputs = make_inputs(base, device, args.resolution, args.text_tokens, args.batch)
    ref, rows = rows_per_call(base, inputs)  # bf16 eager: the reference output, and each Linear's rows per call
    if device == "cuda":
        torch.cuda.synchronize()
    results.summary["build_and_reference_s"] = time.perf_counter() - t0
    results.summary["parameters"] = sum(p.numel() for p in base.parameters())
    results.summary["tokens"] = dict(image=inputs["hidden_states"].shape[1], text=args.text_tokens)
    linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n, m in base.named_modules() if eligible(m, n, rows, args.min_rows)]
    results.summary["fp8_layers"] = dict(linears=len(linears), quantized=len(chosen),
                                         kept_bf16=sorted(set(linears) - set(chosen)))
    results.save()
    logger.info("model built and reference computed in %.1f s (%d parameters, %s tokens); fp8 would quantize %d of %d "
                "Linear layers", results.summary["build_and_reference_s"], results.summary["parameters"],
                results.summary["tokens"], len(chosen), len(linears))

    longest = 0.0
    for name in args.variants:
        left = deadline - time.monotonic()
        if left < longest * 1.1:
            note = f"skipped: {left:.0f} s left, the longest variant so far took {longest:.0f} s"
            results.add(dict(variant=name, notes=note), [])
            continue
        try:
            row, top = run_variant(name, base, inputs, ref, rows, args, device)
        except Exception as exc:  # one variant's failure must not cost the others their rows
            results.summary["errors"].append(dict(variant=name, error=_one_line(exc), traceback=traceback.format_exc()))
            row, top = dict(variant=name, notes=f"failed: {_one_line(exc)}"), []
        finally:
            torch._dynamo.reset()  # the next variant compiles its own graphs; drop this one's
            gc.collect()  # a failed variant's traceback held its model and graph until here
            if device == "cuda":
                torch.cuda.empty_cache()
        longest = max(longest, row.get("wall_s", 0.0) or 0.0)
        results.add(row, top)
    results.summary["finished"] = True
    results.save()
    logger.info("wrote %s", args.out / "breakdown.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
