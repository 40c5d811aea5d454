"""A schedule's `coefficients` section: its schema, its checks, and `apply_schedule` / `qsched generate` applying it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qsched_search.errors import QschedError
from qsched_search.pipeline.coefficients import apply_coefficients
from qsched_search.results.coefficients import COEFFICIENTS_SCHEMA, KINDS, Coefficients
from qsched_search.results.schedule import load_schedule, save_schedule, schedule_schema
from tests.helpers import make_schedule

RAMP = Coefficients.from_ramp(0.9, 1.05, steps=2)


def test_the_published_schema_holds_the_coefficients_section():
    section = schedule_schema()["properties"]["coefficients"]
    assert section == COEFFICIENTS_SCHEMA
    assert section["properties"]["kind"]["enum"] == list(KINDS)
    assert "coefficients" not in schedule_schema()["required"]  # old files stay valid


def test_a_schedule_without_coefficients_loads_as_before(tmp_path):
    path = save_schedule(make_schedule(), tmp_path / "schedule.json")
    assert "coefficients" not in json.loads(path.read_text())
    assert load_schedule(path).coefficients is None


def test_coefficients_round_trip(tmp_path):
    coeffs = Coefficients.from_ramp(0.95, 1.02, steps=4)
    path = save_schedule(make_schedule(extras={"coefficients": coeffs.to_dict()}), tmp_path / "schedule.json")
    loaded = load_schedule(path).coefficients
    assert loaded.kind == "ramp" and loaded.ramp == pytest.approx((0.95, 1.02))
    assert loaded.model_coeff == pytest.approx(coeffs.model_coeff)
    assert loaded.sample_coeff == pytest.approx(coeffs.sample_coeff)


def test_coefficients_for_another_step_count_fail_on_construction():
    with pytest.raises(QschedError, match="cover 3 steps but the schedule has 4"):
        make_schedule(extras={"coefficients": Coefficients.from_ramp(0.9, 1.0, steps=3).to_dict()})


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(model_coeff=[0.9, -1.0, 1.0, 1.0]), "coefficients.model_coeff"),
    (lambda c: c.update(kind="cubic"), "coefficients.kind"),
    (lambda c: c.pop("sample_coeff"), "sample_coeff is missing"),
])
def test_a_malformed_coefficients_section_is_a_one_line_error(tmp_path, edit, expected):
    obj = make_schedule().to_dict()
    obj["coefficients"] = Coefficients.from_ramp(0.9, 1.0, steps=4).to_dict()
    edit(obj["coefficients"])
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(QschedError) as info:
        load_schedule(path)
    message = str(info.value)
    assert expected in message and "\n" not in message and str(path) in message


# ------------------------------------------------------------------------------ applying it to the embedded model


@pytest.fixture(scope="module")
def embedded():
    from qsched_search.pipeline.loading import load_model

    return load_model("embedded")


def _timesteps(pipe, steps: int) -> tuple[int, ...]:
    pipe.scheduler.set_timesteps(steps)
    return tuple(int(t) for t in pipe.scheduler.timesteps)


def _embedded_schedule(model, coefficients: Coefficients | None):
    extras = {"coefficients": coefficients.to_dict()} if coefficients else {}
    return make_schedule(levels=("fp32", "w4a4"), timesteps=_timesteps(model.pipe, 2), extras=extras,
                         weights_sha256=model.weights_sha256(), cost={"bops": 0.5, "memory": 0.5, "latency": None})


def _images(pipe) -> torch.Tensor:
    out = pipe(["bag", "sneaker"], num_inference_steps=2, guidance_scale=0.0, height=32, width=32,
               generator=[torch.Generator().manual_seed(k) for k in range(2)], output_type="pt")
    return out.images


def test_apply_schedule_installs_the_coefficients_and_removes_them(embedded):
    from qsched_search import apply_schedule

    pipe, scheduler = embedded.pipe, embedded.pipe.scheduler
    schedule = _embedded_schedule(embedded, RAMP)
    plain = apply_schedule(pipe, schedule, coefficients=False)
    try:
        without = _images(pipe)
        with apply_coefficients(pipe, RAMP):
            by_hand = _images(pipe)
    finally:
        plain.remove()
    applied = apply_schedule(pipe, schedule)
    try:
        assert applied.coefficients is not None and applied.coefficients.installed
        with_coeffs = _images(pipe)
        assert applied.coefficients.seen == [0, 1]  # both steps were rescaled
    finally:
        applied.remove()
    assert "step" not in vars(scheduler) and "set_timesteps" not in vars(scheduler)
    assert torch.equal(with_coeffs, by_hand)
    assert (with_coeffs - without).abs().max() > 1e-3


def test_generate_applies_the_coefficients_unless_told_not_to(embedded, tmp_path):
    from qsched_search.cli.app import app

    path = save_schedule(_embedded_schedule(embedded, RAMP), tmp_path / "schedule.json")
    made = {}
    for name, extra in (("with", []), ("without", ["--no-coefficients"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["generate", "--schedule", str(path), "--samples", "2", "--out", str(out),
                                          *extra])
        assert result.exit_code == 0, result.output
        made[name] = [np.asarray(Image.open(out / f"{k:02d}.png"), dtype=np.int16) for k in range(2)]
        index = pd.read_csv(out / "index.csv")
        assert set(index.coefficients) == ({RAMP.describe()} if name == "with" else {"none"})
    assert any(np.abs(a - b).max() > 2 for a, b in zip(made["with"], made["without"]))
