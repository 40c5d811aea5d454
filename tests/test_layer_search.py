"""`qsched search --layers`: the per-layer prior, exact item costs, the measured search and its resume, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from qsched_search.cli.app import app
from qsched_search.errors import QschedError
from qsched_search.quant.costs import CostTable, LayerCosts
from qsched_search.quant.groups import LayerAssignment, LayerGroups
from qsched_search.results.assignment import StepAssignment, parse_schedule_key
from qsched_search.results.records import Estimate, Measurement
from qsched_search.results.tables import schedule_key
from qsched_search.search.layer_search import (LAYER_SOURCES, UNGROUPED, LayerSearch, item_costs, labels_to_steps, layer_prior,
                                               steps_to_labels)
from qsched_search.search.priors import AdditiveModel, choice_front

LEVELS = ("fp32", "w8a8", "w4a4")
BITS = {"fp32": (32, 32), "w8a8": (8, 8), "w4a4": (4, 4)}
# Harm of a layer group at a level, per unit of the group's sensitivity.
UNIT = {"fp32": 0.0, "w8a8": 0.05, "w4a4": 1.0}
# Sensitivity of each group in each of 3 steps: one group of step 0 matters most, later steps little.
WEIGHT = [{"a": 0.30, "b": 0.02, "c": 0.05}, {"a": 0.04, "b": 0.03, "c": 0.02}, {"a": 0.01, "b": 0.005, "c": 0.01}]


def _groups(ungrouped: bool = False) -> LayerGroups:
    layers = {"a": ("x.a",), "b": ("x.b1", "x.b2"), "c": ("x.c",)}
    free = ("x.d",) if ungrouped else ()
    return LayerGroups("test", layers, free, tuple(n for v in layers.values() for n in v) + free)


def _layer_costs(groups: LayerGroups) -> LayerCosts:
    macs = {"x.a": 100, "x.b1": 300, "x.b2": 300, "x.c": 200, "x.d": 50, "x.first": 50}
    params = {n: macs[n] for n in groups.switchable}
    return LayerCosts(macs={n: m for n, m in macs.items() if n in groups.switchable or n == "x.first"}, params=params,
                      total_params=sum(params.values()) + 50, quantized={lv: groups.switchable for lv in LEVELS[1:]},
                      bits=BITS, reference="fp32")


def _cost_table(groups: LayerGroups) -> CostTable:
    lc = _layer_costs(groups)
    per_level = {lv: lc.cost(LayerAssignment(lv)) for lv in LEVELS}
    return CostTable({"bops": {lv: c["bops"] for lv, c in per_level.items()},
                      "memory": {lv: c["memory"] for lv, c in per_level.items()}, "latency": None}, layers=lc, groups=groups)


def _true_harm(steps) -> float:
    """The synthetic model's LPIPS: additive over (step, group) plus an interaction the probe cannot see."""
    total = 0.0
    for s, step in enumerate(parse_schedule_key(schedule_key(steps))):
        at = {g: step.level for g in "abc"}
        at.update({o.group: o.level for o in step.overrides})
        part = sum(WEIGHT[s][g] * UNIT[lv] for g, lv in at.items())
        total += part * (1.3 if all(lv == "w4a4" for lv in at.values()) else 1.0)
    return total


def _measurement(value: float, n: int = 8) -> Measurement:
    per_image = tuple(value * (1 + 0.01 * k) for k in range(n))
    mean = sum(per_image) / n
    return Measurement(estimates={"lpips": Estimate(mean, mean * 0.9, mean * 1.1, n, per_image)})


def _step_model() -> AdditiveModel:
    harm = {(s, lv): sum(w * UNIT[lv] for w in WEIGHT[s].values()) for s in range(3) for lv in LEVELS[1:]}
    return AdditiveModel(harm=harm, steps=3, levels=LEVELS, reference="fp32")


def _layer_probe() -> pd.DataFrame:
    rows = [{"kind": "group", "step": s, "group": g, "precision": "w4a4", "metric": "lpips", "delta": w * UNIT["w4a4"],
             "fail_reason": ""} for s in range(3) for g, w in WEIGHT[s].items()]
    return pd.DataFrame(rows)


