"""`qsched generate` and `apply_schedule`: a saved schedule reproduces the search's images bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from qsched_search.cli.app import app
from qsched_search.results.layout import ResultsDir

SETTINGS = ["--steps", "2", "--precisions", "w4a4", "--samples", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    result = CliRunner().invoke(app, ["search", *SETTINGS, "--budget", "0.9", "--images", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return ResultsDir(out)


def test_generate_reproduces_the_schedule_images(searched, tmp_path):
    result = CliRunner().invoke(app, ["generate", "--schedule", str(searched.schedule), "--samples", "4",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    index = pd.read_csv(searched.images_index)
    made = index[index.label == "schedule"].sort_values("sample")
    assert len(made) == 4
    for k, row in enumerate(made.itertuples()):
        expected = np.asarray(Image.open(searched.images_dir / row.file))
        got = np.asarray(Image.open(tmp_path / f"{k:02d}.png"))
        assert np.array_equal(expected, got)


def test_apply_schedule_follows_the_schedule_in_a_plain_pipeline_call(searched):
    import json

    import torch

    from qsched_search import apply_schedule
    from qsched_search.pipeline.loading import load_model

    schedule = json.loads(searched.schedule.read_text())
    pipe = load_model("embedded").pipe
    applied = apply_schedule(pipe, searched.schedule)
    try:
        pipe(["bag"], num_inference_steps=2, guidance_scale=0.0, height=32, width=32,
             generator=torch.Generator().manual_seed(0))
        expected = {level: schedule["levels"].count(level) for level in set(schedule["levels"])}
        assert dict(applied.bank.calls) == expected
        with pytest.raises(Exception, match="num_inference_steps=2"):
            pipe(["bag"], num_inference_steps=3, guidance_scale=0.0, height=32, width=32)
    finally:
        applied.remove()


def test_malformed_schedule_is_one_line_error(tmp_path):
    bad = tmp_path / "schedule.json"
    bad.write_text('{"schema_version": 1, "levels": ["fp32"]')
    result = CliRunner().invoke(app, ["generate", "--schedule", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
