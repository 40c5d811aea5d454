"""Comparing two values of one metric, whose direction (higher or lower is better) the metric decides."""

from __future__ import annotations

__all__ = ["better"]


def better(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether value `a` is strictly better than `b`."""
    return a > b if higher_is_better else a < b
