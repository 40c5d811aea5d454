"""The metric-weights folder for tests: skipped where never fetched, required in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qsched_search import weights


def default_weights_or_skip() -> Path:
    """The default weights folder; skipped when it was never fetched, except in CI where it must exist."""
    folder = weights.weights_dir(None)
    bad = [s for s in weights.check(folder) if s.status != "ok"]
    if bad:
        reason = f"weights not fetched in {folder} ({', '.join(s.name for s in bad)}); run `qsched weights fetch`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return folder
