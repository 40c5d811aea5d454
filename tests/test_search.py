"""Tests `qsched search`: budget, samplers, warm start, the cache, failures, resume after a kill, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from qsched_search.errors import QschedError
from qsched_search.plots import plot_history, plot_pareto
from qsched_search.quant.costs import load_latency_profile
from qsched_search.results.records import Estimate, Measurement
from qsched_search.results.schedule import load_schedule
from qsched_search.results.tables import PROBE_COLUMNS, TRIALS_COLUMNS, choose_schedule, pareto_front
from qsched_search.search.priors import (AdditiveModel, additive_front, additive_model, dp_schedule, greedy_schedule,
                                         warm_start_schedules)
from qsched_search.search.samplers import SAMPLER_FACTORIES, resolve_sampler
from qsched_search.search.stage import SearchSettings
from qsched_search.search.storage import open_storage
from qsched_search.search.study import SOURCES
from tests.helpers import BOPS, HARM, LEVELS, FakeEvaluator, fake_costs, make_search, true_quality

optuna.logging.set_verbosity(optuna.logging.ERROR)

TESTS_DIR = Path(__file__).resolve().parent
COSTS = fake_costs()


def brute_force(steps, budget, choices=LEVELS):
    rows = [(s, sum(BOPS[lv] for lv in s) / steps, true_quality(s)) for s in itertools.product(choices, repeat=steps)]
    feasible = [r for r in rows if r[1] <= budget + 1e-9]
    return rows, min(feasible, key=lambda r: (r[2], r[1]))


def sqlite(tmp_path, name="study.db") -> str:
    return f"sqlite:///{tmp_path / name}"


# ------------------------------------------------------------------------------------------------ samplers and budget


@pytest.mark.parametrize("sampler", sorted(SAMPLER_FACTORIES))
@pytest.mark.parametrize("budget", [0.05, 0.5, 1.0])
def test_every_sampler_returns_a_schedule_within_budget(sampler, budget):
    fake = FakeEvaluator()
    uniform = warm_start_schedules(LEVELS[1:], "fp32", 3, BOPS, budget)
    search = make_search(fake.evaluate, steps=3, budget=budget, sampler=sampler, trials=20, warm_start=uniform)
    outcome = search.run()
    trials = outcome.trials
    assert list(trials.columns) == TRIALS_COLUMNS
    assert set(trials["source"]) <= set(SOURCES)
    assert set(trials["state"]) <= {"COMPLETE", "FAIL"}
    assert max(fake.calls.values()) == 1, "a schedule was evaluated twice"
    assert outcome.new_evaluations == sum(fake.calls.values()) <= 20
    chosen = choose_schedule(trials, budget, higher_is_better=False)
    assert chosen is not None and chosen["cost"] <= budget + 1e-9
    assert chosen["feasible"]
    # Never worse than any uniform schedule within budget: the warm start measures them first.
    for level in LEVELS:
        cost = BOPS[level]
        if cost <= budget:
            assert chosen["value"] <= true_quality((level,) * 3) + 1e-12


def test_exhaustive_measures_every_schedule_once_and_finds_the_true_optimum():
    fake = FakeEvaluator()
    search = make_search(fake.evaluate, steps=3, budget=0.5, sampler="exhaustive")
    assert search.trials == 64
    outcome = search.run()
    assert len(fake.calls) == 64 and set(fake.calls.values()) == {1}
    rows, best = brute_force(3, 0.5)
    chosen = choose_schedule(outcome.trials, 0.5, higher_is_better=False)
    assert tuple(chosen["schedule"].split(",")) == best[0]
    # The front is exactly the brute-force non-dominated set.
    front = pareto_front(outcome.trials, higher_is_better=False)
    expected = {",".join(s) for s, c, q in rows
                if not any((c2 <= c and q2 <= q) and (c2 < c or q2 < q) for _, c2, q2 in rows)}
    assert set(front["schedule"]) == expected
    assert front["on_front"].all()


def test_auto_sampler_rule():
    assert resolve_sampler("auto", 64, None) == "tpe"  # the default 24 new evaluations do not cover 64
    assert resolve_sampler("auto", 64, 64) == "exhaustive"
    assert resolve_sampler("auto", 16, None) == "exhaustive"
    assert resolve_sampler("nsga2", 16, None) == "nsga2"
    with pytest.raises(QschedError, match="--sampler 'cmaes' is unknown; allowed: auto, tpe"):
        resolve_sampler("cmaes", 16, None)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5])
def test_budget_outside_0_1_is_a_one_line_error(budget):
    with pytest.raises(QschedError, match=r"--budget .* is outside \(0, 1\]") as info:
        make_search(FakeEvaluator().evaluate, budget=budget)
    assert "\n" not in str(info.value)
    with pytest.raises(QschedError, match=r"outside \(0, 1\]"):
        SearchSettings(budget=budget)


def test_budget_below_the_cheapest_schedule_names_its_cost():
    with pytest.raises(QschedError, match=r"below the cheapest schedule's bops cost 0.019 \(every step at w4a4\)"):
        make_search(FakeEvaluator().evaluate, budget=0.01)


def test_the_same_seed_gives_the_same_search():
    runs = [make_search(FakeEvaluator().evaluate, steps=4, sampler="tpe", trials=15, seed=3).run().trials for _ in range(2)]
    assert runs[0]["schedule"].tolist() == runs[1]["schedule"].tolist()


# ------------------------------------------------------------------------------------------------ the cache


def test_a_schedule_proposed_again_is_not_re_run():
    # 2 steps x 2 levels: the random sampler proposes duplicates long before it has seen all four.
    fake = FakeEvaluator()
    outcome = make_search(fake.evaluate, steps=2, choices=("fp32", "w4a4"), sampler="random", trials=10).run()
    assert set(fake.calls.values()) == {1} and len(fake.calls) == 4
    cached = outcome.trials[outcome.trials["source"] == "cache"]
    assert len(cached) > 0 and set(cached["schedule"]) <= set(fake.calls)
    assert "all 4 schedules are evaluated" in outcome.stopped_because


def test_cache_survives_a_restart_and_is_shared_between_studies(tmp_path):
    first = FakeEvaluator()
    out1 = make_search(first.evaluate, steps=4, sampler="tpe", trials=12, storage=sqlite(tmp_path)).run()
    # The same command again: the study resumes, and 12 more new schedules are measured.
    second = FakeEvaluator()
    out2 = make_search(second.evaluate, steps=4, sampler="tpe", trials=12, storage=sqlite(tmp_path)).run()
    assert not set(first.calls) & set(second.calls), "a schedule measured before was measured again"
    assert out2.study.study_name == out1.study.study_name
    before = out1.trials.set_index("trial")
    after = out2.trials.set_index("trial").loc[before.index]
    pd.testing.assert_frame_equal(before, after)
    assert len(out2.trials) >= len(out1.trials) + 12
    # Another budget is another study in the same storage; it starts from everything measured so far.
    third = FakeEvaluator()
    out3 = make_search(third.evaluate, steps=4, budget=0.3, sampler="tpe", trials=3, storage=sqlite(tmp_path)).run()
    assert out3.study.study_name != out1.study.study_name
    assert not set(third.calls) & (set(first.calls) | set(second.calls))
    imported = out3.trials[out3.trials["source"] == "cache"]
    assert len(imported) >= len(first.calls) + len(second.calls)


def test_a_study_can_be_finished_by_the_exhaustive_sampler(tmp_path):
    first = FakeEvaluator()
    out1 = make_search(first.evaluate, steps=3, sampler="tpe", trials=10, storage=sqlite(tmp_path)).run()
    rest = FakeEvaluator()
    out2 = make_search(rest.evaluate, steps=3, sampler="exhaustive", storage=sqlite(tmp_path)).run()
    assert out2.study.study_name == out1.study.study_name
    assert not set(first.calls) & set(rest.calls) and len(first.calls) + len(rest.calls) == 64
    assert set(out2.trials.loc[len(out1.trials):, "source"]) <= {"exhaustive", "cache"}


def test_known_measurements_are_imported_not_run():
    known = {"fp32,fp32,fp32": Measurement(estimates={"lpips": Estimate(0.0, 0.0, 0.0, 8)}, origin="probe")}
    fake = FakeEvaluator()
    outcome = make_search(fake.evaluate, trials=5, known=known,
                          warm_start=[(("fp32",) * 3, "uniform"), (("w8a8",) * 3, "uniform")]).run()
    assert "fp32,fp32,fp32" not in fake.calls and fake.calls["w8a8,w8a8,w8a8"] == 1
    row = outcome.trials[outcome.trials["schedule"] == "fp32,fp32,fp32"].iloc[0]
    assert row["source"] == "cache" and row["value"] == 0.0 and not row["feasible"]
    trial = outcome.study.trials[int(row["trial"])]
    assert trial.user_attrs["origin"] == "probe"
    # The public view of every measurement, the imported one included.
    measured = make_search(FakeEvaluator().evaluate, trials=0, known=known).evaluated()
    assert measured == {}  # nothing before run()
    search = make_search(FakeEvaluator().evaluate, trials=5, known=known,
                         warm_start=[(("w8a8",) * 3, "uniform")])
    search.run()
    measured = search.evaluated()
    assert measured["fp32,fp32,fp32"].estimates["lpips"] == Estimate(0.0, 0.0, 0.0, 8)
    assert measured["w8a8,w8a8,w8a8"].value("lpips") == pytest.approx(true_quality(("w8a8",) * 3))
    assert all(isinstance(m, Measurement) for m in measured.values()) and len(measured) >= 2


def test_a_non_finite_objective_fails_its_trial_measured_or_imported():
    inf = Measurement(estimates={"lpips": Estimate(math.inf, math.inf, math.inf, 8)}, origin="probe")
    fake = FakeEvaluator()

    def evaluate(levels):
        if levels == ("w8a8",) * 3:
            return inf
        return fake.evaluate(levels)

    outcome = make_search(evaluate, trials=3, known={"fp32,fp32,fp32": inf},
                          warm_start=[(("fp32",) * 3, "uniform"), (("w8a8",) * 3, "uniform")]).run()
    trials = outcome.trials.set_index("schedule")
    for key in ("fp32,fp32,fp32", "w8a8,w8a8,w8a8"):
        assert trials.loc[key, "state"] == "FAIL" and trials.loc[key, "fail_reason"] == "metric lpips is NaN or infinite"


# ------------------------------------------------------------------------------------------------ failures


def test_failed_evaluations_are_recorded_with_their_reason_and_the_search_goes_on(tmp_path):
    fake = FakeEvaluator(fail={"w4a4,w4a4"}, crash={"w4a8,w4a4"})
    outcome = make_search(fake.evaluate, steps=2, sampler="exhaustive", storage=sqlite(tmp_path)).run()
    trials = outcome.trials.set_index("schedule")
    assert trials.loc["w4a4,w4a4", "state"] == "FAIL"
    assert trials.loc["w4a4,w4a4", "fail_reason"] == "8/8 images unusable (nan)"
    assert trials.loc["w4a8,w4a4", "state"] == "FAIL"
    assert trials.loc["w4a8,w4a4", "fail_reason"] == "RuntimeError: kernel exploded"
    assert (outcome.trials["state"] == "COMPLETE").sum() == 14
    assert pd.isna(trials.loc["w4a4,w4a4", "value"])
    chosen = choose_schedule(outcome.trials, 0.5, higher_is_better=False)
    assert chosen["schedule"] not in ("w4a4,w4a4", "w4a8,w4a4")
    # A measured failure is cached like a result; a crash is tried again on the next run.
    again = FakeEvaluator()
    make_search(again.evaluate, steps=2, sampler="exhaustive", storage=sqlite(tmp_path)).run()
    assert "w4a4,w4a4" not in again.calls
    assert again.calls["w4a8,w4a4"] == 1


# ------------------------------------------------------------------------------------------------ resume


def test_a_trial_left_running_by_a_killed_run_is_failed_and_run_again(tmp_path):
    fake = FakeEvaluator()
    out1 = make_search(fake.evaluate, steps=3, sampler="tpe", trials=6, storage=sqlite(tmp_path)).run()
    # What a SIGKILL mid-evaluation leaves behind: a RUNNING trial with its parameters.
    study = out1.study
    orphan = study.ask({f"step_{i}": optuna.distributions.CategoricalDistribution(LEVELS) for i in range(3)})
    orphan_key = ",".join(orphan.params[f"step_{i}"] for i in range(3))
    again = FakeEvaluator()
    out2 = make_search(again.evaluate, steps=3, sampler="tpe", trials=3, storage=sqlite(tmp_path)).run()
    states = out2.trials.set_index("trial")
    assert states.loc[orphan.number, "state"] == "FAIL"
    assert states.loc[orphan.number, "fail_reason"].startswith("interrupted")
    completed_before = set(out1.trials[out1.trials["state"] == "COMPLETE"]["schedule"])
    assert not completed_before & set(again.calls)
    if orphan_key not in completed_before:
        assert again.calls[orphan_key] == 1, "the interrupted schedule is queued again"


def _wait_for_lines(path: Path, n: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
from tests.helpers import FakeEvaluator, make_search
fake = FakeEvaluator(delay=float(sys.argv[3]), log=sys.argv[2])
make_search(fake.evaluate, steps=4, sampler="tpe", trials=int(sys.argv[4]), storage=sys.argv[1]).run()
"""