def _search(tmp_path=None, budget: float = 0.2, trials: int = 16, start=None, evaluate=None):
    groups = _groups()
    lc = _layer_costs(groups)
    costs = _cost_table(groups)
    prior = layer_prior(_step_model(), _layer_probe(), "lpips", False, groups, lc)
    raw = layer_prior(_step_model(), _layer_probe(), "lpips", False, groups, lc, calibrate=False)
    calls = []

    def measure(steps):
        calls.append(schedule_key(steps))
        return _measurement(_true_harm(steps))

    search = LayerSearch(evaluate or measure, prior=prior, raw_prior=raw, costs=item_costs(groups, lc, LEVELS, "bops"),
                         schedule_costs=costs.costs, metric="lpips", higher_is_better=False, budget=budget, trials=trials,
                         groups=groups, store=None if tmp_path is None else tmp_path / "layer_trials.jsonl",
                         fingerprint="f", start=start)
    return search, costs, calls


# ------------------------------------------------------------------------------------------------ costs and the prior


@pytest.mark.parametrize("ungrouped", [False, True])
@pytest.mark.parametrize("model", ["bops", "memory"])
def test_item_costs_price_every_schedule_as_the_cost_table_does(ungrouped, model):
    groups = _groups(ungrouped)
    costs, lc = _cost_table(groups), _layer_costs(groups)
    items = item_costs(groups, lc, LEVELS, model)
    assert items.items == ("a", "b", "c") + ((UNGROUPED,) if ungrouped else ())
    for labels in itertools.islice(itertools.product(itertools.product(LEVELS, repeat=len(items.items)), repeat=2), 0, None, 37):
        steps = labels_to_steps(labels, items)
        assert items.schedule_cost(labels) == pytest.approx(costs.cost(steps, model), abs=1e-12)
        assert steps_to_labels(steps, items.items, groups) == labels  # the schedule names every label it was built from


def test_labels_become_a_default_level_and_the_fewest_overrides():
    groups = _groups()
    items = item_costs(groups, _layer_costs(groups), LEVELS, "bops")
    (step,) = labels_to_steps((("fp32", "w4a4", "w4a4"),), items)
    assert step.level == "w4a4" and [str(o) for o in step.overrides] == ["a=fp32"]
    with_free = _groups(ungrouped=True)
    items = item_costs(with_free, _layer_costs(with_free), LEVELS, "bops")
    (step,) = labels_to_steps((("w4a4", "w4a4", "w4a4", "w8a8"),), items)
    assert step.level == "w8a8" and len(step.overrides) == 3  # ungrouped layers follow the step's own level


def test_latency_is_refused_for_a_per_layer_search():
    groups = _groups()
    with pytest.raises(QschedError, match="latency"):
        item_costs(groups, _layer_costs(groups), LEVELS, "latency")


def test_prior_calibrates_group_harms_to_the_step_probe_and_scales_unprobed_levels():
    groups = _groups()
    lc = _layer_costs(groups)
    step_model = _step_model()
    probe = _layer_probe()
    probe.loc[(probe.step == 0) & (probe.group == "a"), "delta"] *= 2  # one cell the step probe disagrees with
    prior = layer_prior(step_model, probe, "lpips", False, groups, lc)
    assert prior.origin == {"probed": 9, "scaled": 9, "macs": 0}  # w8a8 is scaled from w4a4
    for s in range(3):
        for lv in ("w8a8", "w4a4"):
            assert sum(prior.item_harm(s, g, lv) for g in "abc") == pytest.approx(step_model.step_harm(s, lv))
    raw = layer_prior(step_model, probe, "lpips", False, groups, lc, calibrate=False)
    assert raw.item_harm(0, "a", "w4a4") == pytest.approx(0.6)
    assert raw.item_harm(0, "a", "w8a8") == pytest.approx(0.6 * step_model.step_harm(0, "w8a8") / step_model.step_harm(0, "w4a4"))
    by_macs = layer_prior(step_model, None, "lpips", False, groups, lc)
    assert by_macs.origin["macs"] == 18
    assert by_macs.item_harm(1, "b", "w4a4") / by_macs.item_harm(1, "a", "w4a4") == pytest.approx(6.0)  # 600 vs 100 MACs
    missing = AdditiveModel(harm={k: v for k, v in step_model.harm.items() if k != (2, "w4a4")}, steps=3, levels=LEVELS,
                            reference="fp32")
    assert math.isinf(layer_prior(missing, probe, "lpips", False, groups, lc).item_harm(2, "c", "w4a4"))


