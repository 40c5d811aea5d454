"""The real-kernel bank and `qsched profile`: level -> kernel mapping, switching, shared memory, the profile CSV."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from qsched_search.errors import QschedError
from qsched_search.quant.backends import check_levels, default_precisions, resolve_backend
from qsched_search.quant.bank import installed_bank
from qsched_search.quant.kernels import kernel_for, real_kernel_levels
from qsched_search.quant.levels import Level, Menu, load_menu
from qsched_search.quant.torchao_bank import RealKernelBank, tensor_bytes
from tests.helpers import build_tiny_sd_pipeline

SD_EXCLUDE = ["conv_in", "conv_out", "time_embedding.*"]


def _menu(**extra) -> Menu:
    levels = dict(load_menu().levels)
    levels.update({"ref2": Level("ref2", "reference", 32, 32), **extra})
    return Menu(levels=levels, source="test")


def _restored(unet) -> bool:
    """The bank is gone and the denoiser calls its own class's forward again."""
    return installed_bank(unet) is None and unet.forward.__func__ is type(unet).forward


def _unet_inputs(unet, batch: int = 1):
    torch.manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, dtype=unet.dtype)
    return (x, torch.tensor([500]), torch.randn(batch, 8, 32, dtype=unet.dtype)), {}


def test_levels_without_a_real_kernel_fail_with_the_fix():
    menu = _menu()
    assert kernel_for(menu["fp32"], "bfloat16").is_identity
    assert kernel_for(menu["bf16"], "bfloat16").is_identity  # a cast to the pipeline's own dtype is no change
    for name in ("w4a4", "w4a8", "w2a8"):
        with pytest.raises(QschedError, match=f"precision level '{name}'.*has no kernel on backend torchao.*--backend sim"):
            kernel_for(menu[name], "bfloat16")
    with pytest.raises(QschedError, match="precision level 'fp16'.*has no kernel on backend torchao"):
        kernel_for(menu["fp16"], "bfloat16")
    # The same check before anything loads, for the torchao backend only (the simulation runs every level).
    with pytest.raises(QschedError, match="'w4a4'.*has no kernel on backend torchao"):
        check_levels("torchao", menu, ["fp32", "w8a8", "w4a4"], "bfloat16")
    check_levels("sim", menu, ["fp32", "w8a8", "w4a4"], "bfloat16")


def test_backend_names_resolve_by_device():
    assert resolve_backend("auto", "cpu") == "sim" and resolve_backend("auto", "cuda:0") == "torchao"
    assert resolve_backend("sim", "cuda") == "sim"
    with pytest.raises(QschedError, match="--backend torchao runs torchao's GPU kernels and needs --device cuda"):
        resolve_backend("torchao", "cpu")
    with pytest.raises(QschedError, match="--backend 'fake-quant' is not one of auto, sim, torchao"):
        resolve_backend("fake-quant", "cpu")


def test_omitted_precisions_are_levels_the_chosen_backend_runs():
    menu = load_menu()
    assert default_precisions("auto", "cpu", "float32", menu) == ("w8a8", "w4a8", "w4a4")
    assert default_precisions("auto", "cuda", "bfloat16", menu) == ("fp8", "w8a8", "w4a16")
    # rowwise fp8 and int4 weight-only need bfloat16 weights
    assert default_precisions("torchao", "cuda:0", "float32", menu) == ("w8a8",)
    for dtype in ("float32", "bfloat16"):
        check_levels("torchao", menu, default_precisions("auto", "cuda", dtype, menu), dtype)
    with pytest.raises(QschedError, match="needs --device cuda"):
        default_precisions("torchao", "cpu", "float32", menu)


def test_real_kernel_levels_of_the_default_menu():
    pytest.importorskip("torchao")
    assert real_kernel_levels(load_menu(), "bfloat16") == ["fp32", "bf16", "fp8", "w8a8", "w8a16", "w4a16"]
    assert real_kernel_levels(load_menu(), "float32") == ["fp32", "w8a8", "w8a16"]  # rowwise fp8, tinygemm: bf16


