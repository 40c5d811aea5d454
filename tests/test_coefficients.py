"""Q-Sched coefficients: the dataclass, its JSON section, and the step wrapper against the published patched schedulers."""

from __future__ import annotations

import inspect
import math

import jsonschema
import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       HeunDiscreteScheduler, LCMScheduler, TCDScheduler)
from diffusers.utils.torch_utils import randn_tensor

from qsched_search.errors import QschedError
from qsched_search.pipeline.coefficients import AppliedCoefficients, apply_coefficients
from qsched_search.results.coefficients import COEFFICIENTS_SCHEMA, Coefficients, validate_coefficients_dict
from tests.helpers import build_tiny_sd_pipeline

COMMON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ------------------------------------------------------------------------------------------------ the dataclass


def test_ramp_is_the_published_linspace():
    # Exactly the published code's float32 torch.linspace values (a float64 formula differs by ~4e-6, which bf16
    # samplers amplify to whole ulps).
    c = Coefficients.from_ramp(0.9, 1.1, 4)
    assert c.model_coeff == tuple(torch.linspace(0.9, 1, 4, dtype=torch.float32).tolist())
    assert c.sample_coeff == tuple(torch.linspace(1.1, 1, 4, dtype=torch.float32).tolist())
    torch.testing.assert_close(torch.tensor(c.model_coeff, dtype=torch.float64), torch.linspace(0.9, 1, 4, dtype=torch.float64))
    assert c.kind == "ramp" and c.ramp == (0.9, 1.1) and c.steps == 4
    # torch.linspace(m, 1, 1) == [m], in float32
    assert Coefficients.from_ramp(0.9, 1.1, 1).model_coeff == (torch.tensor(0.9, dtype=torch.float32).item(),)


def test_identity_default_and_views():
    c = Coefficients.identity(3)
    assert c.is_identity and c.kind == "identity" and c.at(2) == (1.0, 1.0)
    assert not Coefficients.from_ramp(0.9, 1.0, 3).is_identity
    with pytest.raises(QschedError, match="num_inference_steps=3"):
        c.at(3)


@pytest.mark.parametrize("coeffs", [Coefficients.identity(2), Coefficients.from_ramp(0.85, 1.15, 4),
                                    Coefficients.per_step([1.0, 0.9], [1.1, 1.0], calibration={"loss": "jaq"})])
def test_json_round_trip_and_schema(coeffs):
    obj = coeffs.to_dict()
    jsonschema.Draft202012Validator(COEFFICIENTS_SCHEMA).validate(obj)
    back = Coefficients.from_dict(obj, steps=coeffs.steps)
    assert back == coeffs and back.calibration == coeffs.calibration


