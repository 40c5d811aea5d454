"""The simulation bank: levels are really applied, switching is cheap and exact, and removal restores the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsched_search.errors import QschedError
from qsched_search.quant.bank import installed_bank
from qsched_search.quant.fake_quant import fake_quant_int, quantize_weight
from qsched_search.quant.levels import Level, Menu, load_menu
from qsched_search.quant.sim_bank import SimulatedBank, SwitchableLayer
from qsched_search.quant.targets import MIN_ROWS


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.mid(torch.relu(self.conv_in(x)))
        h = self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(torch.relu(h))


class Blocks(nn.Module):
    """Linear layers torchao's kernels take (in and out features divisible by 16) and ones they do not."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 32, 1)
        self.wide = nn.Linear(32, 64)
        self.narrow = nn.Linear(64, 24)  # 24 out-features: not a multiple of 16
        self.back = nn.Linear(24, 32)  # 24 in-features
        self.cond = nn.Linear(32, 32)  # called on one row per sample

    def forward(self, x):
        h = self.conv_in(x).flatten(2).transpose(1, 2)  # (B, H*W, 32)
        h = self.back(torch.relu(self.narrow(torch.relu(self.wide(h)))))
        return h + self.cond(h.mean(1, keepdim=True))


@pytest.fixture
def menu() -> Menu:
    """The packaged levels under target generic: Linear and Conv2d layers are rounded (the Toy is mostly convs)."""
    return Menu(levels=load_menu().levels, target="generic")


def test_the_packaged_menu_targets_torchao():
    menu = load_menu()
    assert menu.target == "torchao" and menu.layer_types == ("Linear",)
    assert Menu(levels=menu.levels, target="generic").layer_types == ("Linear", "Conv2d")
    assert menu["w4a16"].weight_granularity == "per_group" and menu["w4a16"].group_size == 128
    assert menu["w8a16"].weight_bits == 8 and not menu["w8a16"].quantizes_activations
    with pytest.raises(QschedError, match="target 'tensorrt' is not one of torchao, generic"):
        Menu(levels=menu.levels, target="tensorrt")


def test_int_fake_quant_error_is_within_half_a_step():
    w = torch.randn(16, 32)
    for bits in (8, 4, 2):
        q = fake_quant_int(w, bits, axis=0)
        step = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert torch.all((q - w).abs() <= step / 2 + 1e-6)
        # the number of distinct values per row is bounded by the grid
        assert max(len(torch.unique(row)) for row in q) <= 2 ** bits - 1


def test_lower_bits_mean_larger_weight_error(menu):
    w = torch.randn(64, 64)
    err = {name: (quantize_weight(w, menu[name]) - w).pow(2).mean().item() for name in ("bf16", "fp8", "w8a8", "w4a8", "w2a8")}
    assert err["bf16"] < err["w8a8"] < err["w4a8"] < err["w2a8"]
    assert err["fp8"] < err["w4a8"]
    assert quantize_weight(w, menu["fp32"]) is w


def test_bad_level_definitions_fail_with_the_field_named():
    with pytest.raises(QschedError, match="format 'int4'"):
        Level(name="x", format="int4", weight_bits=4, act_bits=8)
    with pytest.raises(QschedError, match="weight_bits=1"):
        Level(name="x", format="int", weight_bits=1, act_bits=8)
    with pytest.raises(QschedError, match="needs dtype"):
        Level(name="x", format="float8", weight_bits=8, act_bits=8)


def test_unknown_precision_lists_the_menu(menu):
    with pytest.raises(QschedError, match="unknown precision 'w3a3'.*w8a8"):
        menu["w3a3"]


def test_bank_switches_levels_and_excludes_first_and_last_layers(menu):
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    bank = SimulatedBank(model, menu, ["w8a8", "w4a4"], "fp32", exclude=["conv_in", "conv_out"])
    assert set(bank.layers) == {"mid", "proj"}
    assert bank.quantized_layers == {"fp32": [], "w8a8": ["mid", "proj"], "w4a4": ["mid", "proj"]}
    assert installed_bank(model) is bank
    assert isinstance(model.mid, SwitchableLayer) and isinstance(model.conv_in, nn.Conv2d)
    with torch.no_grad():
        outputs = {}
        for level in ("fp32", "w8a8", "w4a4", "fp32"):
            bank.set_level(level)
            outputs[level] = model(x)
    assert torch.equal(outputs["fp32"], ref)
    err8 = (outputs["w8a8"] - ref).abs().mean()
    err4 = (outputs["w4a4"] - ref).abs().mean()
    assert 0 < err8 < err4
    assert bank.calls == {"fp32": 2, "w8a8": 1, "w4a4": 1}
    bank.remove()
    assert isinstance(model.mid, nn.Conv2d) and installed_bank(model) is None
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # Removed, the denoiser takes a new bank; installed, it refuses a second one.
    again = SimulatedBank(model, menu, ["w8a8"], "fp32")
    with pytest.raises(QschedError, match="already has a precision bank installed"):
        SimulatedBank(model, menu, ["w8a8"], "fp32")
    again.remove()


