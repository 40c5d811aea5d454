"""The simulation computes what torchao's kernels compute, on the layers they quantize (on CPU, with torchao itself)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qsched_search.quant.fake_quant import LinearRecipe, torchao_float8, torchao_int4_tinygemm, torchao_int8_symmetric
from qsched_search.quant.levels import Menu, load_menu

ao = pytest.importorskip("torchao.quantization", reason="torchao (the test extra) is needed to compare with it")
primitives = pytest.importorskip("torchao.quantization.quant_primitives")
TorchAOBaseTensor = pytest.importorskip("torchao.utils").TorchAOBaseTensor

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def menu() -> Menu:
    return load_menu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "per-tensor"])
def test_int8_rounding_is_torchaos_choose_qparams_and_quantize(dtype, per_row):
    x = torch.randn(33, 256, dtype=dtype) * torch.linspace(0.1, 4, 256, dtype=dtype)
    block = [1, 256] if per_row else [33, 256]
    scale, zero = primitives.choose_qparams_affine(x, primitives.MappingType.SYMMETRIC, block, torch.int8,
                                                  scale_dtype=torch.float32, zero_point_dtype=torch.int8,
                                                  eps=torch.finfo(torch.float32).eps)
    q = primitives.quantize_affine(x, block, scale, zero, torch.int8)
    mine_q, mine_scale = torchao_int8_symmetric(x, per_row)
    assert torch.equal(mine_scale.flatten(), scale.flatten())
    assert torch.equal(mine_q.to(torch.int8), q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "per-tensor"])
def test_float8_rounding_is_torchaos_scale_and_saturation(dtype, per_row):
    x = torch.randn(17, 128, dtype=dtype) * 30
    x[0, 0] = 1e4  # a value the scale must saturate around, not overflow
    block = [1, 128] if per_row else [17, 128]
    scale = primitives._choose_scale_float8(x, block, torch.float8_e4m3fn)
    q = primitives._quantize_affine_float8(x, scale, torch.float8_e4m3fn)
    mine_q, mine_scale = torchao_float8(x, torch.float8_e4m3fn, per_row)
    assert torch.equal(mine_scale.flatten(), scale.flatten())
    assert torch.equal(mine_q.view(torch.uint8), q.view(torch.uint8))


def test_int4_groups_are_tinygemms_scale_zero_point_and_rounding():
    w = torch.randn(64, 512, dtype=torch.bfloat16)
    block = [1, 128]
    scale, zero = primitives._choose_qparams_affine_tinygemm(
        w, primitives.MappingType.ASYMMETRIC, block, torch.int32, 0, 15, scale_dtype=torch.bfloat16,
        zero_point_dtype=torch.bfloat16)
    q = primitives._quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
    expected = primitives._dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.bfloat16)
    assert torch.equal(torchao_int4_tinygemm(w, 128), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", ["w8a8", "w8a16"])
def test_int8_linear_equals_torchaos_quantized_linear_bit_for_bit(menu, dtype, level):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96).to(dtype)
    x = torch.randn(3, 40, 256, dtype=dtype)
    config = (ao.Int8DynamicActivationInt8WeightConfig(granularity=[ao.PerRow(), ao.PerRow()], set_inductor_config=False)
              if level == "w8a8" else ao.Int8WeightOnlyConfig(granularity=ao.PerRow(), set_inductor_config=False))
    real = copy.deepcopy(linear)
    ao.quantize_(real, config)
    recipe = LinearRecipe("int8-dynamic" if level == "w8a8" else "int8-weight", menu[level], linear.weight)
    with torch.no_grad():
        assert torch.equal(recipe(x, linear.bias), real(x))


def _calibration(pipe, denoiser, call_kwargs=None, batch=4):
    from qsched_search.pipeline.rollout import capture_denoiser_call

    call = {"guidance_scale": 0.0, "height": 32, "width": 32, **(call_kwargs or {})}
    return capture_denoiser_call(pipe, denoiser, {"prompt": ["bag"] * batch, "num_inference_steps": 2, **call})


@pytest.mark.parametrize("family", ["embedded", "sd-turbo", "sdxl-turbo", "flux-schnell", "lcm", "pcm"])
@pytest.mark.parametrize("compile_scope", ["none", "regional"])
def test_simulated_levels_quantize_exactly_the_layers_torchao_converts(menu, family, compile_scope):
    """Under target torchao the simulation's layer set is the set torchao's quantize_ converts (checked in the
    real-kernel bank's copy, on CPU with int8 kernels), and both banks compute the same outputs."""
    from qsched_search.pipeline.families import load_family
    from qsched_search.quant.sim_bank import SimulatedBank
    from qsched_search.quant.torchao_bank import RealKernelBank

    call_kwargs = {}
    if family == "embedded":
        from qsched_search.pipeline.loading import load_model

        pipe = load_model("embedded").pipe
    else:
        from tests.helpers import FAMILIES

        builder, _, _, call_kwargs = FAMILIES[family]
        pipe = builder()
    fam = load_family(family)
    denoiser = fam.denoiser_of(pipe)
    if compile_scope == "regional" and not getattr(denoiser, "_repeated_blocks", None):
        pytest.skip(f"{type(denoiser).__name__} declares no repeated blocks")
    call = _calibration(pipe, denoiser, call_kwargs)
    levels = ["w8a8", "w8a16"]
    reference = "fp32"
    sim = SimulatedBank(denoiser, menu, levels, reference, fam.exclude, calibration=call, compile=compile_scope)
    try:
        sim_layers = sim.quantized_layers
        outputs = {}
        for level in levels:
            sim.set_level(level)
            with torch.no_grad():
                outputs[("sim", level)] = denoiser(*call[0], **call[1])[0]
    finally:
        sim.remove()
    # The real bank compiled regionally would run torch.compile on CPU: its layer choice is what is checked here,
    # so it is built eager with the regional scope's layers.
    real = RealKernelBank(denoiser, menu, levels, reference, fam.exclude, calibration=call, compile="none",
                          layers=sim_layers if compile_scope == "regional" else None)
    try:
        for level in levels:
            converted = sorted(name for name, m in real._copies[level].named_modules()
                               if isinstance(m, nn.Linear) and isinstance(m.weight, TorchAOBaseTensor))
            assert converted == sorted(sim_layers[level]), level
            assert sorted(real.quantized_layers[level]) == sorted(sim_layers[level])
            real.set_level(level)
            with torch.no_grad():
                outputs[("real", level)] = denoiser(*call[0], **call[1])[0]
    finally:
        real.remove()
    if compile_scope == "none":
        assert set(sim_layers["w8a8"]) <= {n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)}
    for level in levels:
        assert torch.equal(outputs[("sim", level)], outputs[("real", level)]), level


