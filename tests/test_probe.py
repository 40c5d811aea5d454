"""`qsched probe`: the table's shape, determinism, resuming a killed probe, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from qsched_search.cli.app import app
from qsched_search.results.layout import ResultsDir

FAST = ["--steps", "2", "--precisions", "w4a4,w8a8", "--samples", "6", "--metrics", "psnr,judge_acc"]


def run(*args: str):
    return CliRunner().invoke(app, ["probe", *args])


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    result = run(*FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_probe_writes_a_row_per_step_precision_and_metric(probed):
    results = ResultsDir(probed)
    frame = pd.read_csv(results.probe_csv)
    assert list(frame.columns[:9]) == ["kind", "step", "timestep", "precision", "metric", "value", "ci_low", "ci_high", "n"]
    steps = frame[frame.kind == "step"]
    assert len(steps) == 2 * 2 * 2  # steps x precisions x metrics
    assert set(frame.kind) == {"reference", "step", "uniform"}
    assert (frame.n == 6).all()
    assert (frame.ci_low <= frame.value).all() and (frame.value <= frame.ci_high).all()
    # one step at w4a4 hurts less than all steps at w4a4
    psnr = frame[frame.metric == "psnr"]
    one_step = psnr[(psnr.kind == "step") & (psnr.precision == "w4a4")].value
    uniform = psnr[(psnr.kind == "uniform") & (psnr.precision == "w4a4")].value.iloc[0]
    assert (one_step > uniform).all()
    assert results.probe_heatmap.stat().st_size > 5000
    manifest = json.loads(results.manifest.read_text())
    assert manifest["stage"] == "probe" and manifest["seed"] == 0 and len(manifest["timesteps"]) == 2
    assert "torch" in manifest["versions"] and manifest["prompts_sha256"]


def test_same_command_gives_the_same_csv(probed, tmp_path):
    assert run(*FAST, "--out", str(tmp_path)).exit_code == 0
    assert (tmp_path / "probe.csv").read_text() == ResultsDir(probed).probe_csv.read_text()


def test_prefix_reuse_off_runs_every_call_and_gives_the_same_table(probed, tmp_path):
    result = run(*FAST, "--prefix-cache-mb", "0", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "probe.csv").read_text() == ResultsDir(probed).probe_csv.read_text()
    assert "0 answered from shared prefixes" in result.output
    assert "0 answered from shared prefixes" not in run(*FAST, "--out", str(tmp_path / "again")).output


def test_killed_probe_resumes_from_its_finished_cells(probed, tmp_path, monkeypatch):
    # Keep the first three finished cells, as if the process died during the fourth.
    lines = ResultsDir(probed).probe_cells.read_text().splitlines()
    (tmp_path / "probe_cells.jsonl").write_text("\n".join(lines[:3]) + "\n{\"truncat")
    from qsched_search.eval import evaluate

    calls = []
    original = evaluate.ScheduleEvaluator.evaluate
    monkeypatch.setattr(evaluate.ScheduleEvaluator, "evaluate", lambda self, levels, **kw: calls.append(levels) or original(self, levels, **kw))
    assert run(*FAST, "--out", str(tmp_path)).exit_code == 0
    assert len(calls) == len(lines) - 3
    assert (tmp_path / "probe.csv").read_text() == ResultsDir(probed).probe_csv.read_text()
    # The cut line is gone and every cell is one whole line: a second kill and resume would lose nothing.
    resumed = (tmp_path / "probe_cells.jsonl").read_text().splitlines()
    assert len(resumed) == len(lines) and all(json.loads(line)["cell"] for line in resumed)


def test_changed_settings_do_not_reuse_old_cells(probed, tmp_path):
    (tmp_path / "probe_cells.jsonl").write_text(ResultsDir(probed).probe_cells.read_text())
    assert run(*FAST[:-2], "--metrics", "psnr", "--seed", "5", "--out", str(tmp_path)).exit_code == 0
    frame = pd.read_csv(tmp_path / "probe.csv")
    assert set(frame.metric) == {"psnr"}


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--precisions", "w4a4,int3"], "unknown precision 'int3'"),
    (["--model", "/nonexistent/model"], "model '/nonexistent/model' not found"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--metrics", "clip"], "clip"),
    (["--reference", "w8a8"], "--reference 'w8a8' would round a float32 pipeline"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb -1.0 is negative"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run(*FAST, *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "out" / "probe.csv").exists()
