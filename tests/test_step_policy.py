"""`qsched export --format diffusers-step-policy`: the fields diffusers and vLLM-Omni read, written and read back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from qsched_search.cli.app import app
from qsched_search.errors import QschedError
from qsched_search.quant.levels import Level, load_menu
from qsched_search.results.schedule import save_schedule
from qsched_search.results.step_policy import (export_step_policy, policy_modes, read_step_policy, schedule_modes,
                                               to_step_policy)
from tests.helpers import make_schedule

# The policy of NVIDIA's Cosmos3 FP8 checkpoints, as diffusers' and vLLM-Omni's tests hold it (first and last 3
# steps a16); only `reasoner` differs from what an export writes.
COSMOS3 = {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
           "scope": ["transformer"], "default_mode": "native", "first_steps": {"count": 3, "mode": "a16"},
           "last_steps": {"count": 3, "mode": "a16"}, "overlap": "a16", "reasoner": "a16"}


def _menu():
    """The packaged menu plus fp8a16: float8_e4m3fn weights with 16-bit activations (an FP8 checkpoint's W8A16)."""
    menu = load_menu()
    a16 = Level("fp8a16", "float8", 8, 16, dtype="float8_e4m3fn", weight_granularity="per_channel")
    return type(menu)(levels={**menu.levels, "fp8a16": a16}, source="test", target=menu.target,
                      extra_exclude=menu.extra_exclude)


def test_levels_map_by_definition_and_the_a16_level_leaves_activations_alone():
    menu = _menu()
    assert schedule_modes(["fp8a16", "fp8", "fp8", "fp8a16"], menu) == ["a16", "native", "native", "a16"]
    assert not menu["fp8a16"].quantizes_activations and menu["fp8"].quantizes_activations
    with pytest.raises(QschedError, match=r"cannot express level bf16 at step 0, 3 \(weights and activations rounded "
                                          r"to bfloat16\); w8a8 at step 1 \(W8 int8 .*\): it has only native"):
        schedule_modes(["bf16", "w8a8", "fp8", "bf16"], menu)


def test_policy_fields_and_the_diffusers_step_rule():
    menu = _menu()
    policy = to_step_policy(["fp8a16", "fp8", "fp8", "fp8a16"], menu)
    assert list(policy) == list(COSMOS3) and {**policy, "reasoner": "a16"} != COSMOS3
    assert policy["first_steps"] == {"count": 1, "mode": "a16"} and policy["last_steps"] == {"count": 1, "mode": "a16"}
    # diffusers' use_high_precision on COSMOS3 at 50 steps: [0, 1, 2, 47, 48, 49]; a one-step run is native.
    assert [i for i, m in enumerate(policy_modes(COSMOS3, 50)) if m == "a16"] == [0, 1, 2, 47, 48, 49]
    assert policy_modes(COSMOS3, 1) == ["native"] and policy_modes(COSMOS3, 4) == ["a16"] * 4
    for levels in (["fp8"] * 4, ["fp8a16"] * 4, ["fp8a16", "fp8a16", "fp8", "fp8"], ["fp8", "fp8a16"], ["fp8"]):
        assert policy_modes(to_step_policy(levels, menu), len(levels)) == schedule_modes(levels, menu), levels
    with pytest.raises(QschedError, match=r"cannot express the step pattern native, a16, native, native"):
        to_step_policy(["fp8", "fp8a16", "fp8", "fp8"], menu)
    with pytest.raises(QschedError, match=r"cannot express a one-step a16 schedule"):
        to_step_policy(["fp8a16"], menu)


def test_export_round_trips_through_a_checkpoint_config(tmp_path):
    menu = _menu()
    schedule = replace(make_schedule(), levels=("fp8a16", "fp8", "fp8", "fp8a16"), extras={"menu": menu.to_dict()})
    path = save_schedule(schedule, tmp_path / "schedule.json")
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "transformer").mkdir(parents=True)
    config = {"_class_name": "Cosmos3Transformer", "num_layers": 2,
              "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8", "runtime": None}}
    (checkpoint / "transformer" / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["export", "--format", "diffusers-step-policy", str(path), str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "first 1 and last 1 steps a16" in result.output and "a16, native, native, a16" in result.output
    written = json.loads((checkpoint / "transformer" / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "quantization_config"} == {"_class_name": "Cosmos3Transformer",
                                                                               "num_layers": 2}
    quant = written["quantization_config"]
    assert quant["quant_method"] == "modelopt" and quant["quant_algo"] == "FP8"
    assert quant["runtime"]["diffusion_step_policy"] == read_step_policy(checkpoint) == to_step_policy(
        schedule.levels, menu)
    # A new file gets only the fragment to merge into transformer/config.json.
    fragment = export_step_policy(schedule.levels, menu, tmp_path / "fragment.json")
    assert json.loads(fragment.read_text()) == {"quantization_config": {"runtime": {"diffusion_step_policy":
                                                                                    to_step_policy(schedule.levels, menu)}}}


def test_export_refuses_what_the_policy_cannot_say_in_one_line(tmp_path):
    path = save_schedule(make_schedule(), tmp_path / "schedule.json")  # w8a8, fp32, w4a8, w4a4
    result = CliRunner().invoke(app, ["export", "--format", "diffusers-step-policy", str(path), str(tmp_path / "o.json")])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot express level w8a8 at step 0" in lines[0] and "w4a4 at step 3" in lines[0]
    assert not (tmp_path / "o.json").exists()
    nvfp4 = tmp_path / "nvfp4.json"
    nvfp4.write_text(json.dumps({"quantization_config": {"quant_algo": "NVFP4"}}))
    with pytest.raises(QschedError, match=r"quant_algo is 'NVFP4'; diffusers reads a diffusion_step_policy only from a "
                                          r"ModelOpt FP8 checkpoint"):
        export_step_policy(["fp8"] * 2, _menu(), nvfp4)


def test_reading_fails_closed_like_vllm_omni(tmp_path):
    def config(policy):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"quantization_config": {"runtime": {"diffusion_step_policy": policy}}}))
        return path

    assert read_step_policy(config(COSMOS3)) == COSMOS3
    missing = {k: v for k, v in COSMOS3.items() if k != "overlap"}
    with pytest.raises(QschedError, match=r"fields missing \['overlap'\], unknown \[\]"):
        read_step_policy(config(missing))
    with pytest.raises(QschedError, match=r"unknown \['extra'\]"):
        read_step_policy(config({**COSMOS3, "extra": 1}))
    with pytest.raises(QschedError, match=r"schema_version = 2; allowed: 1"):
        read_step_policy(config({**COSMOS3, "schema_version": 2}))
    with pytest.raises(QschedError, match=r"first_steps = \{'count': 3, 'mode': 'native'\}"):
        read_step_policy(config({**COSMOS3, "first_steps": {"count": 3, "mode": "native"}}))
    with pytest.raises(QschedError, match=r"has no quantization_config.runtime.diffusion_step_policy"):
        read_step_policy(config(None))
