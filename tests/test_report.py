"""Tests `qsched report`: loading a results folder, html/md/json rendering, the regression gate and the CLI edge."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from qsched_search import report as rep
from qsched_search.cli.report import report as report_command
from qsched_search.errors import QschedError
from qsched_search.cli.app import app as qsched_app
from qsched_search.results.layout import ResultsDir
from qsched_search.results.tables import PROBE_COLUMNS, TRIALS_COLUMNS

REPO = Path(__file__).resolve().parents[1]

# A made-up but consistent study: 4 steps, 4 levels; early steps are the sensitive ones.
LEVELS = ["fp32", "w8a8", "w4a8", "w4a4"]
STEP_COST = {"fp32": 1.0, "w8a8": 0.5, "w4a8": 0.35, "w4a4": 0.25}
LEVEL_HARM = {"fp32": 0.0, "w8a8": 0.01, "w4a8": 0.04, "w4a4": 0.12}
STEP_WEIGHT = [3.0, 1.2, 0.6, 0.4]
TIMESTEPS = [999, 759, 499, 259]
NOISE_FLOOR = 0.003
BUDGET = 0.45


def _lpips(levels: list[str]) -> float:
    return NOISE_FLOOR + sum(w * LEVEL_HARM[lvl] for w, lvl in zip(STEP_WEIGHT, levels)) / len(levels)


def _cost(levels: list[str]) -> float:
    return sum(STEP_COST[lvl] for lvl in levels) / len(levels)


def _trial_rows() -> list[dict]:
    rng = random.Random(0)
    schedules = [[lvl] * 4 for lvl in LEVELS]
    everything = [list(s) for s in itertools.product(LEVELS, repeat=4)]
    schedules += rng.sample(everything, 40)
    rows = []
    for i, levels in enumerate(schedules):
        value, cost = _lpips(levels), _cost(levels)
        uniform = len(set(levels)) == 1
        rows.append(
            dict(
                trial=i,
                schedule=",".join(levels),
                source="uniform" if uniform else rng.choice(["tpe", "probe-greedy", "random"]),
                state="COMPLETE",
                fail_reason="",
                cost=round(cost, 6),
                cost_bops=round(cost, 6),
                cost_memory=round(0.5 + cost / 2, 6),
                cost_latency="",
                feasible=cost <= BUDGET,
                metric="lpips",
                value=round(value, 6),
                ci_low=round(value * 0.85, 6),
                ci_high=round(value * 1.15, 6),
                n=16,
            )
        )
    rows.append(
        dict(
            rows[-1], trial=len(rows), schedule="w4a4,w4a4,w4a4,fp32", state="FAIL", fail_reason="NaN output", value=""
        )
    )
    return rows


def _front(rows: list[dict]) -> list[dict]:
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: (r["cost"], r["value"]))
    out, best = [], None
    for r in done:
        if best is None or r["value"] < best:
            out.append(dict(r, on_front=True))
            best = r["value"]
    return out


def _png(path: Path, seed: int, noise: float) -> None:
    """A 32x32 'garment' on black with label-dependent noise, so the image grid shows something to look at."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    shape = (((x - 16) / 9.0) ** 2 + ((y - 17) / 12.0) ** 2 < 1).astype(float) * 200
    shape += rng.normal(0, 255 * noise, shape.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(shape, 0, 255).astype(np.uint8), mode="L").save(path)


