"""Unusable images (NaN, blank, pure noise): found in every run, never averaged into a metric."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["MAX_UNHEALTHY_FRACTION", "health_failure", "image_problems"]

# More unhealthy images than this fraction fail the whole evaluation instead of being left out of the averages.
MAX_UNHEALTHY_FRACTION = 0.1


def image_problems(images: torch.Tensor) -> list[str | None]:
    """Flags images that must never be averaged into a metric: NaN/Inf, blank, or pure noise.

    Noise is told by the correlation of horizontally neighbouring pixels: near 1 for images, near 0 for i.i.d. noise.
    """
    out: list[str | None] = []
    for img in images.float():
        if not torch.isfinite(img).all():
            out.append("nan")
            continue
        if img.std() < 1e-3:
            out.append("blank")
            continue
        a, b = img[..., :, 1:].flatten(), img[..., :, :-1].flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        out.append("noise" if corr < 0.1 else None)
    return out


def health_failure(problems: Sequence[str | None]) -> str | None:
    """Why a run's images fail as a whole ("N/M images unusable (kinds)"), or None when few enough are unusable."""
    bad = [p for p in problems if p is not None]
    if len(bad) > MAX_UNHEALTHY_FRACTION * len(problems):
        return f"{len(bad)}/{len(problems)} images unusable ({', '.join(sorted(set(bad)))})"
    return None
