"""`qsched search --with-coefficients`: Pareto schedules calibrated, measured with and without coefficients."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from qsched_search.errors import QschedError
from qsched_search.results.coefficients import Coefficients
from qsched_search.results.layout import ResultsDir
from qsched_search.results.records import Estimate, Measurement
from qsched_search.results.schedule import load_schedule, save_schedule
from qsched_search.search import joint
from tests.helpers import fake_evaluation, make_schedule


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="clip"), "--coefficients-loss 'clip' is unknown"),
    (dict(candidates=0), "--coefficients-candidates 0"),
    (dict(samples=1), "--calib-samples 1"),
    (dict(param="cubic"), "--param 'cubic'"),
])
def test_bad_settings_fail_in_one_line(kwargs, match):
    with pytest.raises(QschedError, match=match):
        joint.JointSettings(**kwargs)


def test_auto_loss_follows_the_objective():
    settings = joint.JointSettings()
    assert settings.loss_for(SimpleNamespace(paired=True)) == "reference"
    assert settings.loss_for(SimpleNamespace(paired=False)) == "jaq"
    assert joint.JointSettings(loss="jaq").loss_for(SimpleNamespace(paired=True)) == "jaq"


# ------------------------------------------------------------------------- the bookkeeping, with a fake evaluator

LEVELS = ("w8a8", "fp32", "w4a8", "w4a4")  # make_schedule's chosen schedule


def _fake_session(measure):
    """A session whose evaluator reports `measure(levels, scaled)`; `scaled` says whether coefficients are on."""
    from diffusers import LCMScheduler

    pipe = SimpleNamespace(scheduler=LCMScheduler())
    metric = SimpleNamespace(name="lpips", paired=True)

    def evaluate(levels):
        scaled = "step" in vars(pipe.scheduler)
        value = measure(tuple(levels), scaled)
        return fake_evaluation(levels, estimates={"lpips": Estimate(value, value - 0.01, value + 0.01, 16)})

    return SimpleNamespace(
        evaluator=SimpleNamespace(metrics=[metric], evaluate=evaluate),
        model=SimpleNamespace(pipe=pipe, family=SimpleNamespace(family="embedded", default_prompts=("bag",))),
        eval_set=SimpleNamespace(seeds=tuple(range(16)), prompts=("bag",) * 16), runner=None,
        settings=SimpleNamespace(device="cpu", weights_dir=None, seed=0))


def _fake_search(front_rows, comparison=None, measured=None):
    schedule = make_schedule()
    front = pd.DataFrame(front_rows, columns=["schedule", "cost", "value", "ci_low", "ci_high", "n"])
    return SimpleNamespace(schedule=schedule, front=front, comparison=comparison, measured=measured or {})


FRONT = [
    ("w4a4,w4a4,w4a4,w4a4", 0.019, 0.30, 0.29, 0.31, 16),
    (",".join(LEVELS), 0.28, 0.021, 0.014, 0.028, 16),
    ("fp32,fp32,fp32,fp32", 1.0, 0.0, 0.0, 0.0, 16),  # over budget, and nothing to correct
]


@pytest.fixture
def fake_calibrate(monkeypatch):
    calls = []

    def calibrate(runner, levels, settings, objective, *, eval_seeds=()):
        calls.append((tuple(levels), settings.loss, tuple(eval_seeds)))
        coeffs = Coefficients.from_ramp(0.9, 1.02, steps=len(levels))
        return SimpleNamespace(coefficients=coeffs, best={"value": -0.1}, baseline={"value": -0.2}, evaluations=3)

    monkeypatch.setattr(joint, "calibrate", calibrate)
    monkeypatch.setattr(joint, "build_objective", lambda loss, family, **kw: SimpleNamespace(name=f"fake-{loss}"))
    return calls


@pytest.mark.parametrize("helps", [True, False])
def test_schedule_json_carries_coefficients_only_when_they_measured_better(tmp_path, fake_calibrate, helps):
    def measure(levels, scaled):
        base = dict((r[0], r[2]) for r in FRONT)[",".join(levels)]
        return base - 0.005 if scaled and helps else base + 0.005 if scaled else base

    results = ResultsDir(tmp_path)
    out = joint.calibrate_front(_fake_session(measure), _fake_search(FRONT), joint.JointSettings())
    # Nothing is written by the calibration: the search stage writes its result once.
    assert list(tmp_path.iterdir()) == []
    out.front.to_csv(results.pareto_coefficients_csv, index=False)
    save_schedule(out.schedule, results.schedule)
    # Both quantized Pareto schedules within the budget, the best first; never the all-reference one.
    assert [c[0] for c in fake_calibrate] == [LEVELS, ("w4a4",) * 4]
    assert all(c[1] == "reference" and c[2] == tuple(range(16)) for c in fake_calibrate)
    front = pd.read_csv(results.pareto_coefficients_csv)
    assert list(front.schedule) == [",".join(LEVELS), "w4a4,w4a4,w4a4,w4a4"]
    assert front.value.tolist() == [0.021, 0.30]
    assert front.value_with.tolist() == pytest.approx([0.016, 0.295] if helps else [0.026, 0.305])
    assert front.improved.tolist() == [helps, helps] and out.applied is helps
    saved = load_schedule(results.schedule)
    record = saved.extras["search"]["coefficients"]
    assert record["applied"] is helps and record["without"]["value"] == 0.021
    assert record["with"]["value"] == pytest.approx(0.016 if helps else 0.026)
    if helps:
        assert saved.coefficients.ramp == pytest.approx((0.9, 1.02))
        assert saved.quality.value == pytest.approx(0.016)
    else:
        assert saved.coefficients is None and saved.quality.value == 0.021
    # The report's headline says what was kept and why.
    from qsched_search.report.text import _coefficients_fact

    label, value, detail = _coefficients_fact(json.loads(results.schedule.read_text()))
    assert label == "Coefficients" and value == ("ramp m=0.9000 s=1.0200 (4 steps)" if helps else "none")
    assert ("kept: they measured better" in detail) is helps and "lpips without 0.021" in detail


def test_identity_coefficients_are_not_measured_again(tmp_path, monkeypatch, fake_calibrate):
    def calibrate(runner, levels, settings, objective, *, eval_seeds=()):
        return SimpleNamespace(coefficients=Coefficients.identity(len(levels)), best={"value": -0.2},
                               baseline={"value": -0.2}, evaluations=3)

    monkeypatch.setattr(joint, "calibrate", calibrate)

    def measure(levels, scaled):
        raise AssertionError("the identity's measurement is the search's; nothing runs again")

    out = joint.calibrate_front(_fake_session(measure), _fake_search(FRONT), joint.JointSettings(candidates=1))
    assert len(out.front) == 1 and out.front.value_with.iloc[0] == out.front.value.iloc[0]
    assert not out.applied and out.schedule.coefficients is None


def test_the_paired_comparison_is_of_the_schedule_with_its_coefficients(fake_calibrate):
    def measure(levels, scaled):
        base = dict((r[0], r[2]) for r in FRONT)[",".join(levels)]
        return base - 0.005 if scaled else base

    # The search compared the chosen schedule with uniform w4a8, sample by sample.
    baseline = Measurement(estimates={"lpips": Estimate(0.05, 0.04, 0.06, 16, tuple(0.05 + 0.001 * k for k in range(16)))})
    search = _fake_search(FRONT, comparison={"baseline": "w4a8,w4a8,w4a8,w4a8"},
                          measured={"w4a8,w4a8,w4a8,w4a8": baseline})

    session = _fake_session(measure)
    evaluate = session.evaluator.evaluate

    def evaluate_per_image(levels):  # the fake evaluator, with per-sample values around its mean
        evaluation = evaluate(levels)
        est = evaluation.estimates["lpips"]
        per_image = tuple(est.value + 0.0001 * (k - 7.5) for k in range(16))
        return fake_evaluation(levels, estimates={"lpips": Estimate(est.value, est.ci_low, est.ci_high, 16, per_image)})

    session.evaluator.evaluate = evaluate_per_image
    out = joint.calibrate_front(session, search, joint.JointSettings())
    assert out.applied
    comparison = out.schedule.extras["comparison"]
    assert comparison["baseline"] == "w4a8,w4a8,w4a8,w4a8" and comparison["n"] == 16
    assert comparison["difference"] == pytest.approx(0.016 - (0.05 + 0.0075), abs=1e-9)
    assert comparison["verdict"] == "better"
    assert out.schedule.quality.per_image == pytest.approx([0.016 + 0.0001 * (k - 7.5) for k in range(16)])


# ------------------------------------------------------------------------- the command on the embedded model


@pytest.mark.slow
def test_search_with_coefficients_on_the_embedded_model(tmp_path):
    from qsched_search.cli.app import app

    args = ["search", "--steps", "2", "--precisions", "w4a4", "--samples", "6", "--budget", "0.9", "--images", "0",
            "--with-coefficients", "--coefficients-trials", "2", "--coefficients-samples", "6", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = ResultsDir(tmp_path)
    pareto = pd.read_csv(results.pareto_csv)
    front = pd.read_csv(results.pareto_coefficients_csv)
    assert len(front) >= 1 and (front.cost <= 0.9).all()
    # "without" is the search's own measurement of that schedule.
    merged = front.merge(pareto[["schedule", "value"]], on="schedule", suffixes=("", "_search"))
    assert len(merged) == len(front) and (merged.value == merged.value_search).all()
    assert front.value_with.notna().all() and front.calibration_evaluations.eq(3).all()
    obj = json.loads(results.schedule.read_text())
    record = obj["search"]["coefficients"]
    chosen = front[front.schedule == ",".join(obj["levels"])]
    assert record["applied"] == bool(chosen.improved.iloc[0]) and record["loss"] == "reference"
    assert ("coefficients" in obj) == record["applied"]
