"""`qsched probe --layers` and `qsched precisions --groups`: the step x group table, resuming, fewer samples, sizes."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from qsched_search.cli.app import app
from qsched_search.results.layout import ResultsDir

# 2 steps x 5 groups (grouping "role") at w4a4: 10 group cells and the noise floor.
FAST = ["--steps", "2", "--precisions", "w4a4,w8a8", "--samples", "4", "--metrics", "ssim", "--layers",
        "--grouping", "role", "--layer-precisions", "w4a4"]
ROLES = ["attn1.qkv", "attn1.out", "attn2.qkv", "attn2.out", "ff"]


def run(*args: str):
    return CliRunner().invoke(app, ["probe", *args])


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers")
    result = run(*FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def _count_evaluations(monkeypatch) -> list:
    from qsched_search.eval import evaluate

    calls = []
    original = evaluate.ScheduleEvaluator.evaluate
    monkeypatch.setattr(evaluate.ScheduleEvaluator, "evaluate",
                        lambda self, levels, **kw: calls.append(tuple(levels)) or original(self, levels, **kw))
    return calls


def _start_from(probed, tmp_path, layer_lines: int | None = None, cut: bool = False) -> None:
    """The step probe's finished cells, and the first `layer_lines` finished layer cells (all if None)."""
    source = ResultsDir(probed)
    shutil.copy(source.probe_cells, tmp_path / "probe_cells.jsonl")
    lines = source.probe_layer_cells.read_text().splitlines()
    kept = lines if layer_lines is None else lines[:layer_lines]
    (tmp_path / "probe_layer_cells.jsonl").write_text("\n".join(kept) + "\n" + ('{"truncat' if cut else ""))


def test_layer_probe_writes_each_group_alone_at_each_step(probed):
    results = ResultsDir(probed)
    frame = pd.read_csv(results.probe_layers_csv)
    groups = frame[frame.kind == "group"]
    assert len(groups) == 2 * 5  # steps x groups (one level, one metric)
    assert set(frame.kind) == {"reference", "group"} and set(groups.precision) == {"w4a4"}
    assert list(dict.fromkeys(groups.group)) == ROLES and sorted(set(groups.step)) == [0, 1]
    assert (frame.n == 4).all()
    assert (groups.ci_low <= groups.value).all() and (groups.value <= groups.ci_high).all()
    floor = frame[frame.kind == "reference"]
    assert len(floor) == 1 and floor.value.iloc[0] == 1.0 and floor.delta.iloc[0] == 0  # a CPU re-run equals itself
    assert (groups.delta < 0).all(), "every group at w4a4 moves the images off the reference"
    assert results.probe_layers_heatmap("w4a4").stat().st_size > 5000
    stage = json.loads(results.manifest.read_text())["stages"]["probe_layers"]
    assert stage["grouping"] == "role" and stage["groups"] == 5 and stage["samples"] == 4
    assert stage["fewer_samples_than_step_cells"] is False and stage["layer_levels"] == ["w4a4"]
    # One group at w4a4 in a step hurts less than the whole step at w4a4 (the step probe's cell).
    step = pd.read_csv(results.probe_csv)
    whole = step[(step.kind == "step") & (step.precision == "w4a4")].set_index("step").value
    for s, value in groups.groupby("step").value.min().items():
        assert value > whole[s], (s, value, whole[s])


def test_group_sizes_in_the_table(probed):
    # Under target torchao the role groups hold the Linear layers of the 7 transformer blocks.
    frame = pd.read_csv(ResultsDir(probed).probe_layers_csv)
    sizes = frame[frame.kind == "group"].drop_duplicates("group").set_index("group").layers.to_dict()
    assert sizes == {"attn1.qkv": 21, "attn1.out": 7, "attn2.qkv": 21, "attn2.out": 7, "ff": 14}


def test_a_group_cell_is_the_schedule_with_only_that_group_lowered(probed):
    from qsched_search.quant.groups import bank_groups
    from qsched_search.results.assignment import Override, StepAssignment
    from qsched_search.session import RunSettings, open_session

    session = open_session(RunSettings(steps=2, precisions=("w4a4", "w8a8"), samples=4, metrics=("ssim",), backend="sim"))
    try:
        session.runner.groups = bank_groups(session.bank, session.model.family, "role")
        lowered = session.evaluator.evaluate([StepAssignment("fp32", (Override("w4a4", group="attn2.qkv"),)), "fp32"])
        everything = session.evaluator.evaluate(["w4a4", "fp32"])
    finally:
        session.close()
    frame = pd.read_csv(ResultsDir(probed).probe_layers_csv)
    row = frame[(frame.kind == "group") & (frame.group == "attn2.qkv") & (frame.step == 0)].iloc[0]
    assert row.value == pytest.approx(lowered.measurement.estimates["ssim"].value, rel=1e-9)
    assert row.value != pytest.approx(everything.measurement.estimates["ssim"].value, rel=1e-6)


