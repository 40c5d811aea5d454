"""The embedded default: loads offline from the package, is a few-step model, and its judge recognises its samples."""

from __future__ import annotations

import shutil

import pytest
import torch

from qsched_search.embedded.judge import load_judge
from qsched_search.embedded.vocab import CLASS_NAMES, build_clip_tokenizer
from qsched_search.errors import QschedError
from qsched_search.pipeline.loading import load_model
from qsched_search.resources import EMBEDDED_JUDGE_DIR, EMBEDDED_MODEL_DIR


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded")


def test_embedded_model_is_a_stock_diffusers_pipeline(embedded, monkeypatch):
    pipe = embedded.pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20


def test_tokenizer_spells_each_class_as_whole_words():
    tok = build_clip_tokenizer()
    for name in CLASS_NAMES:
        ids = tok(name).input_ids[1:-1]
        assert len(ids) == len(name.replace("-", " - ").split())
        assert tok.unk_token_id not in ids or name == ""


@pytest.mark.parametrize("steps", [4])
def test_four_step_samples_are_recognised_as_their_class(embedded, steps):
    judge = load_judge(EMBEDDED_JUDGE_DIR)
    prompts = [name for name in CLASS_NAMES for _ in range(3)]
    generators = [torch.Generator().manual_seed(1000 + k) for k in range(len(prompts))]
    images = embedded.pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, height=32, width=32,
                           generator=generators, output_type="pt").images
    with torch.no_grad():
        predicted = judge(images[:, :, 2:30, 2:30].float()).argmax(1)
    labels = torch.tensor([CLASS_NAMES.index(p) for p in prompts])
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy >= 0.8, f"only {accuracy:.0%} of 4-step samples were classified as their prompt"


def test_one_step_sampling_runs_and_differs_from_four(embedded):
    gen = lambda: [torch.Generator().manual_seed(3)]  # noqa: E731
    one = embedded.pipe(["bag"], num_inference_steps=1, guidance_scale=0.0, height=32, width=32, generator=gen(), output_type="pt").images
    four = embedded.pipe(["bag"], num_inference_steps=4, guidance_scale=0.0, height=32, width=32, generator=gen(), output_type="pt").images
    assert one.shape == four.shape == (1, 1, 32, 32)
    assert not torch.equal(one, four)


def test_corrupt_embedded_copy_gives_one_line_error(tmp_path):
    copy = tmp_path / "fmnist-lcm"
    shutil.copytree(EMBEDDED_MODEL_DIR, copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QschedError, match="could not load model") as err:
        load_model(str(copy))
    assert "\n" not in str(err.value)
    (copy / "model_index.json").unlink()
    with pytest.raises(QschedError, match="no model_index.json"):
        load_model(str(copy))
