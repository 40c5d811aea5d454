"""The real-kernel bank and `qsched profile`: level -> kernel mapping, switching, shared memory, the profile CSV."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import build_tiny_sd_pipeline
from qsched_search.backends import RealKernelBank, kernel_for, real_kernel_levels, tensor_bytes
from qsched_search.errors import QschedError
from qsched_search.precisions import Level, Menu, load_menu

SD_EXCLUDE = ["conv_in", "conv_out", "time_embedding.*"]


def _menu(**extra) -> Menu:
    levels = dict(load_menu().levels)
    levels.update({"ref2": Level("ref2", "reference", 32, 32), "w8a16": Level("w8a16", "int", 8, 16), **extra})
    return Menu(levels=levels, source="test")


def _unet_inputs(unet, batch: int = 1):
    torch.manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, dtype=unet.dtype)
    return (x, torch.tensor([500]), torch.randn(batch, 8, 32, dtype=unet.dtype)), {}


def test_levels_without_a_real_kernel_fail_with_the_fix():
    menu = _menu()
    assert kernel_for(menu["fp32"], torch.bfloat16).is_identity
    assert kernel_for(menu["bf16"], torch.bfloat16).is_identity  # a cast to the pipeline's own dtype is no change
    for name in ("w4a4", "w4a8", "w2a8"):
        with pytest.raises(QschedError, match=f"precision level '{name}'.*has no real kernel.*fake-quant"):
            kernel_for(menu[name], torch.bfloat16)
    with pytest.raises(QschedError, match="precision level 'fp16'.*no real kernel"):
        kernel_for(menu["fp16"], torch.bfloat16)


def test_real_kernel_levels_of_the_default_menu():
    pytest.importorskip("torchao")
    assert real_kernel_levels(load_menu(), torch.bfloat16) == ["fp32", "bf16", "fp8", "w8a8", "w4a16"]


def test_kernel_configs_follow_the_level_granularity():
    pytest.importorskip("torchao")
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow, PerTensor)

    menu = _menu(fp8t=Level("fp8t", "float8", 8, 8, "per_tensor", "per_tensor", dtype="float8_e4m3fn"),
                 fp8mixed=Level("fp8mixed", "float8", 8, 8, "per_channel", "per_tensor", dtype="float8_e4m3fn"))
    fp8 = kernel_for(menu["fp8"], torch.bfloat16)
    assert isinstance(fp8.config, Float8DynamicActivationFloat8WeightConfig) and fp8.quantizes_activations
    assert all(isinstance(g, PerRow) for g in fp8.config.granularity)
    assert all(isinstance(g, PerTensor) for g in kernel_for(menu["fp8t"], torch.bfloat16).config.granularity)
    with pytest.raises(QschedError, match="same granularity"):
        kernel_for(menu["fp8mixed"], torch.bfloat16)
    assert isinstance(kernel_for(menu["w8a8"], torch.bfloat16).config, Int8DynamicActivationInt8WeightConfig)
    w8a16 = kernel_for(menu["w8a16"], torch.bfloat16)
    assert isinstance(w8a16.config, Int8WeightOnlyConfig) and not w8a16.quantizes_activations
    w4 = kernel_for(menu["w4a16"], torch.bfloat16)
    assert isinstance(w4.config, Int4WeightOnlyConfig) and w4.config.int4_packing_format == "tile_packed_to_4d"
    with pytest.raises(QschedError, match="needs a bfloat16 pipeline"):
        kernel_for(menu["w4a16"], torch.float32)


def test_bank_switches_forward_counts_calls_and_restores():
    unet = build_tiny_sd_pipeline().unet.eval()
    args, kwargs = _unet_inputs(unet)
    with torch.no_grad():
        before = unet(*args, **kwargs).sample
    bank = RealKernelBank(unet, _menu(), ["ref2"], "fp32", SD_EXCLUDE, compile="none")
    try:
        assert bank.levels == ["fp32", "ref2"]
        assert bank.memory()["bank_extra_bytes"] == 0  # identity copies share every tensor with the denoiser
        with torch.no_grad():
            bank.set_level("ref2")
            out = unet(*args, **kwargs).sample
        assert bank.calls == {"ref2": 1}
        torch.testing.assert_close(out, before)
        with pytest.raises(QschedError, match="precision 'w8a8' is in the menu but this bank built only fp32, ref2"):
            bank.set_level("w8a8")
        with pytest.raises(QschedError, match="already has a real-kernel bank"):
            RealKernelBank(unet, _menu(), [], "fp32")
    finally:
        bank.remove()
    assert "forward" not in unet.__dict__
    with pytest.raises(QschedError, match="reference level 'w8a8' would quantize"):
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
                          calibration=(args, kwargs), min_rows=32)
    try:
        w8a8, w8a16 = set(bank.quantized_layers["w8a8"]), set(bank.quantized_layers["w8a16"])
        assert w8a8 and w8a8 < w8a16  # activation-quantized levels skip the per-sample conditioning projections
        assert not any(name.endswith("time_emb_proj") for name in w8a8)
        assert not any(name.startswith("time_embedding") for name in w8a16)
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
    from qsched_search.search import load_latency_profile

    out = tmp_path / "latency.csv"
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--dtype", "float32",
                                      "--backend", "fake-quant", "--precisions", "w8a8,w4a4", "--batch", "2",
                                      "--resolution", "32", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame["level"]) == ["fp32", "w8a8", "w4a4"]
    for col in ("ms_per_step", "ms_p10", "ms_p90", "batch", "resolution", "device", "compile_s", "denoiser_bytes"):
        assert col in frame.columns
    assert (frame["batch"] == 2).all() and (frame["resolution"] == 32).all() and (frame["ms_per_step"] > 0).all()
    costs = load_latency_profile(out, ["w8a8", "w4a4"], "fp32")
    assert costs["fp32"] == 1.0 and costs["w8a8"] > 0


def test_profile_command_errors_are_one_line(tiny_sd_folder, tmp_path):
    from qsched_search.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--backend", "fake-quant",
                                 "--batch", "0", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "--batch must be at least 1, got 0" in result.output
    result = runner.invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--dtype", "float32",
                                 "--precisions", "w4a4", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "has no real kernel" in result.output


@pytest.mark.gpu
def test_real_kernels_on_cuda_are_compiled_once_per_level():
    pytest.importorskip("torchao")
    from torch._dynamo.utils import counters

    unet = build_tiny_sd_pipeline().unet.to("cuda", torch.bfloat16).eval()
    args, kwargs = _unet_inputs(unet, batch=2)
    args = tuple(a.to("cuda") for a in args)
    menu = _menu(bf16ref=Level("bf16ref", "reference", 16, 16))
    bank = RealKernelBank(unet, menu, ["fp8", "w8a8"], "bf16ref", SD_EXCLUDE, calibration=(args, kwargs), min_rows=32)
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
    assert "forward" not in unet.__dict__  # nothing was installed


def test_graph_cache_keys_by_shape_and_plain_values():
    from qsched_search.backends.cuda_graphs import GraphCache

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
                          calibration=(args, kwargs), min_rows=32, cuda_graphs=True)
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

    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_sd_folder), "--device", "cpu", "--backend", "fake-quant",
                                      "--cuda-graphs", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "--cuda-graphs needs --backend torchao on a CUDA device" in result.output
