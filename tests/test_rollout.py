"""Loading pipelines by path, running schedules, and the per-step level switching on real diffusers pipelines."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qsched_search.errors import QschedError
from qsched_search.eval.health import MAX_UNHEALTHY_FRACTION, health_failure, image_problems
from qsched_search.pipeline.loading import load_model
from qsched_search.pipeline.rollout import Runner, capture_denoiser_call, make_eval_set
from qsched_search.pipeline.switching import HOOK_NAME
from qsched_search.quant.levels import load_menu
from qsched_search.quant.sim_bank import SimulatedBank

CALL = {"guidance_scale": 0.0, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def tiny(tiny_sd_folder):
    model = load_model(str(tiny_sd_folder))
    eval_set = make_eval_set(["sneaker", "bag"], 4, seed=7)
    # What open_session does: one recorded denoiser call at the evaluation's batch size builds the bank.
    calibration = capture_denoiser_call(model.pipe, model.denoiser, {**CALL, "prompt": list(eval_set.prompts),
                                                                     "num_inference_steps": 3})
    bank = SimulatedBank(model.denoiser, load_menu(), ["w8a8", "w4a4"], "fp32", list(model.family.exclude),
                         calibration=calibration)
    runner = Runner(model, bank, steps=3, eval_set=eval_set, call_kwargs=CALL)
    yield model, bank, runner
    bank.remove()


def test_local_folder_loads_through_diffusers_with_its_family(tiny):
    model, bank, _ = tiny
    assert type(model.pipe).__name__ == "StableDiffusionPipeline"
    assert model.family.family == "stable-diffusion"
    assert "conv_in" not in bank.layers and "conv_out" not in bank.layers
    assert any(name.endswith("to_q") for name in bank.layers)
    # Target torchao with the regional compile the UNet declares: only Linear layers inside its transformer blocks.
    assert bank.compile == "regional"
    for level in ("w8a8", "w4a4"):
        layers = bank.quantized_layers[level]
        assert layers and all(".transformer_blocks." in name for name in layers)
        assert all(type(bank.layers[name].inner).__name__ == "Linear" for name in layers)
    assert not any("time_emb_proj" in name or "time_embedding" in name for name in bank.layers)
    assert bank.level_costs()["w4a4"]["bops"] < bank.level_costs()["w8a8"]["bops"] < 1


def test_each_step_runs_at_its_level(tiny):
    _, bank, runner = tiny
    bank.calls.clear()
    seen = []
    denoiser = bank.denoiser
    # conv_in runs inside the denoiser's forward, after the hooks picked the call's level.
    handle = denoiser.conv_in.register_forward_pre_hook(
        lambda module, args: seen.append((bank.active, denoiser._diffusers_hook.get_hook(HOOK_NAME) is not None)))
    try:
        result = runner.run(["w4a4", "fp32", "w8a8"])
    finally:
        handle.remove()
    assert bank.calls == {"w4a4": 1, "fp32": 1, "w8a8": 1}  # one batched call per step
    # The schedule hook set each call's level before the denoiser ran, and is removed after the run.
    assert seen == [("w4a4", True), ("fp32", True), ("w8a8", True)]
    assert denoiser._diffusers_hook.get_hook(HOOK_NAME) is None
    assert bank.active == "fp32"  # reset after the run
    assert result.images.shape == (4, 3, 32, 32)
    assert len(result.timesteps) == 3 and result.timesteps == sorted(result.timesteps, reverse=True)


def test_same_schedule_same_images_and_levels_change_images(tiny):
    _, _, runner = tiny
    a = runner.run(["fp32"] * 3).images
    b = runner.run(["fp32"] * 3).images
    c = runner.run(["fp32", "fp32", "w4a4"]).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_do_not_depend_on_batching(tiny):
    model, bank, runner = tiny
    one_by_one = Runner(model, bank, 3, runner.eval_set, batch_size=1, call_kwargs=runner.call_kwargs)
    torch.testing.assert_close(one_by_one.run(["fp32"] * 3).images, runner.run(["fp32"] * 3).images, atol=1e-4, rtol=0)
    # Dynamic activation rounding can flip a bin on float noise from batched kernels: close, not equal.
    diff = (one_by_one.run(["w8a8"] * 3).images - runner.run(["w8a8"] * 3).images).abs()
    assert diff.mean() < 1e-3 and diff.max() < 2e-2


def test_schedule_length_and_names_are_checked(tiny):
    _, _, runner = tiny
    with pytest.raises(QschedError, match="2 levels for 3 steps"):
        runner.run(["fp32", "fp32"])
    with pytest.raises(QschedError, match="unknown precision 'int3'"):
        runner.run(["fp32", "int3", "fp32"])


def test_image_problems_flags_nan_blank_and_noise():
    torch.manual_seed(0)
    smooth = torch.linspace(0, 1, 32).repeat(3, 32, 1)
    nan = smooth.clone()
    nan[0, 0, 0] = float("nan")
    batch = torch.stack([smooth, nan, torch.full_like(smooth, 0.5), torch.rand_like(smooth)])
    assert image_problems(batch) == [None, "nan", "blank", "noise"]
    # A few unusable images are left out of the metrics; more than MAX_UNHEALTHY_FRACTION fail the run.
    ok = [None] * 20
    assert health_failure(ok) is None
    assert health_failure(["nan"] * int(MAX_UNHEALTHY_FRACTION * 20) + ok[: 20 - int(MAX_UNHEALTHY_FRACTION * 20)]) is None
    assert health_failure(["nan", "noise", "nan"] + ok[:17]) == "3/20 images unusable (nan, noise)"


def test_missing_and_corrupt_model_folders_give_one_line_errors(tmp_path, tiny_sd_folder):
    with pytest.raises(QschedError, match="no such folder") as err:
        load_model(str(tmp_path / "nope"))
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(QschedError, match="model_index.json is not valid JSON"):
        load_model(str(broken))
    (broken / "model_index.json").write_text(json.dumps(json.loads((tiny_sd_folder / "model_index.json").read_text())))
    shutil.rmtree(broken / "unet")
    with pytest.raises(QschedError, match="lacks component folder 'unet'"):
        load_model(str(broken))
    (broken / "unet").mkdir()
    (broken / "unet" / "config.json").write_text("{}")
    with pytest.raises(QschedError, match="could not load model") as err:
        load_model(str(broken))
    assert "\n" not in str(err.value)
