"""Calibrating Q-Sched coefficients: settings, seeds, the JAQ objectives (judge and tiny CLIP), the study and the CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from qsched_search.embedded.vocab import CLASS_NAMES
from qsched_search.errors import QschedError
from qsched_search.eval.weights import weights_dir
from qsched_search.pipeline.rollout import make_eval_set
from qsched_search.results.coefficients import Coefficients
from qsched_search.results.layout import ResultsDir
from qsched_search.search.calibrate import (CALIBRATION_SEED_OFFSET, CalibrationSettings, ClipJaq, JudgeJaq,
                                            build_objective, calibrate, calibration_set, coefficients_from_params,
                                            evaluations_to_reach)


def _app():
    from qsched_search.cli.app import app

    return app


# ------------------------------------------------------------------------------------------------ settings and seeds


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="lpips"), "--loss 'lpips' is unknown"),
    (dict(param="linear"), "--param 'linear' is unknown"),
    (dict(sampler="cma"), "--sampler 'cma' is unknown"),
    (dict(sampler="grid", param="per-step"), "ramp only"),
    (dict(trials=-1), "--trials -1"),
    (dict(low=1.2, high=0.8), "--range 1.2,0.8"),
    (dict(samples=1), "--calib-samples 1"),
    (dict(k=-2.0), "--k -2.0"),
    (dict(grid_points=1), "--grid-points 1"),
])
def test_settings_fail_in_one_line(kwargs, match):
    with pytest.raises(QschedError, match=match) as err:
        CalibrationSettings(prompts=("bag",), **kwargs)
    assert "\n" not in str(err.value)


def test_grid_evaluations_count_the_identity():
    assert CalibrationSettings(sampler="grid", grid_points=10).evaluations == 101
    assert CalibrationSettings(trials=40).evaluations == 41


def test_calibration_seeds_are_disjoint_from_evaluation_seeds():
    calib = calibration_set(CLASS_NAMES, 200, seed=3)
    assert calib.seeds[0] == 3 + CALIBRATION_SEED_OFFSET and len(set(calib.seeds)) == 200
    assert calib.prompts[:10] == CLASS_NAMES
    assert not set(calib.seeds) & set(make_eval_set(CLASS_NAMES, 100_000, seed=3).seeds)


def test_params_to_coefficients():
    ramp = coefficients_from_params({"m": 0.9, "s": 1.1}, "ramp", 3)
    assert ramp == Coefficients.from_ramp(0.9, 1.1, 3)
    free = coefficients_from_params({"m_0": 0.9, "m_1": 1.0, "s_0": 1.2, "s_1": 0.8}, "per-step", 2)
    assert free.model_coeff == (0.9, 1.0) and free.sample_coeff == (1.2, 0.8) and free.kind == "per-step"


def test_evaluations_to_reach():
    trials = pd.DataFrame({"trial": [0, 1, 2, 3], "best_so_far": [-3.0, -2.0, -2.0, -1.0]})
    assert evaluations_to_reach(trials, -2.0) == 2
    assert evaluations_to_reach(trials, -1.0) == 4
    assert evaluations_to_reach(trials, 0.0) is None


def test_jaq_needs_clip_outside_the_embedded_family():
    with pytest.raises(QschedError, match="needs a CLIP model: pass --clip-model"):
        build_objective("jaq", "stable-diffusion")
    with pytest.raises(QschedError, match="--loss 'x' is unknown"):
        build_objective("x", "embedded")


# ------------------------------------------------------------------------------------------------ the judge's JAQ


@pytest.fixture(scope="module")
def fmnist():
    from qsched_search.eval.distribution_metrics import load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("test")
    except QschedError as exc:
        pytest.skip(str(exc))
    x = torch.from_numpy(images[:400]).float().div(255).unsqueeze(1)
    return x, [CLASS_NAMES[i] for i in labels[:400]]


def test_judge_jaq_prefers_real_images_and_right_prompts(fmnist):
    images, prompts = fmnist
    jaq = JudgeJaq(k=1.0)
    real = jaq.score(images, prompts)
    assert real["accuracy"] > 0.85 and real["value"] == pytest.approx(real["alignment"] + real["quality"])
    wrong = jaq.score(images, prompts[1:] + prompts[:1])
    assert wrong["alignment"] < real["alignment"] - 1
    noisy = jaq.score((images + 0.3 * torch.randn_like(images)).clamp(0, 1), prompts)
    assert noisy["quality"] < real["quality"] and noisy["value"] < real["value"]


def test_judge_jaq_quality_penalises_lost_diversity(fmnist):
    # Every image replaced by its class mean: each one is typical, the set has no spread. A per-image score would
    # rate these well; the distance of the set to the real statistics does not.
    images, prompts = fmnist
    means = {p: images[[q == p for q in prompts]].mean(0) for p in set(prompts)}
    collapsed = torch.stack([means[p] for p in prompts])
    jaq = JudgeJaq()
    assert jaq.score(collapsed, prompts)["quality"] < jaq.score(images, prompts)["quality"] - 0.5


def test_judge_jaq_rejects_other_prompts(fmnist):
    images, _ = fmnist
    with pytest.raises(QschedError, match="class names as calibration prompts"):
        JudgeJaq().score(images[:2], ["a cat", "a dog"])


# ------------------------------------------------------------------------------------------------ CLIP's JAQ (tiny)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP with a few thousand weights and its processor, saved like a downloaded model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from qsched_search.embedded.vocab import EOS, clip_vocab_and_merges

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab, merges = clip_vocab_and_merges()
    vocab_file, merges_file = folder / "v.json", folder / "m.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token=EOS)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_jaq_matches_a_hand_computation(tiny_clip):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(1)
    images = torch.rand(3, 1, 32, 32)
    prompts = ["bag", "sneaker", "coat"]
    parts = ClipJaq(tiny_clip, k=2.0).score(images, prompts)
    assert parts["value"] == pytest.approx(parts["alignment"] + 2.0 * parts["quality"])

    # The same numbers through the canonical path: uint8 PIL images into the processor.
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)

    def tensor(out):  # transformers 5 returns the projected features in a model output
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    pil = [Image.fromarray((img[0] * 255).round().byte().numpy()).convert("RGB") for img in images]
    with torch.no_grad():
        px = proc(images=pil, return_tensors="pt")["pixel_values"]
        img_f = tensor(model.get_image_features(pixel_values=px))
        img_f = img_f / img_f.norm(dim=-1, keepdim=True)
        txt = proc(text=prompts, return_tensors="pt", padding=True)
        txt_f = tensor(model.get_text_features(input_ids=txt["input_ids"], attention_mask=txt["attention_mask"]))
        txt_f = txt_f / txt_f.norm(dim=-1, keepdim=True)
        clip = (100 * (img_f * txt_f).sum(-1)).clamp(min=0).mean()
        anchors = proc(text=["Good photo.", "Bad photo."], return_tensors="pt", padding=True)
        a = tensor(model.get_text_features(input_ids=anchors["input_ids"], attention_mask=anchors["attention_mask"]))
        a = a / a.norm(dim=-1, keepdim=True)
        iqa = (100 * img_f @ a.T).softmax(-1)[:, 0].mean()
    # uint8 rounding of the PIL path is the only difference
    assert parts["quality"] == pytest.approx(float(iqa), abs=2e-3)
    assert parts["clip_score"] == pytest.approx(float(clip), abs=0.2)
    assert parts["alignment"] == pytest.approx(math.log(max(float(clip), 1e-6)), abs=0.05)


def test_clip_jaq_needs_a_clip_folder(tmp_path):
    with pytest.raises(QschedError, match="is not a CLIP folder"):
        ClipJaq(tmp_path)


# ------------------------------------------------------------------------------------------------ the study


@pytest.fixture(scope="module")
def embedded_session():
    from qsched_search.session import RunSettings, open_session

    session = open_session(RunSettings(steps=2, samples=8, precisions=("w4a4",), batch_size=64), metrics=False)
    yield session
    session.close()


@pytest.mark.slow
def test_calibrate_on_the_embedded_model(embedded_session):
    s = embedded_session
    settings = CalibrationSettings(trials=2, prompts=CLASS_NAMES[:4], samples=12, seed=5)
    seen = []
    result = calibrate(s.runner, ["w4a4", "w4a4"], settings, build_objective("jaq", "embedded"),
                       eval_seeds=s.eval_set.seeds, on_trial=seen.append)
    assert len(result.trials) == 3 == len(seen) == result.evaluations
    assert result.trials.source.iloc[0] == "identity" and result.trials.m.iloc[0] == 1.0
    assert result.best["value"] >= result.baseline["value"] and result.gain >= 0
    assert (result.trials.best_so_far.diff().dropna() >= 0).all()
    cal = result.coefficients.calibration
    assert cal["seeds"]["first"] == 5 + CALIBRATION_SEED_OFFSET and cal["prompts"] == sorted(CLASS_NAMES[:4])
    assert not cal["full_precision_inference"] and cal["loss"] == "jaq"
    assert result.timesteps and len(result.timesteps) == 2
    # The pipeline and the bank are as they were.
    assert "step" not in vars(s.model.pipe.scheduler) and s.bank.active == s.bank.reference
    Coefficients.from_dict(result.coefficients.to_dict(), steps=2)


def test_calibration_seeds_that_collide_with_evaluation_fail(embedded_session):
    s = embedded_session
    settings = CalibrationSettings(trials=0, prompts=CLASS_NAMES, samples=4, seed=0)
    with pytest.raises(QschedError, match="also evaluation seeds"):
        calibrate(s.runner, ["w4a4"] * 2, settings, build_objective("jaq", "embedded"),
                  eval_seeds=range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + 10))
    with pytest.raises(QschedError, match="no calibration prompts"):
        calibrate(s.runner, ["w4a4"] * 2, CalibrationSettings(trials=0), build_objective("jaq", "embedded"))
    with pytest.raises(QschedError, match="3 levels for 2 steps"):
        calibrate(s.runner, ["w4a4"] * 3, settings, build_objective("jaq", "embedded"))


@pytest.mark.slow
def test_calibrate_a_clip_family_pipeline(tiny_sd_folder, tiny_clip):
    from qsched_search.session import RunSettings, open_session

    session = open_session(RunSettings(model=str(tiny_sd_folder), steps=2, samples=4, precisions=("w4a4",),
                                       prompts=("bag", "coat"), call_kwargs={"guidance_scale": 0.0, "height": 32, "width": 32}), metrics=False)
    try:
        objective = build_objective("jaq", session.model.family.family, clip_model=str(tiny_clip))
        assert isinstance(objective, ClipJaq) and objective.k == 2.0
        result = calibrate(session.runner, ["w4a4"] * 2,
                           CalibrationSettings(trials=2, sampler="random", prompts=("bag", "coat"), samples=4),
                           objective, eval_seeds=session.eval_set.seeds)
        assert set(result.trials.columns) >= {"alignment", "quality", "clip_score", "value"}
        assert np.isfinite(result.trials.value).all()
    finally:
        session.close()


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("args, expected", [
    (["--steps", "2"], "give exactly one of --precision LEVEL"),
    (["--steps", "2", "--precision", "w4a4", "--schedule", "x.json"], "got both"),
    (["--steps", "2", "--precision", "w4a4", "--sampler", "grid", "--param", "per-step"], "ramp only"),
    (["--steps", "2", "--precision", "w4a4", "--range", "1.2"], "--range '1.2' is invalid"),
    (["--precision", "w4a4"], "--steps must be at least 1"),
    (["--schedule", "missing.json"], "not found"),
])
def test_cli_errors_are_one_line(tmp_path, args, expected):
    result = CliRunner().invoke(_app(), ["calibrate", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "deprecat" not in line.lower()]
    assert len(lines) == 1 and expected in lines[0], result.output


@pytest.mark.slow
def test_cli_calibrate_writes_a_schedule_that_loads(tmp_path):
    from qsched_search.results.schedule import load_schedule

    out = tmp_path / "uniform"
    args = ["calibrate", "--steps", "2", "--precision", "w4a4", "--calib-samples", "10", "--calib-prompts", "5",
            "--trials", "1", "--batch-size", "16", "--out", str(out)]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    schedule = load_schedule(out / "schedule.json")
    coeffs = Coefficients.from_dict(schedule.extras["coefficients"], steps=schedule.steps)
    assert schedule.levels == ("w4a4", "w4a4") and schedule.budget == 1.0
    assert schedule.quality.metric == "calibration:jaq-judge" and schedule.quality.n == 10
    assert coeffs.calibration["prompts"] == sorted(CLASS_NAMES[:5])
    assert json.loads(ResultsDir(out).coefficients.read_text()) == schedule.extras["coefficients"]
    assert len(pd.read_csv(ResultsDir(out).calibration_trials_csv)) == 2
    # The schedule records how its levels ran, so that generate quantizes the layers calibrated.
    assert schedule.backend == "sim" and schedule.quantized_layers("w4a4")
    # Calibrating a schedule file keeps its fields and sets its coefficients.
    again = tmp_path / "again"
    result = CliRunner().invoke(_app(), ["calibrate", "--schedule", str(out / "schedule.json"), "--calib-samples",
                                         "10", "--trials", "1", "--sampler", "random", "--out", str(again)])
    assert result.exit_code == 0, result.output
    second = load_schedule(again / "schedule.json")
    assert second.levels == schedule.levels and second.provenance == schedule.provenance
    assert second.extras["coefficients"]["calibration"]["sampler"] == "random"


@pytest.mark.skipif(not os.environ.get("CI") and not (weights_dir(None) / "alexnet.pth").is_file(),
                    reason="LPIPS weights not fetched; run `qsched weights fetch`")
@pytest.mark.slow
def test_reference_loss_runs_full_precision_once(embedded_session):
    s = embedded_session
    before = dict(s.bank.calls)  # denoiser calls per level, counted by the bank at the level each call ran at
    result = calibrate(s.runner, ["w4a4"] * 2, CalibrationSettings(loss="reference", trials=1,
                       prompts=CLASS_NAMES, samples=6), build_objective("reference", "embedded"),
                       eval_seeds=s.eval_set.seeds)
    assert s.bank.calls["fp32"] - before.get("fp32", 0) == 2  # one full-precision run of 2 steps, one batch
    assert s.bank.calls["w4a4"] - before.get("w4a4", 0) == 2 * 2  # the identity and one trial
    assert result.coefficients.calibration["full_precision_inference"]
    assert "lpips" in result.trials and (result.trials.lpips >= 0).all()
