"""Builders shared by several test modules: tiny pipelines, schedules, fake evaluators, the weights folder.

Test modules import these from here (never from each other); fixtures stay in conftest.py.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ pipelines


def build_tiny_sd_pipeline(scheduler: str = "euler-ancestral"):
    """A StableDiffusionPipeline of the SD-Turbo architecture with a few thousand random weights.

    Built the way diffusers' own tests build theirs; the tokenizer is the embedded model's (no hub files).
    """
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, LCMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from qsched_search.embedded.vocab import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32,
    )
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
    ))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = (EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing") if scheduler == "euler-ancestral"
             else LCMScheduler(**common))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# One tiny random-weight pipeline per model family (saved with save_pretrained, loaded by path in the tests).

SD_COMMON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _clip_text_encoder(tokenizer, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    config = dict(block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
    config.update(overrides)
    return AutoencoderKL(**config)


def build_tiny_pcm_pipeline():
    """SD 1.5 architecture with the TCD scheduler that PCM checkpoints run with."""
    from diffusers import TCDScheduler

    pipe = build_tiny_sd_pipeline()
    pipe.scheduler = TCDScheduler(**SD_COMMON, timestep_spacing="trailing")
    return pipe


def build_tiny_sdxl_pipeline():
    """A StableDiffusionXLPipeline (SDXL-Turbo architecture: two CLIP encoders, text-time conditioning)."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from qsched_search.embedded.vocab import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=8 * 6 + 32, cross_attention_dim=64, norm_num_groups=4,
    )
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=_clip_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(tokenizer_2, with_projection=True), tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**SD_COMMON, timestep_spacing="trailing"),
    )


