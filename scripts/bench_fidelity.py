"""Does the simulation measure what the real kernels run? Simulated vs torchao-kernel quality, side by side, on one GPU.

Four parts, each written as soon as it is measured (a run stopped by a time limit keeps what it has):

- `embedded`: the embedded model in bf16, every kernel level and mixed schedules, on seeds no search uses: LPIPS and
  PSNR of each backend's images to the plain bf16 pipeline's, and LPIPS between the two backends' images
  (`fidelity.csv`: model, level_or_schedule, lpips_sim, lpips_real, lpips_sim_vs_real, psnr_sim, psnr_real, n).
- `picks`: every 4-step schedule over bf16/fp8/w8a8/w4a16 measured on the search's seeds with each backend, each
  against its own all-bf16 run as a search measures; the schedule each backend picks at three bit-operation budgets
  (the same cost model; only the backend that measures quality differs) (`picks.csv`, `exhaustive.csv`).
- `calls`: relative L2 error of one denoiser call vs bf16, simulated and real, on random-weight FLUX.1-schnell
  (reduced block count) and SDXL UNet configs at 1024 px (`calls.csv`).
- `e2e`: the stock FluxPipeline (full FLUX.1-schnell transformer config, random weights; tiny random CLIP and T5
  text encoders; the full VAE config), 1024 px, batch 1, 4 steps, max_sequence_length 256: `apply_schedule(...,
  backend="torchao", cuda_graphs=True)` with the all-fp8 schedule against all-bf16 compiled and graphed the same way,
  whole `pipe()` calls timed (`e2e.csv`).

    python scripts/bench_fidelity.py --out results/bench/fidelity                 # on the GPU machine
    python scripts/bench_fidelity.py --parts embedded --device cpu --samples 8 --out /tmp/f   # the script, checked
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search.eval.metrics import build_metrics  # noqa: E402
from qsched_search.logs import quiet_libraries  # noqa: E402
from qsched_search.pipeline.loading import load_model  # noqa: E402
from qsched_search.pipeline.rollout import Runner, capture_denoiser_call, make_eval_set  # noqa: E402
from qsched_search.quant.backends import build_bank  # noqa: E402
from qsched_search.quant.bank import default_compile, measure_call, plan_layers  # noqa: E402
from qsched_search.quant.kernels import kernel_for  # noqa: E402
from qsched_search.quant.latency import environment, time_pipeline_calls, write_csv  # noqa: E402
from qsched_search.quant.levels import load_menu  # noqa: E402
from qsched_search.results.io import write_json  # noqa: E402
from qsched_search.results.provenance import command_line, now  # noqa: E402
from qsched_search.results.schedule import cost_of  # noqa: E402

from bench_gpu import EXCLUDE, FLUX_TRANSFORMER, SDXL_UNET  # noqa: E402  (scripts/ is on the path)

logger = logging.getLogger("bench_fidelity")

KERNEL_LEVELS = ("fp8", "w8a8", "w8a16", "w4a16")
MIXED = ("bf16,fp8,w8a8,w8a8", "bf16,bf16,fp8,fp8", "w8a8,fp8,fp8,w4a16", "fp8,w8a8,w4a16,w4a16")
PICK_LEVELS = ("bf16", "fp8", "w8a8", "w4a16")
# Bit-operation budgets relative to all-bf16: every quantized level here costs 0.74 to 0.83 of it (torchao quantizes
# the UNet's Linear layers only), so the budgets sit in that range and above.
PICK_BUDGETS = (0.95, 0.85, 0.76)
# Seeds no search or calibration uses (searches use seed + k for k < samples; calibration 1,000,000 + j).
UNSEEN_SEED = 50_000


class Out:
    """The result files, rewritten atomically after every new row."""

    def __init__(self, folder: Path, args):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.tables: dict[str, list[dict]] = {}
        self.summary = {"command": command_line(), "created": now(), "args": vars(args), "errors": []}

    def add(self, name: str, row: dict, columns: list[str] | None = None) -> None:
        self.tables.setdefault(name, []).append(row)
        write_csv(self.tables[name], self.folder / f"{name}.csv", columns)
        logger.info("%s: %s", name, {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})

    def save(self) -> None:
        write_json(self.folder / "summary.json", self.summary)


# ================================================================================================ the embedded model


def _embedded(device: str):
    model = load_model("embedded", device=device, dtype="bfloat16")
    return model, {**model.family.call_defaults}


def _reference_images(model, eval_set, steps, batch, call):
    """The plain bf16 pipeline's images (no bank installed), the common reference of both backends."""
    images = []
    for start in range(0, len(eval_set), batch):
        gens = [torch.Generator(device=model.device).manual_seed(s) for s in eval_set.seeds[start:start + batch]]
        with torch.no_grad():
            out = model.pipe(prompt=list(eval_set.prompts[start:start + batch]), num_inference_steps=steps,
                             generator=gens, output_type="pt", **call)
        images.append(out.images.float().cpu())
    return torch.cat(images)


