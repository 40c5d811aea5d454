"""Image-quality metrics by name: the registry, the base class, and what every metric shares (checks, intervals).

A metric's direction and pairing are facts of the results contract (`qsched_search.results.metric_facts`); a class
registered here takes them from there, so the report, which loads no network, reads the same facts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from qsched_search.errors import QschedError
from qsched_search.results.metric_facts import MetricFacts, facts, register_facts
from qsched_search.results.records import Estimate

__all__ = ["CONFIDENCE", "Estimate", "Metric", "available_metrics", "build_metrics", "check_images", "check_pair",
           "get_metric_class", "mean_estimate", "register_metric"]

CONFIDENCE = 0.95


class Metric(ABC):
    """A score over a batch of images in [0, 1] shaped (N, C, H, W), C = 1 or 3.

    Subclasses set `preprocessing` (a sentence for reports); `register_metric` sets `name`, `higher_is_better` and
    `paired` from the metric's facts.

    Args:
        device (`str`, defaults to `"cpu"`): where the metric's networks run; images are moved there to be scored.
        weights_dir (`str` or `Path`, *optional*): the weights folder (see `qsched_search.eval.weights.weights_dir`).
    """

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    paired: ClassVar[bool]
    preprocessing: ClassVar[str] = ""
    slow: ClassVar[bool] = False  # too slow on CPU for a default fast path (fid)

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None):
        self.device = torch.device(device)
        self.weights_dir = weights_dir

    @abstractmethod
    def score(self, images: torch.Tensor, reference: torch.Tensor | None, prompts: Sequence[str]) -> Estimate:
        """Scores `images`.

        Args:
            images (`torch.Tensor`): float (N, C, H, W) in [0, 1].
            reference (`torch.Tensor`, *optional*): the reference images, same shape; required when `paired`.
            prompts (`Sequence[str]`): the prompt of each image.

        Returns:
            `Estimate`: the mean (per-image metrics) or the set-level value (distribution metrics) with its 95% CI.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


_REGISTRY: dict[str, type[Metric]] = {}


def register_metric(name: str, *, higher_is_better: bool | None = None, paired: bool | None = None,
                    per_image: bool | None = None) -> Callable[[type[Metric]], type[Metric]]:
    """Class decorator: registers a `Metric` subclass under `name` with its facts.

    The package's own metrics have their facts in `qsched_search.results.metric_facts.METRICS`; a new metric gives
    them here (all three), and they are added there.
    """
    given = (higher_is_better, paired, per_image)
    known = facts(name) if all(v is None for v in given) else register_facts(MetricFacts(name, *given))

    def decorator(cls: type[Metric]) -> type[Metric]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise QschedError(f"metric name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name, cls.higher_is_better, cls.paired = name, known.higher_is_better, known.paired
        _REGISTRY[name] = cls
        return cls

    return decorator


def _registry() -> dict[str, type[Metric]]:
    # The package's own metrics register when their modules are imported; importing them here makes every lookup
    # see them without `import qsched_search.eval.image_metrics` at each call site.
    import qsched_search.eval.distribution_metrics  # noqa: F401
    import qsched_search.eval.image_metrics  # noqa: F401

    return _REGISTRY


def available_metrics() -> list[str]:
    """The registered metric names, sorted."""
    return sorted(_registry())


def get_metric_class(name: str) -> type[Metric]:
    """The metric class registered under `name`; a miss raises `QschedError` listing the valid names."""
    registry = _registry()
    if name not in registry:
        raise QschedError(f"metric {name!r} is unknown; valid metrics: {', '.join(available_metrics())}")
    return registry[name]


def build_metrics(names: Sequence[str], *, device: str = "cpu", weights_dir: str | Path | None = None) -> list[Metric]:
    """Builds the named metrics, loading their networks once.

    Args:
        names (`Sequence[str]`): metric names from `available_metrics()`, each at most once.
        device (`str`, defaults to `"cpu"`): where their networks run.
        weights_dir (`str` or `Path`, *optional*): the weights folder; defaults to `$QSCHED_WEIGHTS_DIR`, then
            `~/.cache/qsched-search/weights`.

    Returns:
        `list[Metric]`: in the order of `names`.
    """
    if isinstance(names, str):
        raise QschedError(f"names={names!r} is one string; pass a list of metric names, e.g. [{names!r}]")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise QschedError(f"metrics {duplicates} are named more than once in {list(names)}; name each once")
    classes = [get_metric_class(n) for n in names]  # every name is checked before any network loads
    return [cls(device=device, weights_dir=weights_dir) for cls in classes]


def check_images(images: torch.Tensor, argument: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise QschedError(f"{argument} must be a torch.Tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise QschedError(f"{argument} must be a float tensor (N, C, H, W) with C = 1 or 3, got {images.dtype} "
                          f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        raise QschedError(f"{argument} is empty (shape {tuple(images.shape)}); score at least one image")
    if not torch.isfinite(images).all():
        raise QschedError(f"{argument} holds NaN or Inf values; leave unusable images out (image_problems) first")
    low, high = images.min().item(), images.max().item()
    if low < -1e-4 or high > 1 + 1e-4:
        raise QschedError(f"{argument} must lie in [0, 1], got values in [{low:.4f}, {high:.4f}]; pass the "
                          "pipeline's output_type='pt' images (already in [0, 1])")
    return images


def check_pair(images: torch.Tensor, reference: torch.Tensor | None, name: str) -> None:
    check_images(images)
    if reference is None:
        raise QschedError(f"metric {name!r} is paired and needs reference images, got reference=None")
    check_images(reference, "reference")
    if reference.shape != images.shape:
        raise QschedError(f"reference shape {tuple(reference.shape)} differs from images shape "
                          f"{tuple(images.shape)}; {name!r} compares images of the same prompt and seed")


def mean_estimate(values: np.ndarray | torch.Tensor, confidence: float = CONFIDENCE) -> Estimate:
    """The mean of per-image values with a Student-t interval.

    Args:
        values (`np.ndarray` or `torch.Tensor`): one value per image.
        confidence (`float`, defaults to 0.95): the interval's coverage.

    Returns:
        `Estimate`: the interval is NaN for one value or for a mix of infinite and finite values.
    """
    from scipy import stats

    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    n = len(v)
    mean = float(v.mean())
    per_image = tuple(float(x) for x in v)
    if n >= 2 and np.all(v == v[0]):
        return Estimate(mean, mean, mean, n, per_image)  # constant values, including all-infinite PSNR of identical images
    if n < 2 or not np.isfinite(v).all():
        return Estimate(mean, math.nan, math.nan, n, per_image)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n, per_image)
