"""Loading pipelines by path, running schedules, and the per-step level switching on real diffusers pipelines."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qsched_search.bank import PrecisionBank
from qsched_search.errors import QschedError
from qsched_search.models import load_model
from qsched_search.precisions import load_menu
from qsched_search.rollout import Runner, image_problems, make_eval_set


@pytest.fixture(scope="module")
def tiny(tiny_sd_folder):
    model = load_model(str(tiny_sd_folder))
    bank = PrecisionBank(model.denoiser, load_menu(), ["w8a8", "w4a4"], "fp32", list(model.family.exclude))
    runner = Runner(model, bank, steps=3, eval_set=make_eval_set(["sneaker", "bag"], 4, seed=7),
                    call_kwargs={"guidance_scale": 0.0, "height": 32, "width": 32})
    yield model, bank, runner
    bank.remove()


def test_local_folder_loads_through_diffusers_with_its_family(tiny):
    model, bank, _ = tiny
    assert type(model.pipe).__name__ == "StableDiffusionPipeline"
    assert model.family.family == "stable-diffusion"
    assert "conv_in" not in bank.layers and "conv_out" not in bank.layers
    assert any(name.endswith("to_q") for name in bank.layers)


def test_each_step_runs_at_its_level(tiny):
    _, bank, runner = tiny
    bank.calls.clear()
    result = runner.run(["w4a4", "fp32", "w8a8"])
    assert bank.calls == {"w4a4": 1, "fp32": 1, "w8a8": 1}  # one batched call per step
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