def _runs(model, backend, levels, schedules, eval_set, steps, batch, call, compile_scope):
    menu = load_menu()
    calibration = capture_denoiser_call(model.pipe, model.denoiser, {**call, "prompt": list(eval_set.prompts[:batch]),
                                                                     "num_inference_steps": steps})
    bank = build_bank(backend, model.denoiser, menu, list(levels), "bf16", list(model.family.exclude),
                      calibration=calibration, compile=compile_scope, cuda_graphs=backend == "torchao" and model.device != "cpu")
    try:
        runner = Runner(model, bank, steps, eval_set, batch, call)
        out = {}
        for key in schedules:
            started = time.perf_counter()
            out[key] = runner.run(key.split(",")).images
            logger.info("%s %s: %.1f s", backend, key, time.perf_counter() - started)
        return out, bank.level_costs(), {lv: len(v) for lv, v in bank.quantized_layers.items()}
    finally:
        bank.remove()


def part_embedded(out: Out, args) -> None:
    model, call = _embedded(args.device)
    eval_set = make_eval_set(list(model.family.default_prompts), args.samples, UNSEEN_SEED)
    lpips, psnr = build_metrics(["lpips", "psnr"], device=args.device, weights_dir=args.weights_dir)
    reference = _reference_images(model, eval_set, 4, args.batch, call)
    schedules = [",".join([lv] * 4) for lv in KERNEL_LEVELS] + list(MIXED)
    sim, costs, layers_sim = _runs(model, "sim", KERNEL_LEVELS, schedules, eval_set, 4, args.batch, call, args.compile)
    real, _, layers_real = (_runs(model, "torchao", KERNEL_LEVELS, schedules, eval_set, 4, args.batch, call, args.compile)
                            if args.device != "cpu" else (sim, None, layers_sim))
    out.summary["embedded"] = {"quantized_layers_sim": layers_sim, "quantized_layers_real": layers_real,
                               "level_costs": costs, "samples": len(eval_set), "seed": UNSEEN_SEED}
    for key in schedules:
        out.add("fidelity", {
            "model": "embedded (bf16)", "level_or_schedule": key.split(",")[0] if len(set(key.split(","))) == 1 else key,
            "lpips_sim": lpips.score(sim[key], reference, eval_set.prompts).value,
            "lpips_real": lpips.score(real[key], reference, eval_set.prompts).value,
            "lpips_sim_vs_real": lpips.score(sim[key], real[key], eval_set.prompts).value,
            "psnr_sim": psnr.score(sim[key], reference, eval_set.prompts).value,
            "psnr_real": psnr.score(real[key], reference, eval_set.prompts).value,
            "n": len(eval_set)}, ["model", "level_or_schedule", "lpips_sim", "lpips_real", "lpips_sim_vs_real",
                                  "psnr_sim", "psnr_real", "n"])