def test_killed_layer_probe_resumes_from_its_finished_cells(probed, tmp_path, monkeypatch):
    _start_from(probed, tmp_path, layer_lines=4, cut=True)
    calls = _count_evaluations(monkeypatch)
    result = run(*FAST, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert len(calls) == 11 - 4  # the step probe's cells and the 4 finished layer cells are not run again
    assert all(any(s.overrides for s in levels if not isinstance(s, str)) for levels in calls)
    assert (tmp_path / "probe_layers.csv").read_text() == ResultsDir(probed).probe_layers_csv.read_text()
    lines = (tmp_path / "probe_layer_cells.jsonl").read_text().splitlines()
    assert len(lines) == 11 and all(json.loads(line)["cell"] for line in lines)


def test_more_levels_later_keep_the_finished_cells(probed, tmp_path, monkeypatch):
    _start_from(probed, tmp_path)
    calls = _count_evaluations(monkeypatch)
    assert FAST[-2:] == ["--layer-precisions", "w4a4"]
    assert run(*FAST[:-1], "w4a4,w8a8", "--out", str(tmp_path)).exit_code == 0
    assert len(calls) == 2 * 5  # only the w8a8 cells
    frame = pd.read_csv(tmp_path / "probe_layers.csv")
    assert (tmp_path / "probe_layers_heatmap_w8a8.png").is_file()
    before = pd.read_csv(ResultsDir(probed).probe_layers_csv)
    kept = frame[frame.precision == "w4a4"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[before.columns], before[before.precision == "w4a4"].reset_index(drop=True))
    # w8a8 damages less than w4a4 for every group and step.
    pivot = frame[frame.kind == "group"].pivot_table(index=["step", "group"], columns="precision", values="value")
    assert (pivot["w8a8"] > pivot["w4a4"]).all()


def test_fewer_samples_per_group_cell_are_recorded(probed, tmp_path):
    shutil.copy(ResultsDir(probed).probe_cells, tmp_path / "probe_cells.jsonl")
    result = run(*FAST, "--layer-samples", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "on 2 samples (fewer than the step cells' 4)" in " ".join(result.output.split())  # rich wraps lines
    frame = pd.read_csv(tmp_path / "probe_layers.csv")
    assert (frame.n == 2).all() and len(frame[frame.kind == "group"]) == 10
    stage = json.loads((tmp_path / "manifest.json").read_text())["stages"]["probe_layers"]
    assert stage["fewer_samples_than_step_cells"] is True and stage["samples"] == 2 and stage["step_samples"] == 4


@pytest.mark.parametrize("args, message", [
    (["--layer-samples", "9"], "--layer-samples 9 is outside 1..4"),
    (["--layer-precisions", "w4a8"], "--layer-precisions w4a8 has 'w4a8', which is not in --precisions"),
    (["--grouping", "nope"], "--grouping 'nope' is not a grouping of model family 'embedded'"),
])
def test_bad_layer_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run(*FAST, *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "out" / "probe.csv").exists()  # refused before the step probe ran


# ------------------------------------------------------------------------------------------------ precisions --groups

def test_precisions_groups_lists_each_groups_parameters_and_macs_by_hand_count():
    from qsched_search.pipeline.loading import load_model

    result = CliRunner().invoke(app, ["precisions", "--groups", "--model", "embedded", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert listed["grouping"] == "block-role" and listed["ungrouped"] == [] and len(listed["groups"]) == 35
    # Count by hand: the Linear layers' weights, and their MACs per sample from one call's activations.
    model = load_model("embedded")
    modules = dict(model.denoiser.named_modules())
    macs, hooks = {}, []
    for name, m in modules.items():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, _n=name: macs.setdefault(_n, i[0].numel() // i[0].shape[0] * mod.out_features) and None))
    try:
        with torch.no_grad():
            model.pipe(["bag"], num_inference_steps=1, output_type="pt", **model.family.call_defaults)
    finally:
        for h in hooks:
            h.remove()
    total = 0
    for g in listed["groups"]:
        assert g["layers"] == len(g["modules"])
        assert g["params"] == sum(modules[n].weight.numel() for n in g["modules"]), g["group"]
        assert g["macs"] == sum(macs[n] for n in g["modules"]), g["group"]
        total += g["layers"]
    assert total == 70
    ff = next(g for g in listed["groups"] if g["group"] == "mid_block.attentions.0.transformer_blocks.0/ff")
    assert ff["levels"] == ["w8a8", "w4a8", "w4a4"]  # the sim backend's default levels all quantize it