def test_kernel_configs_follow_the_level_granularity():
    pytest.importorskip("torchao")
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow, PerTensor)

    menu = _menu(fp8t=Level("fp8t", "float8", 8, 8, "per_tensor", "per_tensor", dtype="float8_e4m3fn"),
                 fp8mixed=Level("fp8mixed", "float8", 8, 8, "per_channel", "per_tensor", dtype="float8_e4m3fn"))
    fp8 = kernel_for(menu["fp8"], "bfloat16")
    assert isinstance(fp8.config(), Float8DynamicActivationFloat8WeightConfig) and fp8.quantizes_activations
    assert all(isinstance(g, PerRow) for g in fp8.config().granularity)
    assert all(isinstance(g, PerTensor) for g in kernel_for(menu["fp8t"], "bfloat16").config().granularity)
    with pytest.raises(QschedError, match="same granularity"):
        kernel_for(menu["fp8mixed"], "bfloat16")
    assert isinstance(kernel_for(menu["w8a8"], "bfloat16").config(), Int8DynamicActivationInt8WeightConfig)
    w8a16 = kernel_for(menu["w8a16"], "bfloat16")
    assert isinstance(w8a16.config(), Int8WeightOnlyConfig) and not w8a16.quantizes_activations
    w4 = kernel_for(menu["w4a16"], "bfloat16")
    assert isinstance(w4.config(), Int4WeightOnlyConfig) and w4.config().int4_packing_format == "tile_packed_to_4d"
    assert w4.config().group_size == 128 and (w4.in_multiple, w4.out_multiple) == (128, 8)
    with pytest.raises(QschedError, match="needs a bfloat16 pipeline"):
        kernel_for(menu["w4a16"], "float32")
    per_channel_int4 = Level("w4pc", "int", 4, 16)
    with pytest.raises(QschedError, match="stores int4 in groups of 32, 64, 128, 256.*group_size: 128"):
        kernel_for(per_channel_int4, "bfloat16")


def test_bank_switches_forward_counts_calls_and_restores():
    unet = build_tiny_sd_pipeline().unet.eval()
    args, kwargs = _unet_inputs(unet)
    with torch.no_grad():
        before = unet(*args, **kwargs).sample
    bank = RealKernelBank(unet, _menu(), ["ref2"], "fp32", SD_EXCLUDE, compile="none")
    try:
        assert bank.levels == ["fp32", "ref2"] and installed_bank(unet) is bank
        assert bank.quantized_layers == {"fp32": [], "ref2": []}  # a second reference level quantizes nothing
        assert bank.memory()["bank_extra_bytes"] == 0  # identity copies share every tensor with the denoiser
        with torch.no_grad():
            bank.set_level("ref2")
            out = unet(*args, **kwargs).sample
        assert bank.calls == {"ref2": 1}
        torch.testing.assert_close(out, before)
        with pytest.raises(QschedError, match="precision 'w8a8' is in the menu but this bank built only fp32, ref2"):
            bank.set_level("w8a8")
        with pytest.raises(QschedError, match="already has a precision bank installed"):
            RealKernelBank(unet, _menu(), [], "fp32")
    finally:
        bank.remove()
    assert _restored(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(*args, **kwargs).sample, before)
    with pytest.raises(QschedError, match="reference level 'w8a8' would round the pipeline"):
        RealKernelBank(unet, _menu(), [], "w8a8")
    with pytest.raises(QschedError, match="compile='eager' is not one of"):
        RealKernelBank(unet, _menu(), [], "fp32", compile="eager")


def test_tensor_bytes_counts_shared_storages_once():
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.weight = a.weight
    assert tensor_bytes([a, b]) == (64 + 8 + 8) * 4