def part_picks(out: Out, args) -> None:
    model, call = _embedded(args.device)
    eval_set = make_eval_set(list(model.family.default_prompts), args.pick_samples, 0)
    (lpips,) = build_metrics(["lpips"], device=args.device, weights_dir=args.weights_dir)
    space = [",".join(p) for p in itertools.product(PICK_LEVELS, repeat=4)]
    levels = [lv for lv in PICK_LEVELS if lv != "bf16"]
    tables = {}
    backends = ("sim", "torchao") if args.device != "cpu" else ("sim",)
    for backend in backends:
        images, costs, _ = _runs(model, backend, levels, space, eval_set, 4, args.batch, call, args.compile)
        # As a search measures: against the same bank's all-reference run (a compiled bf16 copy on the real
        # kernels differs from the eager pipeline by as much as w8a8 does on this model).
        reference = images[",".join(["bf16"] * 4)]
        bops = {lv: c["bops"] for lv, c in costs.items()}
        tables[backend] = {key: (lpips.score(images[key], reference, eval_set.prompts).value,
                                 cost_of(key.split(","), bops)) for key in space}
        for key, (value, cost) in tables[backend].items():
            out.add("exhaustive", {"backend": backend, "schedule": key, "bops": cost, "lpips": value,
                                   "n": len(eval_set)})
    write_picks(out, tables)


def write_picks(out: Out, tables: dict[str, dict[str, tuple[float, float]]]) -> None:
    """picks.csv: the schedule each backend's table picks at each budget (best LPIPS within it, ties: the cheaper)."""
    for budget in PICK_BUDGETS:
        row = {"budget_bops": budget}
        for backend, table in tables.items():
            within = {k: v for k, v in table.items() if v[1] <= budget + 1e-9}
            pick = min(within, key=lambda k: (within[k][0], within[k][1]))
            row[f"pick_{backend}"] = pick
            row[f"lpips_{backend}_of_{backend}_pick"] = within[pick][0]
        if "torchao" in tables:
            row["lpips_real_of_sim_pick"] = tables["torchao"][row["pick_sim"]][0]
            row["same_pick"] = row["pick_sim"] == row["pick_torchao"]
        out.add("picks", row)


def picks_from_table(out: Out, args) -> None:
    """Picks from an `exhaustive.csv` a GPU run measured (`--picks-from`): no model runs."""
    import pandas as pd

    frame = pd.read_csv(args.picks_from)
    tables = {backend: {r.schedule: (r.lpips, r.bops) for r in group.itertuples()}
              for backend, group in frame.groupby("backend")}
    write_picks(out, tables)


# ================================================================================================ single calls

# The full SDXL UNet and FLUX.1-schnell transformer configs and their excluded layers, as the GPU benchmark uses them.


def _random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights of the scale trained ones have (diffusers initialises many layers to zero)."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:  # drawn on the module's device: 12B values on a CPU would take minutes
                p.copy_((torch.randn(p.shape, generator=g, device=device) / p[0].numel() ** 0.5).to(p.dtype))


def _call_inputs(kind: str, device: str, flux_tokens: int = 256):
    g = torch.Generator(device="cpu").manual_seed(1)
    if kind == "flux":
        n = 64 * 64  # 1024 px: 128x128 latents packed 2x2
        ids = torch.zeros(n, 3)
        ids[:, 1] = torch.arange(64).repeat_interleave(64)
        ids[:, 2] = torch.arange(64).repeat(64)
        return dict(hidden_states=torch.randn(1, n, 64, generator=g), encoder_hidden_states=torch.randn(1, flux_tokens, 4096, generator=g),
                    pooled_projections=torch.randn(1, 768, generator=g), txt_ids=torch.zeros(flux_tokens, 3), img_ids=ids,
                    return_dict=False), "timestep"
    return dict(sample=torch.randn(1, 4, 128, 128, generator=g), encoder_hidden_states=torch.randn(1, 77, 2048, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 1280, generator=g),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])},
                return_dict=False), "timestep"


