"""LoRAs: loaded with diffusers' own loader and fused before any bank, refused when they do nothing, recorded in
schedule.json, warned about when a pipeline's LoRAs differ, and reproduced bit for bit by apply_schedule."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qsched_search.errors import QschedError
from qsched_search.pipeline.loading import load_model
from qsched_search.pipeline.lora import EffectCheck, LoraSpec, apply_loras, fuse_loaded_loras, lora_mismatch
from qsched_search.pipeline.rollout import make_eval_set
from qsched_search.quant.levels import load_menu
from qsched_search.quant.sim_bank import SimulatedBank
from qsched_search.resources import PACKAGE_DIR
from tests.helpers import FAMILIES, make_schedule

pytest.importorskip("peft")

SHIPPED = PACKAGE_DIR / "models" / "fmnist-lora-mirror-classes"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def write_lora(pipe, folder, *, zero: bool = False, seed: int = 1, targets=TARGETS):
    """A random rank-2 LoRA of `pipe`'s denoiser, saved with the pipeline class's `save_lora_weights`; with `zero`,
    peft's default initialisation (B = 0): a LoRA that changes nothing. The pipeline is left without it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = getattr(pipe, name)
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=True if zero else False,
                                    target_modules=targets), adapter_name="made")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name="made"))
    type(pipe).save_lora_weights(str(folder), **{f"{name}_lora_layers": layers}, safe_serialization=True)
    denoiser.delete_adapters("made")
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def family_loras(tmp_path_factory):
    """Each family's tiny pipeline (save_pretrained) and a random LoRA for it."""
    root = tmp_path_factory.mktemp("lora-families")
    out = {}
    for name, (build, folder, _, _) in FAMILIES.items():
        pipe = build()
        pipe.save_pretrained(root / folder)
        out[name] = (root / folder, write_lora(pipe, root / f"{folder}-lora"))
    return out


def _check(call_kwargs, steps=1, samples=2):
    return EffectCheck(steps, make_eval_set(["sneaker", "bag"], samples, seed=0), call_kwargs=call_kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_loads_fuses_and_quantizes_a_lora(family, family_loras):
    folder, lora_file = family_loras[family]
    call_kwargs = FAMILIES[family][3]
    model = load_model(str(folder))
    loras = apply_loras(model, [f"{lora_file}:0.5"], check=_check(call_kwargs))
    lora = loras.loras[0]
    assert lora.spec.scale == 0.5 and len(lora.sha256) == 64
    assert sum(lora.matched.values()) == lora.expected_modules > 0  # every module the file adapts was matched
    assert lora.effect["mean_abs_diff"] > lora.effect["noise_floor_mean_abs_diff"]
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.denoiser.modules())  # a bank sees plain layers
    # The fused weights are those of diffusers' own load_lora_weights + fuse_lora, bit for bit.
    stock = load_model(str(folder)).pipe
    stock.load_lora_weights(str(lora_file.parent))
    stock.fuse_lora(lora_scale=0.5)
    stock_denoiser = getattr(stock, model.family.denoiser)
    base = load_model(str(folder)).denoiser
    for name in loras.modules:
        ours = model.denoiser.get_submodule(name).weight
        assert torch.equal(ours, stock_denoiser.get_submodule(name).base_layer.weight), name
        assert not torch.equal(ours, base.get_submodule(name).weight), name
    bank = SimulatedBank(model.denoiser, load_menu(), ["w8a8"], "fp32", list(model.family.exclude))
    try:
        quantized = set(bank.quantized_layers["w8a8"])
        assert quantized & set(loras.modules)  # the bank rounds the fused weights
    finally:
        bank.remove()


def test_a_lora_that_changes_nothing_is_refused_with_one_line(family_loras, tmp_path):
    folder, lora_file = family_loras["sd-turbo"]
    call_kwargs = FAMILIES["sd-turbo"][3]
    zero = write_lora(load_model(str(folder)).pipe, tmp_path / "zero", zero=True)
    with pytest.raises(QschedError, match=r"--lora .*zero.* changes nothing: in every one of its 32 matched modules "
                                          r"\(unet 32\) its A or B matrix is all zero"):
        apply_loras(load_model(str(folder)), [str(zero)])
    # So small a scale that the fused weights round to the base model's: the images are the base model's.
    with pytest.raises(QschedError, match=r"changes nothing visible: .* differ from the base model's by 0 .* not more "
                                          r"than the noise floor 0; it matched unet 32 at scale 1e-30"):
        apply_loras(load_model(str(folder)), [f"{lora_file}:1e-30"], check=_check(call_kwargs))
    # A LoRA of another model's modules.
    flux_lora = family_loras["flux-schnell"][1]
    with pytest.raises(QschedError, match=r"--lora .*tiny-flux-lora.*(matched no module|could not load it)") as info:
        apply_loras(load_model(str(folder)), [str(flux_lora)])
    assert "\n" not in str(info.value)
    # Modules that exist in neither model.
    other = write_lora(load_model(str(folder)).pipe, tmp_path / "ff", targets=["ff.net.2"])
    model = load_model(str(folder))
    renamed = {k.replace("ff.net.2", "ff.net.9"): v for k, v in
               __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(other)).items()}
    from safetensors.torch import save_file

    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(QschedError, match=r"renamed.safetensors matched no module of StableDiffusionPipeline "
                                          r"\(unet, text_encoder\): its target modules, such as '.*ff.net.9.*', are not"):
        apply_loras(model, [str(tmp_path / "renamed.safetensors")])