def test_front_over_items_is_the_exact_pareto_front():
    search, _, _ = _search()
    front = search.front(search.prior)
    brute = []
    n = len(search.items)
    for flat in itertools.product(LEVELS, repeat=3 * n):
        labels = tuple(tuple(flat[s * n:(s + 1) * n]) for s in range(3))
        brute.append((search.costs.schedule_cost(labels), search.prior.predict(labels)))
    for cost, harm, labels in front:
        assert search.prior.predict(labels) == pytest.approx(harm)
        assert search.costs.schedule_cost(labels) == pytest.approx(cost)
        assert not any(c < cost - 1e-12 and h < harm - 1e-12 for c, h in brute)  # nothing dominates a front point
    for budget in (0.2, 0.3, 0.5):  # and it holds the optimum at every budget
        best = min(h for c, h in brute if c <= budget + 1e-12)
        assert min(h for c, h, _ in front if c <= budget + 1e-12) == pytest.approx(best)


def test_choice_front_thinning_keeps_the_cheapest_and_the_least_harmful():
    options = [[("lo", 0.0, 1.0), ("mid", 0.5, 0.4), ("hi", 1.0, 0.0)] for _ in range(6)]
    full = choice_front(options)
    thin = choice_front(options, max_states=4)
    assert len(thin) <= 4 < len(full)
    assert thin[0][0] == full[0][0] and thin[-1][1] == full[-1][1]


# ------------------------------------------------------------------------------------------------ the measured search


def test_search_beats_the_best_per_step_schedule_within_the_budget():
    search, costs, calls = _search(budget=0.2, trials=16)
    outcome = search.run()
    per_step = {lv: costs.cost(lv, "bops") for lv in itertools.product(LEVELS, repeat=3)}
    best_per_step = min(_true_harm(lv) for lv, c in per_step.items() if c <= 0.2 + 1e-12)
    feasible = outcome.trials[outcome.trials.feasible]
    assert len(outcome.trials) == 16 == len(calls) == len(set(calls))  # each schedule measured once
    assert (outcome.trials.cost <= 0.2 + 1e-9).all()  # every move stays within the budget
    assert outcome.best == feasible.sort_values("value").iloc[0]["schedule"]
    assert feasible["value"].min() < 0.8 * best_per_step
    assert set(outcome.trials.source) <= set(LAYER_SOURCES) == {"layer-dp", "layer-dp-raw", "layer-greedy", "layer-local"}
    assert "layer-local" in set(outcome.trials.source)


def test_search_climbs_from_a_better_measured_start():
    start_key = "fp32,w8a8,w4a4"
    search, _, calls = _search(budget=0.4, trials=6, start={start_key: _measurement(0.0)})
    outcome = search.run()
    assert start_key not in calls  # a start is never measured again
    local = outcome.trials[outcome.trials.source == "layer-local"]
    # The climb starts from the best measured schedule: the start (value 0) stays the incumbent, so every local
    # move changes at most two items of it.
    start = steps_to_labels(parse_schedule_key(start_key), search.items, search.groups)
    for key in local.schedule:
        labels = steps_to_labels(parse_schedule_key(key), search.items, search.groups)
        changed = sum(a != b for ra, rb in zip(labels, start) for a, b in zip(ra, rb))
        assert 1 <= changed <= 2