def test_int8_levels_quantize_only_eligible_layers_and_share_the_rest():
    pytest.importorskip("torchao")
    unet = build_tiny_sd_pipeline().unet.to(torch.bfloat16).eval()
    args, kwargs = _unet_inputs(unet)
    with torch.no_grad():
        ref = unet(*args, **kwargs).sample
    menu = _menu(bf16ref=Level("bf16ref", "reference", 16, 16))
    bank = RealKernelBank(unet, menu, ["w8a8", "w8a16"], "bf16ref", SD_EXCLUDE, compile="none",
                          calibration=(args, kwargs))
    try:
        w8a8, w8a16 = set(bank.quantized_layers["w8a8"]), set(bank.quantized_layers["w8a16"])
        assert w8a8 and w8a8 < w8a16  # activation-quantized levels skip the per-sample conditioning projections
        assert not any(name.endswith("time_emb_proj") for name in w8a8)
        assert not any(name.startswith("time_embedding") for name in w8a16)
        # The simulation picks the same layers by the same rule.
        from qsched_search.quant.sim_bank import SimulatedBank

        real_layers = dict(bank.quantized_layers)
        bank.remove()
        sim = SimulatedBank(unet, menu, ["w8a8", "w8a16"], "bf16ref", SD_EXCLUDE, compile="none",
                            calibration=(args, kwargs))
        assert sim.quantized_layers == real_layers
        sim.remove()
        bank = RealKernelBank(unet, menu, ["w8a8", "w8a16"], "bf16ref", SD_EXCLUDE, compile="none",
                              calibration=(args, kwargs))
        memory = bank.memory()
        assert memory["per_level_extra_bytes"]["bf16ref"] == 0
        # int8 weights (1 byte) + per-channel scales, against 2 bytes per bf16 weight: about half the Linear bytes.
        linear_bytes = sum(m.weight.numel() * 2 for n, m in unet.named_modules() if n in w8a16)
        assert 0.45 < memory["per_level_extra_bytes"]["w8a16"] / linear_bytes < 0.65
        outs = {}
        with torch.no_grad():
            for level in ("w8a8", "w8a16", "bf16ref"):
                bank.set_level(level)
                outs[level] = unet(*args, **kwargs).sample
        assert bank.calls == {"w8a8": 1, "w8a16": 1, "bf16ref": 1}
        torch.testing.assert_close(outs["bf16ref"], ref)
        for level in ("w8a8", "w8a16"):
            rel = ((outs[level].float() - ref.float()).norm() / ref.float().norm()).item()
            assert 0 < rel < 0.05, (level, rel)
    finally:
        bank.remove()


def test_regional_compile_quantizes_only_the_repeated_blocks():
    pytest.importorskip("torchao")
    unet = build_tiny_sd_pipeline().unet.to(torch.bfloat16).eval()
    menu = _menu(bf16ref=Level("bf16ref", "reference", 16, 16))
    bank = RealKernelBank(unet, menu, ["w8a16"], "bf16ref", SD_EXCLUDE, compile="regional")
    try:
        blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
        layers = bank.quantized_layers["w8a16"]
        assert layers and all(any(name.startswith(b + ".") for b in blocks) for name in layers)
    finally:
        bank.remove()


def test_profile_command_writes_a_profile_that_search_reads(tiny_sd_folder, tmp_path):
    from qsched_search.cli.app import app
    from qsched_search.quant.costs import load_latency_profile

    out = tmp_path / "latency.csv"
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--dtype", "float32",
                                      "--backend", "sim", "--precisions", "w8a8,w4a4", "--batch", "2",
                                      "--resolution", "32", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame["level"]) == ["fp32", "w8a8", "w4a4"]
    for col in ("ms_per_step", "ms_p10", "ms_p90", "batch", "resolution", "device", "compile_s", "denoiser_bytes"):
        assert col in frame.columns
    assert (frame["batch"] == 2).all() and (frame["resolution"] == 32).all() and (frame["ms_per_step"] > 0).all()
    assert (frame["backend"] == "sim").all() and frame["kernel"].iloc[0].startswith("none")
    costs = load_latency_profile(out, ["w8a8", "w4a4"], "fp32")
    assert costs["fp32"] == 1.0 and costs["w8a8"] > 0


def test_pipeline_call_timing_runs_one_first_call_then_each_repeat_with_its_index():
    import time

    from qsched_search.quant.latency import time_pipeline_calls

    calls = []

    def call(k):
        calls.append(k)
        time.sleep(0.05 if len(calls) == 1 else 0.001 * (3 - k))  # the first call is the slow one (compilation)

    first, ms = time_pipeline_calls(call, "cpu", 3)
    assert calls == [0, 0, 1, 2]
    assert first >= 0.05 and len(ms) == 3 and ms == sorted(ms) and ms[-1] < 50
    assert ms[0] >= 1.0 and ms[-1] >= 3.0  # repeat k slept (3 - k) ms: the sorted times hold all three
    with pytest.raises(QschedError, match="repeats must be at least 1"):
        time_pipeline_calls(call, "cpu", 0)


