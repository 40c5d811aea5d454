"""What every result file records about how it was made: versions, device, command, time; and settings fingerprints."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
import shlex
import sys
from pathlib import Path

from qsched_search._version import __version__
from qsched_search.results.io import write_json

PACKAGES = ("torch", "torchao", "diffusers", "transformers", "optuna", "torchmetrics", "lpips", "clean-fid", "numpy")


def versions() -> dict[str, str]:
    out = {"qsched-search": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_name(device: str) -> str:
    """`cuda:0 (NVIDIA H200)` or `cpu (x86_64, 2 threads)`."""
    import torch  # the contract stays importable without torch; naming a device needs it

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fingerprint(obj) -> str:
    """A short, stable hash of JSON-able settings (sorted keys): equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def update_manifest(path: Path, stage: str, fields: dict) -> dict:
    """Merges one stage's fields into manifest.json: the latest stage's fields on top, every stage under `stages`."""
    manifest = {}
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            manifest = {}
    entry = {"stage": stage, "command": command_line(), "versions": versions(), "created": now(), **fields}
    stages = manifest.get("stages", {})
    stages[stage] = entry
    manifest = {**manifest, **entry, "stages": stages}
    write_json(path, manifest)
    return manifest