@pytest.mark.parametrize("obj, match", [
    ({"kind": "ramp", "model_coeff": [1.0], "sample_coeff": [1.0]}, "version is missing"),
    ({"version": 1, "kind": "linear", "model_coeff": [1.0], "sample_coeff": [1.0]}, "kind = linear"),
    ({"version": 1, "kind": "per-step", "model_coeff": [1.0, -0.5], "sample_coeff": [1.0, 1.0]}, "model_coeff.1"),
    ({"version": 1, "kind": "per-step", "model_coeff": [1.0, 1.0], "sample_coeff": [1.0]}, "has 2 values but"),
    ({"version": 1, "kind": "ramp", "model_coeff": [1.0], "sample_coeff": [1.0]}, "needs ramp"),
    ({"version": 1, "kind": "ramp", "ramp": {"m": 0.9, "s": 1.0}, "model_coeff": [1.0, 1.0],
      "sample_coeff": [1.0, 1.0]}, "are not linspace"),
    ({"version": 1, "kind": "identity", "model_coeff": [0.9], "sample_coeff": [1.0]}, "values other than 1"),
    ([1, 2], "invalid"),
])
def test_bad_sections_fail_in_one_line(obj, match):
    with pytest.raises(QschedError, match=match) as err:
        Coefficients.from_dict(obj, source="s.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("s.json")


def test_steps_must_match_the_schedule():
    with pytest.raises(QschedError, match="cover 4 steps but the schedule has 2"):
        Coefficients.from_dict(Coefficients.from_ramp(0.9, 1.0, 4).to_dict(), steps=2)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_values_must_be_positive_finite_numbers(bad):
    with pytest.raises(QschedError):
        Coefficients.per_step([1.0, bad], [1.0, 1.0])


def test_far_values_warn(caplog):
    Coefficients.per_step([3.0], [1.0])
    assert "outside" in caplog.text


def test_schema_fragment_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(COEFFICIENTS_SCHEMA)
    validate_coefficients_dict(Coefficients.from_ramp(0.9, 1.1, 2).to_dict())


# ------------------------------------------------------------------------------------------------ the wrapper


def _lcm():
    return LCMScheduler(**COMMON)


def _euler_a():
    return EulerAncestralDiscreteScheduler(**COMMON, timestep_spacing="trailing")


def _tcd():
    return TCDScheduler(**COMMON)


def _flow():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


# The published Q-Sched patch of each scheduler, written out: at step i, model_output * m_i and sample * s_i are
# taken at the top of step() and used for the whole update (epsilon / flow prediction).
def _paper_lcm(sch, i, t, eps, x, m, s, gen):
    ts = sch.timesteps
    prev_t = ts[i + 1] if i + 1 < len(ts) else t
    a_t = sch.alphas_cumprod[t]
    a_prev = sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.final_alpha_cumprod
    c_skip, c_out = sch.get_scalings_for_boundary_condition_discrete(t)
    x0 = (s * x - (1 - a_t).sqrt() * m * eps) / a_t.sqrt()
    denoised = c_out * x0 + c_skip * s * x
    if i == len(ts) - 1:
        return denoised
    noise = randn_tensor(eps.shape, generator=gen, device=eps.device, dtype=denoised.dtype)
    return a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise


def _paper_euler_a(sch, i, t, eps, x, m, s, gen):
    sigma, sigma_to = sch.sigmas[i], sch.sigmas[i + 1]
    x = x.float() * s
    eps = eps * m
    x0 = x - sigma * eps
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    prev = x + (x - x0) / sigma * (sigma_down - sigma)
    noise = randn_tensor(eps.shape, dtype=eps.dtype, device=eps.device, generator=gen)
    return prev + noise * sigma_up


def _paper_tcd(sch, i, t, eps, x, m, s, gen, eta=0.3):
    ts = sch.timesteps
    prev_t = ts[i + 1] if i + 1 < len(ts) else torch.tensor(0)
    t_s = torch.floor((1 - eta) * prev_t).to(dtype=torch.long)
    a_t, a_s = sch.alphas_cumprod[t], sch.alphas_cumprod[t_s]
    a_prev = sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.final_alpha_cumprod
    eps, x = eps * m, x * s
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    pn = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    if i == len(ts) - 1:
        return pn
    noise = randn_tensor(eps.shape, generator=gen, device=eps.device, dtype=pn.dtype)
    return (a_prev / a_s).sqrt() * pn + (1 - a_prev / a_s).sqrt() * noise


def _paper_flow(sch, i, t, v, x, m, s, gen):
    return x.float() * s + (sch.sigmas[i + 1] - sch.sigmas[i]) * (v * m)


SCHEDULERS = {"lcm": (_lcm, _paper_lcm, {}), "euler-ancestral": (_euler_a, _paper_euler_a, {}),
              "tcd": (_tcd, _paper_tcd, {"eta": 0.3}), "flow-match-euler": (_flow, _paper_flow, {})}


def _rollout(scheduler, steps, coeffs=None, paper=None, kwargs=None, seed=0):
    """Runs every step on seeded random 'denoiser outputs', through step() or through the written-out patch."""
    kwargs = kwargs or {}
    scheduler.set_timesteps(steps)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    outs = torch.Generator().manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.randn(x.shape, generator=outs)
        if paper is None:
            x = scheduler.step(eps, t, x, generator=gen, return_dict=False, **kwargs)[0]
        else:
            m, s = coeffs.at(i)
            x = paper(scheduler, i, t, eps, x, m, s, gen)
            scheduler._step_index = i + 1  # keep the scheduler's own bookkeeping in line, as step() would
    return x


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 4])
def test_wrapper_equals_the_published_patch(name, steps):
    make, paper, kwargs = SCHEDULERS[name]
    coeffs = Coefficients.per_step([0.9, 1.05, 0.97, 1.1][:steps], [1.08, 0.95, 1.02, 0.9][:steps])
    sch = make()
    with apply_coefficients(sch, coeffs) as applied:
        wrapped = _rollout(sch, steps, kwargs=kwargs)
        assert applied.seen == list(range(steps))
    written_out = _rollout(make(), steps, coeffs, paper, kwargs)
    torch.testing.assert_close(wrapped, written_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_identity_is_the_stock_step_bit_for_bit_and_remove_restores(name):
    make, _, kwargs = SCHEDULERS[name]
    sch = make()
    stock = _rollout(sch, 4, kwargs=kwargs)
    applied = apply_coefficients(sch, Coefficients.identity(4))
    assert torch.equal(_rollout(sch, 4, kwargs=kwargs), stock)
    applied.remove()
    assert "step" not in vars(sch) and "set_timesteps" not in vars(sch)
    applied.remove()  # twice is harmless
    with apply_coefficients(sch, Coefficients.from_ramp(0.9, 1.1, 4)):
        assert not torch.equal(_rollout(sch, 4, kwargs=kwargs), stock)
    assert torch.equal(_rollout(sch, 4, kwargs=kwargs), stock)


def test_wrapper_keeps_the_step_signature():
    # Pipelines pass `generator` (and `eta`) only if step()'s signature names them.
    sch = _tcd()
    with apply_coefficients(sch, Coefficients.identity(2)):
        params = inspect.signature(sch.step).parameters
        assert "generator" in params and "eta" in params


def test_wrong_step_count_and_double_install_and_second_order_fail():
    sch = _lcm()
    with apply_coefficients(sch, Coefficients.from_ramp(0.9, 1.0, 4)):
        with pytest.raises(QschedError, match="runs 2 denoising steps but the coefficients were made for 4"):
            sch.set_timesteps(2)
        with pytest.raises(QschedError, match="already has coefficients"):
            apply_coefficients(sch, Coefficients.identity(4))
    with pytest.raises(QschedError, match="order 2"):
        apply_coefficients(HeunDiscreteScheduler(**COMMON), Coefficients.identity(2))
    with pytest.raises(QschedError, match="must be a Coefficients"):
        AppliedCoefficients(_lcm(), {"m": 1})
    assert apply_coefficients(_lcm(), None) is None


def test_scheduler_without_step_index_counts_calls():
    sch = DDIMScheduler(**COMMON)
    assert not hasattr(type(sch), "step_index")
    with apply_coefficients(sch, Coefficients.per_step([0.9, 1.0, 1.1], [1.0, 1.0, 1.0])) as applied:
        _rollout(sch, 3)
        assert applied.seen == [0, 1, 2]
        _rollout(sch, 3)  # set_timesteps starts the count again
        assert applied.seen == [0, 1, 2]


def test_sixteen_bit_sample_is_scaled_after_the_upcast():
    coeffs = Coefficients.per_step([1.0], [1.0 + 2**-9])  # below bf16's resolution at 1
    sch = _flow()
    sch.set_timesteps(1)
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    v = torch.zeros(1, 4, dtype=torch.bfloat16)
    with apply_coefficients(sch, coeffs):
        out = sch.step(v, sch.timesteps[0], x, return_dict=False)[0]
    assert out.dtype == torch.bfloat16
    # float32 scaling then the stock cast back: what the published patch computes.
    assert torch.equal(out, (x.float() * (1 + 2**-9)).to(torch.bfloat16))


def test_dict_section_is_accepted():
    sch = _lcm()
    applied = apply_coefficients(sch, Coefficients.from_ramp(0.9, 1.0, 2).to_dict())
    assert applied.coefficients.kind == "ramp"
    applied.remove()


# ------------------------------------------------------------------------------------------------ in a pipeline


@pytest.mark.parametrize("scheduler", ["euler-ancestral", "lcm"])
def test_pipeline_with_coefficients_is_reproducible_and_restored(scheduler):
    pipe = build_tiny_sd_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)

    def run():
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return pipe(["bag", "sneaker"], num_inference_steps=3, guidance_scale=0.0, height=32, width=32,
                    generator=gens, output_type="pt").images

    stock = run()
    with apply_coefficients(pipe, Coefficients.identity(3)):
        assert torch.equal(run(), stock)
    with apply_coefficients(pipe, Coefficients.from_ramp(0.85, 1.15, 3)) as applied:
        a, b = run(), run()
        assert applied.seen == [0, 1, 2]
    # The seeded generators reach the wrapped step: the same seeds give the same images.
    assert torch.equal(a, b) and not torch.equal(a, stock)
    assert torch.equal(run(), stock)
