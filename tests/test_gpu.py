"""On a CUDA device: the real-kernel backend measures, and deploys, what it measured (run with `-m gpu`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COMMON = ["--steps", "2", "--samples", "8", "--batch-size", "8", "--device", "cuda", "--dtype", "bfloat16",
          "--reference", "bf16", "--precisions", "fp8,w8a8"]


def _run(args):
    from qsched_search.cli.app import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def real_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-search")
    _run(["probe", *COMMON, "--backend", "torchao", "--out", str(out)])
    # Budget 1: on this 32-px model at batch 8 the quantized levels are not reliably faster than bf16 (launch-bound),
    # so any tighter budget can be infeasible; the test is about measuring latency, not about the speed-up.
    _run(["search", *COMMON, "--backend", "torchao", "--budget", "1.0", "--cost", "latency", "--images", "4",
          "--out", str(out)])
    return out


def test_search_on_real_kernels_records_backend_kernels_and_measured_latency(real_search):
    schedule = json.loads((real_search / "schedule.json").read_text())
    execution = schedule["execution"]
    assert execution["backend"] == "torchao" and execution["target"] == "torchao"
    for level in ("bf16", "fp8", "w8a8"):
        info = execution["levels"][level]
        assert info["ms_per_step"] > 0, info
        assert ("torchao" in info["kernel"]) == (level != "bf16"), info["kernel"]
    assert schedule["cost"]["latency"] is not None and schedule["cost"]["latency"] <= 1.0 + 1e-9


def test_apply_schedule_reproduces_the_real_kernel_search_images(real_search):
    from diffusers import DiffusionPipeline

    from qsched_search import apply_schedule
    from qsched_search.resources import EMBEDDED_MODEL_DIR
    from qsched_search.results.images import to_uint8
    from qsched_search.results.schedule import load_schedule

    schedule = load_schedule(real_search / "schedule.json")
    with open(real_search / "images" / "index.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == "schedule"]
    pipe = DiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL_DIR), torch_dtype=torch.bfloat16).to("cuda")
    applied = apply_schedule(pipe, schedule, backend="torchao")
    try:
        prompts = [r["prompt"] for r in rows]
        generators = [torch.Generator("cuda").manual_seed(int(r["seed"])) for r in rows]
        images = pipe(prompts, num_inference_steps=schedule.steps, generator=generators, output_type="pt",
                      guidance_scale=0.0, height=32, width=32).images.float().cpu()
    finally:
        applied.remove()
    for row, image in zip(rows, images):
        saved = np.asarray(Image.open(real_search / "images" / row["file"]))
        assert np.array_equal(to_uint8(image), saved), row


def test_simulation_and_real_kernels_quantize_the_same_layers_and_agree(tmp_path):
    from qsched_search.pipeline.loading import load_model
    from qsched_search.pipeline.rollout import capture_denoiser_call
    from qsched_search.quant.backends import build_bank
    from qsched_search.quant.levels import load_menu

    model = load_model("embedded", device="cuda", dtype="bfloat16")
    menu = load_menu()
    call = capture_denoiser_call(model.pipe, model.denoiser, {**model.family.call_defaults, "prompt": ["bag"] * 16,
                                                              "num_inference_steps": 2})
    outputs, layers = {}, {}
    for backend in ("sim", "torchao"):
        bank = build_bank(backend, model.denoiser, menu, ["fp8", "w8a8", "w4a16"], "bf16", list(model.family.exclude),
                          calibration=call, compile="none")
        try:
            layers[backend] = bank.quantized_layers
            for level in ("fp8", "w8a8", "w4a16"):
                bank.set_level(level)
                with torch.no_grad():
                    outputs[(backend, level)] = model.denoiser(*call[0], **call[1])[0].float()
        finally:
            bank.remove()
    assert layers["sim"] == layers["torchao"]
    with torch.no_grad():
        ref = model.denoiser(*call[0], **call[1])[0].float()
    # int8: the same formulas and exact integer accumulation, bit for bit. fp8: _scaled_mm accumulates with Hopper's
    # fast (reduced-precision) accumulation, which the simulation does not imitate.
    assert torch.equal(outputs[("sim", "w8a8")], outputs[("torchao", "w8a8")])
    for level in ("w4a16", "fp8"):  # tinygemm dequantizes in registers, rounding its own way: as large, not the same bits
        sim_err, real_err = (outputs[("sim", level)] - ref).norm(), (outputs[("torchao", level)] - ref).norm()
        assert abs(sim_err - real_err) < 0.25 * real_err, (level, sim_err, real_err)
