"""Model families: which denoiser attribute to wrap, which layers to keep at reference, default metrics and prompts."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qsched_search.errors import QschedError
from qsched_search.resources import FAMILY_DIR
logger = logging.getLogger(__name__)


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
    # Detection: a family with model_ids matches only a pipeline loaded from a matching hub id or folder name; one
    # with scheduler_classes only a pipeline with such a scheduler. The most specific matching family wins.
    model_ids: tuple[str, ...] = ()
    scheduler_classes: tuple[str, ...] = ()
    # The scheduler the family is meant to run with ({"class": ..., "config": {...}}); see make_scheduler.
    scheduler: dict = field(default_factory=dict)
    # The denoiser is called with scheduler timestep / timestep_scale (FLUX: /1000); apply_schedule undoes it.
    timestep_scale: float = 1.0
    # `qsched search`'s budget when --budget is not given: where the family's trade-off is.
    default_budget: float = 0.5
    # Groupings of the denoiser's layers for per-layer overrides (name -> list of {name, layers, each}); see
    # qsched_search.quant.groups. `default_grouping` is the one used when none is named.
    layer_groups: dict = field(default_factory=dict)
    default_grouping: str | None = None

    def denoiser_of(self, pipe):
        module = getattr(pipe, self.denoiser, None)
        if module is None:
            raise QschedError(f"pipeline {type(pipe).__name__} has no {self.denoiser!r} component, which family {self.family!r} quantizes")
        return module

    def make_scheduler(self, pipe):
        """The family's scheduler built from `pipe.scheduler`'s config with the family's settings (not installed).

        Example: `pipe.scheduler = family.make_scheduler(pipe)` for an LCM-LoRA or PCM checkpoint that ships
        another scheduler.
        """
        if not self.scheduler:
            raise QschedError(f"model family {self.family!r} names no scheduler in configs/families/{self.family}.yaml")
        import diffusers

        cls = getattr(diffusers, self.scheduler["class"], None)
        if cls is None:
            raise QschedError(f"model family {self.family!r}: scheduler class {self.scheduler['class']!r} is not in diffusers "
                              f"{diffusers.__version__}")
        return cls.from_config(pipe.scheduler.config, **dict(self.scheduler.get("config", {}) or {}))

    def check_scheduler(self, pipe) -> bool:
        """Logs a warning when the pipeline's scheduler is not the family's; returns whether it is."""
        wanted = self.scheduler.get("class") if self.scheduler else None
        have = type(getattr(pipe, "scheduler", None)).__name__
        if wanted and have != wanted:
            logger.warning("model family %s is meant to run with %s, this pipeline has %s; "
                           "pipe.scheduler = family.make_scheduler(pipe) installs it", self.family, wanted, have)
            return False
        return True


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
        model_ids=tuple(raw.get("model_ids", ()) or ()),
        scheduler_classes=tuple(raw.get("scheduler_classes", ()) or ()),
        scheduler=dict(raw.get("scheduler", {}) or {}),
        timestep_scale=float(raw.get("timestep_scale", 1.0)),
        default_budget=float(raw.get("default_budget", 0.5)),
        layer_groups={k: v for k, v in (raw.get("layer_groups") or {}).items() if k != "default"},
        default_grouping=(raw.get("layer_groups") or {}).get("default"),
    )


def _id_matches(patterns: tuple[str, ...], model_id: str) -> bool:
    # A hub id ("org/name") is matched whole; a local path by its last component, so a parent folder's name does
    # not count.
    if not model_id:
        return False
    is_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()
    candidates = {Path(model_id.rstrip("/")).name.lower()} if is_path else {model_id.lower(), model_id.split("/")[-1].lower()}
    return any(fnmatch.fnmatch(c, p.lower()) for c in candidates for p in patterns)


def detect_family(pipe, model_id: str | None = None) -> Family:
    """The most specific family that fits the pipeline (the embedded model is chosen by path).

    A family fits when its `pipeline_classes` lists the pipeline's class, its `model_ids` (if any) match the model's
    hub id or folder name (`model_id`, else the pipeline's `name_or_path`), and its `scheduler_classes` (if any) list
    the pipeline's scheduler class. A model-id match outranks a scheduler match, which outranks a class-only match.
    """
    cls = type(pipe).__name__
    scheduler = type(getattr(pipe, "scheduler", None)).__name__
    model_id = model_id or getattr(pipe, "name_or_path", None) or ""
    best, best_rank = None, -1
    for path in sorted(FAMILY_DIR.glob("*.yaml")):
        if path.stem == "embedded":
            continue
        family = load_family(path.stem)
        if cls not in family.pipeline_classes:
            continue
        if family.model_ids and not _id_matches(family.model_ids, str(model_id)):
            continue
        if family.scheduler_classes and scheduler not in family.scheduler_classes:
            continue
        rank = 2 * bool(family.model_ids) + bool(family.scheduler_classes)
        if rank > best_rank:
            best, best_rank = family, rank
    if best is None:
        raise QschedError(f"no model family lists pipeline class {cls!r} (scheduler {scheduler}); add it to a file in "
                          "configs/families/ (pipeline_classes), or pass --family NAME (one of those files)")
    return best
