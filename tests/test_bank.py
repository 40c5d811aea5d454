"""The precision bank: levels are really applied, switching is cheap and exact, and removal restores the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsched_search.bank import PrecisionBank, SwitchableLayer
from qsched_search.errors import QschedError
from qsched_search.precisions import Level, Menu, fake_quant_int, load_menu, quantize_weight


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


@pytest.fixture
def menu() -> Menu:
    return load_menu()


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
    bank = PrecisionBank(model, menu, ["w8a8", "w4a4"], "fp32", exclude=["conv_in", "conv_out"])
    assert set(bank.layers) == {"mid", "proj"}
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
    assert isinstance(model.mid, nn.Conv2d)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_bank_costs_follow_the_bit_widths(menu):
    model = Toy()
    bank = PrecisionBank(model, menu, ["w8a8", "w4a8", "w4a4", "bf16"], "fp32", exclude=["conv_in", "conv_out"])
    with pytest.raises(QschedError, match="has not seen a denoiser call"):
        bank.level_costs()
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    costs = bank.level_costs()
    assert costs["fp32"] == {"bops": 1.0, "memory": 1.0}
    assert costs["w4a4"]["bops"] < costs["w4a8"]["bops"] < costs["w8a8"]["bops"] < costs["bf16"]["bops"] < 1
    assert costs["w4a8"]["memory"] == costs["w4a4"]["memory"] < costs["w8a8"]["memory"]
    # excluded layers stay at 32 bits, so even w4a4 cannot reach 4*4/(32*32) of the reference
    assert costs["w4a4"]["bops"] > 16 / 1024
    memory = bank.memory()
    assert memory["bank_extra_bytes"] > 0 and memory["total_bytes"] == memory["denoiser_bytes"] + memory["bank_extra_bytes"]


def test_bank_rejects_levels_it_was_not_built_for(menu):
    bank = PrecisionBank(Toy(), menu, ["w8a8"], "fp32")
    with pytest.raises(QschedError, match="'w4a4' is in the menu but this run built only fp32, w8a8"):
        bank.set_level("w4a4")
    with pytest.raises(QschedError, match="reference must have format 'reference'"):
        PrecisionBank(Toy(), menu, ["w8a8"], "w4a8")
