"""Trajectory prefix reuse is exact: a schedule resumed from a shared prefix makes the images of a run from noise."""

from __future__ import annotations

import pytest
import torch

from qsched_search.pipeline.loading import LoadedModel
from qsched_search.pipeline.prefix_cache import PrefixCache
from qsched_search.pipeline.rollout import Runner, capture_denoiser_call, make_eval_set
from qsched_search.quant.levels import Menu, load_menu
from qsched_search.quant.sim_bank import SimulatedBank

# Two schedules sharing their first two steps, and one sharing only the first.
FIRST = ("w8a8", "w4a4", "fp32")
SHARES_TWO = ("w8a8", "w4a4", "w8a8")
SHARES_ONE = ("w8a8", "fp32", "w4a4")


def _model(family: str) -> tuple[LoadedModel, dict]:
    """The model and the call arguments its tiny pipeline needs."""
    from qsched_search.pipeline.families import load_family

    if family == "embedded":
        from qsched_search.pipeline.loading import load_model

        return load_model("embedded"), {}
    from tests.helpers import FAMILIES

    builder, _, _, call = FAMILIES[family]
    return LoadedModel(pipe=builder(), family=load_family(family), model_id=family, device="cpu"), call


def _runner(model: LoadedModel, bank, cache: PrefixCache, call: dict) -> Runner:
    eval_set = make_eval_set(["bag", "sneaker", "coat"], 3, 7)
    return Runner(model, bank, 3, eval_set, batch_size=2, call_kwargs=call, prefix_cache=cache)


@pytest.mark.parametrize("family", ["embedded", "sd-turbo", "sdxl-turbo", "lcm", "pcm", "flux-schnell"])
def test_a_schedule_resumed_from_a_shared_prefix_makes_the_images_of_a_run_from_noise(family):
    """Euler ancestral, LCM and TCD draw noise from the samples' generators at every step, flow-match Euler does
    not: in each, the resumed run's images equal the uncached run's bit for bit."""
    model, extra = _model(family)
    # generic: every Linear and Conv2d rounds, so the levels differ visibly even on tiny random pipelines.
    menu = Menu(levels=load_menu().levels, target="generic", source="test")
    call = {"guidance_scale": 0.0, "height": 32, "width": 32, **extra}
    calibration = capture_denoiser_call(model.pipe, model.denoiser, {**call, "prompt": ["bag"] * 2,
                                                                     "num_inference_steps": 3})
    bank = SimulatedBank(model.denoiser, menu, ["w8a8", "w4a4"], "fp32", model.family.exclude, calibration=calibration)
    try:
        cold = _runner(model, bank, PrefixCache(0), extra)
        warm = _runner(model, bank, PrefixCache(), extra)
        expected = {levels: cold.run(levels).images for levels in (FIRST, SHARES_TWO, SHARES_ONE)}
        assert not torch.equal(expected[FIRST], expected[SHARES_TWO])  # the last step's level shows
        warm.run(FIRST)
        served = warm.cache.calls_served
        for levels in (SHARES_TWO, SHARES_ONE):
            assert torch.equal(warm.run(levels).images, expected[levels]), levels
        # 2 batches x (2 shared steps of SHARES_TWO + 1 of SHARES_ONE) came from the cache.
        assert warm.cache.calls_served - served == 2 * 3
        assert cold.cache.calls_served == 0 and cold.cache.calls_run == 3 * 2 * 3
    finally:
        bank.remove()


def test_coefficients_and_the_noise_floor_are_never_answered_from_other_runs():
    from qsched_search.pipeline.coefficients import apply_coefficients
    from qsched_search.results.coefficients import Coefficients

    model, _ = _model("embedded")
    menu = load_menu()
    bank = SimulatedBank(model.denoiser, menu, ["w8a8", "w4a4"], "fp32", model.family.exclude)
    try:
        warm = _runner(model, bank, PrefixCache(), {})
        cold = _runner(model, bank, PrefixCache(0), {})
        warm.run(FIRST)
        coefficients = Coefficients.from_ramp(0.9, 1.05, 3)
        with apply_coefficients(model.pipe, coefficients):
            expected = cold.run(SHARES_TWO).images
            served = warm.cache.calls_served
            assert torch.equal(warm.run(SHARES_TWO).images, expected)
            assert warm.cache.calls_served == served  # other coefficients: another trajectory, nothing reused
        served = warm.cache.calls_served
        warm.run(FIRST, use_cache=False)  # a re-run that must measure run-to-run differences
        assert warm.cache.calls_served == served
    finally:
        bank.remove()


def test_the_cache_drops_the_least_recently_used_outputs_within_its_budget():
    cache = PrefixCache(max_bytes=3 * 4 * 10)  # three 10-float outputs
    for k in range(4):
        cache.put(k, torch.zeros(10))
    assert len(cache) == 3 and cache.get(0) is None and cache.get(3) is not None and cache.evicted == 1
    out = cache.get(3)
    out += 1  # a caller changing its copy does not change the kept output
    assert torch.equal(cache.get(3), torch.zeros(10))
    assert PrefixCache(0).max_bytes == 0
    auto = PrefixCache()
    auto.size_from(1000)
    assert auto.max_bytes == PrefixCache.AUTO_STEPS * 1000