def test_target_torchao_quantizes_only_the_linear_layers_its_kernels_take():
    torch.manual_seed(0)
    model = Blocks()
    x = torch.randn(2, 3, 4, 4)  # 16 pixels per sample: 32 rows per call for the token layers, 2 for `cond`
    bank = SimulatedBank(model, load_menu(), ["w8a8", "w8a16"], "fp32", calibration=((x,), {}))
    # Divisible in- and out-features only; no convolution; the activation-quantizing w8a8 skips `cond`, which saw
    # fewer than MIN_ROWS rows in the recorded call, the weight-only w8a16 takes it.
    assert bank.quantized_layers["w8a8"] == ["wide"]
    assert bank.quantized_layers["w8a16"] == ["wide", "cond"]
    assert bank.stats.rows["cond"] == 2 < MIN_ROWS <= bank.stats.rows["wide"]
    assert bank.describe()["target"] == "torchao"
    assert bank.kernel("w8a8") == "simulated torchao Int8DynamicActivationInt8Weight"
    with torch.no_grad():
        ref = model(x)
        bank.set_level("w8a8")
        out = model(x)
    assert 0 < (out - ref).abs().max() < 0.1
    bank.remove()
    # Under target generic every Linear and Conv2d is rounded.
    generic = SimulatedBank(model, Menu(levels=load_menu().levels, target="generic"), ["w8a8"], "fp32",
                            calibration=((x,), {}))
    assert generic.quantized_layers["w8a8"] == ["conv_in", "wide", "narrow", "back", "cond"]
    generic.remove()


def test_target_generic_rounds_convolutions_whatever_the_compile_scope():
    from tests.helpers import build_tiny_sd_pipeline

    unet = build_tiny_sd_pipeline().unet
    exclude = ["conv_in", "conv_out", "time_embedding.*"]
    x = (torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 8, 32))
    costs = {}
    for target in ("torchao", "generic"):
        bank = SimulatedBank(unet, Menu(levels=load_menu().levels, target=target), ["w8a8"], "fp32", exclude,
                             calibration=(x, {}))
        assert bank.compile == "regional"  # the UNet declares its repeated blocks
        layers = bank.quantized_layers["w8a8"]
        inside = [n for n in layers if ".transformer_blocks." in n]
        if target == "torchao":
            assert layers == inside  # only the compiled blocks' Linear layers
        else:  # every Linear and Conv2d not excluded, the resnets' convolutions included
            assert "down_blocks.0.resnets.0.conv1" in layers and len(layers) > len(inside) > 0
            assert not set(layers) & {"conv_in", "conv_out", "time_embedding.linear_1"}
        costs[target] = bank.level_costs()["w8a8"]["bops"]
        bank.remove()
    assert costs["generic"] < costs["torchao"] < 1


def test_bank_costs_follow_the_bit_widths(menu):
    model = Toy()
    bank = SimulatedBank(model, menu, ["w8a8", "w4a8", "w4a4", "bf16"], "fp32", exclude=["conv_in", "conv_out"])
    with pytest.raises(QschedError, match="has not seen a denoiser call"):
        bank.level_costs()
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    costs = bank.level_costs()
    bank.remove()
    # A recorded call gives the same costs at once, before any run.
    calibrated = SimulatedBank(model, menu, ["w8a8", "w4a8", "w4a4", "bf16"], "fp32", exclude=["conv_in", "conv_out"],
                               calibration=((torch.randn(1, 3, 8, 8),), {}))
    assert calibrated.level_costs() == costs
    bank = calibrated
    assert costs["fp32"] == {"bops": 1.0, "memory": 1.0}
    assert costs["w4a4"]["bops"] < costs["w4a8"]["bops"] < costs["w8a8"]["bops"] < costs["bf16"]["bops"] < 1
    assert costs["w4a8"]["memory"] == costs["w4a4"]["memory"] < costs["w8a8"]["memory"]
    # excluded layers stay at 32 bits, so even w4a4 cannot reach 4*4/(32*32) of the reference
    assert costs["w4a4"]["bops"] > 16 / 1024
    memory = bank.memory()
    assert memory["bank_extra_bytes"] > 0 and memory["total_bytes"] == memory["denoiser_bytes"] + memory["bank_extra_bytes"]


def test_bank_rejects_levels_it_was_not_built_for(menu):
    bank = SimulatedBank(Toy(), menu, ["w8a8"], "fp32")
    with pytest.raises(QschedError, match="'w4a4' is in the menu but this bank built only fp32, w8a8"):
        bank.set_level("w4a4")
    with pytest.raises(QschedError, match="reference level 'w4a8' would round the pipeline.*format 'reference'"):
        SimulatedBank(Toy(), menu, ["w8a8"], "w4a8")
    with pytest.raises(QschedError, match="'w8a8' quantizes no layer of the denoiser under target torchao"):
        SimulatedBank(Toy(), load_menu(), ["w8a8"], "fp32")  # 8 features and convolutions: nothing torchao takes
