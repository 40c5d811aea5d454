"""Model families: which denoiser attribute to wrap, which layers to keep at reference, default metrics and prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qsched_search.errors import QschedError
from qsched_search.paths import CONFIG_DIR

FAMILY_DIR = CONFIG_DIR / "families"


@dataclass(frozen=True)
class Family:
    """One model family's settings, read from `configs/families/NAME.yaml`."""

    family: str
    denoiser: str
    pipeline_classes: tuple[str, ...]
    exclude: tuple[str, ...]
    metrics: tuple[str, ...]
    default_prompts: tuple[str, ...] = ()
    call_defaults: dict = field(default_factory=dict)

    def denoiser_of(self, pipe):
        module = getattr(pipe, self.denoiser, None)
        if module is None:
            raise QschedError(f"pipeline {type(pipe).__name__} has no {self.denoiser!r} component, which family {self.family!r} quantizes")
        return module


def load_family(name: str) -> Family:
    path = FAMILY_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in FAMILY_DIR.glob("*.yaml"))
        raise QschedError(f"unknown model family {name!r}: configs/families has {', '.join(known)}")
    raw = yaml.safe_load(path.read_text())
    return Family(
        family=raw["family"],
        denoiser=raw["denoiser"],
        pipeline_classes=tuple(raw.get("pipeline_classes", ())),
        exclude=tuple(raw.get("exclude", ())),
        metrics=tuple(raw.get("metrics", ())),
        default_prompts=tuple(raw.get("default_prompts", ()) or ()),
        call_defaults=dict(raw.get("call_defaults", {}) or {}),
    )


def detect_family(pipe) -> Family:
    """The family whose `pipeline_classes` lists the pipeline's class (the embedded model is chosen by path)."""
    cls = type(pipe).__name__
    for path in sorted(FAMILY_DIR.glob("*.yaml")):
        if path.stem == "embedded":
            continue
        family = load_family(path.stem)
        if cls in family.pipeline_classes:
            return family
    raise QschedError(f"no model family lists pipeline class {cls!r}; add it to a file in configs/families/ (pipeline_classes)")