def build_t5_tokenizer():
    """A T5 tokenizer over a tiny Unigram vocabulary built in code (no hub files); unknown words fall back to letters."""
    from transformers import T5TokenizerFast

    from qsched_search.embedded.vocab import CLASS_NAMES

    words = sorted({w for name in CLASS_NAMES for w in name.replace("-", " ").split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz-"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=16)


def build_tiny_flux_pipeline():
    """A FluxPipeline (FLUX.1-schnell architecture: double- and single-stream blocks, CLIP + T5), as diffusers tests it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from qsched_search.embedded.vocab import build_clip_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()  # T5's dropout is 0.1: off, as loaded
    vae = _tiny_vae(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), latent_channels=1, norm_num_groups=1, layers_per_block=1,
                    use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=vae,
                        text_encoder=_clip_text_encoder(tokenizer), tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def build_tiny_lcm_pipeline():
    return build_tiny_sd_pipeline(scheduler="lcm")


# family -> (builder, folder name, denoiser class, call kwargs). The folder name matters for id-matched families.
FAMILIES = {
    "sd-turbo": (build_tiny_sd_pipeline, "sd-turbo-tiny", "UNet2DConditionModel", {"height": 32, "width": 32}),
    "sdxl-turbo": (build_tiny_sdxl_pipeline, "sdxl-turbo-tiny", "UNet2DConditionModel", {"height": 32, "width": 32}),
    "lcm": (build_tiny_lcm_pipeline, "tiny-lcm", "UNet2DConditionModel", {"height": 32, "width": 32, "guidance_scale": 0.0}),
    "pcm": (build_tiny_pcm_pipeline, "tiny-pcm", "UNet2DConditionModel", {"height": 32, "width": 32, "guidance_scale": 0.0}),
    "flux-schnell": (build_tiny_flux_pipeline, "tiny-flux", "FluxTransformer2DModel",
                     {"height": 16, "width": 16, "max_sequence_length": 8}),
}


# ------------------------------------------------------------------------------------------------ schedules

SCHEDULE_COSTS = {"fp32": 1.0, "w8a8": 0.066, "w4a8": 0.035, "w4a4": 0.019}


def make_schedule(**overrides):
    """A valid 4-step schedule (w8a8, fp32, w4a8, w4a4 by default); keyword arguments replace its fields."""
    from qsched_search.results.schedule import Quality, Schedule, cost_of

    levels = overrides.pop("levels", ("w8a8", "fp32", "w4a8", "w4a4"))
    fields = dict(
        levels=levels, steps=len(levels), timesteps=tuple(range(999, 0, -240))[: len(levels)], reference="fp32",
        model_id="embedded", weights_sha256="ab" * 32, budget=0.5, cost_model="bops",
        cost={"bops": cost_of(levels, SCHEDULE_COSTS), "memory": 0.4, "latency": None},
        quality=Quality("lpips", 0.021, 0.014, 0.028, 64, False),
        provenance={"tool_version": "0.1.0", "seed": 0, "prompts_sha256": "cd" * 32, "command": "qsched search",
                    "created": "2026-11-25T00:00:00+00:00"},
    )
    fields.update(overrides)
    return Schedule(**fields)


# ------------------------------------------------------------------------------------------------ a fake search

LEVELS = ("fp32", "w8a8", "w4a8", "w4a4")
BOPS = {"fp32": 1.0, "w8a8": 0.066, "w4a8": 0.035, "w4a4": 0.019}
MEMORY = {"fp32": 1.0, "w8a8": 0.27, "w4a8": 0.148, "w4a4": 0.148}
HARM = {"fp32": 0.0, "w8a8": 0.01, "w4a8": 0.04, "w4a4": 0.12}


def true_quality(levels) -> float:
    """A made-up LPIPS: early steps matter most, and two w4a4 steps in a row hurt more than their sum."""
    value = 0.002 + sum(3.0 * 0.6 ** i * HARM[lv] for i, lv in enumerate(levels)) / len(levels)
    value += sum(0.02 for a, b in zip(levels, levels[1:]) if a == b == "w4a4")
    return value if set(levels) != {"fp32"} else 0.0


def fake_evaluation(levels, timesteps=(), estimates=None, unhealthy_images: int = 0, fail_reason: str | None = None):
    """An `Evaluation` as the evaluator returns it (its `Measurement` inside)."""
    from qsched_search.eval.evaluate import Evaluation
    from qsched_search.results.records import Measurement

    return Evaluation(tuple(levels), Measurement(estimates=dict(estimates or {}), timesteps=tuple(timesteps),
                                                 unhealthy_images=unhealthy_images, fail_reason=fail_reason))


class FakeEvaluator:
    """Stands in for ScheduleEvaluator: counts calls, can fail, crash, sleep and log each evaluation to a file."""

    def __init__(self, fail=(), crash=(), delay: float = 0.0, log: str | None = None):
        self.calls: Counter = Counter()
        self.fail, self.crash, self.delay, self.log = set(fail), set(crash), delay, log

    def evaluate(self, levels):
        from qsched_search.results.records import Estimate

        key = ",".join(levels)
        self.calls[key] += 1
        if self.delay:
            time.sleep(self.delay)
        if self.log:
            with open(self.log, "a") as f:
                f.write(key + "\n")
        timesteps = list(range(999, 0, -1000 // len(levels)))[: len(levels)]
        if key in self.crash:
            raise RuntimeError("kernel exploded")
        if key in self.fail:
            return fake_evaluation(levels, timesteps, unhealthy_images=8, fail_reason="8/8 images unusable (nan)")
        v = true_quality(levels)
        return fake_evaluation(levels, timesteps, {"lpips": Estimate(v, 0.9 * v, 1.1 * v, 8)})


def fake_costs():
    from qsched_search.quant.costs import CostTable

    return CostTable({"bops": BOPS, "memory": MEMORY, "latency": None})


def make_search(evaluate, *, steps=3, budget=0.5, sampler="auto", trials=None, storage=None, seed=0, warm_start=(),
                study_name=None, known=None, choices=LEVELS, costs=None):
    """A `ScheduleSearch` over the fake levels and costs, minimising lpips."""
    from qsched_search.search.study import ScheduleSearch

    return ScheduleSearch(evaluate, choices=choices, reference="fp32", steps=steps, metric="lpips",
                          higher_is_better=False, costs=costs or fake_costs(), cost_model="bops", budget=budget,
                          storage=storage, study_name=study_name, sampler=sampler, trials=trials, seed=seed,
                          fingerprint={"test": "fake"}, warm_start=warm_start, known=known)


# ------------------------------------------------------------------------------------------------ metric weights


def default_weights_or_skip() -> Path:
    """The default weights folder; skipped when it was never fetched, except in CI where it must exist."""
    from qsched_search.eval import weights

    folder = weights.weights_dir(None)
    bad = [s for s in weights.check(folder) if s.status != "ok"]
    if bad:
        reason = f"weights not fetched in {folder} ({', '.join(s.name for s in bad)}); run `qsched weights fetch`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return folder