def test_lora_specs_parse_and_refuse_bad_input(tmp_path):
    assert LoraSpec.parse("org/name:0.8") == LoraSpec("org/name", 0.8)
    assert LoraSpec.parse("style.safetensors") == LoraSpec("style.safetensors", 1.0)
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert LoraSpec.parse(str(odd)).source == str(odd)  # an existing path is never split at ':'
    with pytest.raises(QschedError, match=r"--lora 'x.safetensors:strong': the part after the last ':' must be a scale"):
        LoraSpec.parse("x.safetensors:strong")
    with pytest.raises(QschedError, match=r"--lora x:0 fuses nothing"):
        LoraSpec.parse("x:0")
    with pytest.raises(QschedError, match=r"--lora '/nonexistent/l.safetensors' not found"):
        from qsched_search.pipeline.lora import resolve_lora_file

        resolve_lora_file("/nonexistent/l.safetensors")


def test_schedule_records_loras_and_old_files_still_load(family_loras, tmp_path):
    from qsched_search.results.schedule import load_schedule, save_schedule

    folder, lora_file = family_loras["lcm"]
    model = load_model(str(folder))
    loras = apply_loras(model, [str(lora_file)], check=_check(FAMILIES["lcm"][3]))
    section = loras.to_dict()
    assert section["adapters"][0]["sha256"] == loras.loras[0].sha256 and section["modules_sha256"]
    path = save_schedule(make_schedule(extras={"loras": section}), tmp_path / "schedule.json")
    back = load_schedule(path).loras
    assert back["adapters"][0] == {**json.loads(json.dumps(section["adapters"][0])),
                                   "effect": {**section["adapters"][0]["effect"], "psnr_db": back["adapters"][0]["effect"]["psnr_db"]}}
    assert back["adapters"][0]["id"] == str(lora_file) and back["adapters"][0]["scale"] == 1.0
    assert back["modules"] == section["modules"] and back["modules_sha256"] == section["modules_sha256"]
    # A file of the previous release (no loras section) loads as measured without LoRAs.
    old = make_schedule().to_dict()
    old.pop("loras", None)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_schedule(tmp_path / "old.json").loras is None
    bad = {**make_schedule().to_dict(), "loras": {**section, "adapters": [{**section["adapters"][0], "sha256": "xyz"}]}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(QschedError, match=r"field loras.adapters\[0\].sha256 = \"xyz\" is invalid"):
        load_schedule(tmp_path / "bad.json")


def test_apply_schedule_warns_once_when_the_pipeline_has_other_loras(family_loras, tmp_path, caplog):
    from qsched_search import apply_schedule

    folder, lora_file = family_loras["sd-turbo"]
    model = load_model(str(folder))
    loras = apply_loras(model, [str(lora_file)])
    schedule = make_schedule(levels=("w8a8", "fp32"), steps=2, timesteps=(999, 499), budget=0.9, extras={"loras": loras.to_dict()})
    other = write_lora(load_model(str(folder)).pipe, tmp_path / "other", seed=7)

    def warnings_with(lora_dir, scale=1.0):
        pipe = load_model(str(folder)).pipe
        if lora_dir is not None:
            pipe.load_lora_weights(str(lora_dir))
            pipe.set_adapters(pipe.get_active_adapters(), [scale])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qsched_search"):
            applied = apply_schedule(pipe, schedule, menu=load_menu())
        applied.remove()
        return [r.getMessage() for r in caplog.records if "LoRA" in r.getMessage()]

    assert warnings_with(lora_file.parent) == []  # the same LoRA, loaded by the user: no warning
    for lora_dir, scale, expect in ((None, 1.0, "this pipeline has no LoRA adapters"),
                                    (other.parent, 1.0, "this pipeline has adapter(s) default_0 on 32 modules"),
                                    (lora_file.parent, 0.5, "its weights in the LoRA's modules differ")):
        lines = warnings_with(lora_dir, scale)
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert lines[0].startswith(f"the schedule was measured with LoRA {lora_file}") and expect in lines[0], lines
    # A schedule measured without LoRAs, on a pipeline with one.
    assert "the schedule was measured without LoRAs" in lora_mismatch(None, model.denoiser, loras.fused, "unet")


def test_apply_schedule_fuses_a_loaded_lora_and_remove_restores_the_pipeline(family_loras):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qsched_search import apply_schedule

    folder, lora_file = family_loras["sd-turbo"]
    pipe = load_model(str(folder)).pipe
    pipe.load_lora_weights(str(lora_file.parent))
    wrapped = {n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    schedule = make_schedule(levels=("w8a8", "fp32"), steps=2, timesteps=(999, 499), budget=0.9)
    applied = apply_schedule(pipe, schedule, menu=load_menu())
    try:
        assert applied.loras is not None and set(applied.loras.modules) == wrapped
        assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
        assert set(applied.bank.quantized_layers["w8a8"]) & wrapped
    finally:
        applied.remove()
    assert {n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)} == wrapped
    after = pipe.unet.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)  # unfused: float rounding only
    assert fuse_loaded_loras(load_model(str(folder)).pipe, "unet") is None


