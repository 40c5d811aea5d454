"""A schedule as the `diffusion_step_policy` that diffusers and vLLM-Omni read from a ModelOpt FP8 checkpoint.

diffusers (`pipelines/cosmos/mixed_precision.py`, PR #14664) and vLLM-Omni (PR #6560) read
`quantization_config.runtime.diffusion_step_policy` from a checkpoint's `transformer/config.json`. Version 1 has
one type, `first_last_n`: the first `first_steps.count` and the last `last_steps.count` iterations of the denoising
loop run `a16` (the checkpoint's FP8 weights dequantized, 16-bit activations: W8A16), the others `native` (the
checkpoint's own FP8 W8A8); a one-step run is all native. vLLM-Omni refuses a policy with a missing or unknown
field, so every field is written and no other:

    {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
     "scope": ["transformer"], "default_mode": "native", "first_steps": {"count": 1, "mode": "a16"},
     "last_steps": {"count": 1, "mode": "a16"}, "overlap": "a16", "reasoner": "native"}

A schedule maps onto it when each level is one of the two the policy names (by its definition in the schedule's
menu, not its name): `native` is float8_e4m3fn W8A8, `a16` float8_e4m3fn weights with 16-bit activations; and
when its a16 steps are a leading and a trailing run. `reasoner` (Cosmos3's understanding layers, which a schedule
has no level for) is written `native`: the checkpoint's own precision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from qsched_search.errors import QschedError
from qsched_search.quant.levels import Level, Menu
from qsched_search.results.io import write_json

__all__ = ["POLICY_FIELDS", "export_step_policy", "level_mode", "policy_modes", "read_step_policy",
           "schedule_modes", "to_step_policy"]

POLICY_FIELDS = ("schema_version", "type", "index_space", "scope", "default_mode", "first_steps", "last_steps",
                 "overlap", "reasoner")
_WINDOW_FIELDS = ("count", "mode")
_FIXED = {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
          "default_mode": "native", "overlap": "a16"}
_MODES = "native (float8_e4m3fn W8A8, the checkpoint's own path) and a16 (float8_e4m3fn weights, 16-bit activations)"


def level_mode(level: Level) -> str | None:
    """`native`, `a16`, or None when the policy cannot express the level."""
    if level.format != "float8" or level.dtype != "float8_e4m3fn" or level.weight_bits != 8:
        return None
    return {8: "native", 16: "a16"}.get(level.act_bits)


def schedule_modes(levels: Sequence[str], menu: Menu) -> list[str]:
    """Each step's policy mode; a one-line error naming every level the policy cannot express."""
    bad = [lv for lv in dict.fromkeys(levels) if level_mode(menu[lv]) is None]
    if bad:
        where = "; ".join(f"{lv} at step {', '.join(str(i) for i, x in enumerate(levels) if x == lv)} "
                          f"({menu[lv].describe()})" for lv in bad)
        raise QschedError(f"diffusion-step-policy cannot express level {where}: it has only {_MODES}; search with "
                          "--precisions naming such levels of the menu")
    return [level_mode(menu[lv]) for lv in levels]


def to_step_policy(levels: Sequence[str], menu: Menu) -> dict:
    """The `diffusion_step_policy` mapping of a schedule's per-step levels."""
    modes = schedule_modes(levels, menu)
    n = len(modes)
    first = next((i for i, m in enumerate(modes) if m != "a16"), n)
    last = 0 if first == n else next(i for i, m in enumerate(reversed(modes)) if m != "a16")
    if "a16" in modes[first : n - last]:
        pattern = ", ".join(modes)
        raise QschedError(f"diffusion-step-policy cannot express the step pattern {pattern}: its a16 steps must be a "
                          "leading and a trailing run (first_last_n) around native ones")
    if n == 1 and first:
        raise QschedError("diffusion-step-policy cannot express a one-step a16 schedule: diffusers and vLLM-Omni run "
                          "one-step requests native (W8A8) whatever the policy says")
    policy = {**_FIXED, "scope": ["transformer"], "first_steps": {"count": first, "mode": "a16"},
              "last_steps": {"count": last, "mode": "a16"}, "reasoner": "native"}
    return {k: policy[k] for k in POLICY_FIELDS}