def _to(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def part_calls(out: Out, args) -> None:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    menu = load_menu()
    for kind in ("flux", "sdxl"):
        torch.manual_seed(0)
        if kind == "flux":
            config = {**FLUX_TRANSFORMER, "num_layers": args.flux_blocks[0], "num_single_layers": args.flux_blocks[1]}
            model = FluxTransformer2DModel(**config)
        else:
            model = UNet2DConditionModel(**SDXL_UNET)
        _random_init_(model)  # on the CPU, before the move (the models of the calls part are a few GB)
        model = model.to(args.device, torch.bfloat16).eval()
        kwargs, tkey = _call_inputs(kind, args.device)
        kwargs = _to(kwargs, args.device, torch.bfloat16)
        for t in (1000.0, 500.0):
            call = {**kwargs, tkey: torch.tensor([t / 1000 if kind == "flux" else t], device=args.device, dtype=torch.bfloat16)}
            with torch.no_grad():
                ref = model(**call)[0].float()
            outputs = {}
            for backend in ("sim", "torchao") if args.device != "cpu" else ("sim",):
                bank = build_bank(backend, model, menu, list(KERNEL_LEVELS), "bf16", EXCLUDE[kind],
                                  calibration=((), call), compile="none")
                try:
                    for level in KERNEL_LEVELS:
                        bank.set_level(level)
                        with torch.no_grad():
                            outputs[(backend, level)] = model(**call)[0].float().clone()
                    layers = {lv: len(bank.quantized_layers[lv]) for lv in KERNEL_LEVELS}
                finally:
                    bank.remove()
            for level in KERNEL_LEVELS:
                rel = {b: ((outputs[(b, level)] - ref).norm() / ref.norm()).item() for b in ("sim", "torchao") if (b, level) in outputs}
                sim_vs_real = ((outputs[("sim", level)] - outputs[("torchao", level)]).norm() / ref.norm()).item() \
                    if ("torchao", level) in outputs else float("nan")
                out.add("calls", {"model": f"{kind} {'%d+%d blocks' % tuple(args.flux_blocks) if kind == 'flux' else 'full UNet'}, 1024 px",
                                  "timestep": t, "level": level, "rel_err_sim": rel.get("sim"), "rel_err_real": rel.get("torchao"),
                                  "rel_sim_vs_real": sim_vs_real, "quantized_layers": layers[level]})
        del model
        torch.cuda.empty_cache() if args.device != "cpu" else None


# ================================================================================================ end to end


def _flux_pipeline(device: str):
    """The stock FluxPipeline: full transformer and VAE configs (random weights), tiny random text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from qsched_search.embedded.vocab import CLASS_NAMES, build_clip_tokenizer

    # Copied from tests/test_families.py build_t5_tokenizer: a T5 tokenizer over a tiny Unigram vocabulary built in code.
    words = sorted({w for name in CLASS_NAMES for w in name.replace("-", " ").split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz-"]

    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER).to(torch.bfloat16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                            scaling_factor=0.3611).to(torch.bfloat16)
    _random_init_(transformer)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=256)
    # The pooled CLIP output feeds the transformer's 768-d pooled projection: hidden size 768, one layer.
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=256, num_attention_heads=4,
                                        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1)).to(device, torch.bfloat16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).to(device, torch.bfloat16)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=vae,
                        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                        transformer=transformer)


def part_e2e(out: Out, args) -> None:
    from qsched_search import apply_schedule
    from qsched_search.results.schedule import Quality, Schedule

    pipe = _flux_pipeline(args.device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", num_inference_steps=4, guidance_scale=0.0, height=1024, width=1024,
                max_sequence_length=256, output_type="pil")
    timesteps = (1000, 750, 500, 250)
    # The layers a search on this pipeline would record (one recorded call at batch 1: the modulation projections,
    # one row per call, stay bf16), so the deployment quantizes what a searched schedule says.
    menu = load_menu()
    stats = measure_call(pipe.transformer, *capture_denoiser_call(pipe, pipe.transformer, {**call, "output_type": "latent"}))
    compile_scope = default_compile(pipe.transformer)
    layers = plan_layers(pipe.transformer, menu, ["bf16", "fp8"], EXCLUDE["flux"],
                         {lv: kernel_for(menu[lv], "bfloat16") for lv in ("bf16", "fp8")}, stats.rows, compile_scope)
    execution = {"backend": "torchao", "target": menu.target, "compile": compile_scope,
                 "levels": {lv: {"quantized_layers": names} for lv, names in layers.items()}}
    out.summary["e2e"] = {"fp8_quantized_layers": len(layers["fp8"]), "compile": compile_scope}
    results = {}
    for levels in (("bf16",) * 4, ("fp8",) * 4):
        schedule = Schedule(levels=levels, steps=4, timesteps=timesteps, reference="bf16", model_id="flux-schnell random",
                            weights_sha256="0" * 64, budget=1.0, cost_model="bops", cost={"bops": 1.0, "memory": 1.0, "latency": None},
                            quality=Quality("lpips", 0.0, None, None, 1, False), provenance={
                                "tool_version": "bench", "seed": 0, "prompts_sha256": "0" * 64, "command": command_line(),
                                "created": now()}, extras={"execution": execution})
        started = time.perf_counter()
        applied = apply_schedule(pipe, schedule, family="flux-schnell", backend="torchao", cuda_graphs=True)
        build = time.perf_counter() - started
        try:
            # The first call compiles and captures every step.
            first, ms = time_pipeline_calls(lambda k: pipe(**call, generator=torch.Generator(args.device).manual_seed(k)),
                                            args.device, args.repeats)
            results[levels[0]] = ms[len(ms) // 2]
            out.add("e2e", {"model": "FluxPipeline, full FLUX.1-schnell transformer (random weights), 1024 px, batch 1, 4 steps",
                            "schedule": ",".join(levels), "ms_pipeline_call_median": ms[len(ms) // 2], "ms_min": ms[0],
                            "ms_max": ms[-1], "repeats": len(ms), "bank_build_s": build, "first_call_s": first,
                            "calls_per_level": dict(applied.bank.calls),
                            "speedup_vs_bf16": results["bf16"] / ms[len(ms) // 2] if "bf16" in results else 1.0})
        finally:
            applied.remove()
            torch.cuda.empty_cache()


PARTS = {"embedded": part_embedded, "picks": part_picks, "calls": part_calls, "e2e": part_e2e,
         "picks-from-table": picks_from_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "fidelity")
    parser.add_argument("--parts", default="embedded,picks,calls,e2e", help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=256, help="embedded: samples on unseen seeds")
    parser.add_argument("--pick-samples", type=int, default=64, help="picks: samples per schedule (the search's seeds)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compile", default=None, help="the banks' compile scope (default: the model's)")
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=(4, 8), help="calls: FLUX double and single blocks")
    parser.add_argument("--repeats", type=int, default=5, help="e2e: timed pipeline calls per schedule")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--picks-from", type=Path, default=None, help="picks-from-table: an exhaustive.csv to pick from")
    args = parser.parse_args()
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Out(args.out, args)
    out.summary["environment"] = environment(args.device)
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            PARTS[name](out, args)
        except Exception as exc:  # one part's failure must not lose the others' rows
            logger.error("part %s failed: %s", name, exc)
            out.summary["errors"].append({"part": name, "error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc()[-2000:]})
        out.summary.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        out.save()
    print(json.dumps(out.summary.get("seconds"), indent=1))


if __name__ == "__main__":
    main()
