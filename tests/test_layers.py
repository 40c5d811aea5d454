"""Per-layer overrides: layer groups, the bank's assignments (both banks), exact costs, the schedule hook and apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsched_search.errors import QschedError
from qsched_search.quant.groups import LayerAssignment, bank_groups, build_groups, resolve_step, specs_from_list
from qsched_search.quant.levels import Menu, load_menu
from qsched_search.results.assignment import Override, StepAssignment


@pytest.fixture(scope="module")
def menu() -> Menu:
    return load_menu()


@pytest.fixture(scope="module")
def embedded():
    from qsched_search.pipeline.loading import load_model
    from qsched_search.pipeline.rollout import capture_denoiser_call

    model = load_model("embedded")
    call = capture_denoiser_call(model.pipe, model.denoiser, {**model.family.call_defaults, "prompt": ["bag"] * 8,
                                                              "num_inference_steps": 2})
    return model, call


@pytest.fixture()
def sim_bank(embedded, menu):
    from qsched_search.quant.sim_bank import SimulatedBank

    model, call = embedded
    bank = SimulatedBank(model.denoiser, menu, ["w8a8", "w4a4"], "fp32", model.family.exclude, calibration=call)
    yield bank
    bank.remove()


def _out(model, call):
    with torch.no_grad():
        return model.denoiser(*call[0], **call[1])[0]


# ------------------------------------------------------------------------------------------------ groups

def test_default_grouping_of_the_embedded_unet_covers_every_quantized_layer_once(embedded, sim_bank):
    model, _ = embedded
    groups = bank_groups(sim_bank, model.family)
    assert groups.name == "block-role" and len(groups.groups) == 35  # 7 transformer blocks x 5 roles
    held = [n for layers in groups.groups.values() for n in layers]
    assert sorted(held) == sorted(sim_bank.switchable_layers) and len(held) == len(set(held)) == 70
    assert groups.ungrouped == ()
    ff = "mid_block.attentions.0.transformer_blocks.0/ff"
    assert groups.groups[ff] == ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
                                 "mid_block.attentions.0.transformer_blocks.0.ff.net.2")
    qkv = groups.groups["down_blocks.0.attentions.0.transformer_blocks.0/attn2.qkv"]
    assert [n.rsplit(".", 1)[1] for n in qkv] == ["to_q", "to_k", "to_v"]
    # Torchao does not quantize convolutions: the resnet conv groups are left out, not empty.
    assert not any(name.endswith("/conv") for name in groups.names)
    assert len(bank_groups(sim_bank, model.family, "role").groups) == 5


def test_generic_target_adds_the_resnet_convolution_groups(embedded, menu):
    from qsched_search.quant.sim_bank import SimulatedBank

    model, call = embedded
    generic = Menu(levels=menu.levels, target="generic", source="test")
    bank = SimulatedBank(model.denoiser, generic, ["w8a8"], "fp32", model.family.exclude, calibration=call, compile="none")
    try:
        groups = bank_groups(bank, model.family)
    finally:
        bank.remove()
    assert groups.groups["down_blocks.0.resnets.0/conv"] == ("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj",
                                                             "down_blocks.0.resnets.0.conv2")
    assert "up_blocks.0.upsamplers.0/resample" in groups.groups
    assert groups.ungrouped == ()  # every switchable layer has a group


def test_group_specs_check_themselves_and_a_layer_belongs_to_the_first_group():
    names = ["", "b.0", "b.0.q", "b.0.k", "b.1", "b.1.q", "x"]
    specs = specs_from_list([{"name": "{block}/q", "layers": ["{block}.q"]}, {"name": "rest", "layers": ["*"]}], "test")
    groups = build_groups(names, specs, ["b.0.q", "b.0.k", "b.1.q", "x"], ["b.0.", "b.1."], "test")
    assert groups.groups == {"b.0/q": ("b.0.q",), "rest": ("b.0.k", "x"), "b.1/q": ("b.1.q",)}
    with pytest.raises(QschedError, match="must appear in both"):
        specs_from_list([{"name": "{block}/q", "layers": ["*.q"]}], "test")
    with pytest.raises(QschedError, match=r"test\[0\]"):
        specs_from_list([{"layers": ["*"]}], "test")
    with pytest.raises(QschedError, match="'nope' is not a group of grouping 'test'; allowed: b.0/q"):
        groups.layers_of("nope")


def test_resolving_a_step_later_overrides_win_and_bad_targets_fail(embedded, sim_bank):
    model, _ = embedded
    groups = bank_groups(sim_bank, model.family)
    block = "mid_block.attentions.0.transformer_blocks.0"
    step = StepAssignment("w4a4", (Override("w8a8", pattern=f"{block}.*"), Override("fp32", group=f"{block}/ff"),
                                   Override("w4a4", pattern=f"{block}.attn1.to_q")))
    a = resolve_step(step, sim_bank.switchable_layers, groups)
    assert a.default == "w4a4"
    assert a.level_of(f"{block}.ff.net.2") == "fp32" and a.level_of(f"{block}.attn2.to_k") == "w8a8"
    assert a.level_of(f"{block}.attn1.to_q") == "w4a4"  # back at the default: not an override at all
    assert f"{block}.attn1.to_q" not in dict(a.overrides) and len(a.overrides) == 9
    with pytest.raises(QschedError, match="matches none of the 70 layers"):
        resolve_step(StepAssignment("w4a4", (Override("fp32", pattern="*.conv1"),)), sim_bank.switchable_layers, groups)
    with pytest.raises(QschedError, match="no grouping is loaded"):
        resolve_step(StepAssignment("w4a4", (Override("fp32", group=f"{block}/ff"),)), sim_bank.switchable_layers, None)


# ------------------------------------------------------------------------------------------------ the banks

def test_simulated_bank_runs_each_layer_at_its_assigned_level(embedded, sim_bank):
    model, call = embedded
    ref = _out(model, call)
    sim_bank.set_level("w4a4")
    low = _out(model, call)
    everything = tuple((n, "fp32") for n in sim_bank.switchable_layers)
    sim_bank.set_assignment(LayerAssignment("w4a4", everything))
    assert torch.equal(_out(model, call), ref), "every layer overridden to the reference is the reference"
    groups = bank_groups(sim_bank, model.family)
    one = resolve_step(StepAssignment("w4a4", (Override("fp32", group=groups.names[0]),)), sim_bank.switchable_layers, groups)
    sim_bank.set_assignment(one)
    seen = {}
    kept, lowered = groups.groups[groups.names[0]][0], groups.groups[groups.names[1]][0]
    hooks = [sim_bank.layers[n].register_forward_hook(lambda m, i, o, _n=n: seen.setdefault(_n, (i[0], o)) and None)
             for n in (kept, lowered)]
    try:
        mixed = _out(model, call)
    finally:
        for h in hooks:
            h.remove()
    assert not torch.equal(mixed, low) and not torch.equal(mixed, ref)
    x, y = seen[kept]
    assert torch.equal(y, sim_bank.layers[kept].inner(x)), "the overridden layer computes at fp32"
    x, y = seen[lowered]
    assert torch.equal(y, sim_bank.layers[lowered]._forwards["w4a4"](x)) and not torch.equal(y, sim_bank.layers[lowered].inner(x))
    assert sim_bank.calls[one.key] == 1 and sim_bank.active == "w4a4" and sim_bank.assignment == one
    sim_bank.set_level("w4a4")  # the uniform assignment again, as before
    assert torch.equal(_out(model, call), low)
    with pytest.raises(QschedError, match="no level of this bank quantizes it"):
        sim_bank.set_assignment(LayerAssignment("w4a4", (("conv_in", "fp32"),)))
    with pytest.raises(QschedError, match="built only fp32, w8a8, w4a4"):
        sim_bank.set_assignment(LayerAssignment("w4a4", ((sim_bank.switchable_layers[0], "w4a8"),)))


def test_real_kernel_bank_builds_one_shared_copy_per_assignment_and_matches_the_simulation(embedded, menu):
    pytest.importorskip("torchao.quantization", reason="torchao (the test extra) runs the real-kernel bank")
    from qsched_search.quant.sim_bank import SimulatedBank
    from qsched_search.quant.torchao_bank import RealKernelBank

    model, call = embedded
    layers = None
    outputs = {}
    block = "up_blocks.1.attentions.1.transformer_blocks.0"
    for cls in (SimulatedBank, RealKernelBank):
        kwargs = {"compile": "none"} if cls is RealKernelBank else {}
        bank = cls(model.denoiser, menu, ["w8a8", "w8a16"], "fp32", model.family.exclude, calibration=call, layers=layers,
                   **kwargs)
        try:
            layers = bank.quantized_layers
            a = LayerAssignment("w8a8", tuple((n, "fp32") for n in bank.switchable_layers if n.startswith(block + ".ff"))
                                + ((f"{block}.attn1.to_q", "w8a16"),))
            bank.set_assignment(a)
            outputs[cls.backend] = _out(model, call)
            if cls is RealKernelBank:
                bank.set_assignment(a)  # the same assignment again: no second copy
                b = LayerAssignment("w8a16", ((f"{block}.attn1.to_q", "w8a8"),))
                bank.prepare([b, LayerAssignment("w8a8")])
                memory = bank.memory()
                assert memory["assignment_copies"] == 2 and memory["compiled_copies"] == 3 + 2
                # Assembled from the level copies' quantized modules: no weights of their own.
                assert memory["assignment_extra_bytes"] < 0.01 * memory["denoiser_bytes"]
                mixed = bank._mixed[a]
                for name in bank.switchable_layers:  # each layer is its assigned level's module, and only that
                    level, module = a.level_of(name), mixed.get_submodule(name)
                    if level == "fp32":  # the denoiser's own weights, unquantized
                        own = bank.denoiser.get_submodule(name).weight
                        assert type(module.weight) is torch.nn.Parameter and module.weight.data_ptr() == own.data_ptr()
                    else:
                        assert module is bank._copies[level].get_submodule(name), (name, level)
                assert mixed.get_submodule(f"{block}.attn1.to_k") is bank._copies["w8a8"].get_submodule(f"{block}.attn1.to_k")
                assert type(mixed.get_submodule(f"{block}.ff.net.2").weight) is torch.nn.Parameter
        finally:
            bank.remove()
    assert torch.equal(outputs["sim"], outputs["torchao"])


def test_layer_costs_price_assignments_exactly(embedded, sim_bank):
    from qsched_search.quant.costs import CostTable

    model, _ = embedded
    costs = sim_bank.layer_costs()
    for level, expected in sim_bank.level_costs().items():
        assert costs.cost(LayerAssignment(level)) == pytest.approx(expected, rel=1e-12)
    groups = bank_groups(sim_bank, model.family)
    ff = "mid_block.attentions.0.transformer_blocks.0/ff"
    layers = groups.groups[ff]
    macs = sum(sim_bank.stats.macs[n] for n in layers)
    params = sum(dict(sim_bank.denoiser.named_modules())[n].inner.weight.numel() for n in layers)
    total_macs, total_params = sum(sim_bank.stats.macs.values()), sum(p.numel() for p in sim_bank.denoiser.parameters())
    a = LayerAssignment("w4a4", tuple((n, "fp32") for n in layers))
    got = costs.cost(a)
    base = sim_bank.level_costs()["w4a4"]
    assert got["bops"] - base["bops"] == pytest.approx(macs * (32 * 32 - 4 * 4) / (total_macs * 32 * 32), rel=1e-9)
    assert got["memory"] - base["memory"] == pytest.approx(params * (32 - 4) / (total_params * 32), rel=1e-9)
    table = CostTable.from_bank(sim_bank, groups=groups)
    schedule = [StepAssignment("w4a4", (Override("fp32", group=ff),)), "w8a8"]
    both = table.costs(schedule)
    assert both["bops"] == pytest.approx((got["bops"] + sim_bank.level_costs()["w8a8"]["bops"]) / 2)
    assert both["latency"] is None  # not measured for a mixed step
    with pytest.raises(QschedError, match="latency is known only when measured"):
        CostTable({**table.tables, "latency": {lv: 1.0 for lv in sim_bank.levels}}, table.layers, groups).cost(schedule, "latency")


def test_latency_of_overrides_is_refused_with_one_line_by_every_option_that_asks(sim_bank, embedded):
    from qsched_search.search.layer_search import item_costs
    from qsched_search.search.stage import SearchSettings

    model, _ = embedded
    groups = bank_groups(sim_bank, model.family)
    with pytest.raises(QschedError) as by_settings:
        SearchSettings(cost_model="latency", layers=True)
    with pytest.raises(QschedError) as by_item_costs:
        item_costs(groups, sim_bank.layer_costs(), sim_bank.levels, "latency")
    for refusal, option in ((by_settings, "--layers with --cost latency"), (by_item_costs, "--cost latency")):
        line = str(refusal.value)
        assert line.startswith(f"{option}: ") and "\n" not in line
        assert line.endswith("price a per-layer search by --cost bops or memory")
    assert item_costs(groups, sim_bank.layer_costs(), sim_bank.levels, "bops").fixed < 1.0  # the allowed models still work


# ------------------------------------------------------------------------------------------------ the schedule hook

def test_rollout_switches_overrides_per_step_and_the_prefix_cache_keys_include_them(embedded, sim_bank):
    from qsched_search.pipeline.rollout import Runner, make_eval_set

    model, _ = embedded
    groups = bank_groups(sim_bank, model.family)
    runner = Runner(model, sim_bank, 2, make_eval_set(["bag", "dress"], 4, 0), batch_size=4, groups=groups)
    g = groups.names[-1]
    with_override = [StepAssignment("w4a4", (Override("fp32", group=g),)), "w4a4"]
    first = runner.run(with_override)
    plain = runner.run(["w4a4", "w4a4"])  # shares no prefix with the first: its step 0 differs
    assert runner.cache.calls_served == 0
    again = runner.run([with_override[0], "fp32"])  # shares step 0 with the first
    assert runner.cache.calls_served == 1
    fresh = runner.run(["w4a4", "w4a4"], use_cache=False)
    assert torch.equal(plain.images, fresh.images) and not torch.equal(first.images, plain.images)
    cold = runner.run([with_override[0], "fp32"], use_cache=False)
    assert torch.equal(again.images, cold.images)
    assert any(k.startswith("w4a4+2xfp32#") for k in sim_bank.calls), sim_bank.calls
    assert sim_bank.assignment == LayerAssignment("fp32")  # reset to the reference after a run


def test_apply_schedule_runs_a_version_3_schedule_like_the_search_rollout(embedded, menu, tmp_path):
    from diffusers import DiffusionPipeline

    from qsched_search import apply_schedule
    from qsched_search.pipeline.rollout import Runner, make_eval_set
    from qsched_search.quant.sim_bank import SimulatedBank
    from qsched_search.resources import EMBEDDED_MODEL_DIR
    from qsched_search.results.schedule import load_schedule, save_schedule
    from tests.helpers import make_schedule

    model, call = embedded
    bank = SimulatedBank(model.denoiser, menu, ["w4a4", "w8a8"], "fp32", model.family.exclude, calibration=call)
    try:
        groups = bank_groups(bank, model.family)
        g = "down_blocks.1.attentions.0.transformer_blocks.0/ff"
        steps = [StepAssignment("w4a4", (Override("fp32", group=g), Override("w8a8", pattern="*attn2.to_[kv]"))),
                 StepAssignment("w8a8")]
        runner = Runner(model, bank, 2, make_eval_set(["sneaker"], 3, 7), batch_size=3, groups=groups)
        expected = runner.run(steps, use_cache=False).images
    finally:
        bank.remove()
    schedule = make_schedule(levels=("w4a4", "w8a8"), timesteps=(999, 499), budget=1.0,
                             overrides=(steps[0].overrides, ()), extras={"layer_groups": groups.to_dict()})
    path = save_schedule(schedule, tmp_path / "schedule.json")
    pipe = DiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL_DIR))
    handle = apply_schedule(pipe, load_schedule(path), backend="sim")
    try:
        generators = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
        images = pipe(["sneaker"] * 3, num_inference_steps=2, generator=generators, output_type="pt",
                      **model.family.call_defaults).images
        assert handle.steps[0].overrides and handle.groups.groups[g] == groups.groups[g]
    finally:
        handle.remove()
    assert torch.equal(images.float().cpu(), expected)
    # Without a recorded layer_groups section the family's groups are used, and checked.
    bad = make_schedule(levels=("w4a4", "w8a8"), timesteps=(999, 499), budget=1.0,
                        overrides=((Override("fp32", group="down_blocks.9/ff"),), ()))
    with pytest.raises(QschedError, match=r"overrides\[0\]\[0\].group = 'down_blocks.9/ff' is not in grouping 'block-role'"):
        apply_schedule(pipe, bad, backend="sim")
    assert not hasattr(pipe.unet, "_diffusers_hook") or pipe.unet._diffusers_hook.get_hook("qsched.bank") is None


# ------------------------------------------------------------------------------------------------ every family

def _family_bank(family: str, target: str, levels=("w8a8", "w4a4")):
    from qsched_search.pipeline.families import load_family
    from qsched_search.pipeline.loading import LoadedModel
    from qsched_search.pipeline.rollout import capture_denoiser_call
    from qsched_search.quant.sim_bank import SimulatedBank
    from tests.helpers import FAMILIES

    builder, _, _, extra = FAMILIES[family]
    model = LoadedModel(pipe=builder(), family=load_family(family), model_id=family, device="cpu")
    call = capture_denoiser_call(model.pipe, model.denoiser, {"guidance_scale": 0.0, "height": 32, "width": 32, **extra,
                                                              "prompt": ["bag"] * 2, "num_inference_steps": 2})
    menu = Menu(levels=load_menu().levels, target=target, source="test")
    return model, call, SimulatedBank(model.denoiser, menu, list(levels), "fp32", model.family.exclude, calibration=call)


@pytest.mark.parametrize("target", ["torchao", "generic"])
@pytest.mark.parametrize("family", ["sd-turbo", "sdxl-turbo", "lcm", "pcm", "flux-schnell"])
def test_every_grouping_of_every_family_covers_exactly_the_switchable_layers_once(family, target):
    model, _, bank = _family_bank(family, target)
    try:
        assert model.family.layer_groups and model.family.default_grouping in model.family.layer_groups
        for grouping in model.family.layer_groups:
            groups = bank_groups(bank, model.family, grouping)
            held = [n for layers in groups.groups.values() for n in layers]
            assert len(held) == len(set(held)), (grouping, "a layer in two groups")
            assert sorted(held) == sorted(bank.switchable_layers), (grouping, sorted(set(bank.switchable_layers) - set(held)))
            assert groups.ungrouped == ()
        if target == "generic" and family != "flux-schnell":
            # Convolutions switch under target generic: the UNets' resnet groups appear.
            assert any(g.endswith("/conv") for g in bank_groups(bank, model.family).names)
    finally:
        bank.remove()


@pytest.mark.parametrize("family", ["sd-turbo", "flux-schnell"])
def test_an_override_changes_exactly_the_named_layers_in_the_simulation(family):
    model, call, bank = _family_bank(family, "generic")
    try:
        groups = bank_groups(bank, model.family)
        kept, lowered = groups.names[0], groups.names[-1]
        step = StepAssignment("w4a4", (Override("fp32", group=kept), Override("w8a8", group=lowered)))
        bank.set_assignment(resolve_step(step, bank.switchable_layers, groups))
        seen = {}
        hooks = [layer.register_forward_hook(lambda m, i, o, _n=n: seen.setdefault(_n, (i[0], o)) and None)
                 for n, layer in bank.layers.items()]
        try:
            with torch.no_grad():
                model.denoiser(*call[0], **call[1])
        finally:
            for h in hooks:
                h.remove()
        assert set(seen) == set(bank.switchable_layers)
        for name, (x, y) in seen.items():
            layer = bank.layers[name]
            level = "fp32" if name in groups.groups[kept] else "w8a8" if name in groups.groups[lowered] else "w4a4"
            expected = layer.inner(x) if level == "fp32" else layer._forwards[level](x)
            assert torch.equal(y, expected), (name, level)
            if level != "w4a4":
                assert not torch.equal(y, layer._forwards["w4a4"](x)), (name, "computes as the step's level")
    finally:
        bank.remove()
