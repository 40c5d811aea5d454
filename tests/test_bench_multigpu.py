"""scripts/bench_multigpu.py on CPU: the same run it makes on a multi-GPU host, on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.reliability import REPO, env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_and_a_killed_one_lose_nothing_and_keep_the_front(tmp_path):
    out = tmp_path / "mg"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_multigpu.py"), "--device", "cpu",
                             "--workers", "1,2", "--samples", "16", "--kill-after", "1", "--out", str(out)],
                            env=env(), capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    frame = pd.read_csv(out / "scaling.csv")
    assert list(frame.run) == ["throughput", "throughput", "kill one worker"]
    assert list(frame.workers) == [1, 2, 2]
    # Every one of the 9 schedules measured exactly once in every run, and the same front as one worker.
    assert (frame.schedules == 9).all() and (frame.measured == 9).all()
    assert (frame["lost"] == 0).all() and (frame["duplicated"] == 0).all() and frame["front_equal"].all()
    killed = frame.iloc[2]
    # The dead worker's trial was retried, or its schedule was measured by the other worker's trial that
    # claimed it first; either way no schedule waits on the dead one.
    assert killed.killed_trial >= 0 and bool(killed.taken_over), result.stdout[-2000:]
    assert frame.efficiency.iloc[0] == 1.0 and (frame.evals_per_min > 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cpu") and summary["storage"] and (out / "scaling.png").is_file()


def test_the_sdxl_builder_makes_a_pipeline_of_the_sdxl_family(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_multigpu import build_sdxl

    from qsched_search.pipeline.loading import load_model

    folder = build_sdxl(tmp_path / "sdxl", blocks=2, tiny=True)
    model = load_model(str(folder))
    assert model.family.family == "sdxl-turbo"
    unet = model.pipe.unet
    assert unet.config.cross_attention_dim == 2048 and unet.config.addition_embed_type == "text_time"
    assert model.pipe.text_encoder.config.hidden_size + model.pipe.text_encoder_2.config.hidden_size == 2048
