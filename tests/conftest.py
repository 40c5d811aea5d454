"""Shared fixtures: tiny random-weight pipelines built in code, and the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_tiny_sd_pipeline(scheduler: str = "euler-ancestral"):
    """A StableDiffusionPipeline of the SD-Turbo architecture with a few thousand random weights.

    Built the way diffusers' own tests build theirs; the tokenizer is the embedded model's (no hub files).
    """
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


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """The tiny pipeline saved with save_pretrained: loaded through the same code path as a hub model."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline().save_pretrained(folder)
    return folder
