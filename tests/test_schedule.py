"""Tests the schedule: its cost, its checks, and its JSON file against the published schema."""

from __future__ import annotations

import json
import math

import pytest

from qsched_search.errors import QschedError
from qsched_search.pipeline.switching import step_of
from qsched_search.quant.costs import CostTable
from qsched_search.quant.levels import load_menu
from qsched_search.results.schedule import (SCHEMA_PATH, Quality, cost_of, load_schedule, save_schedule,
                                            schedule_schema, validate_schedule_dict)
from tests.helpers import SCHEDULE_COSTS as COSTS
from tests.helpers import make_schedule


def test_cost_is_the_mean_over_steps_of_the_level_costs():
    assert cost_of(["fp32", "fp32"], COSTS) == 1.0
    assert cost_of(["fp32", "w4a4", "w4a4", "w8a8"], COSTS) == pytest.approx((1 + 0.019 * 2 + 0.066) / 4)
    both = CostTable({"bops": COSTS, "memory": {"w8a8": 0.25, "fp32": 1.0}, "latency": None}).costs(["w8a8", "fp32"])
    assert both == {"bops": pytest.approx(0.533), "memory": pytest.approx(0.625), "latency": None}
    with pytest.raises(QschedError, match="level 'w2a8' has no cost"):
        cost_of(["w2a8"], COSTS)


def test_schema_is_valid_draft_2020_12():
    import jsonschema

    schema = schedule_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert SCHEMA_PATH.is_file()


def test_round_trip(tmp_path):
    schedule = make_schedule(extras={"search": {"sampler": "tpe"}})
    path = save_schedule(schedule, tmp_path / "schedule.json")
    loaded = load_schedule(path)
    assert loaded == schedule
    assert loaded.levels == ("w8a8", "fp32", "w4a8", "w4a4") and loaded.steps == 4
    # The step a denoiser call at timestep 999 belongs to runs the first level (the rule apply_schedule follows).
    assert loaded.levels[step_of(999, loaded.timesteps)] == "w8a8"
    assert step_of(5, loaded.timesteps) is None
    # The file is the published format other tools read.
    obj = json.loads(path.read_text())
    assert obj["schema_version"] == 3 and "overrides" not in obj  # a per-step schedule writes no overrides
    assert set(obj) >= {"model", "steps", "timesteps", "levels", "reference", "budget", "cost", "quality", "provenance"}
    assert obj["cost"]["latency"] is None and obj["budget"] == {"fraction": 0.5, "cost_model": "bops"}
    # A results folder works as well as the file.
    assert load_schedule(tmp_path) == schedule


def test_version_1_files_still_load(tmp_path):
    obj = make_schedule().to_dict()
    obj["schema_version"] = 1
    assert "execution" not in obj and "comparison" not in obj
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(obj))
    loaded = load_schedule(path)
    assert loaded == make_schedule()
    assert loaded.execution == {} and loaded.backend is None and loaded.quantized_layers("w8a8") is None


def test_version_2_sections_round_trip(tmp_path):
    execution = {"backend": "sim", "target": "torchao", "compile": "regional",
                 "levels": {"w8a8": {"kernel": "simulated torchao Int8DynamicActivationInt8Weight",
                                     "quantized_layers": ["down.0.proj", "up.1.proj"]}}}
    per_image = (0.01, None, 0.03)
    schedule = make_schedule(quality=Quality("lpips", 0.02, 0.01, 0.03, 3, False, per_image),
                             extras={"execution": execution})
    loaded = load_schedule(save_schedule(schedule, tmp_path / "s.json"))
    assert loaded.backend == "sim" and loaded.execution["compile"] == "regional"
    assert loaded.quantized_layers("w8a8") == ["down.0.proj", "up.1.proj"] and loaded.quantized_layers("w4a4") is None
    assert loaded.quality.per_image == per_image
    assert json.loads((tmp_path / "s.json").read_text())["quality"]["per_image"] == [0.01, None, 0.03]


def test_undefined_interval_is_written_as_null(tmp_path):
    schedule = make_schedule(quality=Quality("lpips", 0.02, None, None, 1, False))
    path = save_schedule(schedule, tmp_path / "s.json")
    assert json.loads(path.read_text())["quality"]["ci_low"] is None
    assert load_schedule(path).quality.ci_low is None


