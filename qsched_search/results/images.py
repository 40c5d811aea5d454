"""Turns generated image tensors into PNG files, the same way for every command (so files compare bit for bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qsched_search.results.io import atomic_path


def to_uint8(image) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) for one channel, (H, W, C) otherwise, rounded to uint8."""
    array = (image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return array[..., 0] if array.shape[-1] == 1 else array


def save_png(image, path: str | Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