def test_a_search_killed_with_sigkill_resumes_and_keeps_its_finished_trials(tmp_path):
    storage, log1, log2 = sqlite(tmp_path), tmp_path / "first.log", tmp_path / "second.log"
    script = _SCRIPT.format(repo=str(TESTS_DIR.parent))
    proc = subprocess.Popen([sys.executable, "-c", script, storage, str(log1), "0.25", "40"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_lines(log1, 5, timeout=120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    summaries = optuna.get_all_study_summaries(storage)
    assert len(summaries) == 1
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    done = {t.number: (t.user_attrs["schedule"], t.values) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert len(done) >= 4
    subprocess.run([sys.executable, "-c", script, storage, str(log2), "0", "5"], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    trials = {t.number: t for t in study.get_trials()}
    for number, (schedule, values) in done.items():
        assert trials[number].state == optuna.trial.TrialState.COMPLETE
        assert (trials[number].user_attrs["schedule"], trials[number].values) == (schedule, values)
    rerun = log2.read_text().splitlines()
    assert len(rerun) == 5
    assert not {s for s, _ in done.values()} & set(rerun), "finished schedules were evaluated again"
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials.values())


# ------------------------------------------------------------------------------------------------ warm start


def _random_model(steps, seed) -> AdditiveModel:
    import random

    rng = random.Random(seed)
    harm = {(i, lv): rng.uniform(0, 1) * {"w8a8": 0.2, "w4a8": 0.6, "w4a4": 1.0}[lv] for i in range(steps)
            for lv in LEVELS[1:]}
    return AdditiveModel(harm=harm, steps=steps, levels=LEVELS, reference="fp32")


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_programme_is_exact(seed):
    steps = 4
    model = _random_model(steps, seed)
    # Costs rounded: sums of the same level costs in another order differ in the last bit.
    everything = [(s, model.predict(s), round(sum(BOPS[lv] for lv in s) / steps, 12))
                  for s in itertools.product(LEVELS, repeat=steps)]
    front = additive_front(model, BOPS)
    expected = [e for e in everything if not any(c2 <= e[2] and h2 <= e[1] and (c2 < e[2] or h2 < e[1])
                                                 for _, h2, c2 in everything)]
    assert sorted((round(p.cost, 9), round(p.harm, 9)) for p in front) == sorted((round(c, 9), round(h, 9)) for _, h, c in expected)
    for budget in (0.02, 0.05, 0.3, 0.5, 0.8, 1.0):
        best = min((e for e in everything if e[2] <= budget + 1e-9), key=lambda e: (e[1], e[2]))
        got = dp_schedule(model, BOPS, budget)
        assert model.predict(got) == pytest.approx(best[1])
        greedy = greedy_schedule(model, BOPS, budget)
        assert sum(BOPS[lv] for lv in greedy) / steps <= budget + 1e-9
        assert model.predict(greedy) >= best[1] - 1e-12  # greedy is never better than the exact optimum


def _probe_frame(steps=3, higher_is_better=False, failed=()) -> pd.DataFrame:
    rows = [dict(kind="reference", step=None, timestep=None, precision="fp32", metric="lpips", value=0.001,
                 ci_low=0, ci_high=0.002, n=8, delta=0.0, unhealthy_images=0, fail_reason="")]
    sign = -1 if higher_is_better else 1
    for lv in LEVELS[1:]:
        for i in range(steps):
            bad = (i, lv) in failed
            v = math.nan if bad else 3.0 * 0.6 ** i * HARM[lv] / steps
            rows.append(dict(kind="step", step=i, timestep=999 - 333 * i, precision=lv, metric="lpips", value=v,
                             ci_low=v, ci_high=v, n=0 if bad else 8, delta=sign * v, unhealthy_images=8 if bad else 0,
                             fail_reason="8/8 images unusable (nan)" if bad else ""))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def test_additive_model_from_the_probe_table():
    model = additive_model(_probe_frame(failed={(0, "w4a4")}), "lpips", False, 3, LEVELS, "fp32")
    assert model.step_harm(0, "fp32") == 0
    assert model.step_harm(1, "w8a8") == pytest.approx(3.0 * 0.6 * 0.01 / 3)
    assert model.step_harm(0, "w4a4") == math.inf
    assert all(p.levels[0] != "w4a4" for p in additive_front(model, BOPS))
    # Higher-is-better metrics: a drop is harm.
    up = additive_model(_probe_frame(higher_is_better=True), "lpips", True, 3, LEVELS, "fp32")
    assert up.step_harm(1, "w8a8") == pytest.approx(model.step_harm(1, "w8a8"))
    # A probe of another step count or metric gives no model.
    assert additive_model(_probe_frame(steps=2), "lpips", False, 3, LEVELS, "fp32") is None
    assert additive_model(_probe_frame(), "psnr", False, 3, LEVELS, "fp32") is None


def test_probe_cells_are_reused_only_when_measured_the_same_way(tmp_path):
    from qsched_search.results.layout import ResultsDir
    from qsched_search.results.provenance import update_manifest
    from qsched_search.search.probe import CellStore, probe_cells
    from qsched_search.search.stage import _probe_measurements

    described = {"model_id": "embedded", "weights_sha256": "a" * 64, "steps": 3, "samples": 8, "seed": 0,
                 "prompts_sha256": "b" * 64, "reference": "fp32", "dtype": "float32", "device": "cpu",
                 "batch_size": 64, "call_kwargs": {}, "exclude": ["conv_in"], "backend": "sim",
                 "execution": {"backend": "sim", "target": "torchao"}, "levels": {"w8a8": {"format": "int"}}}
    results = ResultsDir(tmp_path)
    store = CellStore(results.probe_cells, "f" * 16)
    cells = probe_cells(LEVELS[1:], "fp32", 3)
    for cell in cells:
        levels = cell.levels("fp32", 3)
        v = true_quality(levels) + (0.001 if cell.kind == "reference" else 0.0)
        store.add(cell, Measurement(estimates={"lpips": Estimate(v, v, v, 8)}, timesteps=(999, 666, 333)))
    _probe_frame().to_csv(results.probe_csv, index=False)

    def reuse(stage, metric="lpips", levels=LEVELS):
        if stage is None:
            results.manifest.unlink(missing_ok=True)
        else:
            results.manifest.unlink(missing_ok=True)
            update_manifest(results.manifest, "probe", stage)
        return _probe_measurements(results, results.probe_csv, described, metric, 3, "fp32", levels)

    stage = {**described, "device": "cpu (x86_64, 2 threads)", "metrics": ["lpips", "psnr"], "fingerprint": "f" * 16}
    records, why = reuse(stage)
    # The noise floor (all fp32), every one-step swap and every uniform schedule.
    assert why == "" and len(records) == len(cells) == 1 + 3 * 3 + 3
    assert records["fp32,fp32,fp32"].value("lpips") == pytest.approx(0.001)
    assert records["fp32,w4a4,fp32"].origin == "probe" and records["w4a4,w4a4,w4a4"].timesteps == (999, 666, 333)
    # Only cells of the levels the search may use.
    records, why = reuse(stage, levels=("fp32", "w8a8"))
    assert why == "" and set(records) == {"fp32,fp32,fp32", "w8a8,fp32,fp32", "fp32,w8a8,fp32", "fp32,fp32,w8a8",
                                          "w8a8,w8a8,w8a8"}
    # Another metric: the cells do not answer it.
    assert reuse(stage, metric="psnr") == ({}, "")
    records, why = reuse({**stage, "prompts_sha256": "c" * 64})
    assert records == {} and "prompts_sha256" in why
    records, why = reuse({**stage, "backend": "torchao"})
    assert records == {} and "backend" in why
    records, why = reuse({**stage, "levels": {"w8a8": {"format": "int", "weight_bits": 4}}})
    assert records == {} and "level w8a8 was defined differently" in why
    assert reuse({**stage, "fingerprint": "e" * 16}) == ({}, "")  # cells of other settings are never read
    records, why = reuse(None)
    assert records == {} and "manifest" in why


def test_warm_start_schedules():
    model = additive_model(_probe_frame(steps=4), "lpips", False, 4, LEVELS, "fp32")
    warm = warm_start_schedules(LEVELS[1:], "fp32", 4, BOPS, 0.5, model)
    schedules = [s for s, _ in warm]
    assert len(schedules) == len(set(schedules))
    assert [s for s, src in warm if src == "uniform"] == [("w4a4",) * 4, ("w4a8",) * 4, ("w8a8",) * 4, ("fp32",) * 4]
    sources = Counter(src for _, src in warm)
    assert sources["probe-dp"] >= 1 and sources["probe-greedy"] <= 1
    for s, src in warm:
        if src != "uniform":
            assert sum(BOPS[lv] for lv in s) / 4 <= 0.5
    assert warm[4] == (dp_schedule(model, BOPS, 0.5), "probe-dp")
    assert [src for _, src in warm_start_schedules(LEVELS[1:], "fp32", 4, BOPS, 0.5, None)] == ["uniform"] * 4


def test_probe_warm_start_reaches_the_optimum_in_few_evaluations():
    model = additive_model(_probe_frame(steps=4), "lpips", False, 4, LEVELS, "fp32")
    warm = warm_start_schedules(LEVELS[1:], "fp32", 4, BOPS, 0.5, model)
    fake = FakeEvaluator()
    outcome = make_search(fake.evaluate, steps=4, sampler="tpe", trials=len(warm), warm_start=warm).run()
    _, best = brute_force(4, 0.5)
    chosen = choose_schedule(outcome.trials, 0.5, higher_is_better=False)
    assert chosen["value"] == pytest.approx(best[2], rel=0.05)
    assert set(outcome.trials["source"]) <= {"uniform", "probe-dp", "probe-greedy"}


# ------------------------------------------------------------------------------------------------ costs, storage, files


def test_latency_profile(tmp_path):
    path = tmp_path / "profile.csv"
    pd.DataFrame({"level": ["fp32", "fp32", "w8a8", "w4a4"], "ms_per_step": [10.0, 12.0, 5.5, 13.2],
                  "batch": [1, 1, 1, 1]}).to_csv(path, index=False)
    costs = load_latency_profile(path, ["w8a8", "w4a4"], "fp32")
    assert costs == {"fp32": 1.0, "w8a8": pytest.approx(0.5), "w4a4": pytest.approx(1.2)}
    with pytest.raises(QschedError, match="no row for level\\(s\\) w4a8"):
        load_latency_profile(path, ["w4a8"], "fp32")
    pd.DataFrame({"level": ["fp32"], "ms": [1.0]}).to_csv(path, index=False)
    with pytest.raises(QschedError, match="lacks column\\(s\\) ms_per_step"):
        load_latency_profile(path, [], "fp32")
    # Latency comes from a profile, or is measured on real kernels; the simulation has no latency to measure.
    from qsched_search.search.stage import check_cost_source

    with pytest.raises(QschedError, match="--cost latency needs real kernels: pass --backend torchao.*--profile FILE.*qsched profile"):
        check_cost_source(SearchSettings(cost_model="latency"), "sim")
    check_cost_source(SearchSettings(cost_model="latency"), "torchao")
    check_cost_source(SearchSettings(cost_model="latency", profile=str(path)), "sim")
    check_cost_source(SearchSettings(cost_model="bops"), "sim")
    with pytest.raises(QschedError, match="needs a latency profile"):
        COSTS.model("latency")


def test_storage_errors_are_one_line(tmp_path):
    with pytest.raises(QschedError, match="--storage 'nosuchdb://x' could not be opened") as info:
        open_storage("nosuchdb://x")
    assert "\n" not in str(info.value)
    assert open_storage(None, tmp_path / "a" / "study.db")[1].startswith("sqlite:///")


def test_a_named_study_with_other_settings_is_refused(tmp_path):
    make_search(FakeEvaluator().evaluate, trials=2, storage=sqlite(tmp_path), study_name="mine").run()
    with pytest.raises(QschedError, match="--study 'mine' .* was made with other settings"):
        make_search(FakeEvaluator().evaluate, budget=0.3, trials=2, storage=sqlite(tmp_path), study_name="mine").run()


def test_plots_are_written(tmp_path):
    fake = FakeEvaluator(fail={"w4a4,w4a4,w4a4"})
    trials = make_search(fake.evaluate, sampler="exhaustive").run().trials
    front = pareto_front(trials, False)
    chosen = choose_schedule(trials, 0.5, False)
    plot_pareto(trials, front, 0.5, "bops", "lpips", False, 3, chosen=(chosen["cost"], chosen["value"]),
                path=tmp_path / "pareto.png", reference="fp32")
    plot_history(trials, 0.5, "lpips", False, tmp_path / "history.png")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000 and (tmp_path / "history.png").stat().st_size > 10_000
    # Without a path, the PNG bytes (the report embeds them).
    png = plot_pareto(trials, front, 0.5, "bops", "lpips", False, 3)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ the CLI


def _app():
    from qsched_search.cli.app import app

    return app


@pytest.mark.parametrize("args, expected", [
    (["--budget", "1.5"], r"--budget 1.5 is outside (0, 1]"),
    (["--budget", "0"], r"--budget 0.0 is outside (0, 1]"),
    (["--cost", "latency"], "--cost latency needs real kernels"),
    (["--precisions", "w8a8,w3a3"], "unknown precision 'w3a3'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    result = CliRunner().invoke(_app(), ["search", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output


@pytest.mark.slow
def test_cli_search_on_the_embedded_model(tmp_path):
    """2 steps x 3 levels, 4 samples: the probe's cells reused, every output file, the schema, and a re-run that
    measures nothing again."""
    common = ["--steps", "2", "--samples", "4", "--precisions", "w8a8,w4a4", "--out", str(tmp_path)]
    probed = CliRunner().invoke(_app(), ["probe", *common, "--metrics", "lpips"])
    assert probed.exit_code == 0, probed.output
    args = ["search", *common, "--images", "2", "--budget", "0.9"]  # Linear layers only: w4a4 costs ~0.66 of fp32
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    # The probe measured 7 of the 9 schedules (the reference, 4 one-step swaps, 2 uniform): 2 are left to run.
    assert "2 new evaluations" in result.output
    schedule = load_schedule(tmp_path / "schedule.json")
    assert schedule.cost["bops"] <= 0.9 and schedule.steps == 2 and schedule.quality.metric == "lpips"
    assert schedule.backend == "sim" and schedule.execution["target"] == "torchao"
    assert all(schedule.quantized_layers(lv) for lv in set(schedule.levels) - {"fp32"})
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert list(trials.columns) == TRIALS_COLUMNS and len(trials) == 9
    pareto = pd.read_csv(tmp_path / "pareto.csv")
    assert list(pareto.columns) == TRIALS_COLUMNS + ["on_front"] and pareto["on_front"].all()
    index = pd.read_csv(tmp_path / "images" / "index.csv")
    assert set(index["label"]) == {"reference", "schedule", "best_uniform", "cheapest_uniform"}
    assert all((tmp_path / "images" / f).is_file() for f in index["file"])
    assert (index[index["label"] == "reference"]["lpips"] == 0).all()
    for name in ("pareto.png", "history.png", "study.db", "manifest.json"):
        assert (tmp_path / name).is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["search"]["sampler"] == "exhaustive"
    assert manifest["stages"]["search"]["probe_cells_reused"] == 7
    assert (trials["source"] == "cache").sum() == 7
    assert "best uniform" in result.output
    again = CliRunner().invoke(_app(), args)
    assert again.exit_code == 0, again.output
    assert "0 new evaluations" in again.output
    assert len(pd.read_csv(tmp_path / "trials.csv")) == 9
    # A budget below every schedule, now that the level costs are measured.
    low = CliRunner().invoke(_app(), [*args, "--budget", "0.001"])
    assert low.exit_code == 2 and "below the cheapest schedule's bops cost" in low.output