def _write_bad(tmp_path, mutate, schedule=None) -> str:
    obj = (schedule or make_schedule()).to_dict()
    mutate(obj)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(QschedError) as info:
        load_schedule(path)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert str(path) in message
    return message


@pytest.mark.parametrize("mutate, expected", [
    (lambda o: o["levels"].pop(), ["levels", "3 entries", "steps = 4", "one level per step"]),
    (lambda o: o["timesteps"].pop(), ["timesteps", "one per step"]),
    (lambda o: o["levels"].__setitem__(1, "w3a3"), ["levels[1]", "'w3a3'", "w8a8"]),
    (lambda o: o["budget"].__setitem__("fraction", 1.5), ["budget.fraction", "1.5", "(0, 1]"]),
    (lambda o: o["budget"].__setitem__("fraction", 0), ["budget.fraction", "= 0", "(0, 1]"]),
    (lambda o: o["budget"].__setitem__("fraction", -0.2), ["budget.fraction", "-0.2", "(0, 1]"]),
    (lambda o: o["budget"].__setitem__("cost_model", "flops"), ["budget.cost_model", "flops", "bops, memory, latency"]),
    (lambda o: o.pop("levels"), ["levels is missing"]),
    (lambda o: o["levels"].__setitem__(0, 8), ["levels[0]", "8", "level names"]),
    (lambda o: o["quality"].pop("n"), ["quality.n is missing", "positive integer"]),
    (lambda o: o["model"].__setitem__("weights_sha256", "xyz"), ["model.weights_sha256", "xyz", "64 lowercase hex"]),
    (lambda o: o.__setitem__("schema_version", 4), ["schema_version", "4", "integer 3"]),
    (lambda o: o["cost"].__setitem__("bops", 0.9), ["cost.bops", "over budget"]),
    (lambda o: o.__setitem__("reference", "w8a8"), ["reference", "'w8a8'", "format 'reference'"]),
])
def test_malformed_schedules_are_rejected_with_one_line(tmp_path, mutate, expected):
    message = _write_bad(tmp_path, mutate)
    for part in expected:
        assert part in message, (part, message)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text("{levels: ")
    with pytest.raises(QschedError, match="not valid JSON"):
        load_schedule(bad)
    with pytest.raises(QschedError, match="not found"):
        load_schedule(tmp_path / "nope.json")
    bad.write_text("[1, 2]")
    with pytest.raises(QschedError, match="JSON object"):
        load_schedule(bad)


def test_construction_checks_name_the_field():
    with pytest.raises(QschedError, match=r"budget.fraction = 1.2 is outside \(0, 1\]"):
        make_schedule(budget=1.2)
    with pytest.raises(QschedError, match="levels has 4 entries .* but steps = 2"):
        make_schedule(steps=2)
    with pytest.raises(QschedError, match="over budget"):
        make_schedule(levels=("fp32", "fp32", "w8a8", "w8a8"))
    with pytest.raises(QschedError, match="cost.latency = null but the budget is in latency"):
        make_schedule(cost_model="latency")
    with pytest.raises(QschedError, match="quality.value"):
        Quality("lpips", math.nan, None, None, 4, False)