def make_results(
    root: Path, *, files: tuple[str, ...] = ("schedule", "manifest", "probe", "trials", "pareto", "images")
) -> Path:
    """Writes a small results folder in exactly the formats the probe and search stages write."""
    rd = ResultsDir(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = _trial_rows()
    feasible = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    chosen = min(feasible, key=lambda r: r["value"])
    levels = chosen["schedule"].split(",")

    if "probe" in files:
        probe = []
        for metric, ref_value in (("lpips", NOISE_FLOOR), ("psnr", 48.0)):
            probe.append(
                dict(
                    kind="reference",
                    step="",
                    timestep="",
                    precision="fp32",
                    metric=metric,
                    value=ref_value,
                    ci_low=ref_value * 0.9,
                    ci_high=ref_value * 1.1,
                    n=16,
                    delta=0.0,
                    unhealthy_images=0,
                    fail_reason="",
                )
            )
            for step, (t, w) in enumerate(zip(TIMESTEPS, STEP_WEIGHT)):
                for lvl in LEVELS[1:]:
                    harm = NOISE_FLOOR + w * LEVEL_HARM[lvl] / 4
                    value = harm if metric == "lpips" else 48.0 - 200 * harm
                    probe.append(
                        dict(
                            kind="step",
                            step=step,
                            timestep=t,
                            precision=lvl,
                            metric=metric,
                            value=value,
                            ci_low=value * 0.9,
                            ci_high=value * 1.1,
                            n=16,
                            delta=value - ref_value,
                            unhealthy_images=0,
                            fail_reason="",
                        )
                    )
            for lvl in LEVELS[1:]:
                harm = _lpips([lvl] * 4)
                value = harm if metric == "lpips" else 48.0 - 200 * harm
                probe.append(
                    dict(
                        kind="uniform",
                        step="",
                        timestep="",
                        precision=lvl,
                        metric=metric,
                        value=value,
                        ci_low=value * 0.9,
                        ci_high=value * 1.1,
                        n=16,
                        delta=value - ref_value,
                        unhealthy_images=0,
                        fail_reason="",
                    )
                )
        pd.DataFrame(probe, columns=PROBE_COLUMNS).to_csv(rd.probe_csv, index=False)
    if "trials" in files:
        pd.DataFrame(rows, columns=TRIALS_COLUMNS).to_csv(rd.trials_csv, index=False)
    if "pareto" in files:
        pd.DataFrame(_front(rows), columns=[*TRIALS_COLUMNS, "on_front"]).to_csv(rd.pareto_csv, index=False)
    if "schedule" in files:
        schedule = {
            "schema_version": 1,
            "model": {"id": "fmnist-lcm", "weights_sha256": "ab" * 32},
            "steps": 4,
            "timesteps": TIMESTEPS,
            "levels": levels,
            "reference": "fp32",
            "budget": {"fraction": BUDGET, "cost_model": "bops"},
            "cost": {"bops": chosen["cost_bops"], "memory": chosen["cost_memory"], "latency": None},
            "quality": {
                "metric": "lpips",
                "value": chosen["value"],
                "ci_low": chosen["ci_low"],
                "ci_high": chosen["ci_high"],
                "n": 16,
                "higher_is_better": False,
            },
            "provenance": {
                "tool_version": "0.1.0",
                "seed": 1234,
                "prompts_sha256": "cd" * 32,
                "command": "qsched search --budget 0.45",
                "created": "2026-11-25T12:00:00Z",
            },
        }
        (rd.schedule).write_text(json.dumps(schedule, indent=2))
    if "manifest" in files:
        manifest = {
            "stage": "search",
            "command": "qsched search --budget 0.45",
            "model": "fmnist-lcm",
            "versions": {"torch": "2.5.1", "diffusers": "0.32.0", "qsched-search": "0.1.0"},
            "seed": 1234,
            "prompts": ["a t-shirt", "an ankle boot <b>"],
            "prompts_sha256": "cd" * 32,
            "device": "cpu",
            "created": "2026-11-25T12:00:00Z",
        }
        rd.manifest.write_text(json.dumps(manifest, indent=2))
    if "images" in files:
        index = []
        label_schedules = {
            "reference": ("fp32,fp32,fp32,fp32", 0.0),
            "schedule": (",".join(levels), 0.05),
            "best_uniform": ("w4a8,w4a8,w4a8,w4a8", 0.12),
            "cheapest_uniform": ("w4a4,w4a4,w4a4,w4a4", 0.3),
        }
        for sample, prompt in enumerate(["a t-shirt", "an ankle boot <b>"]):
            for label, (sched, noise) in label_schedules.items():
                file = f"{label}_{sample}.png"
                _png(rd.images_dir / file, seed=sample * 10 + len(label), noise=noise)
                index.append(
                    dict(
                        label=label,
                        schedule=sched,
                        sample=sample,
                        prompt=prompt,
                        seed=1234 + sample,
                        file=file,
                        lpips="" if label == "reference" else round(noise / 2, 4),
                    )
                )
        pd.DataFrame(index).to_csv(rd.images_index, index=False)
    return root


def edit_schedule(root: Path, **changes) -> None:
    """Sets `quality.<key>`, `cost.<key>` or `budget.<key>` values, e.g. edit_schedule(d, quality_value=0.1, cost_bops=0.5)."""
    path = ResultsDir(root).schedule
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, name = key.split("_", 1)
        data[section][name] = value
    path.write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return make_results(tmp_path / "results")


@pytest.fixture
def app() -> typer.Typer:
    """The command registered as the lead registers it on the real app: `qsched report ...`."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Forces typer to keep `report` as a sub-command, as on the real app."""

    app.command("report")(report_command)
    return app


runner = CliRunner()


# ------------------------------------------------------------------------------------------------ loading and model


def test_load_reads_every_file(results: Path):
    loaded = rep.load_results(results)
    assert loaded.missing == []
    assert len(loaded.schedule["levels"]) == 4
    assert {"kind", "metric"} <= set(loaded.probe.columns)


def test_best_uniform_is_best_at_equal_or_lower_cost(results: Path):
    report = rep.build_report(rep.load_results(results))
    cost = report.schedule_cost
    assert report.best_uniform is not None
    assert report.best_uniform.cost <= cost
    affordable = [p for p in report.uniforms if p.cost <= cost]
    assert report.best_uniform.value == min(p.value for p in affordable)
    assert report.cheapest_uniform.level == "w4a4"
    assert report.levels == ["fp32", "w8a8", "w4a8", "w4a4"]  # the reference, then high to low precision


def test_uniform_at_exactly_equal_cost_counts(results: Path):
    # Make the chosen schedule cost exactly what uniform w8a8 costs: w8a8 becomes the best affordable uniform.
    edit_schedule(results, cost_bops=0.5, budget_fraction=0.5)  # schedule.json is checked: the cost stays in budget
    report = rep.build_report(rep.load_results(results))
    assert report.best_uniform.level == "w8a8"


def test_heatmap_metric_prefers_lpips_else_first(results: Path):
    assert rep.build_report(rep.load_results(results)).heatmap_metric == "lpips"
    probe = pd.read_csv(ResultsDir(results).probe_csv)
    probe[probe["metric"] != "lpips"].to_csv(ResultsDir(results).probe_csv, index=False)
    assert rep.build_report(rep.load_results(results)).heatmap_metric == "psnr"


def test_pareto_front_recomputed_without_pareto_csv(results: Path):
    expected = pd.read_csv(ResultsDir(results).pareto_csv)
    ResultsDir(results).pareto_csv.unlink()
    loaded = rep.load_results(results)
    assert any("pareto.csv is missing" in line for line in loaded.missing)
    report = rep.build_report(loaded)
    assert report.front_recomputed
    assert sorted(report.front["trial"]) == sorted(expected["trial"])


# ------------------------------------------------------------------------------------------------ rendering


def test_html_is_complete_and_self_contained(results: Path):
    out = rep.make_report(results, "html").path
    assert out == ResultsDir(results).report("html")
    text = out.read_text()
    for section in ("headline", "sensitivity", "pareto", "samples", "points", "provenance"):
        assert f'id="{section}"' in text
    assert text.index('id="headline"') < text.index('id="sensitivity"')
    # Headline: every step's cell, the budget, the cost models, quality and the uniform comparison.
    assert text.count('class="cell"') == 4
    for needle in ("Budget", "bops", "memory", "not measured", "Quality vs fp32", "best uniform", "noise floor"):
        assert needle in text
    # The heatmap, the Pareto plot and 8 sample images, all embedded; nothing fetched from anywhere.
    assert text.count("data:image/png;base64,") == 2 + 8
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', text)
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert "Missing files" not in text
    # Provenance from manifest.json and schedule.json; user text is escaped.
    for needle in ("torch 2.5.1", "qsched search --budget 0.45", "1234", "fmnist-lcm"):
        assert needle in text
    assert "ankle boot &lt;b&gt;" in text and "ankle boot <b>" not in text
    # Failed trials are counted, not plotted.
    assert "1 of 45 trials failed" in text and "NaN output" in text


def test_markdown_writes_pngs_beside_it(results: Path):
    out = rep.make_report(results, "md").path
    assert out.name == "report.md"
    text = out.read_text()
    for heading in (
        "## Chosen schedule",
        "## Step sensitivity",
        "## Cost vs quality",
        "## Samples",
        "## Pareto points",
        "## Provenance",
    ):
        assert heading in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3 + 8
    for link in links:
        assert link.startswith("report_files/")
        png = out.parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_summary(results: Path):
    out = rep.make_report(results, "json").path
    summary = json.loads(out.read_text())
    assert summary["schedule"]["levels"] == json.loads(ResultsDir(results).schedule.read_text())["levels"]
    assert summary["cost"]["bops"] <= BUDGET
    assert summary["quality"]["metric"] == "lpips"
    best = summary["best_uniform"]
    assert best["level"] in LEVELS and best["cost"] <= summary["cost"]["bops"]
    assert best["schedule_is_better"] is True and best["difference"] < 0
    assert summary["missing"] == [] and summary["gate"] is None
    assert summary["reference_run"]["value"] == pytest.approx(NOISE_FLOOR)


@pytest.mark.parametrize("fmt", ["html", "md", "json"])
def test_missing_files_are_named_in_report_and_console(tmp_path: Path, app, fmt: str):
    root = make_results(tmp_path / "r", files=("schedule", "trials"))
    result = runner.invoke(app, ["report", str(root), "--format", fmt])
    assert result.exit_code == 0, result.output
    written = ResultsDir(root).report(fmt).read_text()
    missing = rep.load_results(root).missing
    assert [line.split(" ")[0] for line in missing] == ["manifest.json", "probe.csv", "pareto.csv", "images/index.csv"]
    for line in missing:
        assert line in result.stdout.splitlines()  # one line each on the console
        assert line in (json.loads(written)["missing"] if fmt == "json" else written)


def test_only_probe_present_still_renders(tmp_path: Path):
    root = make_results(tmp_path / "r", files=("probe", "manifest"))
    text = rep.make_report(root, "html").path.read_text()
    assert "schedule.json is missing" in text and "trials.csv is missing" in text
    assert text.count("data:image/png;base64,") == 1  # the heatmap alone


def test_missing_image_file_is_reported(results: Path):
    (ResultsDir(results).images_dir / "schedule_1.png").unlink()
    outcome = rep.make_report(results, "html")
    assert any("schedule_1.png" in line for line in outcome.missing)
    assert "missing schedule_1.png" in outcome.path.read_text()


def test_custom_out_and_no_temporary_files_left(results: Path, tmp_path: Path, app):
    out = tmp_path / "elsewhere" / "r.html"
    result = runner.invoke(app, ["report", str(results), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out}" in result.stdout
    assert not list(out.parent.glob(".*.tmp")) and not list(results.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ the gate


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = make_results(tmp_path / "baseline")
    cand = tmp_path / "results"
    shutil.copytree(base, cand)
    return cand, base


def _value(root: Path) -> float:
    return json.loads(ResultsDir(root).schedule.read_text())["quality"]["value"]


@pytest.mark.parametrize(
    "shift, expected",
    [(-0.02, 0), (0.0, 0), (0.009, 0), (0.0100001 + 0.00001, 1), (0.05, 1)],
    ids=["better", "equal", "worse-within-tolerance", "worse-just-beyond", "much-worse"],
)
def test_gate_on_quality(pair, app, shift: float, expected: int):
    cand, base = pair
    edit_schedule(cand, quality_value=_value(base) + shift)
    result = runner.invoke(app, ["report", str(cand), "--baseline", str(base), "--fail-if-worse", "lpips:0.01"])
    assert result.exit_code == expected, result.output
    if expected:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gate failed: lpips") and "tolerance 0.01" in lines[0]
    else:
        assert "gate passed" in result.stdout
    # The report is written either way, so CI can upload it.
    gate = json.loads(rep.make_report(cand, "json", baseline_dir=base, fail_if_worse="lpips:0.01").path.read_text())[
        "gate"
    ]
    assert gate["passed"] is (expected == 0)


def test_gate_on_cost(pair, app):
    cand, base = pair
    edit_schedule(cand, cost_bops=json.loads(ResultsDir(base).schedule.read_text())["cost"]["bops"] + 0.01)
    result = runner.invoke(app, ["report", str(cand), "--baseline", str(base), "--fail-if-worse", "lpips:0.01"])
    assert result.exit_code == 1
    assert "bops cost" in result.stderr and "higher than the baseline" in result.stderr


@pytest.mark.parametrize(
    "metric, higher_is_better",
    [("psnr", True), ("ssim", True), ("judge_acc", True), ("judge_fd", False), ("fid", False)],
)
def test_gate_direction_follows_metric(pair, metric: str, higher_is_better: bool):
    cand, base = pair
    for root, value in ((base, 10.0), (cand, 11.0)):
        edit_schedule(root, quality_metric=metric, quality_value=value, quality_higher_is_better=higher_is_better)
    gate = rep.check_gate(rep.load_results(cand), rep.load_results(base), rep.parse_fail_if_worse(f"{metric}:0.5"))
    assert gate.passed is higher_is_better  # +1.0 is better only where higher is better


def test_gate_metric_from_trials_when_schedule_measured_another(pair):
    cand, base = pair
    for root, value in ((base, 30.0), (cand, 29.0)):
        rd = ResultsDir(root)
        levels = ",".join(json.loads(rd.schedule.read_text())["levels"])
        trials = pd.read_csv(rd.trials_csv)
        extra = trials[trials["schedule"] == levels].iloc[[0]].assign(metric="psnr", value=value)
        pd.concat([trials, extra]).to_csv(rd.trials_csv, index=False)
    gate = rep.check_gate(rep.load_results(cand), rep.load_results(base), rep.parse_fail_if_worse("psnr:0.5"))
    assert not gate.passed and gate.value == 29.0 and gate.baseline_value == 30.0


def test_baseline_alone_compares_without_gating(pair, app):
    cand, base = pair
    edit_schedule(cand, quality_value=_value(base) + 1.0)
    result = runner.invoke(app, ["report", str(cand), "--baseline", str(base)])
    assert result.exit_code == 0, result.output
    text = ResultsDir(cand).report("html").read_text()
    assert "vs baseline" in text and 'id="gate"' not in text


# ------------------------------------------------------------------------------------------------ bad input


def _bad(app, args: list[str]) -> str:
    result = runner.invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("lpips", "is not METRIC:TOLERANCE"),
        ("lpips=0.01", "is not METRIC:TOLERANCE"),
        (":0.1", "is not METRIC:TOLERANCE"),
        ("lpips:abc", "not a finite number"),
        ("lpips:-0.1", "not a finite number"),
        ("foo:0.1", "unknown metric 'foo'"),
    ],
)
def test_malformed_fail_if_worse_exits_2(pair, app, spec: str, needle: str):
    cand, base = pair
    line = _bad(app, [str(cand), "--baseline", str(base), "--fail-if-worse", spec])
    assert needle in line and "--fail-if-worse" in line and "lpips:0.01" in line


def test_missing_results_dir_exits_2(tmp_path: Path, app):
    line = _bad(app, [str(tmp_path / "nope")])
    assert "RESULTS_DIR" in line and "nope" in line and "is not a folder" in line


def test_empty_results_dir_exits_2(tmp_path: Path, app):
    (tmp_path / "empty").mkdir()
    assert "holds none of the result files" in _bad(app, [str(tmp_path / "empty")])


def test_missing_baseline_dir_exits_2(results: Path, tmp_path: Path, app):
    line = _bad(app, [str(results), "--baseline", str(tmp_path / "nope"), "--fail-if-worse", "lpips:0.01"])
    assert line.startswith("error: --baseline")


def test_fail_if_worse_without_baseline_exits_2(results: Path, app):
    assert "needs --baseline" in _bad(app, [str(results), "--fail-if-worse", "lpips:0.01"])


def test_schedule_not_json_exits_2(results: Path, app):
    ResultsDir(results).schedule.write_text('{"levels": ["fp32",')
    line = _bad(app, [str(results)])
    assert "schedule.json" in line and "not valid JSON" in line


def test_gate_on_metric_not_measured_exits_2(pair, app):
    cand, base = pair
    assert "has no ssim value" in _bad(app, [str(cand), "--baseline", str(base), "--fail-if-worse", "ssim:0.01"])


def test_library_raises_qsched_error(tmp_path: Path):
    with pytest.raises(QschedError, match="RESULTS_DIR"):
        rep.load_results(tmp_path / "nope")


def _readme_gate_command() -> list[str]:
    """The quality-gate command of the README's CI snippet (`run: qsched report ...`), as arguments after `qsched`."""
    import shlex

    found = re.findall(r"run:\s*(qsched report [^\n]*--fail-if-worse[^\n]*)", (REPO / "README.md").read_text())
    assert len(found) == 1, "the README shows one `qsched report ... --fail-if-worse` gate in its CI snippet"
    argv = shlex.split(found[0])
    assert argv[0] == "qsched"
    return argv[1:]


def test_the_readme_gate_command_passes_and_fails_through_the_cli(tmp_path: Path, monkeypatch):
    argv = _readme_gate_command()
    assert "--baseline" in argv and "--fail-if-worse" in argv
    monkeypatch.chdir(tmp_path)
    # The command's own folder names (results/, baseline/), relative to where CI runs it.
    results_dir, baseline_dir = Path(argv[1]), Path(argv[argv.index("--baseline") + 1])
    metric, tolerance = argv[argv.index("--fail-if-worse") + 1].split(":")
    make_results(baseline_dir)
    shutil.copytree(baseline_dir, results_dir)
    edit_schedule(results_dir, quality_value=_value(baseline_dir) + float(tolerance) / 2)  # worse, within tolerance
    passed = runner.invoke(qsched_app, argv)
    assert passed.exit_code == 0, passed.output
    assert f"gate passed: {metric}" in passed.stdout
    assert (results_dir / "report.html").is_file()
    edit_schedule(results_dir, quality_value=_value(baseline_dir) + 2 * float(tolerance))  # worse beyond it
    failed = runner.invoke(qsched_app, argv)
    assert failed.exit_code == 1, failed.output
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gate failed: {metric}")
    assert "gate" in json.loads(rep.make_report(results_dir, "json", baseline_dir=baseline_dir,
                                                fail_if_worse=f"{metric}:{tolerance}").path.read_text())


@pytest.mark.parametrize("edit, needle", [
    (lambda o: o.pop("quality"), "field quality is missing"),
    (lambda o: o["levels"].pop(), "levels has 3 entries"),
    (lambda o: o["budget"].__setitem__("fraction", 1.5), "budget.fraction"),
    (lambda o: o["cost"].__setitem__("bops", 0.9), "over budget"),
    (lambda o: o["model"].__setitem__("weights_sha256", "xyz"), "model.weights_sha256"),
])
def test_malformed_schedule_json_exits_2_with_one_line(results: Path, app, edit, needle: str):
    path = ResultsDir(results).schedule
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    line = _bad(app, [str(results)])
    assert line.startswith("error: ") and str(path) in line and needle in line, line


def test_probe_csv_without_its_optional_columns_still_renders(results: Path):
    rd = ResultsDir(results)
    pd.read_csv(rd.probe_csv).drop(columns=["fail_reason", "unhealthy_images", "timestep"]).to_csv(rd.probe_csv, index=False)
    text = rep.make_report(results, "html").path.read_text()
    assert 'id="sensitivity"' in text and text.count("data:image/png;base64,") == 2 + 8


def test_probe_csv_without_deltas_exits_2_naming_the_column(results: Path, app):
    probe = pd.read_csv(ResultsDir(results).probe_csv)
    probe.drop(columns=["delta"]).to_csv(ResultsDir(results).probe_csv, index=False)
    line = _bad(app, [str(results)])
    assert "probe.csv" in line and "lacks the column(s) delta" in line


# ------------------------------------------------------------------------------------------------ in a real browser


@pytest.mark.browser
def test_html_renders_in_headless_chromium(results: Path, tmp_path: Path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must `apt-get install -y chromium chromium-driver`")
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    page = rep.make_report(results, "html").path
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # a blank or unstyled-error page is nearly uniform
    # The headline's coloured schedule cells are drawn near the top: saturated colour above the fold.
    top = np.asarray(Image.open(shot).convert("HSV"), dtype=float)[:600, :, 1]
    assert (top > 100).mean() > 0.01
    if os.environ.get("QSCHED_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["QSCHED_KEEP_SCREENSHOT"])