def test_the_shipped_lora_fuses_into_the_real_kernel_bank():
    pytest.importorskip("torchao")
    from qsched_search.quant.torchao_bank import RealKernelBank

    model = load_model("embedded", dtype="bfloat16")
    base_weights = {n: m.weight.clone() for n, m in model.denoiser.named_modules() if n.endswith("attn2.to_k")}
    loras = apply_loras(model, [str(SHIPPED)])
    assert all(not torch.equal(model.denoiser.get_submodule(n).weight, w) for n, w in base_weights.items())
    bank = RealKernelBank(model.denoiser, load_menu(), ["w8a16"], "bf16", list(model.family.exclude), compile="none")
    try:
        assert set(bank.quantized_layers["w8a16"]) & set(loras.modules)
    finally:
        bank.remove()


# ------------------------------------------------------------------------------------------------ end to end

SETTINGS = ["--steps", "2", "--precisions", "w4a4", "--samples", "4", "--seed", "3", "--lora", str(SHIPPED)]


@pytest.fixture(scope="module")
def searched_with_lora(tmp_path_factory):
    from qsched_search.cli.app import app
    from qsched_search.results.layout import ResultsDir

    out = tmp_path_factory.mktemp("lora-search")
    result = CliRunner().invoke(app, ["search", *SETTINGS, "--budget", "0.9", "--images", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"LoRA {SHIPPED} (scale 1" in result.output and "unet 14 modules" in result.output
    return ResultsDir(out)


def test_search_with_a_lora_records_it_and_apply_schedule_reproduces_its_images(searched_with_lora):
    import pandas as pd

    from qsched_search import apply_schedule
    from qsched_search.results.images import to_uint8
    from qsched_search.results.schedule import load_schedule

    schedule = load_schedule(searched_with_lora.schedule)
    assert [a["id"] for a in schedule.loras["adapters"]] == [str(SHIPPED)]
    assert schedule.loras["effect"]["mean_abs_diff"] > schedule.loras["effect"]["noise_floor_mean_abs_diff"]
    model = load_model("embedded")
    pipe = model.pipe
    pipe.load_lora_weights(str(SHIPPED))  # a user's own LoRA pipeline
    eval_set = make_eval_set(model.family.default_prompts, 4, 3)
    applied = apply_schedule(pipe, schedule)
    try:
        images = pipe(prompt=list(eval_set.prompts), num_inference_steps=2, output_type="pt",
                      generator=[torch.Generator().manual_seed(s) for s in eval_set.seeds],
                      **model.family.call_defaults).images
    finally:
        applied.remove()
    index = pd.read_csv(searched_with_lora.images_index)
    made = index[index.label == "schedule"].sort_values("sample")
    assert len(made) == 4
    for row in made.itertuples():
        expected = np.asarray(Image.open(searched_with_lora.images_dir / row.file))
        assert np.array_equal(expected, to_uint8(images[row.sample])), row.file


def test_report_lists_the_loras(searched_with_lora):
    from qsched_search.cli.app import app

    result = CliRunner().invoke(app, ["report", str(searched_with_lora.root), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((searched_with_lora.root / "report.json").read_text())
    assert [a["id"] for a in summary["loras"]["adapters"]] == [str(SHIPPED)]
    result = CliRunner().invoke(app, ["report", str(searched_with_lora.root), "--format", "md"])
    assert result.exit_code == 0, result.output
    text = (searched_with_lora.root / "report.md").read_text()
    assert f"| **LoRAs** | {SHIPPED} (scale 1)" in text, text
