"""Every model family: a tiny random-weight pipeline of its architecture, saved and loaded by path, switched per step."""

from __future__ import annotations

import pytest
import torch

from qsched_search.errors import QschedError
from qsched_search.pipeline.families import detect_family, load_family
from qsched_search.pipeline.loading import load_model
from qsched_search.pipeline.rollout import Runner, make_eval_set
from qsched_search.quant.bank import default_compile
from qsched_search.quant.levels import load_menu
from qsched_search.quant.sim_bank import SimulatedBank
from qsched_search.quant.targets import repeated_block_prefixes
from tests.helpers import FAMILIES, build_tiny_sd_pipeline

@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """Each family's tiny pipeline written with save_pretrained, loaded later through the hub-id code path."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for name, (build, folder, _, _) in FAMILIES.items():
        folders[name] = root / folder
        build().save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_by_path_and_switches_per_step(family, family_folders):
    _, _, denoiser_cls, call_kwargs = FAMILIES[family]
    model = load_model(str(family_folders[family]))
    assert model.family.family == family
    assert type(model.denoiser).__name__ == denoiser_cls
    menu = load_menu()
    bank = SimulatedBank(model.denoiser, menu, ["w4a4"], "fp32", list(model.family.exclude))
    try:
        assert not any(name in bank.layers for name in ("conv_in", "conv_out", "x_embedder", "proj_out"))
        # Target torchao: Linear layers only, and with the regional compile the model declares, only inside its
        # repeated blocks.
        quantized = bank.quantized_layers["w4a4"]
        assert quantized and all(type(bank.layers[n].inner).__name__ == "Linear" for n in quantized)
        assert bank.compile == default_compile(model.denoiser) == "regional"
        assert all(n.startswith(repeated_block_prefixes(model.denoiser)) for n in quantized)
        runner = Runner(model, bank, steps=2, eval_set=make_eval_set(["sneaker", "bag"], 2, seed=3),
                        call_kwargs=call_kwargs)
        bank.calls.clear()
        mixed = runner.run(["w4a4", "fp32"])
        assert bank.calls == {"w4a4": 1, "fp32": 1}  # one batched denoiser call per step, at the step's level
        assert bank.active == "fp32"
        assert len(mixed.timesteps) == 2 and mixed.timesteps[0] > mixed.timesteps[1]
        reference = runner.run(["fp32", "fp32"]).images
        torch.testing.assert_close(runner.run(["fp32", "fp32"]).images, reference, atol=1e-6, rtol=0)
        assert torch.isfinite(mixed.images).all()
        assert not torch.equal(mixed.images, reference)  # the level of step 0 changes the image
    finally:
        bank.remove()


def test_family_settings_are_read_from_configs():
    flux = load_family("flux-schnell")
    assert flux.denoiser == "transformer" and flux.timestep_scale == 1000
    assert flux.call_defaults["guidance_scale"] == 0.0
    for name in FAMILIES:
        family = load_family(name)
        assert family.metrics and family.scheduler["class"]
    assert load_family("sd-turbo").scheduler["config"]["timestep_spacing"] == "trailing"


def test_generic_sd_pipeline_keeps_the_stable_diffusion_family(tiny_sd_folder):
    # Same classes as SD-Turbo, but not loaded from an sd-turbo id or folder: the generic family.
    assert load_model(str(tiny_sd_folder)).family.family == "stable-diffusion"
    assert detect_family(build_tiny_sd_pipeline(), model_id="stabilityai/sd-turbo").family == "sd-turbo"
    assert detect_family(build_tiny_sd_pipeline(), model_id="/models/sd-turbo-finetunes/my-model").family == "stable-diffusion"


def test_explicit_family_overrides_detection_and_unknown_pipelines_fail(tiny_sd_folder):
    assert load_model(str(tiny_sd_folder), family="sd-turbo").family.family == "sd-turbo"

    class NotAPipeline:
        scheduler = None

    with pytest.raises(QschedError, match="no model family lists pipeline class 'NotAPipeline'"):
        detect_family(NotAPipeline())


def test_make_scheduler_builds_the_family_scheduler_and_check_warns(caplog):
    pipe = build_tiny_sd_pipeline()
    pcm = load_family("pcm")
    assert not pcm.check_scheduler(pipe)
    assert "TCDScheduler" in caplog.text
    scheduler = pcm.make_scheduler(pipe)
    assert type(scheduler).__name__ == "TCDScheduler" and scheduler.config.timestep_spacing == "trailing"
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"  # not installed behind the caller's back


def test_apply_schedule_on_flux_picks_levels_by_unscaled_timestep(family_folders):
    from qsched_search.pipeline.apply import apply_schedule
    from qsched_search.results.schedule import Quality, Schedule

    model = load_model(str(family_folders["flux-schnell"]))
    call = dict(FAMILIES["flux-schnell"][3], num_inference_steps=3, guidance_scale=0.0, output_type="pt")
    seen: list[int] = []
    model.pipe(["bag"], generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, kw: (seen.append(int(t)), kw)[1], **call)
    assert len(seen) == 3 and seen[1] == 666  # FLUX timesteps are floats (666.67): the schedule holds int(t)
    schedule = Schedule(levels=("w4a4", "fp32", "w4a4"), steps=3, timesteps=tuple(seen), reference="fp32",
                        model_id="tiny-flux", weights_sha256="0" * 64, budget=1.0, cost_model="bops",
                        cost={"bops": 0.5, "memory": 0.5, "latency": None},
                        quality=Quality("lpips", 0.1, None, None, 1, False), provenance={})
    applied = apply_schedule(model.pipe, schedule, menu=load_menu())
    try:
        scheduled = model.pipe(["bag"], generator=torch.Generator().manual_seed(0), **call).images
        assert applied.bank.calls == {"w4a4": 2, "fp32": 1}
    finally:
        applied.remove()
    plain = model.pipe(["bag"], generator=torch.Generator().manual_seed(0), **call).images
    assert not torch.equal(scheduled, plain)
    with pytest.raises(QschedError, match="runs 2 denoising steps but the schedule has 3; run it with num_inference_steps=3"):
        applied = apply_schedule(model.pipe, schedule, menu=load_menu())
        try:
            model.pipe(["bag"], generator=torch.Generator().manual_seed(0), **{**call, "num_inference_steps": 2})
        finally:
            applied.remove()


def test_commands_take_the_family_by_name(tiny_sd_folder, tmp_path):
    """--family overrides detection on every command that loads a model; an unknown name is a one-line error."""
    import json

    from typer.testing import CliRunner

    from qsched_search.cli.app import app

    args = ["probe", "--model", str(tiny_sd_folder), "--steps", "1", "--samples", "2", "--batch-size", "2",
            "--precisions", "w8a8", "--metrics", "psnr", "--prompts", "a shoe"]
    result = CliRunner().invoke(app, [*args, "--family", "sd-turbo", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert json.dumps(manifest).count('"family": "sd-turbo"') >= 1
    result = CliRunner().invoke(app, [*args, "--family", "nosuch", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "unknown model family 'nosuch'" in result.output
    assert not (tmp_path / "q" / "probe.csv").exists()
    for command in ("search", "generate", "calibrate"):
        assert "--family" in CliRunner().invoke(app, [command, "--help"]).output