def test_save_validates_before_writing(tmp_path):
    schedule = make_schedule(provenance={"tool_version": "0.1.0"})  # lacks seed, prompts hash, command, created
    with pytest.raises(QschedError, match="provenance.seed is missing"):
        save_schedule(schedule, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_levels_are_checked_against_the_menu_in_the_file_or_the_default(tmp_path):
    menu = load_menu()
    schedule = make_schedule(extras={"menu": {"levels": {"fp32": {"format": "reference", "weight_bits": 32, "act_bits": 32},
                                                         "w8a8": {"format": "int", "weight_bits": 8, "act_bits": 8}}}})
    path = tmp_path / "s.json"
    # The file's own menu lacks w4a8: the schedule does not fit the menu it claims.
    path.write_text(json.dumps(schedule.to_dict()))
    with pytest.raises(QschedError, match=r"levels\[2\] = 'w4a8' is not in the precision menu"):
        load_schedule(path)
    # An explicit menu wins.
    assert load_schedule(path, menu=menu).levels[2] == "w4a8"
    validate_schedule_dict(schedule.to_dict())


# ------------------------------------------------------------------------------------------------ per-layer overrides

def _with_overrides(**fields):
    from qsched_search.results.assignment import Override

    groups = {"grouping": "block-role", "groups": {"mid/ff": ["mid.ff.net.0.proj", "mid.ff.net.2"], "up.0/attn2.qkv": ["up.0.attn2.to_q"]}}
    overrides = ((Override("fp32", group="mid/ff"),), (), (Override("w8a8", pattern="*attn2.to_[qkv]"),
                                                          Override("fp32", group="up.0/attn2.qkv")), ())
    return make_schedule(overrides=overrides, extras={"layer_groups": groups, **fields.pop("extras", {})}, **fields)


def test_version_3_overrides_round_trip_and_name_each_steps_layers(tmp_path):
    schedule = _with_overrides()
    path = save_schedule(schedule, tmp_path / "s.json")
    obj = json.loads(path.read_text())
    assert obj["schema_version"] == 3
    assert obj["overrides"][0] == [{"group": "mid/ff", "level": "fp32"}]
    assert obj["overrides"][1] == [] and obj["overrides"][2][0] == {"pattern": "*attn2.to_[qkv]", "level": "w8a8"}
    loaded = load_schedule(path)
    assert loaded == schedule and loaded.has_overrides
    steps = loaded.step_assignments
    assert [s.level for s in steps] == list(loaded.levels)
    assert str(steps[0]) == "w8a8{mid/ff=fp32}" and str(steps[1]) == "fp32"
    assert str(steps[2]) == "w4a8{~*attn2.to_[qkv]=w8a8;up.0/attn2.qkv=fp32}"
    assert loaded.all_levels == ("w8a8", "fp32", "w4a8", "w4a4")


@pytest.mark.parametrize("version", [1, 2])
def test_older_files_load_as_schedules_without_overrides(tmp_path, version):
    obj = make_schedule().to_dict()
    obj["schema_version"] = version
    path = tmp_path / "old.json"
    path.write_text(json.dumps(obj))
    loaded = load_schedule(path)
    assert not loaded.has_overrides and loaded.overrides == ()
    assert all(not s.overrides for s in loaded.step_assignments)


@pytest.mark.parametrize("mutate, expected", [
    (lambda o: o["overrides"].pop(), ["overrides has 3 entries", "steps = 4", "one list of overrides per step"]),
    (lambda o: o["overrides"][0][0].__setitem__("group", "nowhere/ff"), ["overrides[0][0].group", "'nowhere/ff'",
                                                                         "layer_groups", "mid/ff"]),
    (lambda o: o["overrides"][2][0].__setitem__("level", "w3a3"), ["overrides[2][0].level", "'w3a3'", "precision menu"]),
    (lambda o: o["overrides"][0][0].pop("group"), ["overrides[0][0]", "group", "pattern"]),
    (lambda o: o["overrides"][0][0].__setitem__("pattern", "*ff*"), ["overrides[0][0]"]),
])
def test_malformed_overrides_are_rejected_with_one_line(tmp_path, mutate, expected):
    message = _write_bad(tmp_path, mutate, _with_overrides())
    for part in expected:
        assert part in message, (part, message)


def test_overrides_are_validated_against_the_familys_groups():
    schedule = _with_overrides(extras={})
    schedule.validate_groups(["mid/ff", "up.0/attn2.qkv"])
    with pytest.raises(QschedError, match=r"overrides\[0\]\[0\].group = 'mid/ff' is not in .* allowed: other/ff"):
        schedule.validate_groups(["other/ff"])


def test_step_keys_parse_back_and_reject_malformed_tokens():
    from qsched_search.results.assignment import Override, StepAssignment, parse_schedule_key
    from qsched_search.results.tables import schedule_key, split_schedule

    steps = (StepAssignment("w4a4", (Override("w8a8", group="b.0/ff"), Override("fp32", pattern="*.attn2.*"))),
             StepAssignment("w8a8"))
    key = schedule_key(steps)
    assert key == "w4a4{b.0/ff=w8a8;~*.attn2.*=fp32},w8a8"
    assert parse_schedule_key(key) == steps and len(split_schedule(key)) == 2
    for bad in ("w4a4{b.0/ff}", "w4a4{=fp32}", "{x=fp32}", "w4a4{a=b"):
        with pytest.raises(QschedError):
            parse_schedule_key(bad)