def test_generic_target_also_rounds_convolutions_and_says_so(menu):
    from qsched_search.pipeline.loading import load_model
    from qsched_search.quant.sim_bank import SimulatedBank

    model = load_model("embedded")
    generic = Menu(levels=menu.levels, target="generic", source="test")
    call = _calibration(model.pipe, model.denoiser)
    kinds = {}
    for m, name in ((menu, "torchao"), (generic, "generic")):
        bank = SimulatedBank(model.denoiser, m, ["w8a8"], "fp32", model.family.exclude, calibration=call, compile="none")
        try:
            modules = dict(model.denoiser.named_modules())
            kinds[name] = {type(getattr(modules[n], "inner", modules[n])).__name__ for n in bank.quantized_layers["w8a8"]}
            assert bank.describe()["target"] == name
        finally:
            bank.remove()
    assert kinds == {"torchao": {"Linear"}, "generic": {"Linear", "Conv2d"}}


def test_levels_without_a_torchao_kernel_are_simulated_only_and_refused_by_the_torchao_backend(menu):
    from qsched_search.errors import QschedError
    from qsched_search.quant.backends import check_levels

    check_levels("sim", menu, ["w4a4", "w4a8"], "bfloat16")
    with pytest.raises(QschedError, match=r"'w4a4'.*no kernel on backend torchao; backend sim simulates it"):
        check_levels("torchao", menu, ["fp8", "w4a4"], "bfloat16")
