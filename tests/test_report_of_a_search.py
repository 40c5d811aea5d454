"""`qsched report` on what a real `qsched probe` and `qsched search` wrote: every fact it states is checked against
the files it was made from."""

from __future__ import annotations

import base64
import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from qsched_search.cli.app import app
from qsched_search.results.layout import ResultsDir
from qsched_search.results.schedule import load_schedule
from qsched_search.results.tables import split_schedule

pytestmark = pytest.mark.slow

# The embedded model, 2 steps x {fp32, w8a8, w4a8}: 9 schedules, all measured (exhaustive). SSIM needs no weights
# and is higher-is-better, the direction the made-up report fixtures do not cover.
COMMON = ["--steps", "2", "--samples", "8", "--precisions", "w8a8,w4a8"]
BUDGET = 0.9
IMAGES = 3


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> ResultsDir:
    out = tmp_path_factory.mktemp("searched")
    probed = CliRunner().invoke(app, ["probe", *COMMON, "--metrics", "ssim", "--out", str(out)])
    assert probed.exit_code == 0, probed.output
    result = CliRunner().invoke(app, ["search", *COMMON, "--objective", "ssim", "--sampler", "exhaustive",
                                      "--budget", str(BUDGET), "--images", str(IMAGES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = ResultsDir(out)
    for fmt in ("html", "md", "json"):
        made = CliRunner().invoke(app, ["report", str(out), "--format", fmt])
        assert made.exit_code == 0, made.output
        assert f"wrote {results.report(fmt)}" in made.stdout
        assert "missing" not in made.stdout  # every file a search writes is there
    return results


def _uniform_rows(trials: pd.DataFrame) -> pd.DataFrame:
    done = trials[trials["state"] == "COMPLETE"]
    return done[done["schedule"].map(lambda s: len(set(split_schedule(s))) == 1)]


def test_json_names_the_schedule_of_schedule_json(searched):
    summary = json.loads(searched.report("json").read_text())
    schedule = load_schedule(searched.schedule)
    assert summary["schedule"]["levels"] == list(schedule.levels)
    assert summary["schedule"]["timesteps"] == list(schedule.timesteps) and summary["schedule"]["steps"] == 2
    assert summary["schedule"]["reference"] == schedule.reference == "fp32"
    assert summary["budget"] == {"fraction": BUDGET, "cost_model": "bops"}
    assert summary["cost"]["bops"] == pytest.approx(schedule.cost["bops"]) and summary["cost"]["bops"] <= BUDGET
    assert summary["quality"]["metric"] == "ssim" and summary["quality"]["higher_is_better"] is True
    assert summary["quality"]["value"] == pytest.approx(schedule.quality.value)
    assert summary["missing"] == [] and summary["warnings"] == [] and summary["gate"] is None
    assert summary["execution"]["backend"] == "sim" and summary["execution"]["target"] == "torchao"
    # The chosen schedule is the best within the budget in trials.csv (ties: the cheaper).
    trials = pd.read_csv(searched.trials_csv)
    inside = trials[(trials["state"] == "COMPLETE") & (trials["cost"] <= BUDGET + 1e-9)]
    best = inside.sort_values(["value", "cost"], ascending=[False, True]).iloc[0]
    assert split_schedule(best["schedule"]) == list(schedule.levels)


def test_best_and_cheapest_uniform_are_what_trials_csv_implies(searched):
    summary = json.loads(searched.report("json").read_text())
    trials = pd.read_csv(searched.trials_csv)
    uniform = _uniform_rows(trials)
    assert len(trials) == 9 and trials["schedule"].is_unique
    assert sorted(p["schedule"] for p in summary["uniforms"]) == sorted(uniform["schedule"])
    assert len(summary["uniforms"]) == 3
    chosen_cost = summary["cost"]["bops"]
    affordable = uniform[uniform["cost"] <= chosen_cost + 1e-9]
    expected = affordable.sort_values(["value", "cost", "trial"], ascending=[False, True, True]).iloc[0]
    best = summary["best_uniform"]
    assert best["schedule"] == expected["schedule"] and best["level"] == split_schedule(expected["schedule"])[0]
    assert best["value"] == pytest.approx(expected["value"]) and best["cost"] == pytest.approx(expected["cost"])
    assert best["difference"] == pytest.approx(summary["quality"]["value"] - expected["value"])
    assert best["schedule_is_better"] is bool(summary["quality"]["value"] > expected["value"])
    # The paired comparison schedule.json records is against that same baseline.
    obj = json.loads(searched.schedule.read_text())
    if best["schedule"] != ",".join(obj["levels"]):
        assert obj["comparison"]["baseline"] == best["schedule"] == best["paired"]["baseline"]
        assert obj["comparison"]["n"] == 8
    cheapest = uniform.sort_values(["cost", "trial"]).iloc[0]
    assert summary["cheapest_uniform"]["schedule"] == cheapest["schedule"]
    # The noise floor is the probe's reference row.
    probe = pd.read_csv(searched.probe_csv)
    floor = probe[(probe["kind"] == "reference") & (probe["metric"] == "ssim")].iloc[0]
    assert summary["reference_run"]["value"] == pytest.approx(floor["value"])


def test_pareto_points_are_the_rows_of_pareto_csv(searched):
    summary = json.loads(searched.report("json").read_text())
    pareto = pd.read_csv(searched.pareto_csv)
    assert summary["pareto_points"] == len(pareto) >= 1
    html = searched.report("html").read_text()
    points = html[html.index('id="points"'):]
    for schedule in pareto["schedule"]:
        assert schedule in points


def test_html_embeds_the_heatmap_the_pareto_plot_and_every_sample_image(searched):
    html = searched.report("html").read_text()
    index = pd.read_csv(searched.images_index)
    assert set(index["label"]) == {"reference", "schedule", "best_uniform", "cheapest_uniform"}
    assert len(index) == 4 * IMAGES
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 2 + len(index)
    # Each sample image is in the page byte for byte.
    for file in index["file"]:
        assert base64.b64encode((searched.images_dir / file).read_bytes()).decode() in embedded
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', html)
    assert html.count('class="cell"') == 2  # one coloured cell per step of the chosen schedule
    schedule = load_schedule(searched.schedule)
    for level in schedule.levels:
        assert level in html


def test_markdown_links_every_figure_it_wrote(searched):
    text = searched.report("md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    index = pd.read_csv(searched.images_index)
    assert len(links) == 3 + len(index)
    for link in links:
        assert (searched.root / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