def test_search_resumes_from_its_store_without_measuring_again(tmp_path):
    first, _, calls = _search(tmp_path, trials=8)
    one = first.run()
    assert len(calls) == 8 and one.new_evaluations == 8
    again, _, calls = _search(tmp_path, trials=8)
    two = again.run()
    assert calls == [] and two.new_evaluations == 0
    pd.testing.assert_frame_equal(one.trials, two.trials)
    more, _, calls = _search(tmp_path, trials=11)
    three = more.run()
    assert len(calls) == 3 and list(three.trials.schedule[:8]) == list(one.trials.schedule)


def test_a_failing_schedule_is_a_failed_row_not_the_end_of_the_search():
    def evaluate(steps):
        if any(s.overrides for s in steps):
            raise RuntimeError("kernel exploded")
        return _measurement(_true_harm(steps))

    search, _, _ = _search(trials=5, evaluate=evaluate)
    rows = search.run().trials
    assert len(rows) == 5 and (rows.state == "FAIL").any()
    assert rows.loc[rows.state == "FAIL", "fail_reason"].str.startswith("RuntimeError: kernel exploded").all()


# ------------------------------------------------------------------------------------------------ the command

FAST = ["--steps", "2", "--precisions", "w8a8,w4a4", "--samples", "4", "--grouping", "role"]


def test_search_layers_writes_a_schedule_with_overrides_and_resumes(tmp_path):
    runner = CliRunner()
    probe = runner.invoke(app, ["probe", *FAST, "--layers", "--layer-precisions", "w4a4", "--out", str(tmp_path)])
    assert probe.exit_code == 0, probe.output
    args = ["search", *FAST, "--layers", "--layer-trials", "5", "--budget", "0.665", "--images", "2", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    assert schedule["schema_version"] == 3 and any(schedule["overrides"])
    assert set(schedule["layer_groups"]["groups"]) == {"attn1.qkv", "attn1.out", "attn2.qkv", "attn2.out", "ff"}
    c = schedule["comparison_per_step"]
    assert "{" not in c["baseline"] and c["n"] == 4 and c["verdict"] in ("better", "worse", "not resolved")
    trials = pd.read_csv(tmp_path / "trials.csv")
    layer_rows = trials[trials.source.str.startswith("layer-")]
    assert len(layer_rows) == 5 and list(layer_rows.trial) == list(range(len(trials) - 5, len(trials)))
    assert schedule["cost"]["bops"] <= 0.665 + 1e-9 and schedule["cost"]["latency"] is None
    index = pd.read_csv(tmp_path / "images" / "index.csv")
    assert "best_per_step" in set(index.label)
    manifest = json.loads((tmp_path / "manifest.json").read_text())["stages"]["search"]["layers"]
    assert manifest["grouping"] == "role" and manifest["new_evaluations"] == 5 and manifest["prior"]["probed"] == 10

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["search"]["layers"]["new_evaluations"] == 0
    assert json.loads((tmp_path / "schedule.json").read_text())["overrides"] == schedule["overrides"]

    report = runner.invoke(app, ["report", str(tmp_path), "--format", "md"])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report.md").read_text()
    assert "overrides.png" in text and "vs best per-step at ≤ cost" in text
    assert (tmp_path / "report_files" / "overrides.png").stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    (["--cost", "latency", "--profile", "p.csv"], "--layers with --cost latency"),
    (["--layer-trials", "-1"], "--layer-trials -1 is negative"),
    (["--with-coefficients"], "--layers with --with-coefficients"),
])
def test_search_layers_bad_input_is_one_line(tmp_path, extra, message):
    result = CliRunner().invoke(app, ["search", *FAST, "--layers", *extra, "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert message in result.output and not (tmp_path / "schedule.json").exists()


def test_step_assignment_keys_round_trip_through_labels():
    groups = _groups()
    steps = (StepAssignment("w4a4"), StepAssignment("w8a8", ()), StepAssignment("fp32"))
    labels = steps_to_labels(steps, ("a", "b", "c"), groups)
    assert labels == (("w4a4",) * 3, ("w8a8",) * 3, ("fp32",) * 3)