def test_profile_command_errors_are_one_line(tiny_sd_folder, tmp_path):
    from qsched_search.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--backend", "sim",
                                 "--batch", "0", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "--batch must be at least 1, got 0" in result.output
    result = runner.invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--dtype", "float32",
                                 "--backend", "torchao", "--precisions", "w4a4", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "--backend torchao runs torchao's GPU kernels and needs --device cuda" in result.output
    result = runner.invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--backend", "fake-quant",
                                 "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "fake-quant" in result.output
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.gpu
def test_real_kernels_on_cuda_are_compiled_once_per_level():
    pytest.importorskip("torchao")
    from torch._dynamo.utils import counters

    unet = build_tiny_sd_pipeline().unet.to("cuda", torch.bfloat16).eval()
    args, kwargs = _unet_inputs(unet, batch=2)
    args = tuple(a.to("cuda") for a in args)
    menu = _menu(bf16ref=Level("bf16ref", "reference", 16, 16))
    bank = RealKernelBank(unet, menu, ["fp8", "w8a8"], "bf16ref", SD_EXCLUDE, calibration=(args, kwargs))
    try:
        bank.warm_up(*args, **kwargs)
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            for level in ["fp8", "bf16ref", "w8a8", "fp8"]:
                bank.set_level(level)
                unet(*args, **kwargs)
        assert counters["stats"]["unique_graphs"] == graphs  # switching recompiles nothing
    finally:
        bank.remove()


def test_cuda_graphs_need_a_cuda_denoiser():
    unet = build_tiny_sd_pipeline().unet.eval()
    with pytest.raises(QschedError, match="cuda_graphs=True needs the denoiser on a CUDA device.*cuda_graphs=False"):
        RealKernelBank(unet, _menu(), [], "fp32", compile="none", cuda_graphs=True)
    assert installed_bank(unet) is None and "forward" not in unet.__dict__  # nothing was installed


def test_graph_cache_keys_by_shape_and_plain_values():
    from qsched_search.quant.cuda_graphs import GraphCache

    cache = GraphCache()
    x = torch.zeros(2, 3)
    assert cache.key("a", (x,), {"flag": True}) == cache.key("a", (torch.ones(2, 3),), {"flag": True})
    assert cache.key("a", (x,), {"flag": True}) != cache.key("b", (x,), {"flag": True})
    assert cache.key("a", (x,), {"flag": True}) != cache.key("a", (torch.zeros(4, 3),), {"flag": True})
    assert cache.key("a", (x,), {"flag": True}) != cache.key("a", (x,), {"flag": False})
    with pytest.raises(QschedError, match="unhashable set.*cuda_graphs=False"):
        cache.key("a", (x,), {"cfg": {1, 2}})


@pytest.mark.gpu
# Eager int8 W8A8 is left out: torchao's int8 matmul falls back to the CPU for the tiny model's shapes (no capture).
@pytest.mark.parametrize("compile, levels", [("none", ["fp8"]), ("regional", ["fp8", "w8a8"])])
def test_cuda_graph_replay_matches_direct_calls_across_switches(compile, levels):
    pytest.importorskip("torchao")
    unet = build_tiny_sd_pipeline().unet.to("cuda", torch.bfloat16).eval()
    args, kwargs = _unet_inputs(unet, batch=2)
    args = tuple(a.to("cuda") for a in args)
    menu = _menu(bf16ref=Level("bf16ref", "reference", 16, 16))
    bank = RealKernelBank(unet, menu, levels, "bf16ref", SD_EXCLUDE, compile=compile,
                          calibration=(args, kwargs), cuda_graphs=True)
    try:
        bank.warm_up(*args, **kwargs)
        assert bank.graphs.captures == len(bank.levels)
        with torch.no_grad():
            for trial in range(2):  # fresh inputs each time: the graphs must read the new values, not the captured ones
                fresh = (torch.randn_like(args[0]), args[1] + 7 * trial, torch.randn_like(args[2]))
                direct = {lv: bank._runners[lv](*fresh, **kwargs).sample.clone() for lv in bank.levels}
                for level in [*levels, "bf16ref", *levels[::-1], "bf16ref"]:  # interleaved: the shared pool must not clobber
                    bank.set_level(level)
                    out = unet(*fresh, **kwargs).sample
                    assert torch.isfinite(out).all()
                    torch.testing.assert_close(out, direct[level], rtol=1e-2, atol=1e-2)
                rel = ((direct["fp8"].float() - direct["bf16ref"].float()).norm() / direct["bf16ref"].float().norm()).item()
                assert 0 < rel < 0.1, rel
        assert bank.graphs.captures == len(bank.levels)  # switching levels and inputs re-captured nothing
    finally:
        bank.remove()


def test_profile_cuda_graphs_need_torchao_on_cuda(tiny_sd_folder, tmp_path):
    from qsched_search.cli.app import app

    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--backend", "sim",
                                      "--cuda-graphs", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "--cuda-graphs needs --backend torchao on a CUDA device" in result.output