def policy_modes(policy: Mapping[str, Any], steps: int) -> list[str]:
    """The mode of each of `steps` loop iterations under `policy`, as diffusers' `use_high_precision` decides."""
    first, last = policy["first_steps"]["count"], policy["last_steps"]["count"]
    if steps == 1:
        return ["native"]
    return ["a16" if i < first or i >= steps - last else "native" for i in range(steps)]


def _config_path(out: Path) -> Path:
    return out / "transformer" / "config.json" if out.is_dir() else out


def export_step_policy(levels: Sequence[str], menu: Menu, out: str | Path) -> Path:
    """Writes the policy into a transformer config.json (or a checkpoint folder's `transformer/config.json`),
    keeping its other fields; to a new file, only `{"quantization_config": {"runtime": {...}}}` to merge in.

    Returns:
        `Path`: the file written.
    """
    policy = to_step_policy(levels, menu)
    path = _config_path(Path(out))
    if Path(out).is_dir() and not path.is_file():
        raise QschedError(f"{out} is a folder without transformer/config.json; pass a ModelOpt FP8 checkpoint folder, "
                          "its transformer config.json, or a new .json file for the fragment")
    config = _read_json(path) if path.exists() else {}
    quant = config.setdefault("quantization_config", {})
    if not isinstance(quant, dict):
        raise QschedError(f"{path}: quantization_config is a {type(quant).__name__}, not an object; pass a "
                          "transformer config.json")
    algo = str(quant.get("quant_algo") or quant.get("quant_type") or "")
    if algo and "FP8" not in algo.upper():
        raise QschedError(f"{path}: quantization_config.quant_algo is {algo!r}; diffusers reads a "
                          "diffusion_step_policy only from a ModelOpt FP8 checkpoint")
    runtime = quant.get("runtime")
    quant["runtime"] = {**(runtime if isinstance(runtime, dict) else {}), "diffusion_step_policy": policy}
    write_json(path, config)
    return path


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QschedError(f"{path} is not a readable JSON file ({exc}); pass a transformer config.json") from None
    if not isinstance(obj, dict):
        raise QschedError(f"{path} holds a JSON {type(obj).__name__}, not an object; pass a transformer config.json")
    return obj


def read_step_policy(path: str | Path) -> dict:
    """The `diffusion_step_policy` of a config.json (or a checkpoint folder), checked as vLLM-Omni checks it: every
    field present and no other, version 1 `first_last_n`, windows of a16 with non-negative counts."""
    path = _config_path(Path(path))
    runtime = (_read_json(path).get("quantization_config") or {}).get("runtime") or {}
    policy = runtime.get("diffusion_step_policy") if isinstance(runtime, dict) else None
    if not isinstance(policy, dict):
        raise QschedError(f"{path} has no quantization_config.runtime.diffusion_step_policy object")
    fields = set(policy)
    if fields != set(POLICY_FIELDS):
        raise QschedError(f"{path}: diffusion_step_policy fields missing {sorted(set(POLICY_FIELDS) - fields)}, unknown "
                          f"{sorted(fields - set(POLICY_FIELDS))}; allowed exactly: {', '.join(POLICY_FIELDS)}")
    for key, value in _FIXED.items():
        if policy[key] != value or isinstance(policy[key], bool):
            raise QschedError(f"{path}: diffusion_step_policy.{key} = {policy[key]!r}; allowed: {value!r}")
    scope = policy["scope"]
    if not isinstance(scope, list) or not scope or not all(isinstance(s, str) for s in scope):
        raise QschedError(f"{path}: diffusion_step_policy.scope = {scope!r}; allowed: a non-empty list of names")
    for name in ("first_steps", "last_steps"):
        window = policy[name]
        if not isinstance(window, dict) or set(window) != set(_WINDOW_FIELDS) or window["mode"] != "a16" or \
                not isinstance(window["count"], int) or isinstance(window["count"], bool) or window["count"] < 0:
            raise QschedError(f"{path}: diffusion_step_policy.{name} = {window!r}; allowed: "
                              '{"count": a non-negative integer, "mode": "a16"}')
    if policy["reasoner"] not in ("native", "a16"):
        raise QschedError(f"{path}: diffusion_step_policy.reasoner = {policy['reasoner']!r}; allowed: 'native', 'a16'")
    return dict(policy)
