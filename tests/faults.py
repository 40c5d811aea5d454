"""The fault table: every bad input and injected fault, what it must end with, and how to run one.

One table for tests/test_faults.py (which checks each row) and scripts/bench_reliability.py (which counts them).
Each row runs a real command in-process (typer's CliRunner) on the embedded model, with the fault injected by
its `inject` function: a file made bad, or a function patched to return NaN, raise ENOSPC or raise Ctrl-C.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from typer.testing import CliRunner

from qsched_search.resources import EMBEDDED_MODEL_DIR
from tests.reliability import front, leftovers, measured_once

# 1 step x {fp32, w8a8, w4a4} = 3 schedules; 2 samples; SSIM needs no metric weights; a budget every level fits in
# (with only its Linear layers quantized, w4a4 costs ~0.66 of fp32).
SEARCH = ["search", "--steps", "1", "--precisions", "w8a8,w4a4", "--samples", "2", "--objective", "ssim",
          "--images", "0", "--sampler", "exhaustive", "--budget", "0.9"]
PROBE = ["probe", "--steps", "1", "--precisions", "w8a8,w4a4", "--samples", "2", "--metrics", "ssim"]
SCHEDULES = 3


@dataclass(frozen=True)
class Fault:
    """One row: `args` of a `qsched` command (OUT is replaced by the row's folder), `inject(folder, patch)`
    prepares the fault and returns extra arguments; the command must exit with `code` and, when `message` is not
    empty, print one line starting `error:` that contains it. `resume`: the same command run again without the
    fault must finish with the baseline's front, measuring nothing twice."""

    name: str
    kind: str
    args: tuple[str, ...]
    code: int
    message: str = ""
    inject: Callable[[Path, pytest.MonkeyPatch], list[str]] | None = None
    resume: bool = False
    failed_trials: tuple[str, ...] = field(default=())  # schedules that must be recorded as FAIL (numeric faults)


# ------------------------------------------------------------------------------------------------ injections


def _corrupt_index(folder: Path, patch) -> list[str]:
    model = folder / "model"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    return ["--model", str(model)]


def _corrupt_weights(folder: Path, patch) -> list[str]:
    model = folder / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    return ["--model", str(model)]


def _schedule_json(folder: Path, text: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "schedule.json").write_text(text)
    return ["--schedule", str(folder / "schedule.json")]


def _baseline_schedule(baseline: Path, edit: Callable[[dict], None]) -> str:
    obj = json.loads((baseline / "schedule.json").read_text())
    edit(obj)
    return json.dumps(obj)


def _levels_nan(value: float, level: str):
    """Patches the simulation's weight rounding so that `level` makes weights of `value` (NaN or inf); `level` must
    be one without a torchao kernel, which the simulation rounds with the generic recipe."""
    def inject(folder: Path, patch) -> list[str]:
        from qsched_search.quant import sim_bank

        original = sim_bank.quantize_weight

        def broken(weight, lv):
            out = original(weight, lv)
            return out.fill_(value) if lv.name == level else out

        patch.setattr(sim_bank, "quantize_weight", broken)
        return []
    return inject


def _disk_full(folder: Path, patch) -> list[str]:
    """The first trials.csv write runs out of space half-way through."""
    original = pd.DataFrame.to_csv

    def full(self, path=None, *args, **kwargs):
        if path is not None and Path(str(path)).name.startswith(".trials.csv."):
            Path(path).write_text("trial,schedule\n0,")  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(self, path, *args, **kwargs)

    patch.setattr(pd.DataFrame, "to_csv", full)
    return []


def _ctrl_c_after(calls: int):
    """Ctrl-C (KeyboardInterrupt, what SIGINT raises) during the evaluation after `calls` finished ones."""
    def inject(folder: Path, patch) -> list[str]:
        from qsched_search.eval import evaluate

        original, count = evaluate.ScheduleEvaluator.evaluate, [0]

        def interrupted(self, levels, **kwargs):
            count[0] += 1
            if count[0] > calls:
                raise KeyboardInterrupt
            return original(self, levels, **kwargs)

        patch.setattr(evaluate.ScheduleEvaluator, "evaluate", interrupted)
        return []
    return inject


def _out_under_a_file(folder: Path, patch) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a-file").write_text("not a folder")
    return ["--out", str(folder / "a-file" / "results")]


# ------------------------------------------------------------------------------------------------ the table

_S, _P = tuple(SEARCH), tuple(PROBE)
FAULTS: list[Fault] = [
    Fault("missing model folder", "bad-input", _S + ("--model", "/nonexistent/model"), 2, "model '/nonexistent/model' not found"),
    Fault("corrupt model_index.json", "corrupt-file", _S, 2, "model_index.json is not valid JSON", _corrupt_index),
    Fault("truncated model weights", "corrupt-file", _S, 2, "could not load model", _corrupt_weights),
    Fault("malformed schedule JSON", "corrupt-file", ("generate",), 2, "not valid JSON",
          lambda folder, patch: _schedule_json(folder, '{"levels": ["w8a8", ')),
    Fault("wrong-length schedule", "bad-input", ("generate",), 2, "levels has 2 entries",
          lambda folder, patch: _schedule_json(folder, _baseline_schedule(folder.parent / "baseline",
                                                                          lambda o: o.update(levels=o["levels"] * 2)))),
    Fault("unknown precision in a schedule", "bad-input", ("generate",), 2, "w3a3",
          lambda folder, patch: _schedule_json(folder, _baseline_schedule(folder.parent / "baseline",
                                                                          lambda o: o.update(levels=["w3a3"])))),
    Fault("unknown precision", "bad-input", _S + ("--precisions", "w8a8,w3a3"), 2, "unknown precision 'w3a3'"),
    Fault("budget 0", "bad-input", _S + ("--budget", "0"), 2, "--budget 0.0 is outside (0, 1]"),
    Fault("budget < 0", "bad-input", _S + ("--budget", "-0.5"), 2, "--budget -0.5 is outside (0, 1]"),
    Fault("budget > 1", "bad-input", _S + ("--budget", "1.5"), 2, "--budget 1.5 is outside (0, 1]"),
    Fault("steps < 1", "bad-input", _S + ("--steps", "0"), 2, "--steps must be at least 1, got 0"),
    Fault("steps < 1 (probe)", "bad-input", _P + ("--steps", "0"), 2, "--steps must be at least 1, got 0"),
    Fault("workers < 1", "bad-input", _S + ("--workers", "0"), 2, "--workers 0 is below 1"),
    Fault("heartbeat < 1", "bad-input", _S + ("--heartbeat", "0"), 2, "--heartbeat 0 is not a positive whole number"),
    Fault("precision gives NaN", "numeric", _S, 0, inject=_levels_nan(float("nan"), "w4a4"), failed_trials=("w4a4",)),
    Fault("precision gives inf", "numeric", _S, 0, inject=_levels_nan(float("inf"), "w4a4"), failed_trials=("w4a4",)),
    Fault("unwritable output folder", "io", _S, 2, "is not a writable folder", _out_under_a_file),
    Fault("unwritable output folder (probe)", "io", _P, 2, "is not a writable folder", _out_under_a_file),
    Fault("disk full during a write", "io", _S, 74, "trials.csv': No space left on device (errno ENOSPC)", _disk_full,
          resume=True),
    Fault("Ctrl-C during search", "interrupt", _S, 130, inject=_ctrl_c_after(1), resume=True),
    Fault("Ctrl-C during probe", "interrupt", _P, 130, inject=_ctrl_c_after(2), resume=True),
]


def invoke(args: list[str]):
    from qsched_search.cli.app import app

    return CliRunner().invoke(app, args)


def with_out(args: tuple[str, ...], folder: Path) -> list[str]:
    return [*args, "--out", str(folder)] if args[0] != "generate" else [*args, "--out", str(folder / "generated")]


def run_baseline(folder: Path) -> Path:
    """The uninterrupted search (and its probe) every row is compared with."""
    for args in (PROBE, SEARCH):
        result = invoke(with_out(tuple(args), folder))
        assert result.exit_code == 0, result.output
    return folder


def run_fault(fault: Fault, folder: Path) -> dict:
    """Runs one row; returns what happened (the test asserts it, the benchmark counts it).

    `folder` must sit beside the baseline's folder (`folder.parent / "baseline"`).
    """
    baseline = folder.parent / "baseline"
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        extra = fault.inject(folder, patch) if fault.inject else []
        args = with_out(fault.args, folder)
        if "--out" in extra:  # the row's own --out replaces the default one
            i = args.index("--out")
            del args[i:i + 2]
        result = invoke([*args, *extra])
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    outcome = {
        "name": fault.name, "kind": fault.kind, "command": fault.args[0], "exit_code": result.exit_code,
        "expected_code": fault.code, "error_line": errors[-1] if errors else "", "error_lines": len(errors),
        "traceback": "Traceback" in result.output or (result.exception is not None and not isinstance(result.exception, SystemExit)),
        "leftover_tmp": leftovers(folder), "half_written": [], "failed_trials": 0, "injected": 1,
        "trials_lost": 0, "evaluated_twice": 0, "resumed": "", "output": result.output[-1500:],
    }
    trials_csv = folder / "trials.csv"
    if fault.kind == "numeric" and trials_csv.is_file():
        trials = pd.read_csv(trials_csv)
        bad = trials[trials["schedule"].isin(fault.failed_trials)]
        outcome["failed_trials"] = int((bad["state"] == "FAIL").sum())
        outcome["injected"] = len(fault.failed_trials)
        outcome["trials_lost"] = SCHEDULES - trials["schedule"].nunique()
        outcome["fail_reasons"] = sorted(set(bad["fail_reason"].astype(str)))
    if fault.code not in (0,) and fault.kind in ("io", "interrupt"):
        # A failed run writes nothing half-way: no result file, or only whole ones from before.
        for name in ("trials.csv", "pareto.csv", "schedule.json", "probe.csv"):
            path = folder / name
            if path.is_file() and name.endswith(".csv") and not _whole_csv(path):
                outcome["half_written"].append(name)
    if fault.resume:
        again = invoke(with_out(fault.args, folder))
        outcome["resumed"] = "ok" if again.exit_code == 0 else f"exit {again.exit_code}: {again.output[-300:]}"
        if fault.args[0] == "search" and again.exit_code == 0:
            outcome["trials_lost"] = int(front(folder / "pareto.csv") != front(baseline / "pareto.csv"))
            outcome["evaluated_twice"] = measured_once(folder / "trials.csv")[1]
        if fault.args[0] == "probe" and again.exit_code == 0:
            same = (folder / "probe.csv").read_text() == (baseline / "probe.csv").read_text()
            outcome["trials_lost"] = int(not same)
    return outcome


def _whole_csv(path: Path) -> bool:
    try:
        frame = pd.read_csv(path)
    except Exception:
        return False
    return not frame.empty
